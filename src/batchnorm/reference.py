"""Batch normalization in float64 textbook math: the oracle every kernel and layer is tested against.

Written to be read, not to be fast. Everything is computed in float64 from the definitions of
Ioffe & Szegedy 2015 (arXiv 1502.03167), Algorithms 1 and 2:

    mu    = 1/M sum_i x_i                 (per channel, M = N x spatial)
    var   = 1/M sum_i (x_i - mu)^2        (biased: used to normalize)
    x_hat = (x - mu) / sqrt(var + eps)
    y     = gamma * x_hat + beta

The backward is the closed form obtained by differentiating through mu and var:

    dx = gamma / (M sqrt(var + eps)) * (M dy - sum(dy) - x_hat * sum(dy * x_hat))
    dgamma = sum(dy * x_hat),   dbeta = sum(dy)

Running statistics store the unbiased variance M/(M-1) var (Algorithm 2, step 10).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _channel_first(x: Tensor) -> Tensor:
    """(N, C, *spatial) -> (C, M) in float64, one row of samples per channel."""
    return x.double().transpose(0, 1).reshape(x.shape[1], -1)


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ...) so it broadcasts against an (N, C, *spatial) tensor."""
    return v.double().reshape((1, -1) + (1,) * (ndim - 2))


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, two-pass, float64."""
    rows = _channel_first(x)
    mean = rows.mean(dim=1)
    var = ((rows - mean[:, None]) ** 2).mean(dim=1)
    return mean, var


def normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
              eps: float) -> Tensor:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, float64."""
    x_hat = (x.double() - _per_channel(mean, x.ndim)) / torch.sqrt(_per_channel(var, x.ndim) + eps)
    gamma = _per_channel(weight, x.ndim) if weight is not None else 1.0
    beta = _per_channel(bias, x.ndim) if bias is not None else 0.0
    return gamma * x_hat + beta


def batch_norm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm: returns (y, batch mean, biased batch variance)."""
    mean, var = batch_stats(x)
    return normalize(x, mean, var, weight, bias, eps), mean, var


def batch_norm_train_backward(dy: Tensor, x: Tensor, weight: Tensor | None, eps: float
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form training backward: (dx, dgamma, dbeta) in float64."""
    mean, var = batch_stats(x)
    invstd = 1.0 / torch.sqrt(var + eps)
    x_hat = _channel_first(x) - mean[:, None]
    x_hat = x_hat * invstd[:, None]
    g = _channel_first(dy)
    m = g.shape[1]
    sum_g = g.sum(dim=1)
    sum_g_xhat = (g * x_hat).sum(dim=1)
    gamma = weight.double() if weight is not None else torch.ones_like(mean)
    dx_rows = (gamma * invstd / m)[:, None] * (m * g - sum_g[:, None] - x_hat * sum_g_xhat[:, None])
    dx = dx_rows.reshape((x.shape[1], x.shape[0]) + tuple(x.shape[2:])).transpose(0, 1)
    return dx, sum_g_xhat, sum_g


def update_running_stats(running_mean: Tensor, running_var: Tensor, num_batches_tracked: int,
                         batch_mean: Tensor, batch_var: Tensor, count: int,
                         momentum: float | None) -> tuple[Tensor, Tensor, int]:
    """One running-statistics update; returns new (running_mean, running_var, num_batches_tracked).

    `batch_var` is the biased batch variance; the unbiased count/(count-1) * var is what is stored.
    momentum=None is the cumulative average: factor 1/num_batches_tracked after the increment.
    """
    num_batches_tracked += 1
    factor = 1.0 / num_batches_tracked if momentum is None else momentum
    unbiased_var = batch_var * count / (count - 1)
    new_mean = (1 - factor) * running_mean.double() + factor * batch_mean
    new_var = (1 - factor) * running_var.double() + factor * unbiased_var
    return new_mean, new_var, num_batches_tracked


def activate(pre: Tensor, act: str, act_param: float = 0.01) -> Tensor:
    """The fused epilogues, from their definitions, float64. `act_param` is leaky_relu's slope."""
    pre = pre.double()
    if act == "identity":
        return pre
    if act == "relu":
        return torch.where(pre > 0, pre, 0.0)
    if act == "leaky_relu":
        return torch.where(pre > 0, pre, act_param * pre)
    if act == "silu":
        return pre / (1 + torch.exp(-pre))
    if act == "gelu_tanh":
        return 0.5 * pre * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (pre + 0.044715 * pre**3)))
    raise ValueError(f"unknown activation {act!r}")
