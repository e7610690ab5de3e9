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


# ---- the family: each variant from its definition, float64, differentiable with autograd ------

def _per_channel_or(v: Tensor | None, ndim: int, default: float):
    return _per_channel(v, ndim) if v is not None else default


def batch_renorm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                       running_mean: Tensor, running_var: Tensor, eps: float, rmax: float,
                       dmax: float) -> tuple[Tensor, Tensor, Tensor]:
    """Batch renorm, Ioffe 2017 (arXiv 1702.03275), Algorithm 1; returns (y, mean_B, var_B):

        sigma_B = sqrt(var_B + eps),  sigma = sqrt(running_var + eps)
        r = stop_gradient(clip(sigma_B / sigma, 1/rmax, rmax))
        d = stop_gradient(clip((mu_B - running_mean) / sigma, -dmax, dmax))
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
    """
    mean, var = batch_stats(x)
    sigma_b = torch.sqrt(var + eps)
    sigma = torch.sqrt(running_var.double() + eps)
    r = torch.clamp(sigma_b / sigma, 1 / rmax, rmax).detach()
    d = torch.clamp((mean - running_mean.double()) / sigma, -dmax, dmax).detach()
    x_hat = (x.double() - _per_channel(mean, x.ndim)) / _per_channel(sigma_b, x.ndim)
    x_renorm = x_hat * _per_channel(r, x.ndim) + _per_channel(d, x.ndim)
    y = _per_channel_or(weight, x.ndim, 1.0) * x_renorm + _per_channel_or(bias, x.ndim, 0.0)
    return y, mean, var


def ghost_batch_norm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                           sizes: list[int]) -> Tensor:
    """Ghost batch norm, Hoffer et al. 2017 (arXiv 1705.08741): batch norm of each chunk of
    `sizes[k]` consecutive samples with that chunk's own statistics."""
    return torch.cat([batch_norm_train(chunk, weight, bias, eps)[0] for chunk in x.split(sizes)])


def masked_batch_stats(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel (count, mean, biased variance) over the positions where `mask` (broadcast to
    (N, *spatial)) is True, as weighted sums: sum(m x) / sum(m), sum(m (x - mean)^2) / sum(m)."""
    m = mask.expand((x.shape[0],) + tuple(x.shape[2:])).unsqueeze(1).double()
    dims = [0] + list(range(2, x.ndim))
    count = m.sum(dims).expand(x.shape[1])
    mean = (m * x.double()).sum(dims) / count
    var = (m * (x.double() - _per_channel(mean, x.ndim)) ** 2).sum(dims) / count
    return count, mean, var


def masked_batch_norm_train(x: Tensor, mask: Tensor, weight: Tensor | None,
                            bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Batch norm over the valid positions only, 0 at padded ones; returns (y, mean, var)."""
    _, mean, var = masked_batch_stats(x, mask)
    y = normalize(x, mean, var, weight, bias, eps)
    m = mask.expand((x.shape[0],) + tuple(x.shape[2:])).unsqueeze(1)
    return torch.where(m, y, 0.0), mean, var
