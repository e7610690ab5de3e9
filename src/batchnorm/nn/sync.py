"""SyncBatchNorm: batch statistics over the global batch of a `torch.distributed` process group.

    y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta,

per channel, with E and Var over the union of every rank's batch (and the spatial dimensions) in
training, and the running estimates in eval (Ioffe & Szegedy 2015, arXiv 1502.03167). The
statistics are exact for uneven and empty per-rank batches: each rank's (count, mean, m2) is
all-gathered and merged with Chan's formula weighted by count (Chan, Golub & LeVeque 1979); the
backward all-reduces sum(dy) and sum(dy * x_hat) and uses the global count. The math and the
collectives live in `batchnorm.functional` (`batch_norm(..., sync=True)`); every layer of ours
takes the same `sync=True, process_group=...` arguments, so BatchNormAct and BatchRenorm sync the
same way.

Unlike `torch.nn.SyncBatchNorm`, this runs on every backend, gloo on CPU included. No
communication happens in eval mode, with a world size of 1, or when torch.distributed is not
initialized (the layer is then plain batch norm).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from batchnorm.nn.batchnorm import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase,
                                    carry_over, refuse_uninitialized)

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]


def _check_at_least_2d(self: BatchNormBase, input: Tensor) -> None:
    if isinstance(input, Tensor) and input.ndim < 2:
        raise ValueError(f"{self.layer_name}: expected input of shape (N, C, *spatial) with at "
                         f"least 2 dimensions (got {input.ndim}D input of shape "
                         f"{tuple(input.shape)})")


class SyncBatchNorm(BatchNormBase):
    """Batch norm over (N, C, *spatial) input with statistics of the global batch; see the module
    docstring. State_dict keys are torch.nn.SyncBatchNorm's. It deliberately does not subclass
    `torch.nn.SyncBatchNorm`: DistributedDataParallel refuses CPU models containing one
    ("SyncBatchNorm layers only work with GPU modules"), and running on CPU is the point.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias: as
            BatchNorm2d.
        process_group: the ranks whose batches are normalized together; None for the default
            (world) group. Every rank of the group must run this layer's forward and backward, in
            the same order as the group's other collectives, even with an empty batch.

    Raises:
        ValueError: as BatchNorm2d; training with one value per channel over all ranks together;
            a rank that is not in `process_group`.
        RuntimeError: a collective failed (a rank died or exceeded the process group's timeout);
            the message names the layer.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, sync=True, process_group=process_group)

    _check_input_dim = _check_at_least_2d

    def extra_repr(self) -> str:
        return torch.nn.modules.batchnorm._NormBase.extra_repr(self)  # sync goes without saying

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """`batchnorm.convert_sync_batchnorm`, under torch.nn.SyncBatchNorm's name for it."""
        return convert_sync_batchnorm(module, process_group)


class _BatchNormXd(BatchNormBase):
    """Plain batch norm over any (N, C, *spatial) input: what `revert_sync_batchnorm` makes of a
    SyncBatchNorm that was not produced by `convert_sync_batchnorm`, since the input rank it was
    meant for is unknown (mmcv and timm revert the same way)."""

    _check_input_dim = _check_at_least_2d


# Layers whose behaviour is exactly batch norm: they become SyncBatchNorm (and come back as the
# class they were). Our other layers (BatchNormAct, BatchRenorm, user subclasses) keep their class
# and switch their `sync` option, so activations and renorm settings survive.
_PLAIN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, BatchNorm1d,
          BatchNorm2d, BatchNorm3d, _BatchNormXd)


