"""The Triton kernels of `batchnorm/kernels/cuda.py`, run on CPU tensors by Triton's interpreter.

`TRITON_INTERPRET=1` must be set before triton is first imported (triton.language's own jit
helpers are wrapped at that import), and once set it changes every `@triton.jit` in the process.
So the kernels run in a worker process started with that variable (the `cuda` fixture): the tests
send it the arguments, it calls `batchnorm.kernels.cuda`, and the assertions run here. Nothing in
the pytest process itself sees the variable, so other tests that use triton are unaffected.
The interpreter runs each program in numpy, so the shapes are tiny; the worker's tile is shrunk so
they still take the split path with several tiles per program and several programs per channel
(`test_split_shapes_split` checks that they do).

Oracle: float64 autograd through `reference.py`. Tolerances (DESIGN.md): fp32 within 1e-5 of the
output scale; fp16/bf16 against the fp32 result of the same kernels on the same values, within one
unit of the low precision's epsilon times the output scale.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from batchnorm import functional, kernels, reference

pytest.importorskip("triton", reason="triton is not installed (it is in the dev extra: "
                    "pip install -e '.[dev]'); the CUDA kernels are tested through its interpreter")

EPS = 1e-5
FP32_TOL = 1e-5
# Module constants of the worker's cuda.py: a 64-element tile and 4 reduction programs make the
# tiny shapes below split into 2-5 tiles per channel (group), walked by 1-3 tiles per program.
WORKER_CONSTANTS = dict(TILE=64, INTERPRETER_PROGRAMS=4)

SHAPES = {
    "nchw": (5, 2, 5, 7),
    "nhwc": (3, 5, 4, 3),
    "2d": (37, 6),
    "3d": (9, 3, 10),
    "5d": (2, 2, 3, 4, 5),
    "5d-cl": (2, 5, 2, 3, 3),
    "strided": (3, 2, 4, 5),
}

# Requests and replies are length-prefixed torch.save payloads (tensors keep their strides); the
# protocol has its own copy of fd 1, and print/warnings in the worker go to stderr.
_WORKER = r"""
import io, os, struct, sys
import torch
from batchnorm import functional, kernels, use_backend
from batchnorm.kernels import cuda
replies = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
requests = sys.stdin.buffer


def functional_step(x, weight, bias, z, dy, activation):
    # batchnorm.functional -> BatchNormFunction on a kernel backend whose family, in this worker
    # (CPU tensors, no GPU), is the Triton kernels
    kernels.kernel_family = lambda backend: cuda
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, z)]
    running_mean, running_var = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    with use_backend("native"):
        y = functional.batch_norm(leaves[0], running_mean, running_var, leaves[1], leaves[2],
                                  True, 0.1, 1e-5, residual=leaves[3], activation=activation)
    y.backward(dy)
    return (y.detach(), running_mean, running_var) + tuple(t.grad for t in leaves)


while len(head := requests.read(8)) == 8:
    name, args, constants = torch.load(io.BytesIO(requests.read(struct.unpack("<Q", head)[0])))
    for key, value in constants.items():
        setattr(cuda, key, value)
    try:
        call = functional_step if name == "functional_step" else getattr(cuda, name)
        reply = ("ok", call(*args))
    except Exception as error:
        reply = ("error", f"{type(error).__name__}: {error}")
    buffer = io.BytesIO()
    torch.save(reply, buffer)
    replies.write(struct.pack("<Q", buffer.tell()) + buffer.getvalue())
    replies.flush()
"""


class InterpretedCuda:
    """`batchnorm.kernels.cuda` in a worker process that imported triton with TRITON_INTERPRET=1:
    `proxy.train_forward(...)` runs there and returns the result. `constants` (module constants
    such as FUSED_MAX) are set in the worker before each call."""

    def __init__(self):
        env = dict(os.environ, TRITON_INTERPRET="1")
        self.process = subprocess.Popen([sys.executable, "-c", _WORKER], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.constants = dict(WORKER_CONSTANTS)

    def __getattr__(self, name):
        return lambda *args: self._call(name, args)

    def _call(self, name, args):
        buffer = io.BytesIO()
        torch.save((name, args, self.constants), buffer)
        self.process.stdin.write(struct.pack("<Q", buffer.tell()) + buffer.getvalue())
        self.process.stdin.flush()
        head = self.process.stdout.read(8)
        if len(head) < 8:
            raise RuntimeError(f"the interpreter worker exited (code {self.process.wait()}); "
                               f"its stderr is in the captured output")
        status, value = torch.load(io.BytesIO(self.process.stdout.read(
            struct.unpack("<Q", head)[0])))
        if status == "error":
            raise RuntimeError(f"cuda.{name} raised in the interpreter worker: {value}")
        return value

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def cuda():
    worker = InterpretedCuda()
    yield worker
    worker.close()


@pytest.fixture(params=["fused", "split"])
def path(request, cuda):
    """The one-program-per-channel path, or the split path (partials, merge, elementwise)."""
    cuda.constants["FUSED_MAX"] = 1 << 14 if request.param == "fused" else 0
    yield request.param
    del cuda.constants["FUSED_MAX"]


def arrange(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x (logical (N, C, *spatial)) in the memory layout named `layout`."""
    if layout in ("nhwc", "5d-cl"):
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "strided":
        wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


