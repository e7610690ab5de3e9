"""The rules of batch norm's running statistics, in one place: every path and tool applies these.

Kernels return a batch's per-channel (count, mean, m2) (m2 = sum of squared deviations); what
becomes of them is decided here (Ioffe & Szegedy 2015, arXiv 1502.03167, Algorithm 2, and
torch.nn's conventions):

- normalize with the biased variance m2/M; store the unbiased m2/(M-1) in `running_var`;
- `momentum` float: r <- (1 - momentum) r + momentum * batch; `momentum=None`: the cumulative
  average, factor 1/num_batches_tracked counting this batch;
- a batch whose new running statistics would not be finite (NaN or Inf in the input, or a
  variance beyond the buffer dtype's range, e.g. > 65504 in fp16) changes nothing and warns once
  per layer; under torch.compile, or on tensors without data (meta, fake), the same guard is a
  branch-free `torch.where`;
- an empty batch (N=0) changes nothing; training on one value per channel is an error.

`functional`, `nn` and `tools.recalibrate` call `update_running_stats` (the aten route, whose
kernel forms the same update, `commit_running_stats`); nothing else writes the buffers.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import warnings
import weakref

import torch
from torch import Tensor

from batchnorm.errors import ArgumentError

__all__ = ["check_momentum", "check_eps", "momentum_factor", "momentum_value",
           "unbiased_variance", "update_running_stats", "commit_running_stats", "one_value_error",
           "ONE_VALUE_FIX"]

ONE_VALUE_FIX = "use eval mode, BatchRenorm, or GroupNorm for batch size 1"

_warned_nonfinite: "weakref.WeakSet[object]" = weakref.WeakSet()


def check_eps(eps: float, name: str, batch_stats: bool = True) -> None:
    """torch.nn.functional.batch_norm's rule: eps > 0 where batch statistics are normalized with
    (their variance can be 0), eps >= 0 with running statistics; NaN is refused too (torch lets it
    through to a NaN output). Raises `ArgumentError` with torch's words."""
    if type(eps) is float and (eps > 0.0 or (eps == 0.0 and not batch_stats)):
        return  # the common case, decided in one comparison
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{name}: eps must be a float, got {type(eps).__name__} {eps!r}")
    if batch_stats and not eps > 0:
        raise ArgumentError(f"{name}: eps must be positive during training, but got {eps} (it "
                            f"is added to the batch variance, which can be 0); use e.g. 1e-5")
    if not eps >= 0:
        raise ArgumentError(f"{name}: eps must be non-negative, but got {eps}; use e.g. 1e-5")


def check_momentum(momentum: float | None, name: str) -> None:
    """torch.nn's rule: any real number (a value outside [0, 1] extrapolates the average, which
    torch's own OpInfo samples do), or None for the cumulative average; only a non-finite one is
    refused, since it would make every running statistic NaN. Checked where it is used: in
    training with running statistics."""
    if momentum is None or (type(momentum) is float and math.isfinite(momentum)):
        return
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"{name}: momentum must be a float or None (cumulative average), got "
                        f"{type(momentum).__name__} {momentum!r}")
    if not math.isfinite(momentum):
        raise ValueError(f"{name}: momentum must be finite (it would make the running statistics "
                         f"NaN), got {momentum!r}; use e.g. 0.1, or None for a cumulative average")


def one_value_error(name: str, got: str, fix: str = ONE_VALUE_FIX) -> ValueError:
    return ValueError(f"{name}: training needs more than one value per channel (got {got}); {fix}")


def unbiased_variance(count: Tensor, m2: Tensor) -> Tensor:
    """m2 / (count - 1): Bessel's correction, what `running_var` stores."""
    return m2 / (count - 1)


def momentum_factor(momentum: float | None, num_batches_tracked: Tensor | None,
                    dtype: torch.dtype = torch.float32) -> float | Tensor:
    """How far the running statistics move towards the batch's: `momentum`, or for None the
    cumulative average's 1/num_batches_tracked (read after this batch's increment), in `dtype`."""
    if momentum is not None:
        return momentum
    return num_batches_tracked.clamp_min(1).to(dtype).reciprocal()


def _has_data(t: Tensor) -> bool:
    return not (t.is_meta or torch._C._functorch.is_functorch_wrapped_tensor(t)
                or type(t) is not Tensor)


