"""Batch-norm modules: thin layers holding state and arguments; forward is one functional call."""

from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase

__all__ = ["BatchNormBase", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
