"""GhostBatchNorm1d/2d/3d: batch norm with statistics per virtual batch.

    y_k = gamma * (x_k - E[x_k]) / sqrt(Var[x_k] + eps) + beta,   x = cat(x_1, ..., x_K) along N,

each x_k holding `virtual_batch_size` consecutive samples, the last one the remainder N mod
virtual_batch_size (a remainder of a single value per channel joins the chunk before it). Large
batches keep the regularizing noise of small ones (Hoffer, Hubara & Soudry 2017, arXiv 1705.08741,
s4). The running statistics are updated once per batch from the chunks' statistics merged with
Chan's formula (each chunk weighted by its count), so they equal BatchNorm's on the same batch;
eval mode is plain batch norm on them and takes any batch size. With virtual_batch_size >= N the
layer is BatchNorm. The math is `functional.ghost_batch_norm`.

Args (all layers):
    num_features, eps, momentum, affine, track_running_stats, device, dtype: as BatchNorm
        (without running statistics, eval mode normalizes per virtual batch too).
    virtual_batch_size: samples per ghost batch, > 0. Default 32.

Raises:
    ValueError: virtual_batch_size <= 0, and everything BatchNorm raises.
"""

from __future__ import annotations

from torch import Tensor

from batchnorm import functional as F
from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase


class GhostBatchNormBase(BatchNormBase):
    """The shared forward of GhostBatchNorm1d/2d/3d; see the module docstring."""

    syncable = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, virtual_batch_size: int = 32) -> None:
        F.check_virtual_batch_size(virtual_batch_size, f"{type(self).__name__}({num_features!r})")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return F.ghost_batch_norm(
            input, *self._stats_buffers(), self.weight, self.bias, self.training, self.momentum,
            self.eps, virtual_batch_size=self.virtual_batch_size,
            num_batches_tracked=self.num_batches_tracked, layer_name=self.layer_name,
            warn_key=self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(GhostBatchNormBase, BatchNorm1d):
    """Ghost batch norm over (N, C) or (N, C, L) input; see the module docstring."""


class GhostBatchNorm2d(GhostBatchNormBase, BatchNorm2d):
    """Ghost batch norm over (N, C, H, W) input; see the module docstring."""


class GhostBatchNorm3d(GhostBatchNormBase, BatchNorm3d):
    """Ghost batch norm over (N, C, D, H, W) input; see the module docstring."""