def sample(layout: str, seed: int = 0, offset: float = 0.5, dtype=torch.float32, shape=None):
    """x, weight, bias, z, dy for one case, x and z in `layout`."""
    g = torch.Generator().manual_seed(seed)
    shape = shape or SHAPES[layout]
    c = shape[1]
    x = arrange(torch.randn(shape, generator=g) * 2 + offset, layout).to(dtype)
    weight = torch.randn(c, generator=g) + 1
    bias = torch.randn(c, generator=g)
    z = arrange(torch.randn(shape, generator=g), layout).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, weight, bias, z, dy


def oracle(x, weight, bias, z, dy, act, slope, mean=None, invstd=None):
    """float64: y, batch (mean, var), and the gradients {x, weight, bias, z} by autograd through
    reference.py. Training statistics when `mean` is None, else the given constant statistics."""
    leaves = {k: t.detach().double().requires_grad_() for k, t in
              dict(x=x, weight=weight, bias=bias, z=z).items() if t is not None}
    xd = leaves["x"]
    batch_mean, batch_var = reference.batch_stats(xd)
    if mean is None:
        pre = reference.normalize(xd, batch_mean, batch_var, leaves.get("weight"),
                                  leaves.get("bias"), EPS)
    else:
        var = 1 / invstd.double() ** 2 - EPS
        pre = reference.normalize(xd, mean.double(), var, leaves.get("weight"), leaves.get("bias"),
                                  EPS)
    if "z" in leaves:
        pre = pre + leaves["z"]
    y = reference.activate(pre, act, slope)
    grads = torch.autograd.grad(y, list(leaves.values()), dy.double())
    return y.detach(), batch_mean.detach(), batch_var.detach(), dict(zip(leaves, grads))


