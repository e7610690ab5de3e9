"""Numba kernels for fp32/fp64 CPU batch norm: the same four functions as `native`, fused.

Batch norm is memory-bound, so its speed is the number of walks over the tensor. The kernels
finish each piece of the tensor while it is still in cache:

- training forward: shifted sums of a channel, then y = act(a*(x - mean) + b (+ z)) over the
  same channel (the second read comes from L2/L3, not memory): one read of x and one write of y
  from DRAM;
- backward: sum(g) and sum(g*x_hat), then dx over the same channel; g = dy*act'(pre) is
  recomputed from x (and z), so neither y nor a mask is read;
- eval forward: the per-channel affine plus epilogue, one pass.

Three layouts, chosen by `_plan`; the flat memory is P rows of C channels of S values
(contiguous: P = N, S = prod(spatial); channels-last and (N, C): S = 1):
- "nchw": S >= 512: a channel is N runs of S values; one thread owns whole channels and reduces
  each run in registers.
- "lanes": shorter runs: a thread owns groups of channels whose part of every row is ~4096
  contiguous values (lanes) and accumulates per lane over the rows.
- "rows": S = 1 with many rows (channels-last, long (N, C)): threads own ranges of rows: partial
  sums, a merge, then the elementwise pass.

The loops themselves (and the numerics) are in `cpu_loops`, which imports no torch; this module is
the host side: tensors to arrays, the walk and the thread split, and the four functions of the
kernel interface. Numba is imported when this module is, which `kernels.implementation` delays to
the first CPU fp32/fp64 call (importing `batchnorm` stays fast).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import math
import os
import pickle
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

import numba

from batchnorm.kernels import cpu_loops, cpu_memory
from batchnorm.kernels.cpu_loops import ACT_CODES, kernel as _kernel


# The epilogues worth fusing here (`kernels.fused_activations`). silu and gelu_tanh call Numba's
# exp and tanh, which are scalar libm calls (no SVML): fused, a 64x256x14x14 training step
# measured 0.56x (silu) and 0.18x (gelu_tanh) the speed of torch.nn's batch norm followed by
# torch's vectorized activation, so `functional` applies those as torch ops after the kernel.
# The kernels still compute them when asked (the custom ops take every activation).
FUSED_ACTIVATIONS = ("identity", "relu", "leaky_relu")

# ---- host side: layout, threads, and the four functions of the kernel interface ------------
# Threads: the kernels are serial and release the GIL; `_run` splits the channels (or rows) into
# torch.get_num_threads() ranges and runs them on torch's own OpenMP team (`_OpenMPTeam`), or on a
# small thread pool where that team cannot be borrowed. Unlike Numba's parallel=True this never
# starts an OpenMP runtime of its own (so torch's thread setting cannot be reset), is safe in
# fork-based DataLoader workers (they take the pool, rebuilt after a fork) and from several Python
# threads, and compiles in half the time.
# Small batches are overhead-bound (torch.nn's BatchNorm1d step on (100, 100) takes ~130 us), so
# the host code makes as few torch calls as it can: one allocation for all per-channel outputs,
# numpy views instead of reshapes, no dtype conversions when none is needed.

_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None
_ACC = {torch.float32: torch.float32, torch.float64: torch.float64}
# Below this many values per thread a second thread costs more (a pool hand-off, ~20 us) than it
# saves.
_MIN_NUMEL_PER_THREAD = 1 << 16
# Layout choice (`_plan`), tuned on a 2-core EPYC (1 MB of L2 per core, 32 MB of L3): a channel
# row of at least _SEGMENT_MIN values is walked by the "nchw" loops; shorter ones by "lanes", in
# groups of about _LANES lanes (16 KB of fp32 per row); with S = 1 and fewer than _MIN_LANES
# channels per thread, or at least _ROWS_MIN rows (measured: its backward is faster there), by
# "rows". The lanes group is not shrunk to keep its P rows in L2 for the second pass: long
# contiguous runs, which the prefetchers follow, paid more than L2 hits (measured on
# 256x128x8x8: groups of 8 channels, 2 KB runs that fit L2: forward 1.6 ms, backward 3.5 ms;
# groups of 64, 16 KB runs from L3: 1.2 and 1.7 ms; and 1024x128x8x8, past L3: 15 and 21 ms
# against 10 and 12 ms).
_SEGMENT_MIN = 512
_LANES = 4096
_MIN_LANES = 256
_ROWS_MIN = 256


def supports(x: Tensor) -> bool:
    """Whether these kernels take `x`: a non-empty dense fp32/fp64 CPU tensor, contiguous or
    channels-last."""
    if x.device.type != "cpu" or x.dtype not in _ACC or x.numel() == 0:
        return False
    if x.is_contiguous():
        return True
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim)
    return fmt is not None and x.is_contiguous(memory_format=fmt)


def _threads(numel: int) -> int:
    """How many threads split a tensor of `numel` values: torch.get_num_threads(), fewer when
    there is too little work."""
    return max(1, min(torch.get_num_threads(), numel // _MIN_NUMEL_PER_THREAD))


def _plan(x: Tensor) -> tuple[str, int, int, int, int]:
    """(kind, P, C, S, group): the flat memory of `x` is P rows of C channels of S values
    (contiguous: P = N; channels-last: P = N*spatial, S = 1), walked by the "nchw", "lanes" or
    "rows" kernels; `group` is the channels per group of "lanes"."""
    c = x.shape[1]
    numel = x.numel()
    p = x.shape[0] if x.is_contiguous() else numel // c
    s = numel // (p * c)
    if s >= _SEGMENT_MIN:
        return "nchw", p, c, s, 1
    group = min(-(-_LANES // s), -(-c // _threads(numel)))
    if s == 1 and (p >= _ROWS_MIN or group * s < _MIN_LANES):
        return "rows", p, c, 1, 0
    if group * s < _MIN_LANES:
        group = -(-_MIN_LANES // s)
    return "lanes", p, c, s, min(group, c)


def _flat(t: Tensor) -> np.ndarray:
    """The memory of a dense tensor as a 1-d array in memory order (a view: kernels write it)."""
    return t.detach().numpy().ravel(order="K")


def _like(t: Tensor, x: Tensor) -> Tensor:
    """`t` with x's dtype and strides, so one flat index addresses the same element in both
    (a gradient or residual may arrive in another memory format, or expanded)."""
    if t.dtype == x.dtype and t.stride() == x.stride():
        return t
    return cpu_memory.empty_like(x).copy_(t)


def _vector(t: Tensor, acc: torch.dtype) -> np.ndarray:
    t = t.detach()
    return (t if t.dtype == acc else t.to(acc)).numpy()


def _optional(t: Tensor | None, acc: torch.dtype, absent: np.ndarray) -> np.ndarray:
    """(C,) parameter in the accumulation dtype; an absent one is replaced by `absent` (same
    type, ignored by the kernel) so that absence does not create another specialization."""
    return absent if t is None else _vector(t, acc)


_constants: dict = {}


def _epilogue_constants(dtype: np.dtype, slope: float) -> np.ndarray:
    key = (dtype, slope)
    kv = _constants.get(key)
    if kv is None:
        kv = _constants[key] = np.array(
            [slope, 0.5, 1.0, math.sqrt(2.0 / math.pi), 0.044715, 2.0, 0.0, 3 * 0.044715], dtype)
    return kv


def _ranges(items: int, numel: int, unit: int = 1) -> list[tuple[int, int]]:
    """[lo, hi) ranges splitting `items` channels or rows between `_threads(numel)` threads,
    at multiples of `unit` (a "lanes" group)."""
    units = -(-items // unit)
    threads = min(_threads(numel), units)
    return [(units * t // threads * unit, min(items, units * (t + 1) // threads * unit))
            for t in range(threads)]


def _run(name: str, calls: list[tuple]) -> None:
    """kernel(*args) for each args in `calls`, in parallel: on torch's OpenMP threads where they
    can be borrowed, else on this thread and a small pool."""
    kernel = _kernel(name)
    if len(calls) == 1:
        kernel(*calls[0])
    elif (team := _openmp_team()) is not None:
        team(kernel, calls)
    else:
        _run_on_pool(kernel, calls)


def _run_on_pool(kernel, calls: list[tuple]) -> None:
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        # A forked child inherits the pool object but not its threads: build a new one.
        _pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1),
                                   thread_name_prefix="batchnorm-cpu")
        _pool_pid = os.getpid()
    futures = [_pool.submit(kernel, *args) for args in calls[1:]]
    kernel(*calls[0])
    for future in futures:
        future.result()


class _OpenMPTeam:
    """Runs the kernel calls on torch's own OpenMP threads (`GOMP_parallel` of the runtime torch
    loaded, the call `at::parallel_for` makes).

    Why not our own threads: after each parallel op torch's OpenMP threads spin for a while
    waiting for the next one, so a pool of our own that runs right after a convolution shares
    its cores with spinning threads (measured: 2.5 ms alone, 4.5 ms after a torch op). Borrowing
    the team instead finds them awake. The callback runs Python for a few microseconds (it takes
    the GIL), then the nogil kernel.
    """

    _callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

    def __init__(self, runtime: ctypes.CDLL) -> None:
        self._parallel = runtime.GOMP_parallel
        self._parallel.argtypes = [self._callback_type, ctypes.c_void_p, ctypes.c_uint,
                                   ctypes.c_uint]
        self._parallel.restype = None
        self._thread_num = runtime.omp_get_thread_num
        self._num_threads = runtime.omp_get_num_threads
        self._jobs: dict[int, tuple] = {}
        self._keys = itertools.count(1)
        self._callback = self._callback_type(self._work)  # kept alive as long as the team

    def _work(self, key: int) -> None:
        kernel, calls, errors = self._jobs[key]
        try:
            # A team smaller than asked for (OMP_THREAD_LIMIT, nesting) still runs every call.
            for i in range(self._thread_num(), len(calls), self._num_threads()):
                kernel(*calls[i])
        except BaseException as error:  # raised again on the calling thread
            errors.append(error)

    def __call__(self, kernel, calls: list[tuple]) -> None:
        key = next(self._keys)
        errors: list[BaseException] = []
        self._jobs[key] = (kernel, calls, errors)
        try:
            self._parallel(self._callback, key, len(calls), 0)
        finally:
            del self._jobs[key]
        if errors:
            raise errors[0]


_team: _OpenMPTeam | None = None
_team_checked = False
_forked = False


def _after_fork_in_child() -> None:
    # GNU OpenMP hangs in a forked child whose parent used it (torch's own ops do too, which is
    # why DataLoader workers run torch single-threaded): children use the pool.
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork to guard against
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _openmp_team() -> _OpenMPTeam | None:
    """The team of torch's OpenMP runtime, when torch runs its ops on OpenMP (its default Linux
    build), the runtime exports GOMP_parallel, and this process is not a fork child."""
    global _team, _team_checked
    if _forked:
        return None
    if not _team_checked:
        _team_checked = True
        if "parallel backend: OpenMP" in torch.__config__.parallel_info():
            runtime = _loaded_library(("libgomp", "libiomp5", "libomp"))
            try:
                _team = None if runtime is None else _OpenMPTeam(ctypes.CDLL(runtime))
            except (OSError, AttributeError):
                _team = None
    return _team


def _loaded_library(names: tuple[str, ...]) -> str | None:
    """The path of the first already-loaded shared library whose file name starts with one of
    `names` (Linux: /proc/self/maps; elsewhere None)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1] if "/" in line else ""
                if os.path.basename(path).startswith(names):
                    return path
    except OSError:
        pass
    return None


