"""Drop-in BatchNorm1d/2d/3d: torch.nn's constructor, buffers and state_dict, our kernels.

    y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta

per channel (dim 1), with E and Var over the batch and spatial dimensions in training and the
running estimates in eval (Ioffe & Szegedy 2015, arXiv 1502.03167).

The classes subclass `torch.nn.BatchNorm1d/2d/3d` (timm's choice for its norm-act layers) so that
state_dicts, `_version` upgrades of old checkpoints, `reset_parameters`, and every
`isinstance(m, nn.modules.batchnorm._BatchNorm)` check in user code (weight-decay filters,
`swa_utils.update_bn`, initializers) keep working; only `forward` is ours and it is one call into
`batchnorm.functional`.

Args (all layers):
    num_features: C, the channel count of the expected input.
    eps: added to the variance for stability. Default 1e-5. As in torch.nn, any value
        constructs; the forward refuses eps <= 0 in training and eps < 0 in eval.
    momentum: running-statistics EMA factor, usually in [0, 1] (as in torch.nn, any finite
        value is used, outside it extrapolating), or None for a cumulative average. Default 0.1.
        Read only by the training forward, which refuses a non-finite one.
    affine: learnable per-channel gamma (init 1) and beta (init 0). Default True.
    bias: with affine, whether beta is learned (keyword-only, torch >= 2.13). Default True.
    track_running_stats: keep running_mean/running_var/num_batches_tracked buffers and use them in
        eval; when False, batch statistics are used in both modes. Default True.
    device, dtype: of the parameters and buffers.
    sync: keyword-only; in training, compute the statistics over the global batch of all ranks of
        `process_group` (what SyncBatchNorm does); see `batchnorm.functional.batch_norm`. Default
        False. `batchnorm.convert_sync_batchnorm` turns it on for a whole model.
    process_group: keyword-only; the group `sync` reduces over, None for the default group.

Raises:
    ValueError: num_features <= 0, input of the wrong rank, training with one value per channel.
    ArgumentError (a ValueError and a RuntimeError, as torch.nn raises one or the other): input of
        the wrong channel count, eps <= 0 in training or < 0 in eval.
    TypeError: integer input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm import functional as F


def unscriptable(layer: str) -> RuntimeError:
    """The error `torch.jit.script` gets for a layer that has no torch.nn equivalent."""
    return RuntimeError(
        f"{layer}: torch.jit.script cannot compile this layer (its forward runs batchnorm's Python "
        f"kernels, which TorchScript does not support) and torch.nn has no equivalent of it; use "
        f"torch.jit.trace or torch.export instead, or batchnorm.convert(model, to='torch') first "
        f"if plain batch norm will do")


# The hooks a training loop registers on a layer (profilers, activation statistics, DDP-style
# gradient hooks): a replacement takes the very same dicts, so the RemovableHandles the user holds
# still remove them from it.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_pre_hooks", "_backward_hooks")


def carry_over(old: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module:
    """`new`, which replaces `old` in a model, with `old`'s training flag (its own: children keep
    theirs) and forward, pre-forward and backward hooks; returns `new`. Parameters, devices and
    dtypes are the converters' own business (they share or copy the tensors)."""
    new.training = old.training
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr, None)
        if hooks:
            setattr(new, attr, hooks)
    if old._backward_hooks:
        new._is_full_backward_hook = old._is_full_backward_hook
    return new


def refuse_uninitialized(module: torch.nn.Module, tool: str, path: str) -> None:
    """Raise for a lazy batch norm (torch.nn.LazyBatchNorm2d, ...) that has not run yet: its
    num_features, and so every tensor a converter would move, exist only after its first forward,
    which also turns it into a plain torch.nn.BatchNorm1d/2d/3d that converts as usual."""
    if (isinstance(module, torch.nn.modules.lazy.LazyModuleMixin)
            and module.has_uninitialized_params()):
        raise ValueError(
            f"{tool}: {path or 'the module'} is an uninitialized {type(module).__name__} (its "
            f"num_features is set by its first forward); run the model once on an example batch "
            f"first (e.g. with torch.no_grad(): model(example)), which makes it a "
            f"{type(module).cls_to_become.__name__}, then call {tool}")