def update_running_stats(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Tensor | None, count: Tensor | int, mean: Tensor,
                         m2: Tensor, momentum: float | None, name: str = "batch_norm",
                         warn_key: object | None = None) -> None:
    """Fold one batch's per-channel (count, mean, m2) into the running statistics, in place.

    The new values are formed in fp32 (fp64 for fp64 buffers) and checked after the cast to the
    buffers' dtype (`commit_running_stats`), so neither a non-finite batch nor an overflowing one
    is ever stored. num_batches_tracked counts the batches applied.
    """
    acc = torch.float64 if running_mean.dtype == torch.float64 else torch.float32
    compiling = torch.compiler.is_compiling()
    with _outside_functorch(compiling):
        if not compiling:
            mean, m2, count = _plain(mean), _plain(m2), _plain(count)
        if num_batches_tracked is not None and momentum is None:
            factor = momentum_factor(None, num_batches_tracked + 1, acc)
        else:
            factor = momentum
        batch_var = _as(unbiased_variance(count, m2), acc)
        if not isinstance(factor, Tensor) and factor == 1:
            # The batch's own values: lerp would carry a non-finite old value through (0 * inf),
            # and recalibrate replaces whatever was there.
            new_mean, new_var = _stored(_as(mean, acc), running_mean), _stored(batch_var, running_var)
        else:
            new_mean = _stored(torch.lerp(_as(running_mean, acc), _as(mean, acc), factor),
                               running_mean)
            new_var = _stored(torch.lerp(_as(running_var, acc), batch_var, factor), running_var)
        commit_running_stats(running_mean, running_var, num_batches_tracked, new_mean, new_var,
                             name, warn_key)


def commit_running_stats(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Tensor | None, new_mean: Tensor, new_var: Tensor,
                         name: str = "batch_norm", warn_key: object | None = None) -> None:
    """Store new running statistics (already in the buffers' dtype) if they are all finite, and
    count the batch; else leave everything unchanged and warn once per `warn_key`.

    Callers are `update_running_stats` and the aten route, where torch's kernel forms the same
    update (`momentum_value`'s factor, Bessel's m/(m-1)) into scratch copies of the buffers,
    because there the ~15 small tensor ops of forming it here would double a small batch's
    step. On the CPU a skipped batch warns; elsewhere (CUDA, torch.compile, meta and fake
    tensors) the guard is a branch-free `torch.where`, which needs no host synchronisation and so
    cannot warn.
    """
    if running_mean.is_cpu and not torch.compiler.is_compiling() and _has_data(running_mean):
        if _nonfinite_sum(new_mean, new_var).item() != 0:
            _warn_nonfinite(name, warn_key)
            return
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    finite = _nonfinite_sum(new_mean, new_var) == 0
    running_mean.copy_(torch.where(finite, new_mean, running_mean))
    running_var.copy_(torch.where(finite, new_var, running_var))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))


def _nonfinite_sum(mean: Tensor, var: Tensor) -> Tensor:
    """A 0-dim tensor that is 0 if every element of both is finite, NaN otherwise: x - x is 0
    for finite x and NaN for NaN or Inf, and 0 * v is NaN for non-finite v, so one dot product
    checks both (torch.isfinite costs several kernels)."""
    acc = torch.float64 if mean.dtype == torch.float64 else torch.float32
    mean, var = _as(mean, acc), _as(var, acc)
    return torch.dot(mean - mean, var)


def momentum_value(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    """`momentum_factor` as a Python float, for a kernel that applies the update itself (reads
    num_batches_tracked from the device for momentum=None, as torch.nn does)."""
    if momentum is not None:
        return momentum
    return 1.0 / (int(num_batches_tracked) + 1)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, detached: statistics carry no gradient (a Python check is cheaper than a no-op
    cast, and a small batch's whole step costs tens of such calls)."""
    t = t if t.dtype == dtype else t.to(dtype)
    return t.detach() if t.requires_grad else t


def _stored(value: Tensor, buffer: Tensor) -> Tensor:
    """value rounded to the buffer's dtype: what the buffer would hold."""
    return value if value.dtype == buffer.dtype else value.to(buffer.dtype)


def _outside_functorch(compiling: bool):
    """Where the update runs under a torch.func transform (grad, jvp): outside it, as aten's
    batch norm updates torch.nn's buffers. The running statistics are captured buffers that the
    transform does not track, and it refuses in-place writes into them."""
    if compiling or not torch._C._are_functorch_transforms_active():
        return contextlib.nullcontext()
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
    return temporarily_clear_interpreter_stack()


def _plain(t: Tensor | int) -> Tensor | int:
    """The value of a statistic computed under a torch.func transform, as a plain tensor.
    Statistics carry no gradient, so unwrapping loses nothing. A batched (vmap) statistic has one
    value per sample and no single update: the caller refuses that."""
    while isinstance(t, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _warn_nonfinite(name: str, warn_key: object | None) -> None:
    """Warn once per `warn_key`, pointing at the user's call (outside this package)."""
    if warn_key is not None:
        if warn_key in _warned_nonfinite:
            return
        _warned_nonfinite.add(warn_key)
    warnings.warn(
        f"{name}: the batch statistics are not finite or overflow the running statistics' dtype "
        f"(NaN or Inf in the input, or a variance too large for it), so the running statistics "
        f"were left unchanged; find the input with torch.autograd.set_detect_anomaly(True) or a "
        f"forward pre-hook checking torch.isfinite(input).all()", RuntimeWarning,
        stacklevel=_stacklevel())


def _stacklevel() -> int:
    """The stack level of the first frame outside batchnorm (and torch.nn's Module call)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and (frame.f_globals.get("__name__", "").startswith("batchnorm")
                                 or frame.f_globals.get("__name__", "").startswith("torch.nn")):
        frame, level = frame.f_back, level + 1
    return level
