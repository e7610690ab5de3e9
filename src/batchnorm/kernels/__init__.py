"""The kernel boundary: three `torch.library` custom ops carry all batch-norm math.

    batchnorm::stats(x) -> (count, mean, m2)
    batchnorm::forward(x, mean, invstd, weight?, bias?, z?, act, act_param, training) -> y
    batchnorm::backward(dy, x, mean, invstd, weight?, bias?, z?, y?, act, act_param, training,
                        count?, sum_dy?, sum_dy_xhat?, input_grad) -> (dx, dweight, dbias, dz)

Which backend computes a call is decided once, by `dispatch.choose` (torch's aten kernel, the
composite torch ops, or one of the kernel families below). The kernel families (`cpu`: Numba,
`cuda`: Triton, `native`: torch ops) implement these three ops. Eager mode does not pay the ~70 us
custom-op dispatch per call: `BatchNormFunction` calls the chosen family's functions through one
autograd.Function. Compiled with a kernel backend forced, the custom ops are what torch.compile
and torch.export see (single opaque nodes with fake implementations and `register_autograd`),
and `implementation(x)` picks their family.

The closed-form backward is not itself differentiable. When a graph of the backward is asked for
(create_graph=True: gradient penalties, MAML, Hessian-vector products) or its gradient is batched
(is_grads_batched=True), the backward recomputes the forward with the composite torch ops and
differentiates that (`_differentiable_backward`): never a gradient without its graph.

With `training=True`, `mean` and `invstd` are the batch statistics of `x` itself, so the backward is
the closed form that differentiates through them (DESIGN.md, "The kernel boundary"); with
`training=False` they are constants (running statistics).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch._decomp
from torch import Tensor

from batchnorm.kernels import native

ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu", "gelu_tanh")
# relu and leaky_relu recover act'(pre) from the sign of the output, so the forward keeps y.
OUTPUT_SAVING_ACTIVATIONS = ("relu", "leaky_relu")


_cpu: ModuleType | None = None
_CPU_DTYPES = (torch.float32, torch.float64)


def implementation(x: Tensor) -> ModuleType:
    """The kernel family of the custom ops for `x` (device x dtype x layout): the Numba kernels
    for CPU fp32/fp64, contiguous or channels-last (`cpu`, imported on first use so that
    importing batchnorm does not import Numba); the Triton kernels for the CUDA tensors they
    take; `native` for everything else."""
    if x.device.type == "cpu" and x.dtype in _CPU_DTYPES:
        if (cpu := _cpu_kernels()).supports(x):
            return cpu
    elif x.is_cuda and (cuda := _cuda()) is not None and cuda.supports(x):
        return cuda
    return native


def kernel_family(backend: str) -> ModuleType:
    """The module of a kernel backend of `dispatch.KERNEL_BACKENDS`."""
    if backend == "numba":
        return _cpu_kernels()
    if backend == "triton":
        return _cuda()
    return native


def fused_activations(family: ModuleType) -> tuple[str, ...]:
    """The activations that a kernel family fuses at a profit; functional applies the others as
    torch ops after a kernel without one."""
    return getattr(family, "FUSED_ACTIVATIONS", ACTIVATIONS)


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
            z: Tensor | None, act: str, act_param: float, training: bool, eps: float) -> Tensor:
    """y = act(weight * (x - mean) * invstd + bias (+ z)); with `training`, mean and invstd are
    x's batch statistics (invstd formed with `eps`), and the backward differentiates through
    them."""
    return implementation(x).forward(x, mean, invstd, weight, bias, z, act, act_param)


@forward.register_fake
def _forward_fake(x, mean, invstd, weight, bias, z, act, act_param, training, eps):
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


# The composite math each op computes, as decompositions: `torch.onnx.export(dynamo=True)` (and
# `ExportedProgram.run_decompositions` with torch's table) lowers our ops to standard aten ops, so
# a model exported with a kernel backend forced needs no translation table. Inductor's own
# decomposition table does not include these: compiled, the ops stay our kernels.
torch._decomp.register_decomposition(torch.ops.batchnorm.stats.default)(native.stats)
torch._decomp.register_decomposition(torch.ops.batchnorm.forward.default)(
    lambda x, mean, invstd, weight, bias, z, act, act_param, training, eps:
    native.forward(x, mean, invstd, weight, bias, z, act, act_param))


@torch._decomp.register_decomposition(torch.ops.batchnorm.backward.default)
def _backward_decomposition(dy, x, mean, invstd, weight, bias, z, y, act, act_param, training,
                            count, sum_dy, sum_dy_xhat, input_grad):
    dx, dweight, dbias, dz = native.backward(dy, x, mean, invstd, weight, bias, z, y, act,
                                             act_param, training, count, sum_dy, sum_dy_xhat,
                                             input_grad)
    return dx, dweight.clone(), dbias.clone(), dz.clone()


def _forward_setup_context(ctx, inputs, output):
    x, mean, invstd, weight, bias, z, act, act_param, training, eps = inputs
    ctx.save_for_backward(x, mean, invstd, weight, bias, z,
                          output if act in OUTPUT_SAVING_ACTIVATIONS else None)
    ctx.act, ctx.act_param, ctx.training, ctx.eps = act, act_param, training, eps
    ctx.tensor_slots = (0, 3, 4, 5)  # x, weight, bias, z among the op's arguments


def _forward_backward(ctx, dy):
    x, mean, invstd, weight, bias, z, y = ctx.saved_tensors
    if torch.is_grad_enabled() or not _plain(dy):
        return _differentiable_backward(ctx, dy, x, mean, invstd, weight, bias, z)
    needs = ctx.needs_input_grad
    dx, dweight, dbias, dz = backward(dy, x, mean, invstd, weight, bias, z, y, ctx.act,
                                      ctx.act_param, ctx.training, None, None, None, needs[0])
    return _grads_for_inputs(needs, (3, 4, 5), weight, bias, dx, dweight, dbias, dz) + (None,) * 4


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

def _plain(t: Tensor) -> bool:
    """Whether `t` holds its own data: not a subclass, a torch.func wrapper, or the batched
    gradient of is_grads_batched=True (the legacy vmap's Batched key)."""
    return (type(t) is Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(t)
            and not torch._C._functorch.is_legacy_batchedtensor(t))


def _differentiable_backward(ctx, dy, x, mean, invstd, weight, bias, z):
    """The gradients as autograd computes them through the composite forward (`native`), so
    that they carry their own graph (create_graph=True) or batch with dy (is_grads_batched)."""
    create_graph = torch.is_grad_enabled()
    needs = ctx.needs_input_grad
    slots = [(slot, t) for slot, t in zip(ctx.tensor_slots, (x, weight, bias, z))
             if t is not None and needs[slot]]
    with torch.enable_grad():
        leaves = [t if t.requires_grad else t.detach().requires_grad_() for _, t in slots]
        inputs = dict(zip((slot for slot, _ in slots), leaves))
        xi = inputs.get(ctx.tensor_slots[0], x)
        wi, bi, zi = (inputs.get(slot, t) for slot, t in zip(ctx.tensor_slots[1:],
                                                                (weight, bias, z)))
        if ctx.training:
            y = native.composite_train(xi, wi, bi, zi, ctx.eps, ctx.act, ctx.act_param)[0]
        else:
            y = native.forward(xi, mean, invstd, wi, bi, zi, ctx.act, ctx.act_param)
        grads = torch.autograd.grad(y, leaves, dy, create_graph=create_graph, allow_unused=True)
    result = [None] * len(needs)
    for (slot, t), grad in zip(slots, grads):
        result[slot] = torch.zeros_like(t) if grad is None else grad
    return tuple(result)


class BatchNormFunction(torch.autograd.Function):
    """Eager batch norm on a kernel family (`family`), returning y. Training (`mean is None`):
    fused statistics + normalization, and the batch's (count, mean, m2) appended to the list
    `stats`. Eval: normalization with the given statistics (`stats` unused).

    The statistics leave through a list, not as outputs: each output of an autograd.Function
    costs its call and its backward (measured with cold caches, as after a large kernel: 91 us
    for one output, 149 us for y and four non-differentiable statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, z, mean, invstd, eps, act, act_param, stats, family):
        training = mean is None
        if training:
            y, count, mean, m2, invstd = family.train_forward(x, weight, bias, z, eps, act,
                                                              act_param)
            stats.extend((count, mean, m2))
        else:
            y = family.forward(x, mean, invstd, weight, bias, z, act, act_param)
        _save(ctx, x, mean, invstd, weight, bias, z, y, eps, act, act_param, training, family)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, invstd, weight, bias, z, y = ctx.saved_tensors
        if torch.is_grad_enabled() or not _plain(dy):
            return _differentiable_backward(ctx, dy, x, mean, invstd, weight, bias, z)
        needs = ctx.needs_input_grad
        dx, dweight, dbias, dz = ctx.family.backward(
            dy, x, mean, invstd, weight, bias, z, y, ctx.act, ctx.act_param, ctx.training,
            None, None, None, needs[0])
        return _grads_for_inputs(needs, (1, 2, 3), weight, bias, dx, dweight, dbias, dz) + (None,) * 7


def _save(ctx, x, mean, invstd, weight, bias, z, y, eps, act, act_param, training, family):
    ctx.save_for_backward(x, mean, invstd, weight, bias, z,
                          y if act in OUTPUT_SAVING_ACTIVATIONS else None)
    ctx.eps, ctx.act, ctx.act_param, ctx.training, ctx.family = (eps, act, act_param, training,
                                                                 family)
    ctx.tensor_slots = (0, 1, 2, 3)  # x, weight, bias, z among the Function's arguments


class BatchStatsNormFunction(BatchNormFunction):
    """Eager training-mode batch norm whose batch statistics were computed beforehand.

    Batch renorm needs the batch statistics before it normalizes (its weight and bias are adjusted
    by r and d, which depend on them), so the fused stats-and-normalize of `BatchNormFunction`
    does not fit. This normalizes with the given `mean`/`invstd` of `x` and, like the `forward` op
    with training=True, differentiates through them as batch statistics in the backward (the
    inherited one). `stats` is unused: it keeps `BatchNormFunction`'s arguments, so the
    backward's gradient slots stay the same.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, z, mean, invstd, eps, act, act_param, stats, family):
        y = family.forward(x, mean, invstd, weight, bias, z, act, act_param)
        _save(ctx, x, mean, invstd, weight, bias, z, y, eps, act, act_param, True, family)
        return y
