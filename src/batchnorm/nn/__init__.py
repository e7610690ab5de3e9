"""Batch-norm modules: thin layers holding state and arguments; forward is one functional call."""

from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from batchnorm.nn.sync import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

__all__ = ["BatchNormBase", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
           "convert_sync_batchnorm", "revert_sync_batchnorm"]
