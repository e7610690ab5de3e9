"""MaskedBatchNorm1d/2d/3d: batch norm whose statistics skip padded positions.

    y = gamma * (x - E_m[x]) / sqrt(Var_m[x] + eps) + beta where mask is True, 0 where it is False,

E_m and Var_m taken over the valid positions only, so padding (variable-length sequences, ragged
images) neither enters the statistics nor receives gradient: the output equals BatchNorm on the
unpadded values and the running statistics are the ones BatchNorm would track on them. The math
is `functional.masked_batch_norm`; mask=None is plain batch norm.

These layers subclass our BatchNormBase (so the state_dict is BatchNorm's and loads both ways) but
not torch.nn.BatchNorm1d/2d/3d: their forward takes a mask, so code that swaps or fuses
BatchNormNd layers by type (`freeze`, conv folding) must leave them alone.

Args (all layers): as BatchNorm.

Shape: forward(input, mask=None); input (N, C, *spatial), mask bool broadcastable to
(N, *spatial) with True at valid positions (no channel dimension); output shaped like input.

Raises:
    TypeError: a mask that is not a bool tensor.
    ValueError: a mask not broadcastable to (N, *spatial), and everything BatchNorm raises.
"""

from __future__ import annotations

from torch import Tensor

from batchnorm import functional as F
from batchnorm.nn.batchnorm import BatchNormBase


class MaskedBatchNormBase(BatchNormBase):
    """The shared forward of MaskedBatchNorm1d/2d/3d; see the module docstring."""

    syncable = False

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        return F.masked_batch_norm(
            input, mask, *self._stats_buffers(), self.weight, self.bias, self.training,
            self.momentum, self.eps, num_batches_tracked=self.num_batches_tracked,
            layer_name=self.layer_name, warn_key=self)


class MaskedBatchNorm1d(MaskedBatchNormBase):
    """Masked batch norm over (N, C) or (N, C, L) input; see the module docstring."""

    _input_ranks = (2, 3)


class MaskedBatchNorm2d(MaskedBatchNormBase):
    """Masked batch norm over (N, C, H, W) input; see the module docstring."""

    _input_ranks = (4,)


class MaskedBatchNorm3d(MaskedBatchNormBase):
    """Masked batch norm over (N, C, D, H, W) input; see the module docstring."""

    _input_ranks = (5,)
