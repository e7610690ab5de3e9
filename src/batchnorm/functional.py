"""Functional batch normalization: argument checks, the running-statistics rules, one kernel call.

This module is the only place the update rules live (DESIGN.md, "The rules that live once"):

- normalize with the biased batch variance m2/M; store the unbiased m2/(M-1) in `running_var`,
  M = N x spatial (Ioffe & Szegedy 2015, arXiv 1502.03167, Algorithm 2);
- `momentum` float: r <- (1 - momentum) r + momentum * batch; `momentum=None`: cumulative average,
  factor 1/num_batches_tracked; updates run under no_grad, in place, in the buffers' dtype;
- a batch whose statistics are not finite leaves the running statistics alone (the output still
  shows the NaN) and warns once per layer; under torch.compile the guard is branch-free;
- an empty batch (N=0) returns an empty output and changes nothing;
- training on M=1 values per channel raises ValueError.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import Tensor

from batchnorm import kernels

__all__ = ["batch_norm", "check_momentum", "check_eps"]

_warned_nonfinite: "weakref.WeakSet[object]" = weakref.WeakSet()


def check_momentum(momentum: float | None, name: str) -> None:
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"{name}: momentum must be a float in [0, 1] or None (cumulative average), "
                         f"got {momentum!r}")


def check_eps(eps: float, name: str) -> None:
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"{name}: eps must be a positive float, got {eps!r}")


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_input(input: Tensor, per_channel: dict[str, Tensor | None], name: str) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: expected input to be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point input, got dtype {input.dtype}; "
                        f"convert it first, e.g. input.float()")
    if input.ndim < 2:
        raise ValueError(f"{name}: expected input of shape (N, C, *spatial) with at least 2 "
                         f"dimensions, got shape {_shape(input)}")
    channels = input.shape[1]
    expected = next((t.shape[0] for t in per_channel.values() if t is not None and t.ndim == 1),
                    channels)
    if expected != channels:
        raise ValueError(f"{name} expected input with {expected} channels (dim 1), got shape "
                         f"{_shape(input)}")
    for arg, tensor in per_channel.items():
        if tensor is None:
            continue
        if tensor.shape != (channels,):
            raise ValueError(f"{name}: {arg} must have shape ({channels},) to match the input's "
                             f"{channels} channels, got shape {_shape(tensor)}")
        if tensor.device != input.device:
            raise ValueError(f"{name}: {arg} is on {tensor.device} but the input is on "
                             f"{input.device}; move the layer with .to({str(input.device)!r})")


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float | None = 0.1, eps: float = 1e-5, *,
               num_batches_tracked: Tensor | None = None, residual: Tensor | None = None,
               activation: str = "identity", negative_slope: float = 0.01,
               layer_name: str | None = None, warn_key: object | None = None) -> Tensor:
    """y = act(weight * (x - E[x]) / sqrt(Var[x] + eps) + bias (+ residual)), per channel (dim 1).

    Same semantics as `torch.nn.functional.batch_norm`: batch statistics are used when `training`
    is True or no running statistics are given, and running statistics are updated in place when
    both hold. Ioffe & Szegedy 2015, arXiv 1502.03167.

    Args:
        input: (N, C, *spatial), any floating dtype; fp16/bf16 accumulate in fp32.
        running_mean, running_var: (C,) buffers or None.
        weight, bias: (C,) affine parameters or None.
        training: use (and update) batch statistics.
        momentum: EMA factor in [0, 1], or None for a cumulative average (needs
            `num_batches_tracked`).
        eps: added to the variance, > 0.
        num_batches_tracked: 0-dim long buffer, incremented on each finite training update.
        residual: tensor shaped like `input`, added before the activation.
        activation: one of `kernels.ACTIVATIONS`, fused into the same kernel.
        negative_slope: the slope of "leaky_relu".
        layer_name: how errors and warnings name the caller, e.g. "BatchNorm2d(64)".
        warn_key: object the non-finite warning is issued once for (defaults to the call site).

    Returns:
        A tensor shaped like `input`, in its dtype and memory format.

    Raises:
        TypeError: non-tensor or integer input.
        ValueError: bad shapes, devices, momentum or eps; training with one value per channel.
    """
    name = layer_name or "batch_norm"
    _check_input(input, {"running_mean": running_mean, "running_var": running_var,
                         "weight": weight, "bias": bias}, name)
    check_momentum(momentum, name)
    check_eps(eps, name)
    if activation not in kernels.ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {', '.join(kernels.ACTIVATIONS)}, "
                         f"got {activation!r}")
    if residual is not None and residual.shape != input.shape:
        raise ValueError(f"{name}: residual must have the input's shape {_shape(input)}, got "
                         f"{_shape(residual)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: running_mean and running_var must both be given or both be None")
    if momentum is None and training and running_mean is not None and num_batches_tracked is None:
        raise ValueError(f"{name}: momentum=None (cumulative average) needs num_batches_tracked")

    if input.numel() == 0:
        return input.clone()
    use_batch_stats = training or running_mean is None
    if not use_batch_stats:
        invstd = torch.rsqrt(running_var + eps)
        return _normalize(input, weight, bias, residual, running_mean, invstd, eps, activation,
                          negative_slope)

    values_per_channel = input.numel() // input.shape[1]
    if values_per_channel == 1:
        raise ValueError(
            f"{name}: training needs more than one value per channel (got input of shape "
            f"{_shape(input)}); use eval mode, BatchRenorm, or GroupNorm for batch size 1")
    y, count, mean, m2 = _normalize(input, weight, bias, residual, None, None, eps, activation,
                                    negative_slope)
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, num_batches_tracked, count, mean, m2,
                             momentum, name, warn_key)
    return y


def _normalize(x, weight, bias, residual, mean, invstd, eps, activation, negative_slope):
    """One kernel call. Eager: the autograd.Function (no custom-op dispatch). Compiled: the custom
    ops, so the graph holds opaque batchnorm::stats / batchnorm::forward nodes."""
    if not torch.compiler.is_compiling():
        out = kernels.BatchNormFunction.apply(x, weight, bias, residual, mean, invstd, eps,
                                              activation, negative_slope)
        return out if mean is not None else out[:4]
    training = mean is None
    if training:
        count, mean, m2 = kernels.stats(x.detach())
        invstd = torch.rsqrt(m2 / count + eps)
    y = kernels.forward(x, mean, invstd, weight, bias, residual, activation, negative_slope,
                        training)
    return y if not training else (y, count, mean, m2)


@torch.no_grad()
def update_running_stats(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Tensor | None, count: Tensor, mean: Tensor,
                         m2: Tensor, momentum: float | None, name: str = "batch_norm",
                         warn_key: object | None = None) -> None:
    """Fold one batch's (count, mean, m2) into the running statistics, in place.

    The non-finite guard is a `torch.where`, so it holds without a data-dependent branch under
    torch.compile; eager mode also warns, once per `warn_key`.
    """
    finite = torch.isfinite(mean).all() & torch.isfinite(m2).all()
    if not torch.compiler.is_compiling() and not finite:
        _warn_nonfinite(name, warn_key)
        return
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))
    if momentum is None:
        factor = num_batches_tracked.clamp_min(1).to(running_mean.dtype).reciprocal()
    else:
        factor = momentum
    unbiased_var = (m2 / (count - 1)).to(running_var.dtype)
    new_mean = torch.lerp(running_mean, mean.to(running_mean.dtype), factor)
    new_var = torch.lerp(running_var, unbiased_var, factor)
    running_mean.copy_(torch.where(finite, new_mean, running_mean))
    running_var.copy_(torch.where(finite, new_var, running_var))


def _warn_nonfinite(name: str, warn_key: object | None) -> None:
    if warn_key is not None:
        if warn_key in _warned_nonfinite:
            return
        _warned_nonfinite.add(warn_key)
    warnings.warn(
        f"{name}: the batch statistics are not finite (NaN or Inf in the input), so the running "
        f"statistics were left unchanged; find the input with "
        f"torch.autograd.set_detect_anomaly(True) or a forward pre-hook checking "
        f"torch.isfinite(input).all()", RuntimeWarning, stacklevel=4)
