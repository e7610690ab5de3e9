"""BatchRenorm1d/2d/3d: batch normalization that stays correct for small or non-i.i.d. batches.

    y = gamma * (x_hat * r + d) + beta,   x_hat = (x - mu_B) / sigma_B,
    r = clip(sigma_B / sigma, 1/rmax, rmax),   d = clip((mu_B - mu) / sigma, -dmax, dmax),

per channel, with mu_B, sigma_B = sqrt(Var_B + eps) the batch statistics, mu, sigma = sqrt(running_var
+ eps) the running ones, and r, d constants for the gradient (Ioffe 2017, arXiv 1702.03275,
Algorithm 1). Training then sees the normalization that inference uses (the running statistics),
which is what plain batch norm loses at batch size 4. The math is `functional.batch_renorm`.

The clipping limits ramp with the training step, counted by `num_batches_tracked`: r and d start
clipped to plain batch norm (rmax 1, dmax 0) and rise linearly to `rmax` over the steps of
`rmax_ramp` and to `dmax` over `dmax_ramp` (defaults: the paper's 5k-40k and 5k-25k); a ramp of
None applies the limit from the first step. `BatchRenorm2d(C, rmax=1, dmax=0)` is BatchNorm2d.

Args (all layers):
    num_features, eps, affine, device, dtype: as BatchNorm.
    momentum: running-statistics EMA factor; default 0.01, the paper's value (the running
        statistics enter the training output, so they must move slowly).
    track_running_stats: must be True (r and d compare each batch with the running statistics).
    rmax: final limit of r, >= 1. Default 3.
    dmax: final limit of d, >= 0. Default 5.
    rmax_ramp, dmax_ramp: (start step, end step) of the linear ramps, or None for fixed limits.
    sync, process_group: as BatchNorm: batch statistics (and so r and d) over the global batch of
        the process group's ranks (`batchnorm.nn.sync`).

Raises:
    ValueError: rmax < 1, dmax < 0, a malformed ramp, track_running_stats=False, and everything
        BatchNorm raises.
"""

from __future__ import annotations

from torch import Tensor

from batchnorm import functional as F
from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase


class BatchRenormBase(BatchNormBase):
    """The shared forward of BatchRenorm1d/2d/3d; see the module docstring."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, rmax: float = 3.0, dmax: float = 5.0,
                 rmax_ramp: tuple[int, int] | None = (5000, 40000),
                 dmax_ramp: tuple[int, int] | None = (5000, 25000), sync: bool = False,
                 process_group=None) -> None:
        name = f"{type(self).__name__}({num_features!r})"
        if not track_running_stats:
            raise ValueError(f"{name}: batch renorm needs track_running_stats=True (r and d "
                             f"compare each batch with the running statistics); use BatchNorm "
                             f"for batch statistics only")
        F.check_renorm_limits(rmax, dmax, name)
        F.check_ramp(rmax_ramp, "rmax_ramp", name)
        F.check_ramp(dmax_ramp, "dmax_ramp", name)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         sync=sync, process_group=process_group)
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.rmax_ramp = tuple(rmax_ramp) if rmax_ramp is not None else None
        self.dmax_ramp = tuple(dmax_ramp) if dmax_ramp is not None else None

    def clip_limits(self) -> tuple[Tensor, Tensor]:
        """(rmax_t, dmax_t) at the current training step, `num_batches_tracked`."""
        return F.renorm_limits(self.num_batches_tracked, self.rmax, self.dmax, self.rmax_ramp,
                               self.dmax_ramp)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        rmax, dmax = self.clip_limits() if self.training else (self.rmax, self.dmax)
        return F.batch_renorm(
            input, self.running_mean, self.running_var, self.weight, self.bias, self.training,
            self.momentum, self.eps, rmax=rmax, dmax=dmax,
            num_batches_tracked=self.num_batches_tracked, layer_name=self.layer_name,
            warn_key=self, sync=self.sync, process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, "
                f"rmax_ramp={self.rmax_ramp}, dmax_ramp={self.dmax_ramp}")


class BatchRenorm1d(BatchRenormBase, BatchNorm1d):
    """Batch renorm over (N, C) or (N, C, L) input; see the module docstring."""


class BatchRenorm2d(BatchRenormBase, BatchNorm2d):
    """Batch renorm over (N, C, H, W) input; see the module docstring."""


class BatchRenorm3d(BatchRenormBase, BatchNorm3d):
    """Batch renorm over (N, C, D, H, W) input; see the module docstring."""
