"""Functional batch normalization: one argument check, one routing decision, one kernel call.

    y = act(weight * (x - E[x]) / sqrt(Var[x] + eps) + bias (+ residual)), per channel (dim 1)

(Ioffe & Szegedy 2015, arXiv 1502.03167). Each function here validates its arguments once, asks
`kernels.dispatch.choose` once which backend computes the call (torch's aten kernel, the
composite torch ops, or our Numba/Triton kernels: see that module), runs it, and hands the
batch's (count, mean, m2) to `rules.update_running_stats`, where the running-statistics rules
live. The variants (renorm, ghost, masked, sync) are composed from the same pieces.

`sync=True` (SyncBatchNorm): in training, the statistics are those of the global batch over the
ranks of a `torch.distributed` process group (see `_sync_batch_stats`); the rules then apply to
the global batch: the global M decides the M=1 error, a globally empty batch changes nothing, and
every rank applies the same update.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.distributed as dist
from torch import Tensor

from batchnorm import kernels, recompute, rules
from batchnorm.kernels import aten, dispatch, native
from batchnorm.kernels.native import accumulation_dtype, merge_stats
from batchnorm.errors import ArgumentError
from batchnorm.rules import ONE_VALUE_FIX, check_eps, check_momentum, update_running_stats

__all__ = ["batch_norm", "batch_renorm", "ghost_batch_norm", "masked_batch_norm", "renorm_limits",
           "check_momentum", "check_eps", "update_running_stats", "ArgumentError"]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_input(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                 weight: Tensor | None, bias: Tensor | None, name: str) -> None:
    """The input and the per-channel tensors. Runs on every call, so the common case costs a few
    attribute reads: no containers are built, and the messages are formed only on failure."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: expected input to be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point input, got dtype {input.dtype}; "
                        f"convert it first, e.g. input.float()")
    shape = input.shape
    if len(shape) >= 2:
        channels = shape[1]
    elif shape == (0,):
        channels = 0  # torch.nn.functional's reading of a (0,) input: no channels, empty output
    else:
        raise ValueError(f"{name}: expected input of shape (N, C, *spatial) with at least 2 "
                         f"dimensions, got shape {_shape(input)}")
    on_cpu = input.is_cpu
    for tensor in (running_mean, running_var, weight, bias):
        if tensor is not None and not (
                tensor.shape == (channels,)
                and (tensor.is_cpu if on_cpu else tensor.device == input.device)):
            _refuse_per_channel(input, channels, running_mean, running_var, weight, bias, name)


def _refuse_per_channel(input: Tensor, channels: int, running_mean, running_var, weight, bias,
                        name: str) -> None:
    """Raise `ArgumentError` for the per-channel tensor that does not fit the input, by name and
    in torch's words; but when two or more are given and all agree with each other (a layer built
    for other data), the input is the odd one: a wrong input channel count."""
    given = [(arg, t) for arg, t in (("running_mean", running_mean), ("running_var", running_var),
                                     ("weight", weight), ("bias", bias)) if t is not None]
    first = given[0][1]
    if (len(given) > 1 and first.ndim == 1 and first.shape[0] != channels
            and all(t.shape == first.shape for _, t in given)):
        raise ArgumentError(
            f"{name} expected input with {first.shape[0]} channels (dim 1), got shape "
            f"{_shape(input)} ({', '.join(arg for arg, _ in given)} have {first.shape[0]} "
            f"elements)")
    for arg, tensor in given:
        if tensor.ndim != 1:
            raise ArgumentError(f"{name}: {arg} must have shape ({channels},) to match the "
                                f"input's {channels} channels, got shape {_shape(tensor)}")
        if tensor.shape[0] != channels:
            raise ArgumentError(f"{name}: {arg} should contain {channels} elements not "
                                f"{tensor.shape[0]} (one per channel of the input of shape "
                                f"{_shape(input)})")
        if tensor.device != input.device:
            raise ArgumentError(f"{name}: {arg} is on {tensor.device} but the input is on "
                                f"{input.device}; move the layer with .to({str(input.device)!r})")


def _check_arguments(input, running_mean, running_var, weight, bias, momentum, eps, name,
                     training, num_batches_tracked) -> None:
    """The checks every batch-norm variant shares: input and per-channel tensors, eps, and, where
    the running statistics are updated, momentum and the statistics' pairing."""
    _check_input(input, running_mean, running_var, weight, bias, name)
    check_eps(eps, name, batch_stats=training or running_mean is None)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: running_mean and running_var must both be given or both be None")
    if training and running_mean is not None:
        check_momentum(momentum, name)
        if momentum is None and num_batches_tracked is None:
            raise ValueError(f"{name}: momentum=None (cumulative average) needs "
                             f"num_batches_tracked")