def convert_sync_batchnorm(module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """Make every batch-norm layer in `module` compute statistics over `process_group`.

    - torch.nn BatchNorm1d/2d/3d, torch.nn.SyncBatchNorm and our plain BatchNorm1d/2d/3d are
      replaced by `SyncBatchNorm` sharing the same parameter and buffer tensors (so weights,
      running statistics, device, dtype, requires_grad and an existing optimizer's references carry
      over), with the same training mode and hooks; `revert_sync_batchnorm` restores the original
      class.
    - Our other layers (a subclass of `BatchNormBase`: BatchNormAct, BatchRenorm, ...) are switched
      in place (`sync=True`, `process_group`), keeping their class and behaviour. Ghost, masked
      and domain batch norm, whose statistics are not one batch's, have no sync option: they are
      left as they are and a warning names them (frozen batch norm has no batch statistics).
    - Other subclasses of torch's `_BatchNorm` have a forward of their own that a SyncBatchNorm
      would silently drop (e.g. timm's fused activation, pytorch#187298): they are left as they are
      and the same warning names them.

    - An uninitialized lazy batch norm (torch.nn.LazyBatchNorm2d before its first forward)
      raises ValueError: run the model once first, which makes it a plain BatchNorm2d.

    Like torch's, this edits containers in place and returns the converted module (a new object
    only when `module` itself is replaced). Call it before wrapping the model in DDP.
    """
    skipped: list[str] = []
    converted = _convert(module, process_group, "", skipped)
    if skipped:
        warnings.warn(
            f"convert_sync_batchnorm: left {', '.join(skipped)} with local statistics. Ghost, "
            f"masked and domain batch norm have no sync option (their statistics are not one "
            f"batch's); another library's subclass of torch's _BatchNorm has a forward of its own, "
            f"which replacing it with SyncBatchNorm would drop; for those use batchnorm's layer "
            f"with the same behaviour (e.g. BatchNormAct2d), which converts keeping it",
            RuntimeWarning, stacklevel=2)
    return converted


def revert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Undo `convert_sync_batchnorm`: synced layers compute local statistics again.

    Our SyncBatchNorm becomes the class it was converted from (the same tensors, exactly the same
    values); one built directly, and torch.nn.SyncBatchNorm, become a plain batch norm accepting
    any input rank. Our other layers switch `sync` off in place.
    """
    if type(module) in (SyncBatchNorm, torch.nn.SyncBatchNorm):
        reverted = _rebuild(module, getattr(module, "_reverts_to", _BatchNormXd))
    else:
        reverted = module
        if isinstance(module, BatchNormBase):
            module.sync, module.process_group = False, None
    for name, child in reverted.named_children():
        reverted.add_module(name, revert_sync_batchnorm(child))
    return reverted


def _convert(module: torch.nn.Module, process_group, path: str, skipped: list[str]
             ) -> torch.nn.Module:
    refuse_uninitialized(module, "convert_sync_batchnorm", path)
    converted = module
    if type(module) in _PLAIN or type(module) is torch.nn.SyncBatchNorm:
        converted = _rebuild(module, SyncBatchNorm, process_group=process_group)
        if type(module) is not torch.nn.SyncBatchNorm:
            converted._reverts_to = type(module)
    elif isinstance(module, BatchNormBase) and module.syncable:
        module.sync, module.process_group = True, process_group
    elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        skipped.append(f"{path or 'the model'} ({type(module).__qualname__})")
    for name, child in converted.named_children():
        child_path = f"{path}.{name}" if path else name
        converted.add_module(name, _convert(child, process_group, child_path, skipped))
    return converted


def _rebuild(module: torch.nn.modules.batchnorm._BatchNorm, cls: type, **kwargs) -> torch.nn.Module:
    """A `cls` layer holding `module`'s own parameter and buffer tensors, children, training mode
    and hooks. Built on the meta device so no throw-away tensors are allocated on the real one."""
    rebuilt = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats, device="meta", **kwargs)
    rebuilt._parameters.update(module._parameters)
    rebuilt._buffers.update(module._buffers)
    for name, child in module.named_children():
        rebuilt.add_module(name, child)
    carry_over(module, rebuilt)
    if hasattr(module, "qconfig"):
        rebuilt.qconfig = module.qconfig
    return rebuilt