class BatchNormBase(torch.nn.modules.batchnorm._BatchNorm):
    """The shared forward of our batch-norm layers; subclasses name the input ranks they accept."""

    _input_ranks: tuple[int, ...] = ()
    # Whether forward honours `sync`: layers whose statistics are not one batch's (ghost, masked,
    # domain) set False, so sync=True and convert_sync_batchnorm refuse them rather than ignore.
    syncable: bool = True
    # Class-level defaults too, so modules pickled before the sync option existed still load.
    sync: bool = False
    process_group = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, *, bias: bool = True, sync: bool = False,
                 process_group=None) -> None:
        name = f"{type(self).__name__}({num_features!r})"
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, got "
                             f"{num_features!r}")
        if process_group is not None and not sync:
            raise ValueError(f"{name}: process_group is only used with sync=True; pass sync=True "
                             f"or drop process_group")
        if sync and not self.syncable:
            raise ValueError(f"{name}: has no sync option (its statistics are not those of one "
                             f"batch); use BatchNorm, BatchNormAct or BatchRenorm with sync=True")
        # torch < 2.13 has no `bias` argument: pass it only when it changes something.
        extra = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **extra)
        self.sync = sync
        self.process_group = process_group

    def extra_repr(self) -> str:
        return super().extra_repr() + (", sync=True" if self.sync else "")

    @property
    def layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _check_input_dim(self, input: Tensor) -> None:
        if isinstance(input, Tensor) and input.ndim not in self._input_ranks:
            ranks = " or ".join(f"{r}D" for r in self._input_ranks)
            raise ValueError(f"{self.layer_name}: expected {ranks} input (got {input.ndim}D input "
                             f"of shape {tuple(input.shape)})")

    def _stats_buffers(self) -> tuple[Tensor | None, Tensor | None]:
        """The running statistics to normalize with: None in training without tracking, which
        (as in torch.nn) means batch statistics in both modes."""
        if self.training and not self.track_running_stats:
            return None, None
        return self._member("running_mean"), self._member("running_var")

    def _member(self, name: str) -> Tensor | None:
        """A parameter or buffer, read from its registry: Module.__getattr__ costs ~1 us, and a
        small batch's whole step only ~150 us. A parametrized one is a property instead."""
        registry = self._parameters if name in self._parameters else self._buffers
        return registry[name] if name in registry else getattr(self, name)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """What `torch.jit.script` compiles in this layer's place: for plain BatchNorm1d/2d/3d
        without sync, the torch.nn layer of the same rank holding the very same Parameter and
        buffer objects (so a scripted model trains and loads the same state), whose forward is
        torch's own: it agrees with ours to rounding, but lacks our non-finite-batch guard and
        counts an empty batch in num_batches_tracked. Every other layer raises, since TorchScript
        cannot compile our kernels' Python.

        Raises:
            RuntimeError: the layer has no torch.nn equivalent; the message names the ways out.
        """
        torch_cls = _TORCH_EQUIVALENT.get(type(self))
        if torch_cls is None or self.sync:
            raise unscriptable(self.layer_name + (" with sync=True" if self.sync else ""))
        extra = {} if self.bias is not None or not self.affine else {"bias": False}
        new = torch_cls(self.num_features, self.eps, self.momentum, self.affine,
                        self.track_running_stats, **extra)
        new._parameters.update(self._parameters)
        new._buffers.update(self._buffers)
        return new.train(self.training)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return F.batch_norm(
            input, *self._stats_buffers(), self._member("weight"), self._member("bias"),
            self.training, self.momentum, self.eps,
            num_batches_tracked=self._member("num_batches_tracked"), layer_name=self.layer_name,
            warn_key=self, sync=self.sync, process_group=self.process_group)


class BatchNorm1d(BatchNormBase, torch.nn.BatchNorm1d):
    """Batch norm over (N, C) or (N, C, L) input; see the module docstring."""

    _input_ranks = (2, 3)


class BatchNorm2d(BatchNormBase, torch.nn.BatchNorm2d):
    """Batch norm over (N, C, H, W) input; see the module docstring."""

    _input_ranks = (4,)


class BatchNorm3d(BatchNormBase, torch.nn.BatchNorm3d):
    """Batch norm over (N, C, D, H, W) input; see the module docstring."""

    _input_ranks = (5,)


# the torch.nn layer `torch.jit.script` compiles in place of ours (`__prepare_scriptable__`)
_TORCH_EQUIVALENT = {BatchNorm1d: torch.nn.BatchNorm1d, BatchNorm2d: torch.nn.BatchNorm2d,
                     BatchNorm3d: torch.nn.BatchNorm3d}


# ---- batch norm + activation (+ residual), one fused kernel call ----------------------------

# Names of the fused epilogues (kernels.ACTIVATIONS) and their aliases: one flat registry.
ACTIVATION_NAMES = {"identity": "identity", "none": "identity", "relu": "relu",
                    "leaky_relu": "leaky_relu", "silu": "silu", "swish": "silu",
                    "gelu_tanh": "gelu_tanh"}


# Hugging Face's activation modules (transformers.activations) that compute one of the fused
# functions; matched by class name within that package, so transformers is never imported here.
_TRANSFORMERS_ACTIVATIONS = {"SiLUActivation": "silu", "GELUTanh": "gelu_tanh",
                             "PytorchGELUTanh": "gelu_tanh"}
_TORCH_ACTIVATIONS = ((torch.nn.Identity, "identity"), (torch.nn.ReLU, "relu"),
                      (torch.nn.SiLU, "silu"), (torch.nn.LeakyReLU, "leaky_relu"))


def fused_activation(act: torch.nn.Module) -> str | None:
    """The name of the fused kernel epilogue that computes the activation module `act`, or None.

    nn.Identity, nn.ReLU, nn.SiLU, nn.LeakyReLU and nn.GELU(approximate="tanh") and their
    subclasses that keep the class's forward, and Hugging Face's SiLUActivation and GELUTanh /
    PytorchGELUTanh. A subclass with a forward of its own may compute something else: None."""
    for cls, name in _TORCH_ACTIVATIONS + ((torch.nn.GELU, "gelu_tanh"),):
        if isinstance(act, cls):
            same = type(act).forward is cls.forward
            tanh = cls is not torch.nn.GELU or act.approximate == "tanh"
            return name if same and tanh else None
    if type(act).__module__.split(".")[0] == "transformers":
        return _TRANSFORMERS_ACTIVATIONS.get(type(act).__name__)
    return None


