"""Composite PyTorch implementations of the three batch-norm ops: any device, any float dtype.

This is the portable path (bf16 on CPU, MPS, CUDA without Triton) and the shape every faster
kernel mirrors. Accumulation is fp32 for fp16/bf16/fp32 input and fp64 for fp64 input; the
output has the input's dtype and memory format (elementwise ops with a (1, C, 1, ...) operand keep
the input's strides, so channels-last stays channels-last).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channel dimension 1."""
    return [0] + list(range(2, x.ndim))


def channel_view(v: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ...) for broadcasting against (N, C, *spatial)."""
    return v.view((1, -1) + (1,) * (ndim - 2))


def merge_stats(count: Tensor, mean: Tensor, m2: Tensor, dim: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Chan et al. (1979) parallel merge of per-partial (count, mean, m2) along `dim`.

    mean = sum(n_k mean_k) / n,  m2 = sum(m2_k) + sum(n_k (mean_k - mean)^2).
    Partials with count 0 (an empty rank, an empty chunk) contribute nothing, whatever their mean.
    """
    present = count > 0
    total = count.sum(dim)
    safe_mean = torch.where(present, mean, torch.zeros_like(mean))
    merged_mean = (count * safe_mean).sum(dim) / total.clamp_min(1)
    spread = count * (safe_mean - merged_mean.unsqueeze(dim)) ** 2
    merged_m2 = torch.where(present, m2, torch.zeros_like(m2)).sum(dim) + spread.sum(dim)
    return total, merged_mean, merged_m2


def stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel (count, mean, m2) of a non-empty (N, C, *spatial) tensor.

    Shifted sums per sample (the shift is the channel's first element, which keeps sum(d^2) -
    sum(d)^2/S free of cancellation when |mean| >> std), then Chan's merge across the N samples,
    still in shifted coordinates: a per-sample mean of ~1e4 rounded to fp32 would lose the spread
    between samples that the merge needs.
    """
    acc = accumulation_dtype(x.dtype)
    n, c = x.shape[0], x.shape[1]
    per_sample = x.reshape(n, c, -1)
    s = per_sample.shape[2]
    shift = per_sample[0, :, 0].to(acc)
    d = per_sample.to(acc) - shift[None, :, None]
    s1 = d.sum(dim=2)
    s2 = (d * d).sum(dim=2)
    sample_m2 = (s2 - s1 * s1 / s).clamp_min(0)
    count, shifted_mean, m2 = merge_stats(torch.full_like(s1, s), s1 / s, sample_m2, dim=0)
    return count, shift + shifted_mean, m2


def scale_shift(mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
                ) -> tuple[Tensor, Tensor]:
    """Fold normalization and affine into y = a*x + b: a = weight*invstd, b = bias - mean*a."""
    a = invstd if weight is None else weight.to(invstd.dtype) * invstd
    b = -mean * a if bias is None else bias.to(invstd.dtype) - mean * a
    return a, b


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def activate(pre: Tensor, act: str, act_param: float) -> Tensor:
    if act == "identity":
        return pre
    if act == "relu":
        return torch.relu(pre)
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu(pre, act_param)
    if act == "silu":
        return torch.nn.functional.silu(pre)
    return torch.nn.functional.gelu(pre, approximate="tanh")


def activation_grad(dy: Tensor, pre: Tensor | None, y: Tensor | None, act: str, act_param: float
                    ) -> Tensor:
    """d act(pre) / d pre * dy. relu and leaky_relu read the sign from the output y (slope >= 0);
    silu and gelu_tanh need the pre-activation."""
    if act == "identity":
        return dy
    if act == "relu":
        return torch.where(y > 0, dy, torch.zeros_like(dy))
    if act == "leaky_relu":
        return torch.where(y > 0, dy, dy * act_param)
    if act == "silu":
        s = torch.sigmoid(pre)
        return dy * s * (1 + pre * (1 - s))
    inner = _SQRT_2_OVER_PI * (pre + 0.044715 * pre**3)
    t = torch.tanh(inner)
    d_inner = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * pre**2)
    return dy * (0.5 * (1 + t) + 0.5 * pre * (1 - t * t) * d_inner)


def _pre_activation(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                    bias: Tensor | None, z: Tensor | None) -> Tensor:
    a, b = scale_shift(mean, invstd, weight, bias)
    pre = torch.addcmul(channel_view(b, x.ndim), x.to(a.dtype), channel_view(a, x.ndim))
    return pre if z is None else pre + z.to(a.dtype)


def forward(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
            z: Tensor | None, act: str, act_param: float) -> Tensor:
    """y = act(a*x + b (+ z)), computed in the accumulation dtype, returned in x's dtype."""
    pre = _pre_activation(x, mean, invstd, weight, bias, z)
    return activate(pre, act, act_param).to(x.dtype)


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, z: Tensor | None,
                  eps: float, act: str, act_param: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training forward: statistics, then normalization. Returns (y, count, mean, m2, invstd)."""
    count, mean, m2 = stats(x)
    invstd = torch.rsqrt(m2 / count + eps)
    return forward(x, mean, invstd, weight, bias, z, act, act_param), count, mean, m2, invstd


def composite_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, z: Tensor | None,
                    eps: float, act: str, act_param: float
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training batch norm in plain differentiable torch ops: (y, count, mean, m2).

    y = act(weight * (x - mean) * rsqrt(var + eps) + bias (+ z)) with the batch statistics of x,
    and autograd differentiates through them: every order, forward mode, torch.func, vmap, meta
    tensors and tracers work, and torch.compile sees what inductor fuses. `torch.var_mean`
    (Welford on the CPU and in inductor's code) keeps |mean| >> std exact. The statistics are
    returned without gradient, for the running-statistics update.
    """
    count, mean, m2, (mean_graph, var_graph) = composite_stats(x)
    y = forward(x, mean_graph, torch.rsqrt(var_graph + eps), weight, bias, z, act, act_param)
    return y, count, mean, m2


