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
    eps: added to the variance for stability. Default 1e-5.
    momentum: running-statistics EMA factor in [0, 1], or None for a cumulative average.
        Default 0.1.
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
    ValueError: num_features <= 0, eps <= 0, momentum outside [0, 1], input of the wrong rank or
        channel count, training with one value per channel.
    TypeError: integer input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm import functional as F


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
        F.check_eps(eps, name)
        F.check_momentum(momentum, name)
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


# ---- batch norm + activation (+ residual), one fused kernel call ----------------------------

# Names of the fused epilogues (kernels.ACTIVATIONS) and their aliases: one flat registry.
ACTIVATION_NAMES = {"identity": "identity", "none": "identity", "relu": "relu",
                    "leaky_relu": "leaky_relu", "silu": "silu", "swish": "silu",
                    "gelu_tanh": "gelu_tanh"}


def resolve_activation(act, negative_slope: float, name: str) -> tuple[str, float]:
    """(kernel activation name, negative slope) for `act`: a name of `ACTIVATION_NAMES`, None, or
    an nn.ReLU / LeakyReLU / SiLU / GELU(approximate="tanh") / Identity module or class."""
    if isinstance(act, type) and issubclass(act, torch.nn.Module):
        act = act()
    if act is None:
        return "identity", negative_slope
    if isinstance(act, str):
        if act not in ACTIVATION_NAMES:
            raise ValueError(f"{name}: unknown activation {act!r}; use one of "
                             f"{', '.join(ACTIVATION_NAMES)}")
        resolved = ACTIVATION_NAMES[act]
    elif isinstance(act, torch.nn.LeakyReLU):
        resolved, negative_slope = "leaky_relu", act.negative_slope
    elif isinstance(act, torch.nn.GELU) and act.approximate == "tanh":
        resolved = "gelu_tanh"
    elif isinstance(act, (torch.nn.Identity, torch.nn.ReLU, torch.nn.SiLU)):
        resolved = {torch.nn.Identity: "identity", torch.nn.ReLU: "relu",
                    torch.nn.SiLU: "silu"}[type(act)]
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
            None, or the matching torch.nn module (instance or class); anything else raises
            ValueError, since it has no fused kernel.
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
        self.activation, self.negative_slope = resolve_activation(act, negative_slope,
                                                                  self.layer_name)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        return F.batch_norm(
            input, *self._stats_buffers(), self.weight, self.bias, self.training,
            self.momentum, self.eps, num_batches_tracked=self.num_batches_tracked,
            residual=residual, activation=self.activation, negative_slope=self.negative_slope,
            layer_name=self.layer_name, warn_key=self, sync=self.sync,
            process_group=self.process_group)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, act={self.activation!r}{slope}"


class BatchNormAct1d(BatchNormActBase, BatchNorm1d):
    """Batch norm + activation over (N, C) or (N, C, L) input; see `BatchNormActBase`."""


class BatchNormAct2d(BatchNormActBase, BatchNorm2d):
    """Batch norm + activation over (N, C, H, W) input; see `BatchNormActBase`."""


class BatchNormAct3d(BatchNormActBase, BatchNorm3d):
    """Batch norm + activation over (N, C, D, H, W) input; see `BatchNormActBase`."""
