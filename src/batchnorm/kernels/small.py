"""Small CPU training batches on aten's fused batch-norm kernel (torch.nn's own).

A small batch's training step is overhead-bound: on a (100, 100) BatchNorm1d step torch.nn spends
~150 us, most of it fixed costs. Our regular eager path pays an autograd.Function (a Python
backward), the kernels' host code and a separate running-statistics update on top of the math, so
below `functional._SMALL_NUMEL` values it is 2-3x slower than torch.nn. `native_batch_norm`
computes the statistics and the normalization in one call and records a C++ autograd node; one
Numba call (`_accept`) then checks its statistics and applies our running-statistics update.

What aten does not do is ours to check (`_accept`):
- it sums fp32 statistics without a shift, so its mean drifts as |mean|/std and M grow: the
  output error measured 2.2e-8 * (|mean|/std) * sqrt(M) on random data, M = values per channel
  (2e-3 at |mean|/std = 1000, M = 16k; its variance was 4.7% off at mean 1e4, std 1e-2 on
  (100, 100)). A batch is taken only while that estimate stays under half our fp32 tolerance of
  1e-5: |mean| * invstd * sqrt(M) <= MAX_DRIFT;
- it has no non-finite guard;
- a finite fp32 batch with std > ~1e19 overflows the variance (invstd < 1e-19).
Such a batch changes nothing and `train` returns None: the caller then takes the regular path (our
kernels, the guard and its warning).

The running statistics are not handed to aten: that would need a copy to restore them from when a
batch is refused, and a copy, the factor of a cumulative average (float(num_batches_tracked)) and
the count's increment each cost a torch op, ~5 us here, of a ~150 us step. `_accept` updates them
by `cpu_loops.update_running_stats` (the rule of every other path) from aten's mean and invstd:
the biased variance is 1/invstd^2 - eps, within 2^-23 * (var + eps) of exact in fp32 (invstd is
rounded to fp32), which is as finely as eval's sqrt(running_var + eps) resolves it.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

from batchnorm.kernels import cpu, cpu_loops

# Half the tolerance (fp32 1e-5, fp64 1e-10) over the measured drift per unit of
# (|mean|/std) * sqrt(M): 2.2e-8 in fp32, scaled by the unit roundoff for fp64.
MAX_DRIFT = {torch.float32: 0.5e-5 / 2.2e-8, torch.float64: 0.5e-10 / (2.2e-8 * 2.0**-29)}
MIN_INVSTD = 1e-19


@njit(cache=True, nogil=True)
def _accept(mean_at, invstd_at, running_mean_at, running_var_at, tracked_at, channels, count,
            eps, max_drift, min_invstd, momentum, like):
    # The (C,) tensors come by address (`cpu_loops.vector_at`), in like's dtype. mean, invstd:
    # aten's batch statistics over `count` values per channel. Whether the batch is taken (see
    # the module docstring); if so and running_mean_at is not 0, the running statistics and
    # num_batches_tracked (int64, if tracked_at is not 0) get the update of
    # `cpu_loops.update_running_stats` (momentum < 0: cumulative average).
    mean = cpu_loops.vector_at(mean_at, channels, like)
    invstd = cpu_loops.vector_at(invstd_at, channels, like)
    max_ratio = max_drift / np.sqrt(count)
    for c in range(channels):
        if not (abs(mean[c]) * invstd[c] <= max_ratio and invstd[c] >= min_invstd):
            return False  # NaN fails both comparisons
    if running_mean_at == 0:
        return True
    # In like's dtype, as the statistics of the other paths: the same specialization of the rule.
    counts, m2 = np.empty(channels, like.dtype), np.empty(channels, like.dtype)
    for c in range(channels):
        inv = np.float64(invstd[c])
        counts[c] = count
        m2[c] = max(0.0, 1.0 / (inv * inv) - eps) * count
    return cpu_loops.update_running_stats(
        cpu_loops.vector_at(running_mean_at, channels, like),
        cpu_loops.vector_at(running_var_at, channels, like), cpu_loops.counter_at(tracked_at),
        counts, mean, m2, momentum)


def train(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
          running_var: Tensor | None, num_batches_tracked: Tensor | None,
          momentum: float | None, eps: float) -> Tensor | None:
    """y = weight * (x - E[x]) / sqrt(Var[x] + eps) + bias with the batch statistics of x,
    differentiable, and the running statistics (if given) moved towards the batch's by
    `momentum`, or by 1/num_batches_tracked counting this batch when it is None (the count goes
    up by one, as on every path); None, with nothing changed, for a batch this path does not take
    (see the module docstring). x: a small dense fp32/fp64 CPU tensor; the others match it (the
    running statistics contiguous), num_batches_tracked a one-element int64 tensor or None."""
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    if mean.dtype is not x.dtype:  # `_accept` reads their memory in x's dtype
        return None
    channels = x.shape[1]
    track = running_mean is not None
    tracked = track and num_batches_tracked is not None
    if not _accept(mean.data_ptr(), invstd.data_ptr(),
                   running_mean.data_ptr() if track else 0, running_var.data_ptr() if track else 0,
                   num_batches_tracked.data_ptr() if tracked else 0, channels,
                   x.numel() // channels, eps, MAX_DRIFT[x.dtype], MIN_INVSTD,
                   -1.0 if momentum is None else momentum, cpu.EMPTY_OF[x.dtype]):
        return None
    if track:  # written around autograd's version counters: bump them, as an in-place op would
        torch.autograd.graph.increment_version(
            (running_mean, running_var, num_batches_tracked) if tracked
            else (running_mean, running_var))
    return y