def composite_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
    """(count, mean, m2) of x without gradient, and (mean, biased var) with their graph, for
    `composite_train` and the variants that normalize after looking at the statistics."""
    var, mean = torch.var_mean(x.to(accumulation_dtype(x.dtype)), reduce_dims(x), correction=0)
    count = torch.full_like(mean, x.numel() // x.shape[1]).detach()
    return count, mean.detach(), (var * count).detach(), (mean, var)


def backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
             bias: Tensor | None, z: Tensor | None, y: Tensor | None, act: str, act_param: float,
             training: bool, count: Tensor | None, sum_dy: Tensor | None,
             sum_dy_xhat: Tensor | None, input_grad: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closed-form backward; returns (dx, dweight, dbias, dz).

    With g = dy * act'(pre) and x_hat = (x - mean) * invstd, per channel:
      dweight = sum(g * x_hat), dbias = sum(g), dz = g,
      training: dx = weight * invstd / M * (M g - sum(g) - x_hat * sum(g * x_hat)),
      eval:     dx = weight * invstd * g.
    `sum_dy`/`sum_dy_xhat`/`count`, when given, replace the local reductions and M (how
    SyncBatchNorm uses the global ones). dx is empty when `input_grad` is False.
    """
    acc = invstd.dtype
    dims = reduce_dims(x)
    pre = _pre_activation(x, mean, invstd, weight, bias, z) if act in ("silu", "gelu_tanh") else None
    g = activation_grad(dy.to(acc), pre, y, act, act_param)
    x_hat = (x.to(acc) - channel_view(mean, x.ndim)) * channel_view(invstd, x.ndim)
    if sum_dy is None:
        sum_dy = g.sum(dims)
    if sum_dy_xhat is None:
        sum_dy_xhat = (g * x_hat).sum(dims)
    dz = g.to(z.dtype) if z is not None else x.new_empty(0)
    if not input_grad:
        return x.new_empty(0), sum_dy_xhat, sum_dy, dz
    a = invstd if weight is None else weight.to(acc) * invstd
    if training:
        m = torch.full_like(invstd, x.numel() // x.shape[1]) if count is None else count.to(acc)
        dx = channel_view(a, x.ndim) * (
            g - channel_view(sum_dy / m, x.ndim) - x_hat * channel_view(sum_dy_xhat / m, x.ndim))
    else:
        dx = channel_view(a, x.ndim) * g
    return dx.to(x.dtype), sum_dy_xhat, sum_dy, dz
