"""Tools around batch norm: fold for inference, exact recalibration, domain adaptation,
diagnostics, conversion between layer kinds, ONNX export."""

from batchnorm.tools.fold import FoldReport, fold
from batchnorm.tools.recalibrate import population_stats, recalibrate

__all__ = ["fold", "FoldReport", "recalibrate", "population_stats"]
