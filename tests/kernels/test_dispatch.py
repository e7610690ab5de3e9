"""kernels.dispatch: one routing decision per call, from the default machine profile."""

import json

import pytest
import torch

import batchnorm
from batchnorm.kernels import dispatch, profile

CL = torch.channels_last


def choose(shape, fmt=torch.contiguous_format, training=True, fused=False, dtype=torch.float32):
    return dispatch.choose(torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt),
                           training=training, fused=fused)


@pytest.mark.parametrize("shape,fmt,training,fused,expected", [
    ((100, 100), torch.contiguous_format, True, False, "aten"),      # small: fixed costs decide
    ((32, 16, 8, 8), CL, True, False, "aten"),                        # small channels-last
    ((32, 64, 56, 56), torch.contiguous_format, True, False, "numba"),
    ((32, 64, 56, 56), CL, True, False, "numba"),                      # aten's sums drift there
    ((512, 1024), torch.contiguous_format, True, False, "aten"),      # (N, C), short columns
    ((32768, 64), torch.contiguous_format, True, False, "numba"),     # (N, C), long columns
    ((32, 64, 56, 56), torch.contiguous_format, False, False, "aten"),  # eval: one affine pass
    ((32, 64, 56, 56), torch.contiguous_format, False, True, "numba"),  # eval, fused epilogue
    ((32, 64, 56, 56), torch.contiguous_format, True, True, "numba"),
])
def test_default_routes(shape, fmt, training, fused, expected):
    assert profile.current() == profile.Profile()
    assert choose(shape, fmt, training, fused) == expected


def test_other_dtypes_and_strides_take_torchs_kernel():
    assert choose((32, 64, 56, 56), dtype=torch.bfloat16) == "aten"
    strided = torch.empty(64, 32, 56, 56).transpose(0, 1)
    assert dispatch.choose(strided, training=True, fused=False) == "aten"


def test_transforms_take_the_composite_math():
    x = torch.empty(32, 64, 56, 56)
    with torch.autograd.forward_ad.dual_level():
        assert dispatch.choose(x, training=True, fused=False) == "composite"
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        assert dispatch.transform(dual) is not None
    assert dispatch.choose(x.to("meta"), training=True, fused=False) == "composite"
    seen = []
    torch.func.vmap(lambda v: seen.append(dispatch.choose(v, training=True, fused=False)) or v)(
        torch.empty(2, 8, 3, 4, 4))
    assert seen == ["composite"]
    # a forced kernel backend does not survive a transform; forced aten (differentiable) does
    with batchnorm.use_backend("numba"), torch.autograd.forward_ad.dual_level():
        assert dispatch.choose(x, training=True, fused=False) == "composite"
    with batchnorm.use_backend("aten"), torch.autograd.forward_ad.dual_level():
        assert dispatch.choose(x, training=True, fused=False) == "aten"


def test_use_backend_forces_nests_and_validates():
    with batchnorm.use_backend("native"):
        assert choose((100, 100)) == "native"
        with batchnorm.use_backend(None):
            assert choose((100, 100)) == "aten"
        assert choose((100, 100)) == "native"
    assert choose((100, 100)) == "aten"
    with pytest.raises(ValueError, match=r"use_backend: expected one of aten, composite.*'cudnn'"):
        with batchnorm.use_backend("cudnn"):
            pass
    with batchnorm.use_backend("numba"), pytest.raises(ValueError, match=r"use_backend\('numba'\)"
                                                                       r".*bfloat16"):
        batchnorm.BatchNorm1d(4)(torch.randn(8, 4, dtype=torch.bfloat16))
    if not torch.cuda.is_available():
        with batchnorm.use_backend("triton"), pytest.raises(ValueError, match="triton"):
            batchnorm.BatchNorm1d(4)(torch.randn(8, 4))


def test_profile_is_stored_per_machine_and_read_back(tmp_path, monkeypatch):
    target = tmp_path / "profile.json"
    monkeypatch.setenv("BATCHNORM_PROFILE", str(target))
    profile.current.cache_clear()
    try:
        assert profile.current() == profile.Profile()  # no file: the defaults
        measured = profile.Profile(small_values=1 << 12, aten_nchw_max_values=1 << 20,
                                   aten_rows_max=64, machine=profile.machine())
        assert profile.store(measured) == target
        assert profile.current() == measured
        assert choose((8, 16, 64, 64)) == "aten"        # NCHW up to 2^20 values: measured faster
        assert choose((512, 1024)) == "numba"           # (N, C) beyond 64 rows
        target.write_text(json.dumps(dict(json.loads(target.read_text()), machine="another")))
        profile.current.cache_clear()
        assert profile.current() == profile.Profile()  # another machine's profile is not used
    finally:
        profile.current.cache_clear()


def test_tune_measures_a_profile_that_routes_by_it(tmp_path, monkeypatch):
    """`batchnorm tune` times both backends and stores what it found; the sweep is shortened
    here, the logic is the same."""
    monkeypatch.setenv("BATCHNORM_PROFILE", str(tmp_path / "p.json"))
    lines = []
    measured = profile.measure(report=lines.append, runs=2, max_values=1 << 16)
    assert measured.machine == profile.machine()
    assert 1 << 12 <= measured.small_values <= 1 << 16
    assert any("aten" in line and "ours" in line for line in lines)
    profile.current.cache_clear()
