"""batchnorm: fast, complete and trustworthy batch normalization for PyTorch."""

from batchnorm import functional
from batchnorm.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.nn import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

__version__ = "0.1.0"

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "functional"]
__all__ += ["SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]
