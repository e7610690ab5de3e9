"""batchnorm: fast, complete and trustworthy batch normalization for PyTorch."""

from batchnorm import functional
from batchnorm.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.tools import adapt, convert, eval_gap, export_onnx, fold, recalibrate, track

__version__ = "0.1.0"

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "functional", "convert", "fold",
           "recalibrate", "adapt", "track", "eval_gap", "export_onnx"]