def resolve_activation(act, negative_slope: float, name: str) -> tuple[str, float]:
    """(kernel activation name, negative slope) for `act`: a name of `ACTIVATION_NAMES`, None, or
    an activation module (instance or class) that `fused_activation` knows."""
    if isinstance(act, type) and issubclass(act, torch.nn.Module):
        act = act()
    if act is None:
        return "identity", negative_slope
    if isinstance(act, str):
        if act not in ACTIVATION_NAMES:
            raise ValueError(f"{name}: unknown activation {act!r}; use one of "
                             f"{', '.join(ACTIVATION_NAMES)}")
        resolved = ACTIVATION_NAMES[act]
    elif not isinstance(act, torch.nn.Module):
        raise ValueError(f"{name}: act must be an activation name, None or an nn.Module, got "
                         f"{type(act).__name__} {act!r}")
    elif fused_activation(act) is not None:
        resolved = fused_activation(act)
        if resolved == "leaky_relu":
            negative_slope = act.negative_slope
    else:
        raise ValueError(f"{name}: activation {act!r} has no fused kernel; use one of "
                         f"{', '.join(ACTIVATION_NAMES)} (or nn.ReLU, nn.LeakyReLU, nn.SiLU, "
                         f"nn.GELU(approximate='tanh'), nn.Identity), or apply it after a "
                         f"BatchNorm layer")
    if resolved == "leaky_relu" and (not isinstance(negative_slope, (int, float))
                                     or isinstance(negative_slope, bool)):
        raise ValueError(f"{name}: negative_slope must be a number, got {negative_slope!r}")
    return resolved, float(negative_slope)


class BatchNormActBase(BatchNormBase):
    """y = act(gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta (+ residual)), one fused kernel.

    Batch norm (Ioffe & Szegedy 2015, arXiv 1502.03167) followed by an activation, with an
    optional residual added before it (the ResNet block's `relu(bn(conv(x)) + shortcut)`). The
    layer has exactly BatchNorm's parameters and buffers, so weights trained with a separate
    BatchNorm and activation load unchanged (timm's `BatchNormAct2d` makes the same choice).

    Args:
        act: "relu" (default), "leaky_relu", "silu" ("swish"), "gelu_tanh", "identity" ("none"),
            None, or any nn.Module activation (instance or class). One that computes a fused
            function (`fused_activation`: nn.ReLU, nn.SiLU, Hugging Face's SiLUActivation, ...)
            is fused into the kernel; any other (nn.ReLU6, nn.Hardswish, ...) is kept as the
            submodule `act` and applied to the normalized output (timm's BatchNormAct2d accepts
            any act_layer too). A parameterless one adds no state_dict keys, so torch.nn
            BatchNorm checkpoints still load.
        negative_slope: leaky_relu's slope (taken from an nn.LeakyReLU if one is given); a negative
            one is applied after the kernel, whose backward needs slope >= 0.
        sync, process_group: statistics over the global batch of the group's ranks, as BatchNorm.
        The others: as BatchNorm (see the module docstring).

    Shape: forward(input, residual=None), residual shaped like input; output shaped like input.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, act="relu", negative_slope: float = 0.01, sync: bool = False,
                 process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         sync=sync, process_group=process_group)
        module = act() if isinstance(act, type) and issubclass(act, torch.nn.Module) else act
        if isinstance(module, torch.nn.Module) and fused_activation(module) is None:
            self.activation, self.negative_slope = "identity", 0.01
            self.act = module  # a submodule, applied after the kernel
        else:
            self.activation, self.negative_slope = resolve_activation(module, negative_slope,
                                                                      self.layer_name)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        y = F.batch_norm(
            input, *self._stats_buffers(), self.weight, self.bias, self.training,
            self.momentum, self.eps, num_batches_tracked=self.num_batches_tracked,
            residual=residual, activation=self.activation, negative_slope=self.negative_slope,
            layer_name=self.layer_name, warn_key=self, sync=self.sync,
            process_group=self.process_group)
        act = self._modules.get("act")
        return y if act is None else act(y)

    def extra_repr(self) -> str:
        if "act" in self._modules:  # printed as the child module (act)
            return super().extra_repr()
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, act={self.activation!r}{slope}"


class BatchNormAct1d(BatchNormActBase, BatchNorm1d):
    """Batch norm + activation over (N, C) or (N, C, L) input; see `BatchNormActBase`."""


class BatchNormAct2d(BatchNormActBase, BatchNorm2d):
    """Batch norm + activation over (N, C, H, W) input; see `BatchNormActBase`."""


class BatchNormAct3d(BatchNormActBase, BatchNorm3d):
    """Batch norm + activation over (N, C, D, H, W) input; see `BatchNormActBase`."""