def assert_scaled(actual, expected, tol, what):
    """max |actual - expected| <= tol x max |expected| (the output scale). Unlike conftest's
    assert_close_scaled the scale has no floor at 1: the tiny outputs here are held to 1e-5 of
    their own size."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x output scale {scale:.3g}"


def run_training(cuda, x, weight, bias, z, dy, act, slope):
    y, count, mean, m2, invstd = cuda.train_forward(x, weight, bias, z, EPS, act, slope)
    grads = cuda.backward(dy, x, mean, invstd, weight, bias, z, y, act, slope, True, None, None,
                          None, True)
    return (y, count, mean, m2, invstd), grads


def check_training(cuda, layout, act="identity", slope=0.01, residual=False, affine=True):
    x, weight, bias, z, dy = sample(layout)
    weight, bias = (weight, bias) if affine else (None, None)
    z = z if residual else None
    (y, count, mean, m2, invstd), (dx, dweight, dbias, dz) = run_training(
        cuda, x, weight, bias, z, dy, act, slope)
    y_ref, mean_ref, var_ref, grads = oracle(x, weight, bias, z, dy, act, slope)
    m = x.numel() // x.shape[1]
    assert torch.equal(count, torch.full_like(count, m))
    assert_scaled(mean, mean_ref, FP32_TOL * 3, "mean")  # mean's scale: ~3x |mean|, the spread
    assert_scaled(m2 / m, var_ref, FP32_TOL, "variance")
    assert_scaled(invstd, 1 / torch.sqrt(var_ref + EPS), FP32_TOL, "invstd")
    assert_scaled(y, y_ref, FP32_TOL, "y")
    assert_scaled(dx, grads["x"], FP32_TOL, "dx")
    if affine:
        assert_scaled(dweight, grads["weight"], FP32_TOL, "dweight")
        assert_scaled(dbias, grads["bias"], FP32_TOL, "dbias")
    if residual:
        assert_scaled(dz, grads["z"], FP32_TOL, "dz")
    else:
        assert dz.numel() == 0
    dense = x if layout != "strided" else x.contiguous()
    assert y.stride() == dense.stride() and dx.stride() == dense.stride(), "memory format kept"
    assert y.dtype == dx.dtype == x.dtype


# ---- fp32 against the float64 reference ------------------------------------------------------


@pytest.mark.parametrize("layout", SHAPES)
def test_training_forward_backward(cuda, path, layout):
    check_training(cuda, layout)
    x = sample(layout)[0]
    count, mean, m2 = cuda.stats(x)
    mean_ref, var_ref = reference.batch_stats(x)
    assert_scaled(mean, mean_ref, FP32_TOL * 3, "stats mean")
    assert_scaled(m2 / count, var_ref, FP32_TOL, "stats variance")


@pytest.mark.parametrize("residual", [False, True], ids=["no_z", "z"])
@pytest.mark.parametrize("act", kernels.ACTIVATIONS)
def test_epilogues(cuda, monkeypatch, act, residual):
    # The epilogue code is shared by both paths; across its two cases each activation still runs
    # both paths and both layouts (the residual in NHWC here, in NCHW in the tests below).
    index = kernels.ACTIVATIONS.index(act)
    path = "split" if (index + residual) % 2 else "fused"
    cuda.constants["FUSED_MAX"] = 1 << 14 if path == "fused" else 0
    try:
        check_training(cuda, "nhwc" if residual else "nchw", act=act, slope=0.2,
                       residual=residual)
    finally:
        del cuda.constants["FUSED_MAX"]


def test_without_affine(cuda, path):
    check_training(cuda, "nhwc", act="silu", affine=False)


@pytest.mark.parametrize("layout,act",
                         [("nchw", "identity"), ("nhwc", "relu"), ("2d", "gelu_tanh")])
def test_eval_forward_backward(cuda, layout, act):
    x, weight, bias, z, dy = sample(layout)
    c = x.shape[1]
    mean, invstd = torch.linspace(-1, 1, c), torch.linspace(0.5, 2, c)
    y = cuda.forward(x, mean, invstd, weight, bias, z, act, 0.01)
    dx, dweight, dbias, dz = cuda.backward(dy, x, mean, invstd, weight, bias, z, y, act, 0.01,
                                           False, None, None, None, True)
    y_ref, _, _, grads = oracle(x, weight, bias, z, dy, act, 0.01, mean, invstd)
    assert_scaled(y, y_ref, FP32_TOL, "y")
    for name, got in dict(x=dx, weight=dweight, bias=dbias, z=dz).items():
        assert_scaled(got, grads[name], FP32_TOL, f"d{name}")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_passed_in_reductions(cuda, path, layout):
    """SyncBatchNorm's backward: global count, sum(g), sum(g x_hat) replace the local ones."""
    x, weight, bias, z, dy = sample(layout)
    act, slope = "leaky_relu", 0.1
    y, count, mean, m2, invstd = cuda.train_forward(x, weight, bias, z, EPS, act, slope)
    c = x.shape[1]
    total = count * 3  # as if two more ranks held as many values
    sum_dy, sum_dy_xhat = torch.linspace(-2, 3, c), torch.linspace(1, -4, c)
    dx, dweight, dbias, dz = cuda.backward(dy, x, mean, invstd, weight, bias, z, y, act, slope,
                                           True, total, sum_dy, sum_dy_xhat, True)
    assert torch.equal(dweight, sum_dy_xhat) and torch.equal(dbias, sum_dy)
    # float64 closed form with the given reductions: dx = a/M (M g - sum_dy - x_hat sum_dy_xhat)
    view = (1, c) + (1,) * (x.ndim - 2)
    md, sd = mean.double().view(view), invstd.double().view(view)
    a = weight.double().view(view) * sd
    x_hat = (x.double() - md) * sd
    pre = (a * x.double() + bias.double().view(view) - md * a + z.double()).requires_grad_()
    g, = torch.autograd.grad(reference.activate(pre, act, slope), pre, dy.double())
    n = total.double().view(view)
    given_dy, given_dy_xhat = sum_dy.double().view(view), sum_dy_xhat.double().view(view)
    expected = a / n * (n * g - given_dy - x_hat * given_dy_xhat)
    assert_scaled(dx, expected, FP32_TOL, "dx")
    assert_scaled(dz, g, FP32_TOL, "dz")

    # one reduction given: the other one is computed locally
    _, local_dweight, _, _ = cuda.backward(dy, x, mean, invstd, weight, bias, z, y, act, slope,
                                           True, None, None, None, True)
    _, dweight2, dbias2, _ = cuda.backward(dy, x, mean, invstd, weight, bias, z, y, act, slope,
                                           True, None, sum_dy, None, True)
    assert torch.equal(dbias2, sum_dy)
    assert_scaled(dweight2, local_dweight, FP32_TOL, "locally computed sum(g x_hat)")

    # no input gradient: the reductions and dz only
    dx3, dweight3, dbias3, dz3 = cuda.backward(dy, x, mean, invstd, weight, bias, z, y, act, slope,
                                               True, None, None, None, False)
    assert dx3.numel() == 0
    assert_scaled(dweight3, local_dweight, FP32_TOL, "dweight without dx")
    assert_scaled(dz3, g, FP32_TOL, "dz without dx")


