"""Batch-norm modules: thin layers holding state and arguments; forward is one functional call."""

from batchnorm.nn.batchnorm import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d,
                                    BatchNormAct2d, BatchNormAct3d, BatchNormActBase,
                                    BatchNormBase)
from batchnorm.nn.domain import (DomainBatchNorm1d, DomainBatchNorm2d, DomainBatchNorm3d,
                                 DomainBatchNormBase)
from batchnorm.nn.frozen import (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d,
                                 FrozenBatchNormBase, freeze, unfreeze)
from batchnorm.nn.ghost import (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d,
                                GhostBatchNormBase)
from batchnorm.nn.masked import (MaskedBatchNorm1d, MaskedBatchNorm2d, MaskedBatchNorm3d,
                                 MaskedBatchNormBase)
from batchnorm.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, BatchRenormBase
from batchnorm.nn.sync import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

__all__ = ["BatchNormBase", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "BatchNormActBase", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "BatchRenormBase", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
           "GhostBatchNormBase", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
           "FrozenBatchNormBase", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
           "freeze", "unfreeze",
           "MaskedBatchNormBase", "MaskedBatchNorm1d", "MaskedBatchNorm2d", "MaskedBatchNorm3d",
           "DomainBatchNormBase", "DomainBatchNorm1d", "DomainBatchNorm2d", "DomainBatchNorm3d",
           "SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]