# ---- first compile: the backward kernels compile in a second process ------------------------
# A fresh install's first training step compiles the forward kernels of its walk, then the
# backward ones, 3-7 s each here, one after the other: Numba compiles on one core, under a
# process-wide lock. So the first training forward of a walk and dtype starts a child process that
# compiles the backward kernels (their argument types sent down a pipe) into the same on-disk cache
# on another core, and the backward waits for it and loads them. The child leaves a marker next to
# the cache once done, so later processes (their kernels cached) start none. Should the child
# fail, the backward compiles them itself.

_SAMPLES = {"nchw": ((2, 2, 32, 32), torch.contiguous_format),
            "lanes": ((4, 8, 7, 7), torch.contiguous_format),
            "rows": ((2, 8, 16, 16), torch.channels_last)}
_compilers: dict[tuple[str, torch.dtype], subprocess.Popen | None] = {}


def _ready_marker(kind: str, dtype: torch.dtype) -> str:
    """The file a child writes once the backward kernels of (kind, dtype) are in the cache; its
    name changes with this file's source and the Numba and Python versions (what the cache's
    validity depends on)."""
    here = os.path.abspath(__file__)
    cache_dir = numba.config.CACHE_DIR or os.path.join(os.path.dirname(here), "__pycache__")
    digest = hashlib.sha256()
    for path in (here, cpu_loops.__file__):  # the loops, and the argument types given them
        with open(path, "rb") as source:
            digest.update(source.read())
    digest.update(f"{numba.__version__} {sys.version} {platform.machine()}".encode())
    return os.path.join(cache_dir, f"batchnorm-{kind}-{str(dtype)[6:]}-{digest.hexdigest()[:16]}"
                                   f".ready")


