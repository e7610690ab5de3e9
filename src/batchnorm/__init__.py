"""batchnorm: fast, complete and trustworthy batch normalization for PyTorch."""

from batchnorm import functional
from batchnorm.errors import ArgumentError
from batchnorm.kernels.dispatch import BACKENDS, use_backend
from batchnorm.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.nn import (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, BatchRenorm1d,
                          BatchRenorm2d, BatchRenorm3d, DomainBatchNorm1d, DomainBatchNorm2d,
                          DomainBatchNorm3d, FrozenBatchNorm1d, FrozenBatchNorm2d,
                          FrozenBatchNorm3d, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d,
                          MaskedBatchNorm1d, MaskedBatchNorm2d, MaskedBatchNorm3d, freeze, unfreeze)
from batchnorm.nn import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from batchnorm.tools import adapt, convert, eval_gap, export_onnx, fold, recalibrate, track

__version__ = "0.1.0"

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "functional", "use_backend", "BACKENDS",
           "ArgumentError",
           "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
           "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
           "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze", "unfreeze",
           "MaskedBatchNorm1d", "MaskedBatchNorm2d", "MaskedBatchNorm3d",
           "DomainBatchNorm1d", "DomainBatchNorm2d", "DomainBatchNorm3d",
           "SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm",
           "convert", "fold", "recalibrate", "adapt", "track", "eval_gap", "export_onnx"]
