"""torch's own batch-norm kernels (torch.nn's), with our epilogue as torch ops.

`native_batch_norm` records a C++ autograd node with derivative formulas for every order and
mode, so this route is as fast as torch.nn where fixed costs decide (small batches) and as
general. It returns the batch mean and invstd; the variance for the running statistics is
1/invstd^2 - eps, within ~2^-22 (var + eps) of exact in fp32 (invstd itself is rounded to fp32), as
finely as eval's sqrt(running_var + eps) resolves it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm.kernels import native


def _epilogue(y: Tensor, z: Tensor | None, act: str, act_param: float) -> Tensor:
    return native.activate(y if z is None else y + z, act, act_param)


def train(x: Tensor, weight: Tensor | None, bias: Tensor | None, z: Tensor | None, eps: float,
          act: str, act_param: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, count, mean, m2) with the batch statistics of x; the statistics without gradient."""
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    values_per_channel = x.numel() // x.shape[1]
    m2 = invstd.detach().pow(-2).sub_(eps).clamp_min_(0).mul_(values_per_channel)
    count = torch.full_like(m2, values_per_channel)
    return _epilogue(y, z, act, act_param), count, mean.detach(), m2


def train_updating(x: Tensor, weight: Tensor | None, bias: Tensor | None, z: Tensor | None,
                   eps: float, act: str, act_param: float, running_mean: Tensor,
                   running_var: Tensor, factor: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, new_mean, new_var): torch's kernel normalizes with the batch statistics and forms the
    running-statistics update with `factor` (`rules.momentum_value`) into copies of the buffers,
    which `rules.commit_running_stats` then checks and stores."""
    new_mean, new_var = running_mean.clone(), running_var.clone()
    y, _, _ = torch.native_batch_norm(x, weight, bias, new_mean, new_var, True, factor, eps)
    return _epilogue(y, z, act, act_param), new_mean, new_var


def normalize(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
         bias: Tensor | None, z: Tensor | None, eps: float, act: str, act_param: float) -> Tensor:
    y = torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps,
                         torch.backends.cudnn.enabled)
    return _epilogue(y, z, act, act_param)