def test_statistics_of_offset_data(cuda, path):
    """|mean| >> std: per-tile two-pass statistics and Chan's merge keep the variance exact."""
    x = sample("nchw", offset=1e4)[0]
    count, mean, m2 = cuda.stats(x)
    mean_ref, var_ref = reference.batch_stats(x)
    assert_scaled(mean, mean_ref, 1e-7, "mean")
    assert_scaled(m2 / count, var_ref, FP32_TOL, "variance")


def test_mixed_layouts(cuda, path):
    """dy, z and y in other layouts than x are read correctly; outputs follow x."""
    x, weight, bias, z, dy = sample("nhwc")
    z_nchw = z.contiguous()
    y, count, mean, m2, invstd = cuda.train_forward(x, weight, bias, z_nchw, EPS, "relu", 0.01)
    dx, dweight, dbias, dz = cuda.backward(dy.contiguous(), x, mean, invstd, weight, bias, z_nchw,
                                           y.contiguous(), "relu", 0.01, True, None, None, None,
                                           True)
    y_ref, _, _, grads = oracle(x, weight, bias, z, dy, "relu", 0.01)
    assert_scaled(y, y_ref, FP32_TOL, "y")
    assert_scaled(dx, grads["x"], FP32_TOL, "dx")
    assert_scaled(dz, grads["z"], FP32_TOL, "dz")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    assert dz.is_contiguous(), "dz follows z's memory format"


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_through_functional(cuda, path, layout):
    """batch_norm() with the dispatch pointed at the Triton kernels: outputs, gradients and the
    running statistics (fed by the kernels' count and m2) match the native path."""
    x, weight, bias, z, dy = sample(layout)
    got = cuda.functional_step(x, weight, bias, z, dy, "silu")
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, z)]
    running_mean, running_var = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    y = functional.batch_norm(leaves[0], running_mean, running_var, leaves[1], leaves[2], True,
                              0.1, EPS, residual=leaves[3], activation="silu")
    y.backward(dy)
    want = (y.detach(), running_mean, running_var) + tuple(t.grad for t in leaves)
    names = ["y", "running_mean", "running_var", "dx", "dweight", "dbias", "dz"]
    for name, a, b in zip(names, got, want):
        assert_scaled(a, b, FP32_TOL, name)
    assert got[0].stride() == x.stride()


def test_split_shapes_split(monkeypatch):
    """The test shapes exercise what the split path does on a GPU with a large input."""
    from batchnorm.kernels import cuda  # the planning is host code: no interpreter needed
    for key, value in dict(WORKER_CONSTANTS, FUSED_MAX=0).items():
        monkeypatch.setattr(cuda, key, value)
    several_programs = several_tiles = 0
    for layout in SHAPES:
        x = sample(layout)[0]
        x, plan = cuda._prepare(x)
        programs, _, per = plan.reduction_grid(x.device)
        assert plan.fused is None and plan.split.tiles > 1, layout
        several_programs += programs > 1
        several_tiles += per > 1
    assert several_programs >= 5 and several_tiles >= 4


# ---- fp16 / bf16 against the fp32 result --------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision(cuda, path, dtype, layout):
    x, weight, bias, z, dy = sample(layout, dtype=dtype)
    act = "silu" if dtype == torch.float16 else "relu"
    low = run_training(cuda, x, weight, bias, z, dy, act, 0.01)
    full = run_training(cuda, x.float(), weight, bias, z.float(), dy.float(), act, 0.01)
    eps = torch.finfo(dtype).eps
    names = ["y", "count", "mean", "m2", "invstd", "dx", "dweight", "dbias", "dz"]
    for name, got, want in zip(names, low[0] + low[1], full[0] + full[1]):
        low_output = name in ("y", "dx", "dz")
        assert got.dtype == (dtype if low_output else torch.float32), name
        # outputs in the low precision: one rounding off; fp32 accumulations: the same math
        assert_scaled(got, want, eps if low_output else FP32_TOL, name)
    assert low[0][0].stride() == x.stride()


