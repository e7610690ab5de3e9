"""Bad and hostile inputs across the public API, one table row each.

A row builds the objects under test (`make`), calls the API on them (`call`), and states either
the error (type and the words that tell the user what happened and what to do) or a check of the
correct result. Every row then asserts that no state changed: each module's parameters and
buffers (running statistics, num_batches_tracked), and each tensor the row handed in, compared
bit for bit (NaN included) before and after. Where torch.nn raises RuntimeError for a bad
argument, ours is `batchnorm.ArgumentError`, also a ValueError: those rows ask for both types
(`also`). SyncBatchNorm ranks with mismatched channel counts need two processes:
tests/nn/test_sync.py, test_ranks_with_mismatched_channel_counts.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import cli
from batchnorm import functional as F


@dataclass
class Row:
    id: str
    make: Callable[[], Any]  # the objects under test: modules, tensors, or a tuple/dict of them
    call: Callable[[Any], Any]
    raises: type | tuple[type, ...] | None = None
    match: str = ""
    check: Callable[[Any, Any], None] | None = None  # (objects, result) for the correct result
    also: type | None = None  # a second type the raised exception must have
    changes_state: bool = False  # the correct result updates the objects (checked by `check`)


def _state(obj) -> list[torch.Tensor]:
    """Every tensor the row's objects hold, cloned, in a fixed order."""
    if isinstance(obj, nn.Module):
        return [t.detach().clone() for t in obj.state_dict(keep_vars=True).values()]
    if isinstance(obj, torch.Tensor):
        return [obj.detach().clone()]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _state(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _state(v)]
    return []


