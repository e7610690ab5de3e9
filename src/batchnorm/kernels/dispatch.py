"""The one routing decision: which backend computes a batch-norm call.

Backends:
    "aten"       torch's own `native_batch_norm` (torch.nn's kernel and its C++ autograd node),
                 followed by torch ops for an activation or residual;
    "composite"  torch ops (`native.composite_train` / `native.forward`), differentiated by
                 autograd: correct under every transform (double backward, forward AD, torch.func,
                 vmap, meta and fake tensors, jit.trace), and what torch.compile/export see, so
                 inductor fuses it like torch.nn's batch norm;
    "numba"      the fused CPU kernels (`cpu`), fp32/fp64, contiguous or channels-last;
    "triton"     the CUDA kernels (`cuda`);
    "native"     the three-op kernel interface in torch ops (`native`): any device and dtype.
The last three sit behind `kernels.BatchNormFunction` (eager) or the custom ops (compiled with a
forced backend); their backward is closed-form, and falls back to autograd through the composite
math when a graph of the backward is asked for (create_graph=True) or its gradient is batched.

`choose` decides once per call, from the device, dtype, layout, size and autograd mode of the
input and the machine profile (`profile.current()`: aten's and our measured times on a sweep of
real networks' shapes per layout, by `batchnorm tune`; on an unknown machine those of the
machine the benchmarks ran on), bounded by accuracy (`profile.aten_accurate`). `use_backend`
forces a backend for a block of code (tests, benchmarks, users who know better); a transform
that only the composite math survives still takes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from batchnorm.kernels import profile

BACKENDS = ("aten", "composite", "numba", "triton", "native")
KERNEL_BACKENDS = ("numba", "triton", "native")

# The forced backend, process-wide: a plain global, which torch.compile reads as a constant and
# guards on (a ContextVar would break its graph).
_forced: str | None = None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run every batch-norm call inside the block on backend `name` (one of `BACKENDS`), or on
    the automatic choice for None; for the whole process (every thread), and compiled code
    recompiles when it changes. A call the backend cannot take raises ValueError; a call under
    an autograd transform that only the composite math supports (forward AD, torch.func, vmap,
    meta tensors, jit.trace) takes "composite" whatever is forced.

        >>> import torch, batchnorm
        >>> with batchnorm.use_backend("composite"):
        ...     y = batchnorm.BatchNorm1d(3)(torch.randn(4, 3))
    """
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"use_backend: expected one of {', '.join(BACKENDS)} or None, got "
                         f"{name!r}")
    before, _forced = _forced, name
    try:
        yield
    finally:
        _forced = before


def transform(x: Tensor) -> str | None:
    """The name of the autograd transform or tracer that `x` is under, if only the composite
    math (plain torch ops) is correct there; None for a plain eager call."""
    if type(x) is not Tensor:
        return f"a tensor subclass ({type(x).__name__})"
    if torch._C._are_functorch_transforms_active():
        return "a torch.func transform (grad, jvp, vmap, ...)"
    if torch.autograd.forward_ad._current_level >= 0:
        return "forward-mode AD (torch.autograd.forward_ad)"
    if x.is_meta:
        return "the meta device"
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    return None


def kernel_takes(backend: str, x: Tensor) -> bool:
    """Whether kernel backend `backend` computes `x` (non-empty)."""
    if backend == "native":
        return True
    if backend == "numba":
        return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and profile.dense_layout(x) is not None)
    if backend == "triton":
        from batchnorm import kernels
        cuda = kernels._cuda() if x.is_cuda else None
        return cuda is not None and cuda.supports(x)
    return False


def aten_takes(x: Tensor, per_channel: tuple[Tensor | None, ...]) -> bool:
    """Whether torch's kernel takes these dtypes: the per-channel tensors in x's dtype, or fp32
    with a reduced-precision x (torch refuses any other mix)."""
    reduced = x.dtype in (torch.float16, torch.bfloat16)
    for t in per_channel:
        if t is not None and t.dtype != x.dtype and not (reduced and t.dtype == torch.float32):
            return False
    return True


def choose(x: Tensor, *, training: bool, fused: bool,
           per_channel: tuple[Tensor | None, ...] = ()) -> str:
    """The backend for one call on a non-empty input `x`: training (batch statistics) or not,
    with an activation or residual (`fused`) or not; `per_channel` are its weight, bias and
    statistics, whose dtypes torch's kernel may refuse (the composite math then takes it)."""
    backend = _choose(x, training, fused)
    if backend == "aten" and not aten_takes(x, per_channel):
        return "composite"
    return backend


def _choose(x: Tensor, training: bool, fused: bool) -> str:
    forced_backend = _forced
    if torch.compiler.is_compiling():
        # Inductor fuses the composite math (and aten's eval kernel) like torch.nn's batch norm;
        # a forced kernel backend compiles to our custom ops.
        return forced_backend or ("composite" if training else "aten")
    if transform(x) is not None:
        return "aten" if forced_backend == "aten" or not training and not fused else "composite"
    if forced_backend is not None:
        if forced_backend in KERNEL_BACKENDS and not kernel_takes(forced_backend, x):
            raise ValueError(f"use_backend({forced_backend!r}): this backend does not take an "
                             f"input of dtype {x.dtype} on {x.device} with strides {x.stride()}; "
                             f"use 'aten' or 'composite' for it")
        return forced_backend
    if x.is_cuda:
        return "triton" if profile.triton_wins(x) and kernel_takes("triton", x) else "aten"
    if x.is_cpu and x.dtype in (torch.float32, torch.float64):
        return profile.current().backend(x, training, fused)
    return "aten"