# ---- dispatch, the fallback table, compilation ---------------------------------------------------


def test_cpu_runs_never_import_triton():
    code = ("import sys, torch, batchnorm\n"
            "m = batchnorm.BatchNorm2d(3)\n"
            "m(torch.randn(4, 3, 5, 5, requires_grad=True)).sum().backward()\n"
            "assert 'triton' not in sys.modules, 'a CPU-only run imported triton'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_results_table_decides_where_triton_runs(tmp_path):
    from batchnorm.kernels import cuda  # compiled-mode module: loads, launches nothing

    def case(cls, speedup):
        return {"class": list(cls), "speedup": speedup}
    slow, fast = ("nhwc", "bfloat16", "split"), ("nchw", "float32", "fused")
    results = tmp_path / "kernels-cuda.json"
    results.write_text(json.dumps({"cases": [case(slow, 0.8), case(slow, 0.9), case(slow, 1.2),
                                             case(fast, 0.9), case(fast, 1.5), case(fast, 2.0)]}))
    assert cuda.load_wins(results) == frozenset({fast})
    assert cuda.load_wins(tmp_path / "missing.json") == frozenset()  # unmeasured: torch's kernel
    x = torch.randn(2, 3, 4, 5)
    assert cuda.path_key(x) == ("nchw", "float32", "fused")
    assert cuda.path_key(x.to(memory_format=torch.channels_last).bfloat16()) == (
        "nhwc", "bfloat16", "fused")
    assert cuda.path_key(torch.randn(64, 8, 32, 32)) == ("nchw", "float32", "split")
    assert set(cuda._ACT_CODES) == set(kernels.ACTIVATIONS)
    assert cuda.supports(x) and cuda.supports(x.half())
    assert not cuda.supports(x.double()) and not cuda.supports(x[:0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dispatch_sends_cuda_tensors_to_triton_only_where_it_measured_faster():
    from batchnorm.kernels import cuda, dispatch
    x = torch.randn(4, 3, 5, 5, device="cuda")
    expected = "triton" if cuda.path_key(x) in cuda.WINS else "aten"
    assert dispatch.choose(x, training=True, fused=False) == expected
    assert kernels.implementation(x.double()) is kernels.native


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_kernels_compile_for_sm90(monkeypatch):
    """The interpreter does not check what only the compiler does (constexpr globals, loop-carried
    types): compile the launches of a split bf16 NHWC training step with gelu and a residual and a
    fused fp32 NCHW one with relu to PTX/cubin for sm_90, no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from batchnorm.kernels import cuda
    launches = []

    class Record:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    for name in ("_stats_partial_kernel", "_stats_merge_kernel", "_normalize_kernel",
                 "_backward_partial_kernel", "_backward_kernel"):
        monkeypatch.setattr(cuda, name, Record(getattr(cuda, name)))
    for fused_max, dtype, layout, act in [(0, torch.bfloat16, "nhwc", "gelu_tanh"),
                                          (1 << 14, torch.float32, "nchw", "relu")]:
        monkeypatch.setattr(cuda, "FUSED_MAX", fused_max)
        x, weight, bias, z, dy = sample(layout, dtype=dtype)
        stat = torch.ones(x.shape[1])
        cuda.train_forward(x, weight, bias, z, EPS, act, 0.01)
        cuda.backward(dy, x, stat, stat, weight, bias, z, x, act, 0.01, True, None, None, None,
                      True)
    types = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
             bool: "i1", int: "i32", float: "fp32"}
    for kernel, args, kwargs in launches:
        options = dict(num_warps=kwargs.pop("num_warps", 4))
        bound = dict(zip(kernel.arg_names, args)) | kwargs
        signature, constants = {}, {}
        for param, name in zip(kernel.params, kernel.arg_names):
            value = bound[name]
            if param.is_constexpr:
                signature[name], constants[name] = "constexpr", value
            else:
                signature[name] = types[value.dtype if torch.is_tensor(value) else type(value)]
        source = triton.compiler.ASTSource(kernel, signature, constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.asm["cubin"], kernel.__name__
    assert len(launches) == 7

