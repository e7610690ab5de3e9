"""Running statistics across ranks: find where they differ, and make them agree.

Data-parallel training with batch norms that are not synced leaves each rank with running
statistics of its own batches (DDP's buffer broadcast hides this only while it runs, and only
from rank 0's side). A checkpoint saved on rank 0 then keeps rank 0's, and evaluation on every
rank gives rank-dependent answers (fvcore#152). Three tools, every rank calling each alike:

- `rank_differences(model)`: per buffer, the largest difference between any rank and rank 0;
- `check_consistency(model, atol=0, rtol=0)`: raises on every rank, naming each buffer that
  differs and by how much;
- `sync_running_stats(model, "broadcast" | "average")`: rank `src`'s statistics everywhere, or
  their average, weighted as each layer's statistics are averages:

      momentum=None (cumulative):  w_k = num_batches_tracked_k     (the batches each rank averaged)
      momentum float (EMA):        w_k = 1                          (every rank, the same steps)
      running_mean = sum_k w_k mean_k / sum_k w_k,   running_var = sum_k w_k var_k / sum_k w_k

  With momentum=None that is exactly what one process would hold after seeing every rank's
  batches (its running_var is, like each rank's, the average of the batches' unbiased variances,
  which is what training normalized with; the spread between ranks' means is not a batch's
  variance). num_batches_tracked is a count, never averaged: "average" leaves it as it is.

For statistics that are the same on every rank by construction, use SyncBatchNorm in training,
or `recalibrate` (precise BN), which merges every rank's partial statistics with Chan's formula:
every rank ends with the population statistics of all ranks' batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from batchnorm.tools._common import batchnorm_types

__all__ = ["rank_differences", "check_consistency", "sync_running_stats"]

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    """'layer.buffer' -> tensor for every batch norm's running statistics, in a fixed order."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, batchnorm_types()):
            for b in _BUFFERS:
                t = getattr(m, b, None)
                if isinstance(t, Tensor):
                    found[f"{name}.{b}" if name else b] = t
    return found


def _world(process_group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _flat(buffers: dict[str, Tensor]) -> Tensor:
    """All buffers as one float64 vector (exact for every float dtype and for counts < 2^53)."""
    if not buffers:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in buffers.values()])


def _unflat(flat: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
    out, offset = {}, 0
    for key, t in buffers.items():
        out[key] = flat[offset:offset + t.numel()].reshape(t.shape)
        offset += t.numel()
    return out


def _gathered(model: nn.Module, process_group) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(buffers, key -> (world, *shape) float64 values of every rank, in group rank order)."""
    buffers = _buffers(model)
    flat = _flat(buffers)
    device = next(iter(buffers.values())).device if buffers else flat.device
    flat = flat.to(device)
    world = _world(process_group)
    if world == 1:
        return buffers, {k: v.unsqueeze(0) for k, v in _unflat(flat, buffers).items()}
    counts = [torch.zeros((), dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor(flat.numel(), device=device), group=process_group)
    if len({int(c) for c in counts}) > 1:
        raise RuntimeError(f"rank consistency: the ranks' models hold different numbers of "
                           f"batch-norm statistics ({[int(c) for c in counts]} values on ranks "
                           f"0..{world - 1}); every rank must pass the same model")
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat, group=process_group)
    stacked = torch.stack(parts)
    per_key = {}
    offset = 0
    for key, t in buffers.items():
        per_key[key] = stacked[:, offset:offset + t.numel()].reshape((world, *t.shape))
        offset += t.numel()
    return buffers, per_key


def rank_differences(model: nn.Module, process_group=None) -> dict[str, float]:
    """'layer.buffer' -> max |value on any rank - value on rank 0| of every batch norm's running
    statistics (0.0 where all ranks agree). One all-gather; every rank gets the same answer."""
    _, per_key = _gathered(model, process_group)
    return {k: (v - v[:1]).abs().max().item() if v.numel() else 0.0 for k, v in per_key.items()}


def check_consistency(model: nn.Module, *, atol: float = 0.0, rtol: float = 0.0,
                      process_group=None) -> None:
    """Raise RuntimeError, on every rank alike, if a batch norm's running statistics differ
    between ranks by more than atol + rtol * |rank 0's value|. The defaults demand equality,
    which SyncBatchNorm, `recalibrate` and `sync_running_stats` give bit for bit."""
    _, per_key = _gathered(model, process_group)
    bad = []
    for key, values in per_key.items():
        diff = (values - values[:1]).abs()
        if bool((diff > atol + rtol * values[:1].abs()).any()):
            ranks = [r for r in range(values.shape[0]) if bool((diff[r] > atol + rtol *
                                                                  values[0].abs()).any())]
            bad.append(f"{key} (ranks {ranks} differ from rank 0 by up to "
                       f"{diff.max().item():.3g})")
    if bad:
        raise RuntimeError(
            f"rank consistency: batch-norm running statistics differ between the "
            f"{next(iter(per_key.values())).shape[0]} ranks: {'; '.join(bad)}. Each rank's "
            f"unsynced batch norm averages its own batches; make them agree with "
            f"batchnorm.tools.sync_running_stats(model, 'average') (or 'broadcast'), recompute "
            f"them with batchnorm.tools.recalibrate, or train with SyncBatchNorm")


@torch.no_grad()
def sync_running_stats(model: nn.Module, how: str = "average", *, src: int = 0,
                       process_group=None) -> nn.Module:
    """Make every rank's batch-norm running statistics equal, in place; see the module docstring.

    Args:
        how: "broadcast" copies rank `src`'s running_mean, running_var and num_batches_tracked;
            "average" sets running_mean and running_var to their weighted average over the ranks
            and leaves num_batches_tracked alone.
        src: the global rank "broadcast" copies from.
        process_group: the ranks to make agree; None for all.

    Returns:
        `model`.
    """
    if how not in ("broadcast", "average"):
        raise ValueError(f"sync_running_stats: how must be 'broadcast' or 'average', got {how!r}")
    if _world(process_group) == 1:
        return model
    buffers, per_key = _gathered(model, process_group)
    if how == "broadcast":
        index = dist.get_group_rank(process_group or dist.group.WORLD, src)
        for key, t in buffers.items():
            t.copy_(per_key[key][index].to(t.dtype))
        return model
    for name, m in model.named_modules():
        if not isinstance(m, batchnorm_types()) or getattr(m, "running_mean", None) is None:
            continue
        prefix = f"{name}." if name else ""
        mean, var = per_key[prefix + "running_mean"], per_key[prefix + "running_var"]
        tracked = per_key.get(prefix + "num_batches_tracked")
        if getattr(m, "momentum", 0.1) is None and tracked is not None:
            weight = tracked.reshape(tracked.shape + (1,) * (mean.ndim - tracked.ndim))
            if not bool((weight.sum(0) > 0).all()):
                continue  # no rank has counted a batch: nothing to average
        else:
            weight = torch.ones_like(mean)
        total = weight.sum(0)
        m.running_mean.copy_(((weight * mean).sum(0) / total).to(m.running_mean.dtype))
        m.running_var.copy_(((weight * var).sum(0) / total).to(m.running_var.dtype))
    return model
