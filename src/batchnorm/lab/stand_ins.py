"""Stand-ins for library parts the lab needs that have not landed in `batchnorm` yet.

Each mirrors the expected public API (DESIGN.md) so that swapping in `batchnorm.<name>` is a
one-line change in `models.py` / `train.py`, after which this module is deleted. They are built from
the library's `BatchNorm1d/2d` and torch, not from its internals.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import batchnorm


class _Ghost:
    """y = BN(x_k) for each virtual batch x_k of `virtual_batch_size` examples (Hoffer et al.
    2017, arXiv 1705.08741); the running statistics move once per call, towards the average of
    the virtual batches' statistics; eval uses them as BatchNorm does."""

    def __init__(self, num_features: int, virtual_batch_size: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        n = self.virtual_batch_size
        if not self.training or input.shape[0] <= n:
            return super().forward(input)
        self._check_input_dim(input)
        k = input.shape[0] // n
        # (k, n, C, *): all virtual batches normalized in one pass instead of a Python loop
        xv = input[:k * n].reshape(k, n, *input.shape[1:])
        dims = [1] + list(range(3, xv.ndim))
        mean = xv.mean(dims, keepdim=True)
        var = xv.var(dims, unbiased=False, keepdim=True)
        shape = [1, 1, -1] + [1] * (xv.ndim - 3)
        y = (xv - mean) * (var + self.eps).rsqrt() * self.weight.view(shape) \
            + self.bias.view(shape)
        with torch.no_grad():
            m = xv[0].numel() // xv.shape[2]
            self.running_mean.lerp_(mean.mean(0).flatten(), self.momentum)
            self.running_var.lerp_(var.mean(0).flatten() * m / max(m - 1, 1), self.momentum)
            self.num_batches_tracked += 1
        y = y.reshape(k * n, *input.shape[1:])
        if k * n < input.shape[0]:
            y = torch.cat([y, super().forward(input[k * n:])])
        return y


class GhostBatchNorm1d(_Ghost, batchnorm.BatchNorm1d):
    pass


class GhostBatchNorm2d(_Ghost, batchnorm.BatchNorm2d):
    pass


class _Renorm:
    """y = gamma * (x_hat * r + d) + beta with r = clip(sigma_B / sigma, 1/rmax, rmax) and
    d = clip((mu_B - mu) / sigma, -dmax, dmax), both without gradient (Ioffe 2017, arXiv
    1702.03275). rmax ramps 1 -> rmax and dmax 0 -> dmax linearly from `warmup_steps` to
    `rmax_steps` / `dmax_steps` training calls."""

    def __init__(self, num_features: int, momentum: float = 0.01, rmax: float = 3.0,
                 dmax: float = 5.0, warmup_steps: int = 5000, rmax_steps: int = 40000,
                 dmax_steps: int = 25000, **kwargs) -> None:
        super().__init__(num_features, momentum=momentum, **kwargs)
        self.rmax, self.dmax = rmax, dmax
        self.warmup_steps, self.rmax_steps, self.dmax_steps = warmup_steps, rmax_steps, dmax_steps

    def _limits(self) -> tuple[float, float]:
        step = int(self.num_batches_tracked)

        def ramp(end: int) -> float:
            if end <= self.warmup_steps:
                return float(step >= self.warmup_steps)
            return min(max((step - self.warmup_steps) / (end - self.warmup_steps), 0.0), 1.0)

        return 1 + (self.rmax - 1) * ramp(self.rmax_steps), self.dmax * ramp(self.dmax_steps)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.ndim))
        shape = [1, -1] + [1] * (input.ndim - 2)
        mean = input.mean(dims)
        var = input.var(dims, unbiased=False)
        std_b = (var + self.eps).sqrt()
        rmax, dmax = self._limits()
        with torch.no_grad():
            std = (self.running_var + self.eps).sqrt()
            r = (std_b / std).clamp(1 / rmax, rmax)
            d = ((mean - self.running_mean) / std).clamp(-dmax, dmax)
            m = input.numel() // input.shape[1]
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * m / max(m - 1, 1), self.momentum)
            self.num_batches_tracked += 1
        x_hat = (input - mean.view(shape)) / std_b.view(shape) * r.view(shape) + d.view(shape)
        return x_hat * self.weight.view(shape) + self.bias.view(shape)


class BatchRenorm1d(_Renorm, batchnorm.BatchNorm1d):
    pass


class BatchRenorm2d(_Renorm, batchnorm.BatchNorm2d):
    pass


@torch.no_grad()
def recalibrate(model: nn.Module, batches) -> nn.Module:
    """Precise BN (Wu & Johnson 2021, arXiv 2105.07576): running statistics replaced by their
    average over `batches` (a cumulative average, `momentum=None`), the model left in eval mode."""
    torch.optim.swa_utils.update_bn(batches, model)
    return model.eval()
