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
        # torch < 2.13 has no `bias` argument: pass it only when it changes something.
        extra = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **extra)
        self.sync = sync
        self.process_group = process_group

    @property
    def layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _check_input_dim(self, input: Tensor) -> None:
        if isinstance(input, Tensor) and input.ndim not in self._input_ranks:
            ranks = " or ".join(f"{r}D" for r in self._input_ranks)
            raise ValueError(f"{self.layer_name}: expected {ranks} input (got {input.ndim}D input "
                             f"of shape {tuple(input.shape)})")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_running = not self.training or self.track_running_stats
        return F.batch_norm(
            input, self.running_mean if use_running else None,
            self.running_var if use_running else None, self.weight, self.bias, self.training,
            self.momentum, self.eps, num_batches_tracked=self.num_batches_tracked,
            layer_name=self.layer_name, warn_key=self, sync=self.sync,
            process_group=self.process_group)


class BatchNorm1d(BatchNormBase, torch.nn.BatchNorm1d):
    """Batch norm over (N, C) or (N, C, L) input; see the module docstring."""

    _input_ranks = (2, 3)


class BatchNorm2d(BatchNormBase, torch.nn.BatchNorm2d):
    """Batch norm over (N, C, H, W) input; see the module docstring."""

    _input_ranks = (4,)


class BatchNorm3d(BatchNormBase, torch.nn.BatchNorm3d):
    """Batch norm over (N, C, D, H, W) input; see the module docstring."""

    _input_ranks = (5,)
