"""kernels.dispatch: one routing decision per call, from the default machine profile (the cost
models `batchnorm tune` fitted on the benchmark machine) and the accuracy bound."""

import dataclasses
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
    ((16, 960, 2, 2), torch.contiguous_format, True, False, "numba"),  # aten pays per plane
    ((16, 960, 2, 2), CL, True, False, "aten"),
    ((1, 2, 128, 256), CL, True, False, "numba"),                      # 32768 values a channel
    ((512, 1024), torch.contiguous_format, True, False, "aten"),      # (N, C), short columns
    ((32768, 64), torch.contiguous_format, True, False, "numba"),     # (N, C), long columns
    ((32, 64, 56, 56), torch.contiguous_format, False, False, "aten"),  # eval: one affine pass
    ((32, 64, 56, 56), torch.contiguous_format, False, True, "numba"),  # eval, fused epilogue
    ((32, 64, 56, 56), torch.contiguous_format, True, True, "numba"),
])
def test_default_routes(shape, fmt, training, fused, expected):
    assert profile.current() == profile.defaults()
    assert choose(shape, fmt, training, fused) == expected


def test_the_profile_picks_the_measured_winner_and_interpolates_between():
    def at(values, aten, numba):
        return profile.Timing(values=values, run=16, aten=aten, numba=numba)
    rows = (at(1 << 10, 1.0, 2.0), at(1 << 14, 1.0, 1.1), at(1 << 20, 3.0, 1.0))
    known = profile.Profile(timings={"train/nchw": rows}, machine="test")
    assert known.faster("train", "nchw", torch.empty(4, 16, 4, 4)) == "aten"       # 2^10
    assert known.faster("train", "nchw", torch.empty(4096, 16, 4, 4)) == "numba"   # 2^20
    # nearer the 2^14 point (aten by 10%) than the 2^20 one (ours 3x): log-ratios weighted
    assert known.faster("train", "nchw", torch.empty(128, 16, 4, 4)) == "aten"     # 2^15
    assert known.faster("train", "nchw", torch.empty(1024, 16, 4, 4)) == "numba"   # 2^18
    assert known.faster("train", "nchw", torch.empty(1 << 16, 16, 4, 4)) == "numba"  # beyond


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
        assert profile.current() == profile.defaults()  # no file: the defaults
        # a machine where aten wins every NCHW call and ours every (N, C) one
        timings = dict(profile.defaults().timings)
        timings["train/nchw"] = tuple(dataclasses.replace(t, aten=t.numba / 2)
                                      for t in timings["train/nchw"])
        timings["train/rows"] = tuple(dataclasses.replace(t, numba=t.aten / 2)
                                      for t in timings["train/rows"])
        measured = profile.Profile(timings=timings, machine=profile.machine())
        assert profile.store(measured) == target
        assert profile.current() == measured
        assert choose((32, 64, 56, 56)) == "aten"
        assert choose((512, 1024)) == "numba"
        target.write_text(json.dumps(dict(json.loads(target.read_text()), machine="another")))
        profile.current.cache_clear()
        assert profile.current() == profile.defaults()  # another machine's profile is not used
        target.write_text("{not json")
        profile.current.cache_clear()
        assert profile.current() == profile.defaults()  # an unreadable one neither
    finally:
        profile.current.cache_clear()


def test_accuracy_bounds_the_aten_route_whatever_the_profile_says(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHNORM_PROFILE", str(tmp_path / "p.json"))
    timings = {key: tuple(dataclasses.replace(t, aten=t.numba / 2) for t in rows)
               for key, rows in profile.defaults().timings.items()}
    profile.store(profile.Profile(timings=timings, machine=profile.machine()))
    try:
        assert choose((32, 64, 56, 56), CL) == "numba"
        assert choose((32, 64, 56, 56), CL, dtype=torch.float64) == "aten"
        assert choose((32768, 64)) == "numba"
        assert choose((16384, 64)) == "aten"
    finally:
        profile.current.cache_clear()


def test_tune_measures_a_profile_that_routes_by_it(tmp_path, monkeypatch):
    """`batchnorm tune` times both backends and stores the fitted models; the sweep is shortened
    here, the logic is the same."""
    monkeypatch.setenv("BATCHNORM_PROFILE", str(tmp_path / "p.json"))
    lines = []
    measured = profile.measure(report=lines.append, runs=2, max_values=1 << 16)
    assert measured.machine == profile.machine()
    assert set(measured.timings) == set(profile.defaults().timings)
    assert all(t.aten > 0 and t.numba > 0 for rows in measured.timings.values() for t in rows)
    assert any("aten" in line and "ours" in line for line in lines)
    profile.store(measured)
    assert profile.current() == measured
    profile.current.cache_clear()