def _x(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


def _stats(c=10):
    return {"running_mean": torch.zeros(c), "running_var": torch.ones(c)}


def _eq(expected_fn):
    """A check: the result equals expected_fn(objects) (torch.testing.assert_close)."""
    return lambda objs, result: torch.testing.assert_close(result, expected_fn(objs))


def _all_nan(objs, result):
    assert torch.isnan(result).all()


def _empty_like_input(shape):
    def check(objs, result):
        assert result.shape == shape and result.numel() == 0
    return check


def _cli(argv):
    """(exit code, stderr) of `batchnorm <argv>` through its main()."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def _cli_fails(*words):
    def check(objs, result):
        code, err = result
        assert code == 2, (code, err)
        for w in words:
            assert w in err, (w, err)
    return check


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def _masked():
    return batchnorm.MaskedBatchNorm1d(3)


ONE_VALUE = r"training needs more than one value per channel.*use eval mode"

ROWS = [
    # ---- constructors -------------------------------------------------------------------
    *[Row(f"num_features={v!r}", lambda: None, lambda _, v=v: batchnorm.BatchNorm2d(v), ValueError,
          r"BatchNorm2d: num_features must be a positive int, got")
      for v in (0, -3, 2.5, True, "4", None)],
    *[Row(f"momentum={v!r} constructs, training forward refuses",
          lambda v=v: batchnorm.BatchNorm1d(4, momentum=v), lambda m: m(_x(3, 4)), error,
          rf"BatchNorm1d\(4\): momentum must be {words}")
      for v, error, words in (("0.1", TypeError, r"a float or None.*got str '0.1'"),
                              (float("nan"), ValueError, r"finite.*got nan"),
                              (float("-inf"), ValueError, r"finite.*got -inf"))],
    *[Row(f"momentum={v} extrapolates as torch.nn's", lambda v=v: (
          batchnorm.BatchNorm1d(4, momentum=v), nn.BatchNorm1d(4, momentum=v), _x(3, 4)),
          lambda o: (o[0](o[2]), o[1](o[2])), changes_state=True,
          check=lambda o, r: torch.testing.assert_close(o[0].state_dict(), o[1].state_dict()))
      for v in (-0.1, 1.5)],
    Row("process_group without sync", lambda: None,
        lambda _: batchnorm.BatchNorm2d(4, process_group=object()), ValueError,
        r"process_group is only used with sync=True; pass sync=True or drop process_group"),
    Row("ghost sync", lambda: None, lambda _: batchnorm.GhostBatchNorm2d(4, sync=True),
        TypeError, r"unexpected keyword argument 'sync'"),
    Row("masked sync", lambda: None, lambda _: batchnorm.MaskedBatchNorm2d(4, sync=True),
        ValueError, r"has no sync option"),
    Row("act unknown name", lambda: None, lambda _: batchnorm.BatchNormAct2d(4, act="tanh"),
        ValueError, r"BatchNormAct2d\(4\): unknown activation 'tanh'; use one of identity"),
    Row("act not a module", lambda: None, lambda _: batchnorm.BatchNormAct2d(4, act=42),
        ValueError, r"act must be an activation name, None or an nn.Module, got int 42"),
    Row("act slope not a number", lambda: None,
        lambda _: batchnorm.BatchNormAct2d(4, act="leaky_relu", negative_slope="steep"),
        ValueError, r"negative_slope must be a number, got 'steep'"),
    Row("frozen unfusable act", lambda: None,
        lambda _: batchnorm.FrozenBatchNorm2d(4, act=nn.Tanh()), ValueError,
        r"FrozenBatchNorm2d\(4\): activation Tanh\(\) has no fused kernel"),
    Row("renorm rmax < 1", lambda: None, lambda _: batchnorm.BatchRenorm2d(4, rmax=0.5),
        ValueError, r"BatchRenorm2d\(4\): rmax must be a number >= 1.*got 0.5"),
    Row("ghost virtual_batch_size 0", lambda: None,
        lambda _: batchnorm.GhostBatchNorm2d(4, virtual_batch_size=0), ValueError,
        r"virtual_batch_size must be a positive int.*got 0"),
    Row("domain num_domains 0", lambda: None,
        lambda _: batchnorm.DomainBatchNorm2d(4, num_domains=0), ValueError,
        r"DomainBatchNorm2d\(4\): num_domains must be a positive int, got 0"),
    *[Row(f"eps={v} constructs, training forward refuses", lambda v=v: batchnorm.BatchNorm2d(
          4, eps=v), lambda m: m(_x(2, 4, 3, 3)), ValueError,
          rf"BatchNorm2d\(4\): eps must be positive during training, but got {v}.*use e.g. 1e-5",
          also=RuntimeError)
      for v in (0.0, -1.0)],
    Row("eps=0 in eval works as torch.nn's", lambda: (
        batchnorm.BatchNorm2d(4, eps=0.0).eval(), nn.BatchNorm2d(4, eps=0.0).eval(),
        _x(2, 4, 3, 3)), lambda o: o[0](o[2]), check=_eq(lambda o: o[1](o[2]))),
    Row("eps=-1 in eval", lambda: batchnorm.BatchNorm2d(4, eps=-1.0).eval(),
        lambda m: m(_x(2, 4, 3, 3)), ValueError,
        r"BatchNorm2d\(4\): eps must be non-negative, but got -1.0", also=RuntimeError),
    # ---- module forwards ----------------------------------------------------------------
    Row("2d layer, 3D input", lambda: batchnorm.BatchNorm2d(4), lambda m: m(_x(2, 4, 3)),
        ValueError, r"BatchNorm2d\(4\): expected 4D input \(got 3D input of shape \(2, 4, 3\)\)"),
    Row("1d layer, 4D input", lambda: batchnorm.BatchNorm1d(4), lambda m: m(_x(2, 4, 3, 3)),
        ValueError, r"BatchNorm1d\(4\): expected 2D or 3D input \(got 4D input"),
    Row("3d layer, 4D input", lambda: batchnorm.BatchNorm3d(4), lambda m: m(_x(2, 4, 3, 3)),
        ValueError, r"BatchNorm3d\(4\): expected 5D input \(got 4D input"),
    Row("channel mismatch", lambda: batchnorm.BatchNorm2d(64), lambda m: m(_x(8, 32, 7, 7)),
        ValueError, r"BatchNorm2d\(64\) expected input with 64 channels \(dim 1\), got shape "
                    r"\(8, 32, 7, 7\)", also=RuntimeError),
    Row("channel mismatch in eval", lambda: batchnorm.BatchNorm2d(4).eval(),
        lambda m: m(_x(2, 3, 2, 2)), ValueError, r"expected input with 4 channels",
        also=RuntimeError),
    Row("running_mean swapped for a wrong-sized one", lambda: _set(
        batchnorm.BatchNorm1d(10), running_mean=torch.zeros(9)), lambda m: m(_x(4, 10)),
        RuntimeError, r"BatchNorm1d\(10\): running_mean should contain 10 elements not 9",
        also=ValueError),
    *[Row(f"{dtype} input", lambda: batchnorm.BatchNorm1d(4),
          lambda m, dtype=dtype: m(torch.zeros(3, 4, dtype=dtype)), TypeError,
          rf"BatchNorm1d\(4\): expected a floating-point input, got dtype {dtype}; convert it")
      for dtype in (torch.int64, torch.bool, torch.uint8, torch.complex64)],
    Row("list input", lambda: batchnorm.BatchNorm2d(4), lambda m: m([1.0, 2.0]), TypeError,
        r"BatchNorm2d\(4\): expected input to be a torch.Tensor, got list"),
    Row("training on batch 1 (N, C)", lambda: batchnorm.BatchNorm1d(100),
        lambda m: m(_x(1, 100)), ValueError, r"BatchNorm1d\(100\): " + ONE_VALUE),
    Row("training on 1x1 spatial batch 1", lambda: batchnorm.BatchNorm2d(5),
        lambda m: m(_x(1, 5, 1, 1)), ValueError, ONE_VALUE),
    Row("eval on batch 1 works", lambda: (batchnorm.BatchNorm1d(3).eval(), _x(1, 3)),
        lambda o: o[0](o[1]), check=_eq(lambda o: nn.BatchNorm1d(3).eval()(o[1]))),
    Row("empty batch in training", lambda: batchnorm.BatchNorm2d(4),
        lambda m: m(_x(0, 4, 3, 3)), check=_empty_like_input((0, 4, 3, 3))),
    Row("NaN batch leaves the statistics", lambda: batchnorm.BatchNorm1d(3),
        lambda m: m(torch.full((4, 3), float("nan"))), check=_all_nan),
    Row("inf batch leaves the statistics", lambda: batchnorm.BatchNorm2d(3),
        lambda m: m(torch.full((2, 3, 2, 2), float("inf"))),
        check=lambda o, r: None if not torch.isfinite(r).any() else pytest.fail("finite output")),
    Row("momentum set to NaN after construction", lambda: _set(batchnorm.BatchNorm2d(4),
                                                               momentum=float("nan")),
        lambda m: m(_x(3, 4, 2, 2)), ValueError, r"BatchNorm2d\(4\): momentum must be finite"),
    Row("momentum NaN ignored in eval", lambda: _set(batchnorm.BatchNorm2d(4).eval(),
                                                     momentum=float("nan")),
        lambda m: m(torch.ones(3, 4, 2, 2)), check=lambda m, r: torch.testing.assert_close(
            r, torch.full((3, 4, 2, 2), 1 / (1 + 1e-5) ** 0.5))),
    Row("fp16 batch variance above 65504 is not stored", lambda: batchnorm.BatchNorm1d(
        2, momentum=1.0).half(), lambda m: _warned(lambda: m((_x(64, 2) * 400).half())),
        check=lambda m, w: _assert_words(w, "BatchNorm1d(2): the batch statistics are not finite "
                                            "or overflow the running statistics' dtype",
                                         "left unchanged")),
    Row("residual of the wrong shape", lambda: batchnorm.BatchNormAct2d(4),
        lambda m: m(_x(2, 4, 3, 3), _x(2, 4, 3, 2)), ValueError,
        r"residual must have the input's shape \(2, 4, 3, 3\), got \(2, 4, 3, 2\)"),
    Row("masked: float mask", _masked, lambda m: m(_x(2, 3, 4), torch.ones(2, 4)), TypeError,
        r"MaskedBatchNorm1d\(3\): mask must be a bool tensor.*got torch.float32.*mask.bool\(\)"),
    Row("masked: mask of the wrong shape", _masked,
        lambda m: m(_x(2, 3, 4), torch.ones(2, 5, dtype=torch.bool)), ValueError,
        r"mask must be broadcastable to the input's batch and spatial shape"),
    Row("masked: mask with a channel dim", _masked,
        lambda m: m(_x(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.bool)), ValueError,
        r"it has no channel dimension"),
    Row("masked: one valid position", _masked,
        lambda m: m(_x(2, 3, 4), torch.arange(8).reshape(2, 4) == 0), ValueError,
        r"the mask leaves one valid position; use eval mode"),
    Row("masked: all padding", _masked,
        lambda m: m(_x(2, 3, 4), torch.zeros(2, 4, dtype=torch.bool)),
        check=lambda m, r: torch.testing.assert_close(r, torch.zeros(2, 3, 4))),
    Row("domain out of range", lambda: batchnorm.DomainBatchNorm2d(4, num_domains=2),
        lambda m: m(_x(2, 4, 3, 3), domain=5), IndexError,
        r"DomainBatchNorm2d\(4\): domain 5 is out of range for num_domains=2"),
    Row("frozen wrong rank", lambda: batchnorm.FrozenBatchNorm2d(4), lambda m: m(_x(2, 4, 3)),
        ValueError, r"FrozenBatchNorm2d\(4\): expected 4D input \(got 3D input"),
    Row("renorm batch 1", lambda: batchnorm.BatchRenorm1d(3), lambda m: m(_x(1, 3)), ValueError,
        r"more than one value per channel"),
    # ---- functional ---------------------------------------------------------------------
    Row("F: running_mean without running_var", lambda: _stats(),
        lambda s: F.batch_norm(_x(2, 10), s["running_mean"], None, training=True), ValueError,
        r"running_mean and running_var must both be given or both be None"),
    Row("F: momentum None without num_batches_tracked", lambda: _stats(),
        lambda s: F.batch_norm(_x(2, 10), s["running_mean"], s["running_var"], training=True,
                               momentum=None), ValueError, r"momentum=None.*needs num_batches_tracked"),
    Row("F: unknown activation", lambda: _stats(),
        lambda s: F.batch_norm(_x(2, 10), s["running_mean"], s["running_var"], training=True,
                               activation="tanh"), ValueError, r"activation must be one of"),
    Row("F: running_mean on another device", lambda: None,
        lambda _: F.batch_norm(_x(2, 3), torch.zeros(3, device="meta"), torch.ones(3)),
        ValueError, r"running_mean is on meta but the input is on cpu"),
    Row("F: 1-D input", lambda: _stats(5),
        lambda s: F.batch_norm(_x(5), s["running_mean"], s["running_var"]), ValueError,
        r"expected input of shape \(N, C, \*spatial\) with at least 2 dimensions"),
    Row("F: (0,) input with (3,) statistics", lambda: _stats(3),
        lambda s: F.batch_norm(torch.zeros(0), s["running_mean"], s["running_var"]), RuntimeError,
        r"batch_norm expected input with 3 channels \(dim 1\), got shape \(0,\)",
        also=ValueError),
    Row("F: momentum -1 in training extrapolates as torch's", lambda: (_stats(), _stats(),
                                                                       _x(4, 10)),
        lambda o: (F.batch_norm(o[2], **o[0], training=True, momentum=-1.0),
                   nn.functional.batch_norm(o[2], **o[1], training=True, momentum=-1.0)),
        check=lambda o, r: torch.testing.assert_close((r[0], o[0]), (r[1], o[1])),
        changes_state=True),
    Row("F: eps -1 in eval", lambda: _stats(),
        lambda s: F.batch_norm(_x(2, 10), s["running_mean"], s["running_var"], eps=-1.0),
        ValueError, r"batch_norm: eps must be non-negative, but got -1.0", also=RuntimeError),
    Row("F: eps '1e-5'", lambda: _stats(),
        lambda s: F.batch_norm(_x(2, 10), s["running_mean"], s["running_var"], eps="1e-5"),
        TypeError, r"batch_norm: eps must be a float, got str '1e-5'"),
    Row("F: training on batch 1 without statistics", lambda: None,
        lambda _: F.batch_norm(_x(1, 3), None, None, training=True), ValueError, ONE_VALUE),
    Row("F: eps 0 in training", lambda: _stats(),
        lambda s: F.batch_norm(_x(2, 10), s["running_mean"], s["running_var"], training=True,
                               eps=0.0), ValueError,
        r"batch_norm: eps must be positive during training, but got 0.0", also=RuntimeError),
    *[Row(f"F: (0,) input, training={t}", lambda: {"running_mean": torch.zeros(0),
                                                   "running_var": torch.ones(0)},
          lambda s, t=t: F.batch_norm(torch.zeros(0), s["running_mean"], s["running_var"],
                                      training=t), check=_empty_like_input((0,)))
      for t in (True, False)],
    Row("F: masked (0,) input", lambda: None,
        lambda _: F.masked_batch_norm(torch.zeros(0), torch.zeros(0, dtype=torch.bool), None, None,
                                      training=True), check=_empty_like_input((0,))),
    *[Row(f"F: {arg} of 9 for 10 channels", lambda: _stats(),
          lambda s, arg=arg: F.batch_norm(_x(2, 10), **{**s, arg: torch.ones(9)}, training=True),
          ValueError, rf"^batch_norm: {arg} should contain 10 elements not 9 \(one per channel "
                      rf"of the input of shape \(2, 10\)\)$", also=RuntimeError)
      for arg in ("running_mean", "running_var")],
    *[Row(f"F: {arg} of 9 for 10 channels", lambda: _stats(),
          lambda s, arg=arg: F.batch_norm(_x(2, 10), **s, **{arg: torch.ones(9)}),
          ValueError, rf"^batch_norm: {arg} should contain 10 elements not 9", also=RuntimeError)
      for arg in ("weight", "bias")],
    # ---- tools --------------------------------------------------------------------------
    Row("convert: unknown target", _model, lambda m: batchnorm.convert(m, to="nope"), ValueError,
        r"convert: unknown target 'nope'; valid targets are .*'act'.*'batchnorm'"),
    Row("convert: SyncBatchNorm without dim", lambda: nn.Sequential(nn.SyncBatchNorm(4)),
        lambda m: batchnorm.convert(m), ValueError, r"pass dim=1, 2 or 3"),
    Row("convert: dim 4", lambda: nn.Sequential(nn.SyncBatchNorm(4)),
        lambda m: batchnorm.convert(m, dim=4), ValueError, r"dim must be 1, 2 or 3, got 4"),
    Row("convert: frozen without statistics",
        lambda: nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)),
        lambda m: batchnorm.convert(m, to="frozen"), ValueError, r"nothing to freeze"),
    Row("freeze: without statistics",
        lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
        lambda m: batchnorm.freeze(m), ValueError,
        r"freeze: 1 \(BatchNorm2d\) has no running statistics \(track_running_stats=False\)"),
    Row("fold: training mode", lambda: _model().train(),
        lambda m: batchnorm.fold(m, _x(2, 3, 8, 8)), ValueError,
        r"fold: the model has batch norms in training mode.*call model.eval\(\) first"),
    Row("recalibrate: num_batches 0", _model,
        lambda m: batchnorm.recalibrate(m, [_x(4, 3, 6, 6)], 0, progress=False), ValueError,
        r"recalibrate: num_batches must be a positive int or None, got 0"),
    Row("recalibrate: num_batches True", _model,
        lambda m: batchnorm.recalibrate(m, [_x(4, 3, 6, 6)], True, progress=False), ValueError,
        r"num_batches must be a positive int or None, got True"),
    Row("recalibrate: empty batch tuple", _model,
        lambda m: batchnorm.recalibrate(m, [()], progress=False), ValueError,
        r"got an empty batch tuple; expected \(inputs, ...\) or a tensor"),
    Row("recalibrate: one value per channel",
        lambda: nn.Sequential(nn.Linear(3, 4), batchnorm.BatchNorm1d(4)),
        lambda m: batchnorm.recalibrate(m, [_x(1, 3)], progress=False), ValueError,
        r"BatchNorm1d\(4\): " + ONE_VALUE),
    Row("recalibrate: every batch NaN", _model,
        lambda m: _warned(lambda: batchnorm.recalibrate(
            m, [torch.full((2, 3, 6, 6), float("nan"))], progress=False)),
        check=lambda m, w: _assert_words(w, "batch 0; that batch is left out",
                                         "saw no input in the given batches")),
    Row("adapt: num_batches -1", _model,
        lambda m: batchnorm.adapt(m, [_x(4, 3, 6, 6)], -1, progress=False), ValueError,
        r"num_batches must be a positive int or None, got -1"),
    Row("track: every 0", _model, lambda m: batchnorm.track(m, every=0).__enter__(), ValueError,
        r"track: every must be a positive int, got 0"),
    Row("track: unknown module name", _model,
        lambda m: batchnorm.track(m, ["nope"]).__enter__(), ValueError,
        r"track: no module named 'nope' in the model; names are as in model.named_modules\(\)"),
    Row("eval_gap: num_batches '3'", _model,
        lambda m: batchnorm.eval_gap(m, [_x(4, 3, 6, 6)], "3"), ValueError,
        r"eval_gap: num_batches must be a positive int or None, got '3'"),
    Row("export_onnx: training mode", lambda: _model().train(),
        lambda m: batchnorm.export_onnx(m, (_x(2, 3, 8, 8),), "never-written.onnx"),
        ValueError, r"eval"),
    # ---- the lab CLI --------------------------------------------------------------------
    Row("cli: unknown command", lambda: None, lambda _: _cli(["nope"]),
        check=_cli_fails("invalid choice: 'nope'")),
    Row("cli: lab --data missing path", lambda: None,
        lambda _: _cli(["lab", "--data", "/nonexistent/data"]),
        check=_cli_fails("--data: expected mnist1d, digits, or an existing path",
                         "no such file or directory")),
    Row("cli: lab --seeds 0", lambda: None, lambda _: _cli(["lab", "--seeds", "0"]),
        check=_cli_fails("--seeds: expected a positive number, got 0")),
    Row("cli: lab --jobs -2", lambda: None, lambda _: _cli(["lab", "--jobs", "-2"]),
        check=_cli_fails("--jobs: expected a positive number")),
    Row("cli: lab --claims nope", lambda: None, lambda _: _cli(["lab", "--claims", "nope"]),
        check=_cli_fails("--claims: expected any of convergence", "got nope")),
    Row("cli: lab --seeds two", lambda: None, lambda _: _cli(["lab", "--seeds", "two"]),
        check=_cli_fails("--seeds", "invalid int value: 'two'")),
]


def _set(module, **attrs):
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


def _warned(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


def _assert_words(messages, *words):
    for w in words:
        assert any(w in m for m in messages), (w, messages)


def _params():
    for row in ROWS:
        yield pytest.param(row, id=row.id)


def test_table_has_at_least_60_rows():
    assert len(ROWS) >= 60
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", list(_params()))
def test_bad_input(row: Row):
    torch.manual_seed(0)
    objs = row.make()
    before = _state(objs)
    if row.raises is not None:
        with pytest.raises(row.raises, match=row.match) as info:
            row.call(objs)
        if row.also is not None:
            assert isinstance(info.value, row.also), type(info.value).__mro__
    else:
        result = row.call(objs)
        row.check(objs, result)
        if row.changes_state:
            return
    after = _state(objs)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