def _check_epilogue(input, residual, activation, negative_slope, name) -> None:
    if activation not in kernels.ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {', '.join(kernels.ACTIVATIONS)}, "
                         f"got {activation!r}")
    if activation == "leaky_relu" and (not isinstance(negative_slope, (int, float))
                                       or isinstance(negative_slope, bool)):
        raise ValueError(f"{name}: negative_slope must be a number, got {negative_slope!r}")
    if residual is not None and residual.shape != input.shape:
        raise ValueError(f"{name}: residual must have the input's shape {_shape(input)}, got "
                         f"{_shape(residual)}")


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float | None = 0.1, eps: float = 1e-5, *,
               num_batches_tracked: Tensor | None = None, residual: Tensor | None = None,
               activation: str = "identity", negative_slope: float = 0.01,
               layer_name: str | None = None, warn_key: object | None = None,
               sync: bool = False, process_group: "dist.ProcessGroup | None" = None) -> Tensor:
    """y = act(weight * (x - E[x]) / sqrt(Var[x] + eps) + bias (+ residual)), per channel (dim 1).

    Same semantics as `torch.nn.functional.batch_norm`: batch statistics are used when `training`
    is True or no running statistics are given, and running statistics are updated in place when
    both hold. Ioffe & Szegedy 2015, arXiv 1502.03167.

    Args:
        input: (N, C, *spatial), any floating dtype; fp16/bf16 accumulate in fp32. A (0,) input
            (with (0,) or no per-channel tensors) returns an empty tensor, as torch's does.
        running_mean, running_var: (C,) buffers or None.
        weight, bias: (C,) affine parameters or None.
        training: use (and update) batch statistics.
        momentum: EMA factor, usually in [0, 1] (any finite value, as in torch: outside it
            extrapolates), or None for a cumulative average (needs `num_batches_tracked`); read
            only in training with running statistics.
        eps: added to the variance: > 0 where batch statistics are used, >= 0 in eval.
        num_batches_tracked: 0-dim long buffer, incremented on each finite training update.
        residual: tensor shaped like `input`, added before the activation.
        activation: one of `kernels.ACTIVATIONS`, fused into the same kernel where that pays.
        negative_slope: the slope of "leaky_relu".
        layer_name: how errors and warnings name the caller, e.g. "BatchNorm2d(64)".
        warn_key: object the non-finite warning is issued once for (defaults to the call site),
            and, with `sync`, that the ranks' agreement on channels and dtype is checked once for
            (without one, on every call: one more small all-gather).
        sync: in training, compute the statistics over the global batch of all ranks of
            `process_group` (SyncBatchNorm). Every rank must then call this in the same order, in
            forward and backward, even with an empty batch. No communication in eval mode, with a
            world size of 1, or when torch.distributed is not initialized.
        process_group: the group `sync` reduces over; None is the default (world) group.

    Returns:
        A tensor shaped like `input`, in its dtype and memory format.

    Raises:
        TypeError: non-tensor or integer input, a non-number eps or momentum.
        ArgumentError (both ValueError and RuntimeError, as torch raises one or the other): a
            per-channel tensor of the wrong size or device, a wrong input channel count, eps
            <= 0 in training or < 0 in eval; the message carries torch's words.
        ValueError: a wrong input rank, a non-finite momentum; training with one value per
            channel (with `sync`, one value over all ranks); `sync` on a rank outside
            `process_group`; vmap over a training call that updates running statistics.
        RuntimeError: with `sync`, a collective failed (a rank died or timed out); the message
            names the layer.
    """
    name = layer_name or "batch_norm"
    _check_arguments(input, running_mean, running_var, weight, bias, momentum, eps, name,
                     training, num_batches_tracked)
    _check_epilogue(input, residual, activation, negative_slope, name)
    if activation == "leaky_relu" and negative_slope < 0:
        # The kernels' backward reads leaky_relu's derivative from the output's sign, which a
        # negative slope flips: normalize (and add the residual) fused, then torch's op.
        y = batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       num_batches_tracked=num_batches_tracked, residual=residual,
                       layer_name=layer_name, warn_key=warn_key, sync=sync,
                       process_group=process_group)
        return torch.nn.functional.leaky_relu(y, negative_slope)
    if sync and training and _sync_world_size(process_group, name) > 1:
        if torch.compiler.is_compiling():
            return _traced_sync_batch_norm(input, running_mean, running_var, weight, bias,
                                           momentum, eps, num_batches_tracked, residual,
                                           activation, negative_slope, process_group, name)
        return _sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps,
                                num_batches_tracked, residual, activation, negative_slope,
                                process_group, name, warn_key)
    if input.numel() == 0:
        return input.clone()
    fused = activation != "identity" or residual is not None
    if not (training or running_mean is None):
        backend = dispatch.choose(input, training=False, fused=fused,
                                  per_channel=(weight, bias, running_mean, running_var))
        return _normalize(backend, input, running_mean, running_var, weight, bias, residual, eps,
                          activation, negative_slope)
    _check_one_value(input.numel() // input.shape[1], _shape(input), name, ONE_VALUE_FIX)
    backend = dispatch.choose(input, training=True, fused=fused,
                              per_channel=(weight, bias, running_mean, running_var))
    if training and running_mean is not None and backend == "aten" and _plain_eager(input):
        y, new_mean, new_var = aten.train_updating(
            input, weight, bias, residual, eps, activation, negative_slope, running_mean,
            running_var, rules.momentum_value(momentum, num_batches_tracked))
        if not _recomputing():
            rules.commit_running_stats(running_mean, running_var, num_batches_tracked, new_mean,
                                       new_var, name, warn_key)
        return y
    y, count, mean, m2 = _train(backend, input, weight, bias, residual, eps, activation,
                                negative_slope)
    if training and running_mean is not None:
        _refuse_vmapped_update(mean, name)
        _update_once(running_mean, running_var, num_batches_tracked, count, mean, m2, momentum,
                     name, warn_key)
    return y


def _recomputing() -> bool:
    """Whether this is the recomputation of a checkpointed region (`batchnorm.recompute`)."""
    state = recompute.phase()
    return state is not None and state[0] == recompute.RECOMPUTE


def _update_once(running_mean, running_var, num_batches_tracked, count, mean, m2, momentum, name,
                 warn_key) -> None:
    """`update_running_stats`, except in the recomputation of a `torch.utils.checkpoint` region,
    whose first pass already counted this batch (torch.nn counts it twice, pytorch#96136)."""
    if not _recomputing():
        update_running_stats(running_mean, running_var, num_batches_tracked, count, mean, m2,
                             momentum, name, warn_key)


def _plain_eager(x: Tensor) -> bool:
    """Neither compiling nor under a transform: torch's kernel may write scratch buffers."""
    return not torch.compiler.is_compiling() and dispatch.transform(x) is None


def _train(backend: str, x: Tensor, weight, bias, z, eps: float, act: str, act_param: float
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training batch norm on `backend`: (y, count, mean, m2), the statistics without gradient."""
    if backend == "aten":
        return aten.train(x, weight, bias, z, eps, act, act_param)
    if backend == "composite":
        return native.composite_train(x, weight, bias, z, eps, act, act_param)
    family = kernels.kernel_family(backend)
    if act not in kernels.fused_activations(family):
        # This family's epilogue would be slower than torch's own op: normalize (and add the
        # residual) in the kernel, then activate.
        y, *stats = _train(backend, x, weight, bias, z, eps, "identity", 0.0)
        return (native.activate(y, act, act_param), *stats)
    if torch.compiler.is_compiling():
        count, mean, m2 = kernels.stats(x.detach())
        invstd = torch.rsqrt(m2 / count + eps)
        y = kernels.forward(x, mean, invstd, weight, bias, z, act, act_param, True, eps)
        return y, count, mean, m2
    stats: list[Tensor] = []
    y = kernels.BatchNormFunction.apply(x, weight, bias, z, None, None, eps, act, act_param, stats,
                                        family)
    return (y, *stats)


def _normalize(backend: str, x: Tensor, running_mean: Tensor, running_var: Tensor, weight, bias,
               z, eps: float, act: str, act_param: float) -> Tensor:
    """Eval batch norm with the running statistics, on `backend`."""
    if backend == "aten":
        return aten.normalize(x, running_mean, running_var, weight, bias, z, eps, act, act_param)
    acc = accumulation_dtype(x.dtype)
    mean, invstd = running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps)
    if backend == "composite":
        return native.forward(x, mean, invstd, weight, bias, z, act, act_param)
    return _kernel_normalize(backend, x, mean, invstd, weight, bias, z, eps, act, act_param,
                             training=False)


def _kernel_normalize(backend, x, mean, invstd, weight, bias, z, eps, act, act_param, training):
    """y = act(a*x + b (+ z)) on a kernel backend with given statistics; `training`: they are
    x's batch statistics, and the backward differentiates through them."""
    family = kernels.kernel_family(backend)
    if act not in kernels.fused_activations(family):
        y = _kernel_normalize(backend, x, mean, invstd, weight, bias, z, eps, "identity", 0.0,
                              training)
        return native.activate(y, act, act_param)
    if torch.compiler.is_compiling():
        return kernels.forward(x, mean, invstd, weight, bias, z, act, act_param, training, eps)
    function = kernels.BatchStatsNormFunction if training else kernels.BatchNormFunction
    return function.apply(x, weight, bias, z, mean, invstd, eps, act, act_param, None, family)


def _refuse_vmapped_update(mean: Tensor, name: str) -> None:
    """Under vmap each sample has its own batch statistics and there is no single update of the
    running statistics; torch.nn refuses too."""
    if torch.compiler.is_compiling():
        return
    t = mean
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        if torch._C._functorch.is_batchedtensor(t):
            raise ValueError(
                f"{name}: vmap over a training forward that updates running statistics has no "
                f"single update (each vmapped sample has its own batch statistics); call "
                f"torch.func.replace_all_batch_norm_modules_(model) first, construct the layer "
                f"with track_running_stats=False, or use eval mode")
        t = torch._C._functorch.get_unwrapped(t)


def _check_one_value(values_per_channel: int, shape: tuple[int, ...], name: str, fix: str) -> None:
    if values_per_channel == 1:
        raise rules.one_value_error(name, f"input of shape {shape}", fix)


# ---- the family: variants composed from the same kernels and the same update rule -------------

def _batch_stats(backend: str, x: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple | None]:
    """(count, mean, m2) of x without gradient, for variants that need the statistics before they
    normalize (renorm), and for the composite math also (mean, var) with their graph, which
    `_normalize_with_batch_stats` normalizes with (computed once, used twice)."""
    if backend in ("aten", "composite"):
        return native.composite_stats(x)
    if torch.compiler.is_compiling():
        return (*kernels.stats(x.detach()), None)
    return (*kernels.kernel_family(backend).stats(x.detach()), None)


def _normalize_with_batch_stats(backend: str, x: Tensor, mean: Tensor, invstd: Tensor,
                                weight: Tensor | None, bias: Tensor | None, eps: float,
                                differentiable: tuple | None) -> Tensor:
    """Normalize with batch statistics of x computed beforehand; the backward differentiates
    through them (training mode)."""
    if differentiable is not None:
        batch_mean, var = differentiable
        return native.forward(x, batch_mean, torch.rsqrt(var + eps), weight, bias, None,
                              "identity", 0.0)
    return _kernel_normalize(backend, x, mean, invstd, weight, bias, None, eps, "identity", 0.0,
                             training=True)


def check_renorm_limits(rmax: float, dmax: float, name: str) -> None:
    if isinstance(rmax, bool) or not isinstance(rmax, (int, float)) or not rmax >= 1:
        raise ValueError(f"{name}: rmax must be a number >= 1 (r is clipped to [1/rmax, rmax]; "
                         f"rmax=1 is plain batch norm), got {rmax!r}")
    if isinstance(dmax, bool) or not isinstance(dmax, (int, float)) or not dmax >= 0:
        raise ValueError(f"{name}: dmax must be a number >= 0 (d is clipped to [-dmax, dmax]; "
                         f"dmax=0 is plain batch norm), got {dmax!r}")


def check_ramp(ramp: tuple[int, int] | None, arg: str, name: str) -> None:
    ok = ramp is None or (isinstance(ramp, (tuple, list)) and len(ramp) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) for s in ramp) and 0 <= ramp[0] <= ramp[1])
    if not ok:
        raise ValueError(f"{name}: {arg} must be None (fixed limit) or a pair of training steps "
                         f"(start, end) with 0 <= start <= end, got {ramp!r}")


