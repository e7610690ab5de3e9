"""The Numba CPU kernels (`batchnorm.kernels.cpu`) against the float64 reference and torch.nn.

Every layout the kernels walk ("nchw": contiguous with spatial > 1; "rows": (N, C), channels-last,
spatial 1x1), every epilogue with and without the residual, awkward sizes (C=1, 1x1 spatial, N=1
with spatial > 1, primes, sizes that are not a multiple of the vector width or of the kernels'
chunk), and shapes large enough to be split between two threads. The reference gradients come from
autograd through `batchnorm.reference` in float64.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import functional as F
from batchnorm import kernels, reference
from batchnorm.kernels import cpu, cpu_memory, native

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
ACTS = kernels.ACTIVATIONS
SLOPE = 0.2

# (shape, memory format): each walks a different path through the kernels (`cpu._plan`; checked
# by test_the_cases_cover_every_path).
SHAPES = [
    ((2, 3, 5, 7), torch.contiguous_format),        # lanes, primes
    ((1, 5, 4, 3), torch.contiguous_format),        # lanes, N=1 with spatial > 1
    ((4, 1, 3, 3), torch.contiguous_format),        # lanes, C=1
    ((3, 2, 37, 41), torch.contiguous_format),      # nchw, rows longer than the 1024-value chunk
    ((4, 1, 32, 32), torch.contiguous_format),      # nchw, C=1
    ((1, 3, 24, 24), torch.contiguous_format),      # nchw, N=1
    ((5, 7, 13), torch.contiguous_format),          # lanes, BatchNorm1d (N, C, L)
    ((2, 3, 2, 3, 5), torch.contiguous_format),     # lanes, 5d
    ((13, 33), torch.contiguous_format),            # rows, (N, C)
    ((3, 4, 1, 1), torch.contiguous_format),        # rows, spatial 1x1
    ((2, 3, 5, 7), torch.channels_last),            # rows, channels-last
    ((1, 11, 3, 2), torch.channels_last),           # rows, N=1, C prime
    ((2, 3, 2, 3, 5), torch.channels_last_3d),      # rows, channels-last 3d
    ((2, 1100, 3, 1), torch.channels_last),         # lanes, channels-last, more channels than the chunk
    ((6, 2, 23, 25), torch.contiguous_format),      # nchw, four rows per loop and two more
]
# Large enough (>= 2 * 65536 values) to be split between two threads.
BIG = [((4, 8, 64, 65), torch.contiguous_format),   # nchw
       ((4, 8, 64, 65), torch.channels_last),       # rows
       ((1030, 130), torch.contiguous_format),      # rows
       ((130, 75, 4, 4), torch.contiguous_format),  # lanes, one ragged group per thread
       ((8, 40, 20, 20), torch.contiguous_format),  # lanes, several groups per thread
       ((2, 2048, 8, 8), torch.channels_last)]      # lanes, channels-last


@pytest.fixture(autouse=True)
def numba_kernels_on_two_threads(monkeypatch):
    """Every batch here runs on the Numba kernels (`use_backend("numba")`), and every epilogue
    is fused (`cpu.FUSED_ACTIVATIONS`). BIG cases split between two threads only if torch allows
    two (the lab's conftest sets one for the whole process when its tests share the worker)."""
    monkeypatch.setattr(cpu, "FUSED_ACTIVATIONS", ACTS)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    with batchnorm.use_backend("numba"):
        yield
    torch.set_num_threads(before)


def ids(cases):
    return [f"{'x'.join(map(str, s))}-{str(f).split('.')[-1]}" for s, f in cases]


def make(shape, fmt, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    x = x.contiguous(memory_format=fmt)
    weight = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    z = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    return x, weight, bias, z, dy


def reference_step(x, weight, bias, z, dy, act, training, mean=None, var=None, eps=1e-5):
    """Float64 forward by the textbook formulas and the gradients autograd takes through them."""
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_() if weight is not None else None
    b64 = bias.double().requires_grad_() if bias is not None else None
    z64 = z.double().requires_grad_() if z is not None else None
    if training:
        mean, var = reference.batch_stats(x64)
    pre = reference.normalize(x64, mean, var, w64, b64, eps)
    if z64 is not None:
        pre = pre + z64
    y = reference.activate(pre, act, SLOPE)
    leaves = {name: t for name, t in zip(("x", "weight", "bias", "z"), (x64, w64, b64, z64))
              if t is not None}
    grads = torch.autograd.grad(y, list(leaves.values()), dy.double())
    return y.detach(), dict(zip(leaves, grads))


def assert_scaled(actual, expected, tol, what):
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x scale {scale:.3g}"


def run_ours(x, weight, bias, z, dy, act, training, running=None, eps=1e-5):
    x = x.detach().requires_grad_()
    params = [t.detach().requires_grad_() for t in (weight, bias)]
    zz = z.detach().requires_grad_() if z is not None else None
    rm, rv = running if running is not None else (None, None)
    y = F.batch_norm(x, rm, rv, params[0], params[1], training, 0.1, eps, residual=zz,
                     activation=act, negative_slope=SLOPE)
    y.backward(dy)
    grads = {"x": x.grad, "weight": params[0].grad, "bias": params[1].grad}
    if zz is not None:
        grads["z"] = zz.grad
    return y, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape,fmt", SHAPES + BIG, ids=ids(SHAPES + BIG))
def test_training_forward_and_backward_match_the_float64_reference(shape, fmt, dtype):
    x, weight, bias, z, dy = make(shape, fmt, dtype)
    assert kernels.implementation(x) is cpu
    tol = TOL[dtype]
    for act in ACTS:
        for residual in (None, z):
            what = f"{act}, residual={residual is not None}"
            y, grads = run_ours(x, weight, bias, residual, dy, act, True)
            y_ref, grads_ref = reference_step(x, weight, bias, residual, dy, act, True)
            assert y.dtype == dtype and y.stride() == x.stride(), what
            assert_scaled(y, y_ref, tol, f"y ({what})")
            for name, g in grads_ref.items():
                assert_scaled(grads[name], g, tol, f"d{name} ({what})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape,fmt", SHAPES[:1] + SHAPES[6:9] + BIG[:2],
                         ids=ids(SHAPES[:1] + SHAPES[6:9] + BIG[:2]))
def test_eval_forward_and_backward_match_the_float64_reference(shape, fmt, dtype):
    x, weight, bias, z, dy = make(shape, fmt, dtype)
    c = shape[1]
    rm = torch.linspace(2, 4, c, dtype=dtype)
    rv = torch.linspace(0.5, 5, c, dtype=dtype)
    for act in ACTS:
        for residual in (None, z):
            what = f"{act}, residual={residual is not None}"
            y, grads = run_ours(x, weight, bias, residual, dy, act, False, (rm, rv))
            y_ref, grads_ref = reference_step(x, weight, bias, residual, dy, act, False,
                                              rm.double(), rv.double())
            assert_scaled(y, y_ref, TOL[dtype], f"y ({what})")
            for name, g in grads_ref.items():
                assert_scaled(grads[name], g, TOL[dtype], f"d{name} ({what})")


@pytest.mark.parametrize("shape,fmt", [SHAPES[0], SHAPES[6], SHAPES[8], BIG[0], BIG[1]],
                         ids=ids([SHAPES[0], SHAPES[6], SHAPES[8], BIG[0], BIG[1]]))
def test_statistics_match_the_reference_and_survive_a_mean_that_dwarfs_the_std(shape, fmt):
    x = (torch.randn(shape, dtype=torch.float64) * 1e-2 + 1e4).float().contiguous(memory_format=fmt)
    count, mean, m2 = cpu.stats(x)
    mean_ref, var_ref = reference.batch_stats(x)
    assert torch.equal(count, torch.full_like(count, x.numel() // shape[1]))
    assert_scaled(mean, mean_ref, 1e-6, "mean")
    assert ((m2 / count).double() - var_ref).abs().max() <= 1e-3 * var_ref.min()
    y, count2, mean2, m22, invstd = cpu.train_forward(x, None, None, None, 1e-5, "identity", 0.0)
    assert torch.equal(mean2, mean) and torch.equal(m22, m2)
    assert_scaled(invstd, 1 / torch.sqrt(var_ref + 1e-5), 1e-5, "invstd")


STEP_CASES = [SHAPES[0], SHAPES[3], SHAPES[8], SHAPES[10]]  # lanes, nchw, rows, rows channels-last


@pytest.mark.parametrize("shape,fmt", STEP_CASES, ids=ids(STEP_CASES))
def test_fp32_output_holds_its_tolerance_when_the_mean_is_500_stds(shape, fmt):
    # The normalize computes a*(x - mean) + b: the folded a*x + (b - a*mean) cancels in fp32
    # (measured 1.5e-5 of the output scale on the rows walk here; now 5.6e-6). Beyond ~1000 stds
    # the fp32 mean's own rounding (|mean| * 6e-8) takes over, in the output and in the
    # gradients' sum(dy*x_hat), as in torch.nn; that needs the mean carried in more than fp32.
    x, weight, bias, z, dy = make(shape, fmt, torch.float32)
    x = x + 500 * 2  # std 2
    for act in ("identity", "relu", "gelu_tanh"):
        y, _ = run_ours(x, weight, bias, None, dy, act, True)
        y_ref, _ = reference_step(x, weight, bias, None, dy, act, True)
        assert_scaled(y, y_ref, TOL[torch.float32], f"y ({act})")


@pytest.mark.parametrize("shape,fmt", STEP_CASES, ids=ids(STEP_CASES))
def test_training_step_matches_torch_nn(shape, fmt):
    import batchnorm
    layer = {2: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}[len(shape)](shape[1])
    ref = {2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[len(shape)](shape[1])
    x, *_, dy = make(shape, fmt, torch.float32)
    for _ in range(2):
        xs = [x.detach().clone().requires_grad_() for _ in range(2)]
        ys = [layer(xs[0]), ref(xs[1])]
        for y in ys:
            y.backward(dy)
        assert_scaled(ys[0], ys[1].detach().double(), 1e-5, "y")
        assert_scaled(xs[0].grad, xs[1].grad.double(), 1e-5, "dx")
        for name in ("weight", "bias"):
            assert_scaled(getattr(layer, name).grad, getattr(ref, name).grad.double(), 1e-5, name)
    for name in ("running_mean", "running_var"):
        assert_scaled(getattr(layer, name), getattr(ref, name).double(), 1e-5, name)


@pytest.mark.parametrize("shape,fmt", [((3, 2, 4, 5), torch.contiguous_format),
                                       ((3, 2, 4, 5), torch.channels_last),
                                       ((6, 3), torch.contiguous_format)],
                         ids=["nchw", "channels-last", "rows"])
@pytest.mark.parametrize("act", ["identity", "silu"])
def test_gradcheck_in_float64_through_the_numba_path(shape, fmt, act):
    x, weight, bias, z, _ = make(shape, fmt, torch.float64)
    assert kernels.implementation(x) is cpu
    inputs = [t.detach().requires_grad_() for t in (x, weight, bias, z)]

    def fn(x, weight, bias, z):
        return F.batch_norm(x, None, None, weight, bias, True, residual=z, activation=act)

    assert torch.autograd.gradcheck(fn, inputs)


def test_backward_with_given_reductions_uses_them():
    """SyncBatchNorm's path: sum(dy), sum(dy*x_hat) and the count are passed in."""
    x, weight, bias, _, dy = make((4, 3, 5, 6), torch.contiguous_format, torch.float64)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xx, dyy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
        _, _, mean, _, invstd = cpu.train_forward(xx, weight, bias, None, 1e-5, "identity", 0.0)
        sum_dy = torch.arange(3, dtype=torch.float64)
        sum_dy_xhat = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
        count = torch.full((3,), 1000.0, dtype=torch.float64)
        ours = cpu.backward(dyy, xx, mean, invstd, weight, bias, None, None, "identity", 0.0, True,
                            count, sum_dy, sum_dy_xhat, True)
        ref = native.backward(dyy, xx, mean, invstd, weight, bias, None, None, "identity", 0.0,
                              True, count, sum_dy, sum_dy_xhat, True)
        for a, b in zip(ours[:3], ref[:3]):
            assert_scaled(a, b, 1e-12, "given reductions")


def test_gradient_in_another_memory_format_and_expanded():
    x, weight, bias, _, _ = make((2, 3, 4, 5), torch.channels_last, torch.float32)
    x.requires_grad_()
    y = F.batch_norm(x, None, None, weight, bias, True, activation="relu")
    y.sum().backward()  # dy is an expanded tensor of ones
    x_ref = x.detach().double().requires_grad_()
    y_ref = reference.activate(reference.normalize(x_ref, *reference.batch_stats(x_ref),
                                                   weight, bias, 1e-5), "relu")
    y_ref.sum().backward()
    assert_scaled(x.grad, x_ref.grad, 1e-5, "dx")


def test_non_finite_input_gives_non_finite_statistics_and_output():
    x = torch.randn(4, 3, 5, 5)
    x[1, 2, 3, 3] = float("nan")
    y, count, mean, m2, invstd = cpu.train_forward(x, None, None, None, 1e-5, "relu", 0.0)
    assert mean[:2].isfinite().all() and not mean[2].isfinite()
    assert y[:, 2].isnan().all() and y[:, :2].isfinite().all()


def test_these_tests_reach_the_numba_kernels(monkeypatch):
    calls = []
    for name in ("train_forward", "backward"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, real=real, name=name: (calls.append(name),
                                                                          real(*a))[1])
    x, weight, bias, z, dy = make(*SHAPES[0], torch.float32)
    run_ours(x, weight, bias, z, dy, "relu", True)
    assert calls == ["train_forward", "backward"]


def test_the_cases_cover_every_path():
    plans = {(cpu._plan(make(s, f, torch.float32)[0])[0], len(cpu._ranges(s[1], math.prod(s))))
             for s, f in SHAPES + BIG}
    assert plans == {(kind, threads) for kind in ("nchw", "lanes", "rows") for threads in (1, 2)}


@pytest.mark.skipif(cpu_memory._MADVISE is None, reason="no transparent huge pages on this system")
def test_large_outputs_are_allowed_huge_pages():
    x = torch.randn(4, 64, 64, 64).contiguous(memory_format=torch.channels_last)  # 4 MB
    y = cpu_memory.empty_like(x)
    assert y.shape == x.shape and y.stride() == x.stride() and y.dtype == x.dtype
    start = y.data_ptr()
    with open("/proc/self/smaps") as smaps:
        regions = smaps.read().split("\n")
    flags = []  # the VmFlags of every mapping that holds part of y
    for i, line in enumerate(regions):
        if "-" in line.split(" ", 1)[0]:
            lo, hi = (int(v, 16) for v in line.split(" ", 1)[0].split("-"))
            current = lo < start + x.numel() * 4 and hi > start
        elif line.startswith("VmFlags:") and current:
            flags.append(line.split()[1:])
    assert any("hg" in f for f in flags), flags  # "hg": madvise(MADV_HUGEPAGE) took


def test_large_outputs_reuse_the_memory_of_freed_ones(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_free", type(cpu_memory._free)(list))
    monkeypatch.setattr(cpu_memory, "_free_bytes", 0)
    x = torch.randn(4, 64, 64, 64).contiguous(memory_format=torch.channels_last)  # 4 MB
    y = cpu_memory.empty_like(x)
    assert y.shape == x.shape and y.stride() == x.stride() and y.dtype == x.dtype
    first, view = y.data_ptr(), y[1:]
    del y
    other = cpu_memory.empty_like(x)
    assert other.data_ptr() != first  # a view still holds the block
    del view
    assert cpu_memory._free_bytes == 4 << 20
    again = cpu_memory.empty_like(x)
    assert again.data_ptr() == first and cpu_memory._free_bytes == 0
    del other, again
    assert cpu_memory._free_bytes == 8 << 20
    cpu_memory.empty_cache()
    assert cpu_memory._free_bytes == 0 and not any(cpu_memory._free.values())
    monkeypatch.setattr(cpu_memory, "max_free_bytes", 6 << 20)
    blocks = [cpu_memory.empty_like(x) for _ in range(2)]
    del blocks
    assert cpu_memory._free_bytes == 4 << 20  # the second freed block went back to the OS
    small = torch.randn(100, 100)
    assert cpu_memory.empty_like(small).shape == small.shape and cpu_memory._free_bytes == 4 << 20


def test_training_steps_on_reused_memory_match_torch_nn(monkeypatch):
    # 4 MB outputs (y, dx) come from the pool; the second step gets the first step's blocks back.
    import batchnorm
    monkeypatch.setattr(cpu_memory, "_free", type(cpu_memory._free)(list))
    monkeypatch.setattr(cpu_memory, "_free_bytes", 0)
    ours, ref = batchnorm.BatchNorm2d(64), torch.nn.BatchNorm2d(64)
    for seed in (0, 1):
        x, *_, dy = make((16, 64, 32, 32), torch.contiguous_format, torch.float32, seed)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [ours(xs[0]), ref(xs[1])]
        for y in ys:
            y.backward(dy)
        assert_scaled(ys[0], ys[1].detach().double(), 1e-5, f"y, step {seed}")
        assert_scaled(xs[0].grad, xs[1].grad.double(), 1e-5, f"dx, step {seed}")
        del xs, ys
        assert cpu_memory._free_bytes == 8 << 20  # y and dx back in the pool


def test_the_loops_import_without_torch():
    # The compiling child (`cpu._CHILD`) imports cpu_loops alone, so that it starts fast.
    code = cpu._CHILD.split("from batchnorm.kernels import")[0].format(
        packages={"batchnorm": os.path.dirname(os.path.dirname(cpu.__file__)),
                  "batchnorm.kernels": os.path.dirname(cpu.__file__)}, marker="")
    code += "from batchnorm.kernels import cpu_loops\nprint('torch' in sys.modules)\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False"]


def test_slow_epilogues_run_as_torch_ops_after_the_kernel(monkeypatch):
    # Numba's exp/tanh are scalar calls: silu and gelu_tanh go to torch's vectorized ops; the
    # cheap epilogues stay fused. Both give the reference values.
    monkeypatch.setattr(cpu, "FUSED_ACTIVATIONS", ("identity", "relu", "leaky_relu"))
    x, weight, bias, z, dy = make((4, 6, 9, 9), torch.contiguous_format, torch.float32)
    fused_node = type(F.batch_norm(x.requires_grad_(), None, None, weight, bias, True,
                                   activation="relu").grad_fn)
    for act in ACTS:
        y, grads = run_ours(x, weight, bias, z, dy, act, True)
        y_ref, grads_ref = reference_step(x, weight, bias, z, dy, act, True)
        assert_scaled(y, y_ref, TOL[torch.float32], f"y ({act})")
        for name, g in grads_ref.items():
            assert_scaled(grads[name], g, TOL[torch.float32], f"d{name} ({act})")
        xx = x.detach().requires_grad_()
        node = type(F.batch_norm(xx, None, None, weight, bias, True, residual=z,
                                 activation=act).grad_fn)
        assert (node is fused_node) == (act in ("identity", "relu", "leaky_relu")), (act, node)


def test_dispatch_table():
    assert kernels.implementation(torch.randn(2, 3, 4, 4)) is cpu
    assert kernels.implementation(torch.randn(2, 3, 4, 4, dtype=torch.float64)) is cpu
    assert kernels.implementation(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)) is cpu
    assert kernels.implementation(torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)) is native
    assert kernels.implementation(torch.randn(2, 3, 4, 4, dtype=torch.float16)) is native
    assert kernels.implementation(torch.randn(4, 3, 4, 2).transpose(0, 3)) is native  # strided


def test_eager_eval_without_epilogue_runs_torchs_kernel():
    x, weight, bias, z, _ = make((4, 3, 5, 6), torch.channels_last, torch.float32)
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    expected = torch.nn.functional.batch_norm(x, mean, var, weight, bias, False)
    with batchnorm.use_backend(None):
        assert torch.equal(F.batch_norm(x, mean, var, weight, bias, False), expected)
    # with an epilogue it is ours (fused), equal to rounding
    fused = F.batch_norm(x, mean, var, weight, bias, False, residual=z, activation="relu")
    assert_scaled(fused, torch.relu(expected + z).double(), 1e-5, "fused eval")


@pytest.mark.parametrize("threads", [1, 2])
def test_torch_thread_setting_is_left_alone(threads):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        x, weight, bias, _, dy = make(*BIG[0], torch.float32)
        run_ours(x, weight, bias, None, dy, "relu", True)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


class _NormalizeDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        x = make(*BIG[0], torch.float32, seed=i)[0]
        return F.batch_norm(x, None, None, training=True, activation="relu")


def test_fork_based_dataloader_workers():
    # The parent uses the kernels (and their thread pool) first, as a training script does.
    parent = [_NormalizeDataset()[i] for i in range(4)]
    loader = torch.utils.data.DataLoader(_NormalizeDataset(), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=120)
    for i, y in enumerate(loader):
        assert torch.allclose(y, parent[i], atol=1e-5)


def test_a_forked_child_runs_the_kernels_on_two_threads():
    """GNU OpenMP hangs in a forked child whose parent used it; the kernels must not (they fall
    back to their own pool there). The child calls only the kernels: torch's own parallel ops
    would hang there themselves."""
    x, weight, bias, _, _ = make(*BIG[0], torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = cpu.train_forward(x, weight, bias, None, 1e-5, "relu", 0.0)[0].numpy()
        pid = os.fork()
        if pid == 0:
            y = cpu.train_forward(x, weight, bias, None, 1e-5, "relu", 0.0)[0]
            os._exit(0 if np.array_equal(y.numpy(), expected) else 1)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, "child hung or differed"
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch runs its ops on another thread pool")
def test_kernels_run_on_torchs_openmp_team_and_errors_reach_the_caller():
    team = cpu._openmp_team()
    assert team is not None
    seen = []
    team(lambda i: seen.append(i), [(0,), (1,), (2,)])
    assert sorted(seen) == [0, 1, 2]

    def fail(i):
        raise ValueError(f"call {i}")
    with pytest.raises(ValueError, match="call"):
        team(fail, [(0,), (1,)])


def test_compiled_fullgraph_runs_the_numba_path():
    x, weight, bias, z, dy = make((4, 3, 5, 5), torch.contiguous_format, torch.float32)

    def step(x, weight, bias, z):
        return F.batch_norm(x, None, None, weight, bias, True, residual=z, activation="relu")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, z)]
    y = compiled(*leaves)
    y.backward(dy)
    y_ref, grads_ref = reference_step(x, weight, bias, z, dy, "relu", True)
    assert_scaled(y, y_ref, 1e-5, "y")
    for leaf, name in zip(leaves, ("x", "weight", "bias", "z")):
        assert_scaled(leaf.grad, grads_ref[name], 1e-5, f"d{name}")


def test_read_only_package_caches_in_a_user_directory():
    """A read-only install compiles once into a user cache, and the next process loads it."""
    import batchnorm
    package = os.path.dirname(batchnorm.__file__)
    root = tempfile.mkdtemp(prefix="batchnorm-readonly-")
    try:
        install, home = os.path.join(root, "site"), os.path.join(root, "home")
        shutil.copytree(package, os.path.join(install, "batchnorm"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        os.makedirs(home)
        for path in (root, install):
            os.chmod(path, 0o755)
        os.chmod(home, 0o777)
        for dirpath, _, files in os.walk(install):
            os.chmod(dirpath, 0o555)
            for f in files:
                os.chmod(os.path.join(dirpath, f), 0o444)
        # Root writes through file modes, so for root the install is made read-only where the
        # package looks: os.access.
        script = textwrap.dedent(f"""
            import os
            if os.geteuid() == 0:
                real_access = os.access
                os.access = lambda path, mode, **kw: (
                    False if mode == os.W_OK and os.path.abspath(path).startswith({install!r})
                    else real_access(path, mode, **kw))
            import torch, numba
            from batchnorm.kernels import cpu, cpu_loops
            cpu.stats(torch.randn(3, 4))
            print(numba.config.CACHE_DIR, sum(cpu_loops._compiled["rows_stats"].stats.cache_hits.values()))
        """)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
        env.update(PYTHONPATH=install, HOME=home, XDG_CACHE_HOME=os.path.join(home, ".cache"))
        runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                               text=True, timeout=300) for _ in range(2)]
        for run in runs:
            assert run.returncode == 0, run.stderr
        (first_dir, first_hits), (cache_dir, hits) = (run.stdout.split() for run in runs)
        assert cache_dir == first_dir and cache_dir.startswith(home), cache_dir
        assert not os.path.exists(os.path.join(install, "batchnorm", "kernels", "__pycache__"))
        assert int(first_hits) == 0 and int(hits) == 1
    finally:
        for dirpath, _, _ in os.walk(root):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(cpu._cores() < 2, reason="the backward compiles in a second process only "
                                            "with a second core")
def test_first_step_compiles_the_backward_in_a_second_process():
    """With an empty cache the first training forward starts a child that compiles the backward
    kernels, and the backward loads them from the cache; the next process starts no child."""
    script = textwrap.dedent("""
        import torch, batchnorm
        from batchnorm import functional as F
        from batchnorm.kernels import cpu, cpu_loops
        torch.manual_seed(0)
        x = torch.randn(6, 8, 7, 7, requires_grad=True)
        ours, theirs = batchnorm.BatchNorm2d(8), torch.nn.BatchNorm2d(8)
        with batchnorm.use_backend("numba"):
            ours(x).square().sum().backward()
        grad, x.grad = x.grad, None
        theirs(x).square().sum().backward()
        assert torch.allclose(grad, x.grad, atol=1e-5), (grad - x.grad).abs().max()
        child = cpu._compilers[("lanes", torch.float32)]
        print(None if child is None else child.returncode,
              sum(cpu_loops._compiled["lanes_backward"].stats.cache_hits.values()))
    """)
    cache = tempfile.mkdtemp(prefix="batchnorm-numba-")
    try:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                               text=True, timeout=600) for _ in range(2)]
        for run in runs:
            assert run.returncode == 0, run.stderr
        assert runs[0].stdout.split() == ["0", "1"]  # the child compiled, the backward loaded
        assert runs[1].stdout.split() == ["None", "1"]  # cached: no child
        assert any(name.startswith("batchnorm-lanes-float32-") for name in os.listdir(cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_eager_and_compiled_paths_agree_to_the_bit():
    """Eager runs the fused train_forward, torch.compile runs the stats and forward ops with
    invstd formed by torch.rsqrt in functional: both must give the same statistics and output."""
    for fmt, shape in ((torch.contiguous_format, (4, 3, 5, 6)), (torch.channels_last, (4, 3, 5, 6)),
                       (torch.contiguous_format, (9, 5))):
        x = make(shape, fmt, torch.float32)[0]
        y, count, mean, m2, invstd = cpu.train_forward(x, None, None, None, 1e-5, "identity", 0.0)
        count2, mean2, m22 = cpu.stats(x)
        invstd2 = torch.rsqrt(m22 / count2 + 1e-5)
        assert torch.equal(mean, mean2) and torch.equal(m2, m22) and torch.equal(invstd, invstd2)
        assert torch.equal(y, cpu.forward(x, mean2, invstd2, None, None, None, "identity", 0.0))
