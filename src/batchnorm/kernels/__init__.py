"""The kernel boundary: three `torch.library` custom ops carry all batch-norm math.

    batchnorm::stats(x) -> (count, mean, m2)
    batchnorm::forward(x, mean, invstd, weight?, bias?, z?, act, act_param, training) -> y
    batchnorm::backward(dy, x, mean, invstd, weight?, bias?, z?, y?, act, act_param, training,
                        count?, sum_dy?, sum_dy_xhat?, input_grad) -> (dx, dweight, dbias, dz)

`torch.compile` and `torch.export` see these ops as single opaque nodes (they have fake
implementations and `register_autograd`). Eager mode does not pay the ~70 us custom-op dispatch per
call: `BatchNormFunction` calls the same implementation functions through one autograd.Function.
Either way `implementation(x)` picks the module that does the work (the dispatch table below), so
the math exists once per kernel family.

With `training=True`, `mean` and `invstd` are the batch statistics of `x` itself, so the backward is
the closed form that differentiates through them (DESIGN.md, "The kernel boundary"); with
`training=False` they are constants (running statistics).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import Tensor

from batchnorm.kernels import native

ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu", "gelu_tanh")
# relu and leaky_relu recover act'(pre) from the sign of the output, so the forward keeps y.
OUTPUT_SAVING_ACTIVATIONS = ("relu", "leaky_relu")


_cpu: ModuleType | None = None
_CPU_DTYPES = (torch.float32, torch.float64)


def implementation(x: Tensor) -> ModuleType:
    """The dispatch table (device x dtype x layout): which module computes batch norm for `x`.

    CPU fp32/fp64, contiguous or channels-last: the Numba kernels (`cpu`, imported on first use
    so that importing batchnorm does not import Numba). CUDA: the Triton kernels where they
    apply. Everything else: `native`.
    """
    if x.device.type == "cpu" and x.dtype in _CPU_DTYPES:
        if (cpu := _cpu_kernels()).supports(x):
            return cpu
    elif x.is_cuda and (cuda := _cuda()) is not None and cuda.supports(x):
        return cuda
    return native


def fused_activations(x: Tensor) -> tuple[str, ...]:
    """The activations that `implementation(x)` fuses into its kernels at a profit; functional
    applies the others as torch ops after a kernel without one."""
    return getattr(implementation(x), "FUSED_ACTIVATIONS", ACTIVATIONS)


def update_running_stats(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Tensor | None, count: Tensor, mean: Tensor,
                         m2: Tensor, momentum: float | None) -> bool | None:
    """Eager fast path of `functional.update_running_stats` (the rule lives there): whether the
    batch statistics were finite and applied, or None where no kernel applies (the caller then
    runs its torch ops)."""
    if mean.device.type != "cpu" or mean.dtype not in _CPU_DTYPES:
        return None
    return _cpu_kernels().update_running_stats(running_mean, running_var, num_batches_tracked,
                                               count, mean, m2, momentum)


def _cpu_kernels() -> ModuleType:
    """The Numba kernels, imported on first use (importing Numba takes ~0.5 s)."""
    global _cpu
    if _cpu is None:
        from batchnorm.kernels import cpu as _cpu
    return _cpu


@functools.cache
def _cuda() -> ModuleType | None:
    """The Triton kernels, imported on the first CUDA tensor (importing triton takes seconds, and
    CPU-only runs never pay it); None when triton does not import: CUDA then runs native."""
    try:
        from batchnorm.kernels import cuda
    except ImportError:
        return None
    return cuda


# ---- custom ops: what torch.compile / torch.export see -------------------------------------

@torch.library.custom_op("batchnorm::stats", mutates_args=())
def stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel (count, mean, m2) of a non-empty (N, C, *spatial) tensor."""
    return implementation(x).stats(x)


@stats.register_fake
def _stats_fake(x):
    acc = native.accumulation_dtype(x.dtype)
    return tuple(x.new_empty((x.shape[1],), dtype=acc) for _ in range(3))


@torch.library.custom_op("batchnorm::forward", mutates_args=())
def forward(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
            z: Tensor | None, act: str, act_param: float, training: bool) -> Tensor:
    """y = act(weight * (x - mean) * invstd + bias (+ z))."""
    return implementation(x).forward(x, mean, invstd, weight, bias, z, act, act_param)


@forward.register_fake
def _forward_fake(x, mean, invstd, weight, bias, z, act, act_param, training):
    return torch.empty_like(x)