def renorm_limits(step: Tensor, rmax: float, dmax: float, rmax_ramp: tuple[int, int] | None,
                  dmax_ramp: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
    """The clipping limits (rmax_t, dmax_t) of batch renorm at training step `step`.

    rmax_t = 1 + (rmax - 1) p_r and dmax_t = dmax p_d, where p = clip((step - start) / (end -
    start), 0, 1) for a ramp (start, end) and p = 1 for ramp None: plain batch norm until `start`,
    the full limits from `end` on (Ioffe 2017, arXiv 1702.03275, s4: rmax 1 -> 3 over steps 5k-40k,
    dmax 0 -> 5 over 5k-25k). Computed as tensors from the step buffer, so a compiled model does
    not recompile as the step advances.
    """
    def progress(ramp):
        if ramp is None:
            return torch.ones((), device=step.device)
        start, end = ramp
        return ((step - start) / max(end - start, 1)).clamp(0.0, 1.0)

    return 1.0 + (rmax - 1.0) * progress(rmax_ramp), dmax * progress(dmax_ramp)


def batch_renorm(input: Tensor, running_mean: Tensor, running_var: Tensor,
                 weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                 momentum: float | None = 0.01, eps: float = 1e-5, *,
                 rmax: float | Tensor = 3.0, dmax: float | Tensor = 5.0,
                 num_batches_tracked: Tensor | None = None, layer_name: str | None = None,
                 warn_key: object | None = None, sync: bool = False,
                 process_group: "dist.ProcessGroup | None" = None) -> Tensor:
    """y = gamma * (x_hat * r + d) + beta, x_hat = (x - mu_B) / sigma_B, per channel (dim 1), with

        r = clip(sigma_B / sigma, 1/rmax, rmax),   d = clip((mu_B - mu) / sigma, -dmax, dmax),
        sigma_B = sqrt(Var_B[x] + eps),            sigma = sqrt(running_var + eps), mu = running_mean,

    r and d treated as constants by the gradient (Ioffe 2017, arXiv 1702.03275, Algorithm 1).
    Inference is batch norm on the running statistics. With rmax=1 and dmax=0 this is batch norm.

    It is batch norm with weight gamma*r and bias beta + gamma*d: the batch statistics are computed
    first (r and d need them), then one normalization whose backward differentiates through them.
    The running statistics follow `batch_norm`'s rules (unbiased variance, M = N x spatial), so
    they stay compatible with BatchNorm's buffers; the paper's EMA of sigma is replaced by the EMA
    of the variance that sigma is computed from.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked, layer_name, warn_key: as in `batch_norm`; the running statistics are
            required (r and d compare the batch with them). momentum defaults to the paper's 0.01.
        rmax: r's clipping limit, >= 1 (a number, or a 0-dim tensor from `renorm_limits`).
        dmax: d's clipping limit, >= 0 (likewise).
        sync, process_group: as in `batch_norm`: in training, mu_B and sigma_B (so r and d) are
            those of the global batch of the group's ranks.

    Raises:
        ValueError: missing running statistics, rmax < 1, dmax < 0, training with one value per
            channel, and everything `batch_norm` checks.
    """
    name = layer_name or "batch_renorm"
    if running_mean is None or running_var is None:
        raise ValueError(f"{name}: batch renorm needs running_mean and running_var (r and d compare "
                         f"the batch statistics with them); use batch_norm without running "
                         f"statistics")
    # Scheduled limits arrive as tensors from `renorm_limits`, which keeps them in range.
    check_renorm_limits(1.0 if isinstance(rmax, Tensor) else rmax,
                        0.0 if isinstance(dmax, Tensor) else dmax, name)
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps,
                          layer_name=name)
    _check_arguments(input, running_mean, running_var, weight, bias, momentum, eps, name,
                     training, num_batches_tracked)
    fix = "use eval mode or GroupNorm for batch size 1"
    syncing = sync and _sync_world_size(process_group, name) > 1
    if syncing:
        count, mean, m2 = _sync_batch_stats(input, process_group, name, fix, warn_key)
        if count[0] == 0:  # every rank's batch is empty: all ranks return here alike
            return input.clone()
    else:
        if input.numel() == 0:
            return input.clone()
        _check_one_value(input.numel() // input.shape[1], _shape(input), name, fix)
        backend = dispatch.choose(input, training=True, fused=True)
        if backend == "composite" and torch.compiler.is_compiling():
            # Inductor (torch 2.13) miscompiles the gradient of the composite renorm (0.27 off
            # eager on a 7x3x4x4 batch; aot_eager is right): compiled, renorm takes the custom
            # ops, which it keeps opaque.
            backend = "native"
        count, mean, m2, differentiable = _batch_stats(backend, input)
    var = m2 / count
    invstd = torch.rsqrt(var + eps)
    # r and d compare the batch with the running statistics, which the first pass of a
    # checkpointed region has already updated when the recomputation runs: it replays the ones
    # the first pass saw (see `batchnorm.recompute`).
    checkpointed, limits_of = recompute.phase(), (running_mean, running_var, rmax, dmax)
    if checkpointed is not None and checkpointed[0] == recompute.RECOMPUTE:
        limits_of = recompute.replay(running_mean, mean, name)
    elif checkpointed is not None:
        recompute.record(checkpointed[1], running_mean, mean,
                         (running_mean.clone(), running_var.clone(), rmax, dmax))
    with torch.no_grad():
        seen_mean, seen_var, rmax, dmax = limits_of
        rmax = torch.as_tensor(rmax, dtype=mean.dtype, device=mean.device)
        dmax = torch.as_tensor(dmax, dtype=mean.dtype, device=mean.device)
        sigma = torch.sqrt(seen_var.to(mean.dtype) + eps)
        r = torch.clamp(torch.sqrt(var + eps) / sigma, 1.0 / rmax, rmax)
        d = torch.clamp((mean - seen_mean.to(mean.dtype)) / sigma, -dmax, dmax)
    renorm_weight = r if weight is None else weight * r
    renorm_bias = d if weight is None else weight * d
    renorm_bias = renorm_bias if bias is None else renorm_bias + bias
    if syncing:
        y = _sync_normalize(input, mean, invstd, count, renorm_weight, renorm_bias, None,
                            "identity", 0.0, process_group, name)
    else:
        y = _normalize_with_batch_stats(backend, input, mean, invstd, renorm_weight, renorm_bias,
                                        eps, differentiable)
    _refuse_vmapped_update(mean, name)
    if checkpointed is None or checkpointed[0] != recompute.RECOMPUTE:
        update_running_stats(running_mean, running_var, num_batches_tracked, count, mean, m2,
                             momentum, name, warn_key)
    return y


def virtual_batch_sizes(batch_size: int, virtual_batch_size: int, values_per_sample: int
                        ) -> list[int]:
    """The chunk sizes ghost batch norm splits a batch into: `virtual_batch_size` samples each,
    the last chunk holding the remainder; a remainder of one value per channel (one sample, no
    spatial dimensions) joins the chunk before it, since it has no variance of its own."""
    sizes = [virtual_batch_size] * (batch_size // virtual_batch_size)
    remainder = batch_size % virtual_batch_size
    if remainder:
        if remainder * values_per_sample == 1 and sizes:
            sizes[-1] += remainder
        else:
            sizes.append(remainder)
    return sizes


def check_virtual_batch_size(virtual_batch_size: int, name: str) -> None:
    if (isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int)
            or virtual_batch_size <= 0):
        raise ValueError(f"{name}: virtual_batch_size must be a positive int (samples per ghost "
                         f"batch), got {virtual_batch_size!r}")


def ghost_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                     weight: Tensor | None = None, bias: Tensor | None = None,
                     training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5, *,
                     virtual_batch_size: int, num_batches_tracked: Tensor | None = None,
                     layer_name: str | None = None, warn_key: object | None = None) -> Tensor:
    """y_k = gamma * (x_k - E[x_k]) / sqrt(Var[x_k] + eps) + beta for each virtual batch x_k.

    The batch is split along dim 0 into chunks of `virtual_batch_size` samples (see
    `virtual_batch_sizes` for the last, smaller chunk), each normalized with its own statistics
    (Hoffer, Hubara & Soudry 2017, arXiv 1705.08741, "ghost batch normalization"). The running
    statistics are updated once per call with the chunks' (count, mean, m2) merged by Chan's
    formula, i.e. weighted by each chunk's count: they are the statistics of the whole batch, so
    a model trained with ghost batches is evaluated like one trained with BatchNorm. Eval with
    running statistics is plain batch norm and never needs the batch to divide evenly. With
    virtual_batch_size >= N this is `batch_norm`.

    Args:
        virtual_batch_size: samples per ghost batch, > 0.
        The others: as in `batch_norm`.

    Raises:
        ValueError: virtual_batch_size <= 0, a chunk with one value per channel, and everything
            `batch_norm` checks.
    """
    name = layer_name or "ghost_batch_norm"
    check_virtual_batch_size(virtual_batch_size, name)
    if not (training or running_mean is None):
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps,
                          layer_name=name)
    _check_arguments(input, running_mean, running_var, weight, bias, momentum, eps, name,
                     training, num_batches_tracked)
    if input.numel() == 0:
        return input.clone()
    values_per_sample = input[0, 0].numel()
    sizes = virtual_batch_sizes(input.shape[0], virtual_batch_size, values_per_sample)
    outputs, partials = [], []
    for chunk in input.split(sizes):
        _check_one_value(chunk.numel() // chunk.shape[1], _shape(chunk), name,
                         "use a larger virtual_batch_size or eval mode")
        backend = dispatch.choose(chunk, training=True, fused=False, per_channel=(weight, bias))
        y, count, mean, m2 = _train(backend, chunk,
                                    weight, bias, None, eps, "identity", 0.0)
        outputs.append(y)
        partials.append((count, mean, m2))
    if training and running_mean is not None:
        count, mean, m2 = merge_stats(*(torch.stack(p) for p in zip(*partials)))
        _refuse_vmapped_update(mean, name)
        _update_once(running_mean, running_var, num_batches_tracked, count, mean, m2, momentum,
                     name, warn_key)
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _broadcast_mask(mask: Tensor, input: Tensor, name: str) -> Tensor:
    """The mask broadcast to the input's batch and spatial shape (N, *spatial)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name}: mask must be a bool tensor (True = a valid position), got {got}; "
                        f"convert it with mask.bool()")
    target = (input.shape[0],) + tuple(input.shape[2:])
    try:
        shape = torch.broadcast_shapes(mask.shape, target)
    except RuntimeError:
        shape = None
    if shape != torch.Size(target):
        raise ValueError(f"{name}: mask must be broadcastable to the input's batch and spatial shape "
                         f"(N, *spatial) = {target} (it has no channel dimension), got shape "
                         f"{_shape(mask)}")
    if mask.device != input.device:
        raise ValueError(f"{name}: mask is on {mask.device} but the input is on {input.device}")
    return mask.expand(target)


def masked_batch_norm(input: Tensor, mask: Tensor | None, running_mean: Tensor | None,
                      running_var: Tensor | None, weight: Tensor | None = None,
                      bias: Tensor | None = None, training: bool = False,
                      momentum: float | None = 0.1, eps: float = 1e-5, *,
                      num_batches_tracked: Tensor | None = None, layer_name: str | None = None,
                      warn_key: object | None = None) -> Tensor:
    """y = gamma * (x - E_m[x]) / sqrt(Var_m[x] + eps) + beta where mask is True, 0 where False.

    E_m and Var_m run over the valid positions only (M = number of True entries of the mask
    broadcast to (N, *spatial)), so padding neither enters the statistics nor receives gradient:
    the result equals batch norm on the unpadded values, and the running statistics are updated
    from them. mask=None is `batch_norm`. Masked statistics for variable-length sequences follow
    e.g. Shen et al. 2020 (PowerNorm, arXiv 2003.07845, s3).

    The valid positions are gathered into an (M, C) batch that goes through the batch-norm kernels
    and scattered back, so the normalization math is batch norm's own. Under torch.compile the
    gather has a data-dependent size, which the custom ops support.

    Args:
        mask: bool, broadcastable to (N, *spatial) (no channel dimension), True = valid.
        The others: as in `batch_norm`.

    Raises:
        TypeError: a mask that is not a bool tensor.
        ValueError: a mask of the wrong shape or device, one valid value per channel in
            training, and everything `batch_norm` checks.
    """
    name = layer_name or "masked_batch_norm"
    if mask is None:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                          num_batches_tracked=num_batches_tracked, layer_name=name,
                          warn_key=warn_key)
    _check_input(input, running_mean, running_var, weight, bias, name)
    if input.ndim == 1:  # the (0,) input, which `_check_input` lets through: empty, as batch_norm
        return input.clone()
    mask = _broadcast_mask(mask, input, name)
    if not (training or running_mean is None):
        y = batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps,
                       layer_name=name)
        return torch.where(mask.unsqueeze(1), y, 0.0)
    _check_arguments(input, running_mean, running_var, weight, bias, momentum, eps, name,
                     training, num_batches_tracked)
    channels_last = input.movedim(1, -1)
    valid = channels_last[mask]
    if not torch.compiler.is_compiling():
        # Data-dependent checks; compiled, an all-padding batch gives non-finite statistics, which
        # the update rule already ignores.
        if valid.shape[0] == 0:
            return torch.where(mask.unsqueeze(1), input, 0.0)  # zeros, still part of the graph
        _check_one_value(valid.shape[0], _shape(input), name,
                         "the mask leaves one valid position; use eval mode for it")
    backend = dispatch.choose(valid, training=True, fused=False, per_channel=(weight, bias))
    y, count, mean, m2 = _train(backend, valid, weight, bias, None, eps, "identity", 0.0)
    if training and running_mean is not None:
        _refuse_vmapped_update(mean, name)
        _update_once(running_mean, running_var, num_batches_tracked, count, mean, m2, momentum,
                     name, warn_key)
    # index_put, not masked_scatter: the latter's backward has no forward-mode derivative in
    # torch (forward-over-reverse fails on it).
    out = torch.zeros_like(channels_last).index_put((mask,), y)
    return out.movedim(-1, 1)


# ---- sync: statistics over the global batch of a process group ------------------------------
# Two reusable pieces, which every synced variant composes: `_sync_batch_stats` (the global
# statistics) and `_SyncNormalizeFunction` (normalization with them, whose backward all-reduces the
# gradient sums, applied through `_sync_normalize`). Both run eagerly under torch.compile
# (`torch.compiler.disable`): they are collectives inside Python and an autograd.Function.


def _eager_only(fn):
    """`torch.compiler.disable(fn)`, decided at call time: as a decorator it imports torch._dynamo
    (seconds, and triton with it) on `import batchnorm`, and eager calls should never pay that."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)
    return run


