"""Tools around batch norm: conversion between layer kinds, folding for inference, exact
recalibration (precise BN), domain adaptation (AdaBN), diagnostics, ONNX export, and running
statistics that agree across ranks."""

from batchnorm.tools.adapt import adapt
from batchnorm.tools.consistency import check_consistency, rank_differences, sync_running_stats
from batchnorm.tools.convert import TARGETS, Change, convert
from batchnorm.tools.export import export_onnx
from batchnorm.tools.fold import FoldReport, fold
from batchnorm.tools.fsdp import shard_batchnorm_fp32
from batchnorm.tools.inspect import Tracker, eval_gap, plot, track
from batchnorm.tools.recalibrate import population_stats, recalibrate

__all__ = ["convert", "Change", "TARGETS", "fold", "FoldReport", "recalibrate",
           "population_stats", "adapt", "track", "Tracker", "eval_gap", "plot", "export_onnx",
           "check_consistency", "rank_differences", "sync_running_stats", "shard_batchnorm_fp32"]