@torch.library.custom_op("batchnorm::backward", mutates_args=())
def backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
             bias: Tensor | None, z: Tensor | None, y: Tensor | None, act: str, act_param: float,
             training: bool, count: Tensor | None, sum_dy: Tensor | None,
             sum_dy_xhat: Tensor | None, input_grad: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closed-form backward: (dx, dweight, dbias, dz); see `native.backward` for the formulas."""
    dx, dweight, dbias, dz = implementation(x).backward(
        dy, x, mean, invstd, weight, bias, z, y, act, act_param, training, count, sum_dy,
        sum_dy_xhat, input_grad)
    # custom ops may not return their inputs: pass-through reductions and dz = dy are copied.
    dweight = dweight.clone() if dweight is sum_dy_xhat else dweight
    dbias = dbias.clone() if dbias is sum_dy else dbias
    dz = dz.clone() if dz is dy else dz
    return dx, dweight, dbias, dz


@backward.register_fake
def _backward_fake(dy, x, mean, invstd, weight, bias, z, y, act, act_param, training, count,
                   sum_dy, sum_dy_xhat, input_grad):
    reduced = x.new_empty((x.shape[1],), dtype=invstd.dtype)
    dx = torch.empty_like(x) if input_grad else x.new_empty(0)
    dz = torch.empty_like(z) if z is not None else x.new_empty(0)
    return dx, reduced, torch.empty_like(reduced), dz


def _forward_setup_context(ctx, inputs, output):
    x, mean, invstd, weight, bias, z, act, act_param, training = inputs
    ctx.save_for_backward(x, mean, invstd, weight, bias, z,
                          output if act in OUTPUT_SAVING_ACTIVATIONS else None)
    ctx.act, ctx.act_param, ctx.training = act, act_param, training


def _forward_backward(ctx, dy):
    x, mean, invstd, weight, bias, z, y = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, dweight, dbias, dz = backward(dy, x, mean, invstd, weight, bias, z, y, ctx.act,
                                      ctx.act_param, ctx.training, None, None, None, needs[0])
    return _grads_for_inputs(needs, (3, 4, 5), weight, bias, dx, dweight, dbias, dz) + (None,) * 3


torch.library.register_autograd("batchnorm::forward", _forward_backward,
                                setup_context=_forward_setup_context)


def _grads_for_inputs(needs, param_slots, weight, bias, dx, dweight, dbias, dz):
    """Gradients for x (slot 0) and weight, bias, z at `param_slots`; None where not needed."""
    weight_slot, bias_slot, z_slot = param_slots
    grads = [dx if needs[0] else None] + [None] * z_slot
    if needs[weight_slot]:
        grads[weight_slot] = dweight.to(weight.dtype)
    if needs[bias_slot]:
        grads[bias_slot] = dbias.to(bias.dtype)
    if needs[z_slot]:
        grads[z_slot] = dz
    return tuple(grads)


# ---- eager path: one autograd.Function call per layer call, no custom-op dispatch ---------

class BatchNormFunction(torch.autograd.Function):
    """Eager batch norm, returning y. Training (`mean is None`): fused statistics +
    normalization, and the batch's (count, mean, m2) appended to the list `stats`. Eval:
    normalization with the given statistics (`stats` unused).

    The statistics leave through a list, not as outputs: each output of an autograd.Function
    costs its call and its backward (measured with cold caches, as after a large kernel: 91 us
    for one output, 149 us for y and four non-differentiable statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, z, mean, invstd, eps, act, act_param, stats):
        impl = implementation(x)
        training = mean is None
        if training:
            y, count, mean, m2, invstd = impl.train_forward(x, weight, bias, z, eps, act, act_param)
            stats.extend((count, mean, m2))
        else:
            y = impl.forward(x, mean, invstd, weight, bias, z, act, act_param)
        ctx.save_for_backward(x, mean, invstd, weight, bias, z,
                              y if act in OUTPUT_SAVING_ACTIVATIONS else None)
        ctx.act, ctx.act_param, ctx.training = act, act_param, training
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, invstd, weight, bias, z, y = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dweight, dbias, dz = implementation(x).backward(
            dy, x, mean, invstd, weight, bias, z, y, ctx.act, ctx.act_param, ctx.training,
            None, None, None, needs[0])
        return _grads_for_inputs(needs, (1, 2, 3), weight, bias, dx, dweight, dbias, dz) + (None,) * 6


class BatchStatsNormFunction(BatchNormFunction):
    """Eager training-mode batch norm whose batch statistics were computed beforehand.

    Batch renorm needs the batch statistics before it normalizes (its weight and bias are adjusted
    by r and d, which depend on them), so the fused stats-and-normalize of `BatchNormFunction`
    does not fit. This normalizes with the given `mean`/`invstd` of `x` and, like the `forward` op
    with training=True, differentiates through them as batch statistics in the backward (the
    inherited one). `eps` and `stats` are unused: they keep `BatchNormFunction`'s arguments, so
    the backward's gradient slots stay the same.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, z, mean, invstd, eps, act, act_param, stats):
        y = implementation(x).forward(x, mean, invstd, weight, bias, z, act, act_param)
        ctx.save_for_backward(x, mean, invstd, weight, bias, z,
                              y if act in OUTPUT_SAVING_ACTIVATIONS else None)
        ctx.act, ctx.act_param, ctx.training = act, act_param, True
        return y