def _sync_world_size(process_group: "dist.ProcessGroup | None", name: str) -> int:
    """Ranks in `process_group`; 1 when torch.distributed is unavailable or not initialized, so a
    synced model also runs in a plain single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    if dist.get_rank(process_group) < 0:
        raise ValueError(f"{name}: sync=True on rank {dist.get_rank()}, which is not a member of "
                         f"process_group; run the layer only on the group's ranks, or build it "
                         f"with a group that contains this rank")
    return dist.get_world_size(process_group)


@_eager_only  # collectives and a data-dependent update
def _sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps,
                     num_batches_tracked, residual, activation, negative_slope, process_group,
                     name, warn_key):
    """Training with global statistics, then the running-statistics update, identical on every
    rank because every rank merges the same gathered partials in the same order."""
    count, mean, m2 = _sync_batch_stats(input, process_group, name, checked_key=warn_key)
    invstd = torch.rsqrt(m2 / count.clamp_min(1) + eps)
    y = _sync_normalize(input, mean, invstd, count, weight, bias, residual, activation,
                        negative_slope, process_group, name)
    if running_mean is not None and count[0] > 0:
        _update_once(running_mean, running_var, num_batches_tracked, count, mean, m2, momentum,
                     name, warn_key)
    return y


def _traced_sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps,
                            num_batches_tracked, residual, activation, negative_slope,
                            process_group, name):
    """SyncBatchNorm as torch.compile traces it, so that `fullgraph=True` holds (torch.nn's
    graph-breaks: pytorch#161302, #156680): the same global statistics as `_sync_batch_stats`,
    but from differentiable torch ops and a functional all-gather, whose autograd formula (a
    reduce-scatter of the gradient) takes the place of the eager backward's all-reduce of the
    gradient sums.

    What a trace cannot do: raise on one value per channel over all ranks (the count is another
    rank's data), and skip the update for a globally empty batch by a branch; its statistics are
    made NaN instead, which the update rule ignores (`rules`).
    """
    from torch.distributed import _functional_collectives as funcol

    acc = accumulation_dtype(input.dtype)
    x = input.to(acc)
    channels = x.shape[1]
    if x.numel() > 0:
        var, mean = torch.var_mean(x, native.reduce_dims(x), correction=0)
    else:
        var = mean = x.new_zeros(channels)
    count = torch.full_like(mean, x.numel() // channels).detach()
    local = torch.stack([count, mean, var * count])  # (3, C)
    gathered = funcol.all_gather_tensor_autograd(local, gather_dim=0, group=_group(process_group))
    gathered = gathered.view(-1, 3, channels)  # (world, 3, C), rank order
    total, mean, m2 = merge_stats(gathered[:, 0].detach(), gathered[:, 1], gathered[:, 2])
    invstd = torch.rsqrt(m2 / total.clamp_min(1) + eps)
    y = native.forward(input, mean, invstd, weight, bias, residual, activation, negative_slope)
    if running_mean is not None:
        empty = torch.where(total > 0, 0.0, float("nan"))
        _update_once(running_mean, running_var, num_batches_tracked, total, mean.detach() + empty,
                     m2.detach(), momentum, name, None)
    return y


def _group(process_group):
    """The group functional collectives take: None means the default (world) group."""
    return dist.group.WORLD if process_group is None else process_group


def _collective(what: str, call, process_group, name: str) -> None:
    """Run one collective; a failure becomes an error that names the layer and the usual causes,
    since the backend's message names only its own internals."""
    try:
        call()
    except RuntimeError as error:
        raise RuntimeError(
            f"{name}: the {what} across the {dist.get_world_size(process_group)} ranks of the "
            f"process group failed on rank {dist.get_rank()}: another rank has died, timed out, or "
            f"did not run this layer (every rank must run the forward and backward of every synced "
            f"layer in the same order, even with an empty batch), or the backend does not take "
            f"these tensors. Backend error: {error}"
        ) from error


@_eager_only  # collectives
@torch.no_grad()
def _sync_batch_stats(x: Tensor, process_group, name: str, fix: str = ONE_VALUE_FIX,
                      checked_key: object | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel (count, mean, m2) of the global batch: the concatenation of every rank's `x`.

    Local (count, mean, m2) from the `stats` kernel (zeros for an empty local batch), one
    all-gather of the (3, C) partials, then Chan's merge weighted by count (`merge_stats`, which
    ignores empty partials). An all-gather rather than an all-reduce because the merge is
    exact where summing (n, n*mean, m2 + n*mean^2) cancels catastrophically when |mean| >> std.
    Every rank merges the same partials in the same order: the results are bitwise identical.

    Raises ValueError, on every rank alike, when the global batch has one value per channel
    (`fix` replaces the error's advice), or when the ranks disagree on the channel count or dtype
    (checked on the first call for `checked_key`, the layer, or on every call without one).
    """
    _check_ranks_agree(x, process_group, name, checked_key)
    acc = accumulation_dtype(x.dtype)
    if x.numel() > 0:
        local = torch.stack(kernels.implementation(x).stats(x))
    else:
        local = x.new_zeros((3, x.shape[1]), dtype=acc)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    _collective("all-gather of the batch statistics",
                lambda: dist.all_gather(gathered, local, group=process_group), process_group, name)
    partials = torch.stack(gathered)
    count, mean, m2 = merge_stats(partials[:, 0], partials[:, 1], partials[:, 2])
    if int(count[0]) == 1:
        raise rules.one_value_error(name, f"input of shape {_shape(x)} on this rank, 1 value per "
                                     f"channel over all {len(gathered)} ranks", fix)
    return count, mean, m2


_DTYPE_CODES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_agreed: "weakref.WeakKeyDictionary[object, set]" = weakref.WeakKeyDictionary()


def _check_ranks_agree(x: Tensor, process_group, name: str, checked_key: object | None) -> None:
    """One all-gather of (channels, dtype) before a layer's first synced statistics: ranks whose
    models differ would otherwise all-gather partials of different sizes (a gloo abort or a hang)
    or merge mismatched statistics. A model is built once, so one check per layer and group."""
    group_key = id(process_group)
    if checked_key is not None and group_key in _agreed.get(checked_key, ()):
        return
    mine = torch.tensor([x.shape[1], _DTYPE_CODES.index(x.dtype)], device=x.device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(process_group))]
    _collective("all-gather of the channel counts and dtypes",
                lambda: dist.all_gather(gathered, mine, group=process_group), process_group, name)
    seen = [(int(c), _DTYPE_CODES[int(d)]) for c, d in gathered]
    if any(other != seen[0] for other in seen):
        described = ", ".join(f"rank {rank} has {c} channels of {str(d)[6:]}"
                              for rank, (c, d) in enumerate(seen))
        raise ValueError(f"{name}: the ranks' inputs disagree ({described}); every rank must "
                         f"build the same model and feed it the same dtype")
    if checked_key is not None:
        _agreed.setdefault(checked_key, set()).add(group_key)


@_eager_only  # an autograd.Function issuing collectives
def _sync_normalize(x, mean, invstd, count, weight, bias, z, act, act_param, process_group, name):
    return _SyncNormalizeFunction.apply(x, mean, invstd, count, weight, bias, z, act, act_param,
                                        process_group, name)


class _SyncNormalizeFunction(torch.autograd.Function):
    """y = act(weight * (x - mean) * invstd + bias (+ z)) with the global batch statistics
    (mean, invstd, count) of `_sync_batch_stats`, differentiating through them.

    Backward: local sum(g) and sum(g * x_hat) (`backward` kernel with input_grad=False), one
    all-reduce of the (2, C) sums, then dx from the `backward` kernel with the global sums and the
    global count M. dweight/dbias are this rank's contributions: DDP averages parameter gradients
    across ranks as for every other layer, so the result is the gradient of the mean of the
    per-rank losses. An empty local batch contributes zero sums and gets empty gradients.
    """

    @staticmethod
    def forward(ctx, x, mean, invstd, count, weight, bias, z, act, act_param, process_group, name):
        if x.numel() > 0:
            y = kernels.implementation(x).forward(x, mean, invstd, weight, bias, z, act, act_param)
        else:
            y = torch.empty_like(x)
        ctx.save_for_backward(x, mean, invstd, count, weight, bias, z,
                              y if act in kernels.OUTPUT_SAVING_ACTIVATIONS else None)
        ctx.act, ctx.act_param, ctx.process_group, ctx.name = act, act_param, process_group, name
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, invstd, count, weight, bias, z, y = ctx.saved_tensors
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{ctx.name}: a differentiable backward (create_graph=True, e.g. a gradient "
                f"penalty) through batch norm synced across "
                f"{dist.get_world_size(ctx.process_group)} ranks is not supported; compute the "
                f"penalty on a model whose batch norms are not synced "
                f"(batchnorm.revert_sync_batchnorm), or in eval mode")
        needs = ctx.needs_input_grad
        impl = kernels.implementation(x)
        if x.numel() > 0:
            _, sum_dy_xhat, sum_dy, dz = impl.backward(
                dy, x, mean, invstd, weight, bias, z, y, ctx.act, ctx.act_param, True, None, None,
                None, False)
        else:
            sum_dy_xhat, sum_dy = torch.zeros_like(invstd), torch.zeros_like(invstd)
            dz = torch.empty_like(z) if z is not None else None
        sums = torch.stack([sum_dy, sum_dy_xhat])
        _collective("all-reduce of the gradient sums",
                    lambda: dist.all_reduce(sums, group=ctx.process_group), ctx.process_group,
                    ctx.name)
        dx = None
        if needs[0]:
            if x.numel() > 0:
                dx, _, _, _ = impl.backward(
                    dy, x, mean, invstd, weight, bias, z, y, ctx.act, ctx.act_param, True, count,
                    sums[0], sums[1], True)
            else:
                dx = torch.empty_like(x)
        grads = kernels._grads_for_inputs(needs, (4, 5, 6), weight, bias, dx, sum_dy_xhat, sum_dy,
                                          dz)
        return grads + (None,) * 4