def _writable(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _compile_backward_elsewhere(kind: str, dtype: torch.dtype) -> None:
    """Start the child compiling the backward kernels of (kind, dtype), once per process, unless
    their marker says an earlier process did. Not in a fork child, with one core (the child
    would only slow the parent), or when sys.executable is not a Python (an embedding binary such
    as uwsgi or a frozen app may not take `-c`)."""
    key = (kind, dtype)
    if key in _compilers:
        return
    _compilers[key] = None
    if _forked or _cores() < 2 or not os.path.basename(sys.executable).startswith("python"):
        return
    marker = _ready_marker(kind, dtype)
    if os.path.exists(marker) or not _writable(os.path.dirname(marker)):
        return  # cached already, or nothing the child compiled could reach us
    env = dict(os.environ)
    if numba.config.CACHE_DIR:
        env["NUMBA_CACHE_DIR"] = numba.config.CACHE_DIR
    kernels_dir = os.path.dirname(os.path.abspath(__file__))
    code = _CHILD.format(packages={"batchnorm": os.path.dirname(kernels_dir),
                                   "batchnorm.kernels": kernels_dir}, marker=marker)
    try:
        child = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with child.stdin:  # a few KB: the pipe takes them without blocking
            pickle.dump(_backward_signatures(kind, dtype), child.stdin)
    except OSError:  # a child that lost its input fails, and the backward compiles here
        return
    _compilers[key] = child


# The child imports the loops alone: `batchnorm` and `batchnorm.kernels` are bare packages there, as
# their __init__ imports torch (2-3 s, the first step's critical path when the child imported it).
# The module keeps its name, which the cache entries record.
_CHILD = """
import sys, types
for name, path in {packages!r}.items():
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = [path]
from batchnorm.kernels import cpu_loops
cpu_loops.compile_signatures(sys.stdin.buffer, {marker!r})
"""


def _backward_signatures(kind: str, dtype: torch.dtype) -> list[tuple[str, tuple]]:
    """Each backward kernel of walk `kind` in `dtype` with the argument types of its calls: those
    of a backward through a small sample of the walk, whose calls are formed but not run."""
    shape, fmt = _SAMPLES[kind]
    x = torch.ones(shape, dtype=dtype).contiguous(memory_format=fmt)
    plan = _plan(x)
    assert plan[0] == kind, (kind, plan)
    channels = torch.ones(shape[1], dtype=dtype)
    launches = []
    _backward(plan, x, x, channels, channels, channels, channels, None, "identity", 0.0, True, None,
              None, None, True, lambda name, calls: launches.append(
                  (name, tuple(numba.typeof(arg) for arg in calls[0]))))
    return launches


def _await_backward_compile(kind: str, dtype: torch.dtype) -> None:
    child = _compilers.get((kind, dtype))
    if child is not None and child.returncode is None:
        try:
            child.wait(timeout=120)  # ~7 s here; past this, compiling here costs less
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _rows_stats(xf: np.ndarray, p: int, c: int, eps: float, st_np: np.ndarray) -> None:
    ranges = _ranges(p, p * c)
    s1 = np.zeros((len(ranges), c))
    s2 = np.zeros((len(ranges), c))
    _run("rows_stats", [(xf, c, s1[t], s2[t], lo, hi) for t, (lo, hi) in enumerate(ranges)])
    typed = st_np.dtype.type
    _kernel("rows_stats_merge")(xf, p, typed(eps), typed(1), s1, s2, st_np)


def _batch_stats(x: Tensor, z: Tensor | None, y: Tensor | None, weight: Tensor | None,
                 bias: Tensor | None, eps: float, act: str, act_param: float) -> Tensor:
    """(4, C) count, mean, m2, invstd of `x`, and y = act(x_hat*weight + bias (+ z)) into `y`
    unless it is None: the fused training forward, and the `stats` op."""
    acc = _ACC[x.dtype]
    kind, p, c, s, group = _plan(x)
    if y is not None:
        _compile_backward_elsewhere(kind, x.dtype)
    st = torch.empty((4, c), dtype=acc)
    st_np, xf = st.numpy(), _flat(x)
    yf = xf if y is None else _flat(y)
    zf = xf if z is None else _flat(_like(z, x))
    w, b = _optional(weight, acc, st_np[0]), _optional(bias, acc, st_np[0])
    code, kv = ACT_CODES[act], _epilogue_constants(xf.dtype, act_param)
    eps_t, one = st_np.dtype.type(eps), st_np.dtype.type(1)
    flags = (weight is not None, bias is not None, z is not None)
    numel = x.numel()
    if kind == "rows":
        _rows_stats(xf, p, c, eps_t, st_np)
        if y is not None:
            _run("rows_forward", [(xf, zf, yf, c, st_np[1], st_np[3], w, b, *flags, code, kv,
                                   lo, hi) for lo, hi in _ranges(p, numel)])
    elif kind == "lanes":
        _run("lanes_forward", [(xf, zf, yf, p, c, s, st_np[1], st_np[3], w, b, *flags, True,
                                y is not None, eps_t, one, code, kv, st_np, group, lo, hi)
                               for lo, hi in _ranges(c, numel, group)])
    elif y is None:
        _run("nchw_stats", [(xf, p, c, s, one, one, st_np, lo, hi) for lo, hi in _ranges(c, numel)])
    else:
        _run("nchw_train_forward", [(xf, zf, yf, p, c, s, w, b, *flags, eps_t, one, code, kv,
                                     st_np, lo, hi) for lo, hi in _ranges(c, numel)])
    return st


def stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel (count, mean, m2) of a non-empty (N, C, *spatial) tensor; see the module
    docstring for the numerics."""
    st = _batch_stats(x, None, None, None, None, 1.0, "identity", 0.0)
    # Separate tensors: custom-op outputs may not alias each other.
    return st[0].clone(), st[1].clone(), st[2].clone()


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, z: Tensor | None,
                  eps: float, act: str, act_param: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Statistics and normalization in one pass per channel block. Returns (y, count, mean, m2,
    invstd)."""
    y = cpu_memory.empty_like(x)
    return (y,) + _batch_stats(x, z, y, weight, bias, eps, act, act_param).unbind(0)


def forward(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
            z: Tensor | None, act: str, act_param: float) -> Tensor:
    """y = act(weight * (x - mean) * invstd + bias (+ z)) with the given statistics."""
    acc = _ACC[x.dtype]
    kind, p, c, s, group = _plan(x)
    y = cpu_memory.empty_like(x)
    mean_np, xf = _vector(mean, acc), _flat(x)
    args = (xf, xf if z is None else _flat(_like(z, x)), _flat(y))
    params = (mean_np, _vector(invstd, acc), _optional(weight, acc, mean_np),
              _optional(bias, acc, mean_np), weight is not None, bias is not None, z is not None)
    code, kv = ACT_CODES[act], _epilogue_constants(xf.dtype, act_param)
    numel = x.numel()
    if kind == "rows":
        _run("rows_forward", [args + (c,) + params + (code, kv) + r for r in _ranges(p, numel)])
    elif kind == "lanes":
        one, no_stats = mean_np.dtype.type(1), np.empty((4, 0), mean_np.dtype)
        _run("lanes_forward", [args + (p, c, s) + params + (False, True, one, one, code, kv,
                                                            no_stats, group) + r
                               for r in _ranges(c, numel, group)])
    else:
        _run("nchw_forward", [args + (p, c, s) + params + (code, kv) + r
                              for r in _ranges(p * c, numel)])
    return y


def backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
             bias: Tensor | None, z: Tensor | None, y: Tensor | None, act: str, act_param: float,
             training: bool, count: Tensor | None, sum_dy: Tensor | None,
             sum_dy_xhat: Tensor | None, input_grad: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closed-form backward, (dx, dweight, dbias, dz): the formulas of `native.backward`, with
    g = dy*act'(pre) recomputed from x (and z), so `y` is not read."""
    plan = _plan(x)
    _await_backward_compile(plan[0], x.dtype)
    return _backward(plan, dy, x, mean, invstd, weight, bias, z, act, act_param, training, count,
                     sum_dy, sum_dy_xhat, input_grad, _run)


def _backward(plan, dy, x, mean, invstd, weight, bias, z, act, act_param, training, count, sum_dy,
              sum_dy_xhat, input_grad, launch):
    """`backward` for x's `_plan`, whose kernels run as launch(name, calls)."""
    acc = _ACC[x.dtype]
    kind, p, c, s, group = plan
    dy = _like(dy, x)
    need_sums = sum_dy is None or sum_dy_xhat is None
    if need_sums:
        # Two allocations, not one split in two: custom-op outputs may not alias each other.
        sum_dy, sum_dy_xhat = torch.empty(c, dtype=acc), torch.empty(c, dtype=acc)
    sums = (_vector(sum_dy, acc), _vector(sum_dy_xhat, acc))
    dx = cpu_memory.empty_like(x) if input_grad else None
    write_dz = z is not None and act != "identity"
    dz = cpu_memory.empty_like(x) if write_dz else None
    mean_np, xf = _vector(mean, acc), _flat(x)
    tensors = (_flat(dy), xf, xf if z is None else _flat(_like(z, x)))
    outputs = (xf if dx is None else _flat(dx), _flat(dz) if write_dz else xf)
    params = (mean_np, _vector(invstd, acc), _optional(weight, acc, mean_np),
              _optional(bias, acc, mean_np), weight is not None, bias is not None, z is not None,
              ACT_CODES[act], _epilogue_constants(xf.dtype, act_param), training,
              count is not None, mean_np if count is None else _vector(count, acc))
    flags = (need_sums, input_grad, write_dz)
    numel = x.numel()
    if kind == "rows":
        ranges = _ranges(p, numel)
        sg, sgx = np.zeros((len(ranges), c)), np.zeros((len(ranges), c))
        if need_sums:
            launch("rows_grad_sums", [tensors + (c,) + params[:9] + (sg[t], sgx[t], lo, hi)
                                    for t, (lo, hi) in enumerate(ranges)])
        launch("rows_grad_input", [tensors + outputs + (p, c) + params + (sg, sgx) + sums + flags
                                 + r for r in ranges])
    elif kind == "lanes":
        launch("lanes_backward", [tensors + outputs + (p, c, s) + params + sums + flags + (group,)
                                + r for r in _ranges(c, numel, group)])
    else:
        launch("nchw_backward", [tensors + outputs + (p, c, s) + params + sums + flags + r
                               for r in _ranges(c, numel)])
    if dx is None:
        dx = x.new_empty(0)
    if z is None:
        dz = x.new_empty(0)
    elif not write_dz:
        dz = dy
    return dx, sum_dy_xhat, sum_dy, dz if z is None or dz.dtype == z.dtype else dz.to(z.dtype)
