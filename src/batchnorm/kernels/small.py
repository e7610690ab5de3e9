"""Small CPU training batches on aten's fused batch-norm kernel (torch.nn's own).

A small batch's training step is overhead-bound: on a (100, 100) BatchNorm1d step torch.nn spends
~150 us, most of it fixed costs. Our regular eager path pays an autograd.Function (a Python
backward), the kernels' host code and a separate running-statistics update on top of the math, so
below `functional._SMALL_NUMEL` values it is 2-3x slower than torch.nn. `native_batch_norm`
does the statistics, the normalization and torch.nn's running-statistics update (which is ours:
unbiased variance, EMA factor) in one call and records a C++ autograd node.

What it does not do is ours to check afterwards (`_accepted`):
- it sums fp32 statistics without a shift, so its mean drifts as |mean|/std and M grow: the
  output error measured 2.2e-8 * (|mean|/std) * sqrt(M) on random data, M = values per channel
  (2e-3 at |mean|/std = 1000, M = 16k; its variance was 4.7% off at mean 1e4, std 1e-2 on
  (100, 100)). A batch is taken only while that estimate stays under half our fp32 tolerance of
  1e-5: |mean| * invstd * sqrt(M) <= MAX_DRIFT;
- it has no non-finite guard: a NaN/Inf batch goes into the running statistics;
- a finite fp32 batch with std > ~1e19 overflows the running variance (invstd < 1e-19).
Such a batch gets its running statistics restored and `train` returns None: the caller then takes
the regular path (our kernels, the guard and its warning).
"""

from __future__ import annotations

import math

import torch
from numba import njit
from torch import Tensor

# Imported for its side effect: it points Numba's cache at a writable directory.
from batchnorm.kernels import cpu_loops  # noqa: F401

# Half the tolerance (fp32 1e-5, fp64 1e-10) over the measured drift per unit of
# (|mean|/std) * sqrt(M): 2.2e-8 in fp32, scaled by the unit roundoff for fp64.
MAX_DRIFT = {torch.float32: 0.5e-5 / 2.2e-8, torch.float64: 0.5e-10 / (2.2e-8 * 2.0**-29)}
MIN_INVSTD = 1e-19


@njit(cache=True, nogil=True)
def _accepted(mean, invstd, max_ratio, min_invstd):
    # mean, invstd: (C,) aten's batch statistics. One Numba call: the same test in numpy takes
    # five calls (~10 us here, as long as aten's forward kernel on (100, 100)).
    for c in range(mean.shape[0]):
        if not (abs(mean[c]) * invstd[c] <= max_ratio and invstd[c] >= min_invstd):
            return False  # NaN fails both comparisons
    return True


def train(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
          running_var: Tensor | None, factor: float, eps: float) -> Tensor | None:
    """y = weight * (x - E[x]) / sqrt(Var[x] + eps) + bias with the batch statistics of x,
    differentiable, and the running statistics (if given) moved by `factor` towards the batch's;
    None, with the running statistics untouched, for a batch this path does not take (see the
    module docstring). x: a small dense fp32/fp64 CPU tensor; the others match it."""
    if running_mean is not None:
        saved = torch.cat((running_mean, running_var))
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True,
                                              factor, eps)
    max_ratio = MAX_DRIFT[x.dtype] / math.sqrt(x.numel() // x.shape[1])
    if _accepted(mean.numpy(), invstd.numpy(), max_ratio, MIN_INVSTD):
        return y
    if running_mean is not None:
        channels = running_mean.shape[0]
        running_mean.copy_(saved[:channels])
        running_var.copy_(saved[channels:])
    return None
