"""Precise batch norm: exact population statistics instead of the training EMA.

Wu & Johnson 2021 ("Rethinking 'Batch' in BatchNorm", arXiv 2105.07576, s3): the EMA in
`running_mean`/`running_var` lags the weights and mixes statistics of many past models. Precise BN
freezes the weights and runs the given batches in training mode, so every layer sees its input
normalized with batch statistics exactly as in training, and for every batch-norm layer collects

    count_k, mean_k, m2_k = sum over batch k of (x - mean_k)^2    (per channel, float64)

merged with Chan's formula (`kernels.native.merge_stats`): the population mean weights each batch
by its size, and

    running_mean = mean,   running_var = m2 / (count - 1)           (Bessel over the total count).

Under torch.distributed the per-rank partials are gathered and merged the same way, so every rank
ends with the statistics of all ranks' batches. Non-batch-norm modules run in eval mode during the
passes (dropout off: the statistics describe the activations inference sees). Parameters,
`num_batches_tracked` and every module's training flag are left as they were.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from batchnorm.kernels.native import merge_stats, stats
from batchnorm.tools._common import (batch_inputs, batchnorm_types, limited, model_device,
                                     progress_bar, run_model, to_device, total_batches)

__all__ = ["recalibrate", "population_stats"]


def _tracked_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, batchnorm_types()) and m.running_mean is not None}


def _all_gather_merge(partials: dict[str, tuple[Tensor, Tensor, Tensor]]
                      ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Merge every layer's (count, mean, m2) across ranks: one all_gather of all layers at once."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return partials
    names = sorted(partials)
    flat = torch.cat([torch.stack(partials[n]).reshape(-1) for n in names])
    # gloo and nccl both gather; the layout is [layer][count|mean|m2][channel].
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    stacked = torch.stack(gathered)  # (ranks, total)
    merged, offset = {}, 0
    for n in names:
        c = partials[n][0].numel()
        part = stacked[:, offset:offset + 3 * c].reshape(-1, 3, c)
        merged[n] = merge_stats(part[:, 0], part[:, 1], part[:, 2], dim=0)
        offset += 3 * c
    return merged


@torch.no_grad()
def population_stats(model: nn.Module, batches: Iterable, num_batches: int | None = None, *,
                     forward: Callable[[nn.Module, object], object] | None = None,
                     progress: bool = True, description: str = "recalibrate"
                     ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Per batch-norm layer (count, mean, m2) in float64 over `batches`, merged across ranks.

    Runs the model with its batch norms in training mode and everything else in eval; parameters,
    buffers and training flags are restored afterwards. See `recalibrate` for the arguments.
    """
    layers = _tracked_layers(model)
    partials: dict[str, list[Tensor]] = {}

    def hook(module, args, name):
        x = args[0]
        if x.numel() == 0:
            return
        count, mean, m2 = stats(x.detach().double())
        if name in partials:
            merged = merge_stats(torch.stack([partials[name][0], count]),
                                 torch.stack([partials[name][1], mean]),
                                 torch.stack([partials[name][2], m2]))
            partials[name] = list(merged)
        else:
            partials[name] = [count, mean, m2]

    modes = {m: m.training for m in model.modules()}
    saved = {name: {k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None}
             for name, m in layers.items()}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name))
               for name, m in layers.items()]
    device = model_device(model)
    try:
        model.eval()
        for m in layers.values():
            m.train()
        it = limited(batches, num_batches, description)
        for batch in progress_bar(it, total_batches(batches, num_batches), description, progress):
            inputs = to_device(batch_inputs(batch), device)
            if forward is None:
                run_model(model, inputs)
            else:
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        # the passes ran in training mode, so the layers' own EMA moved; put it back.
        for name, m in layers.items():
            for k, v in saved[name].items():
                getattr(m, k).copy_(v)
    ones = {name: tuple(partials[name]) for name in partials}
    channels = {name: m.num_features for name, m in layers.items()}
    # every rank must take part in the gather, even one that saw no input for some layer.
    for name in layers:
        if name not in ones:
            zeros = torch.zeros(channels[name], dtype=torch.float64, device=device)
            ones[name] = (zeros, zeros.clone(), zeros.clone())
    return _all_gather_merge(ones)


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable, num_batches: int | None = None, *,
                forward: Callable[[nn.Module, object], object] | None = None,
                progress: bool = True) -> nn.Module:
    """Set every batch norm's running statistics to the exact population statistics of `batches`.

    running_mean = sum_k n_k mean_k / n, running_var = m2 / (n - 1) over all n values per channel
    the layer sees across the batches (and ranks); see the module docstring.

    Args:
        model: any model containing batch norms (torch.nn's, ours, the family's).
        batches: an iterable of batches: tensors, (inputs, labels, ...) tuples, or dicts of keyword
            arguments; tensors are moved to the model's device. Unequal sizes are fine.
        num_batches: use only the first `num_batches` batches; None uses them all.
        forward: `forward(model, batch)` for models that are not called as model(inputs).
        progress: show a progress bar (rich, when installed).

    Returns:
        `model`, updated in place.

    Raises:
        ValueError: bad num_batches, or a layer saw only one value per channel (the unbiased
            variance needs two).
    """
    population = population_stats(model, batches, num_batches, forward=forward,
                                  progress=progress, description="recalibrate")
    for name, m in _tracked_layers(model).items():
        count, mean, m2 = population[name]
        if not bool((count > 0).all()):
            warnings.warn(f"recalibrate: {name} ({type(m).__name__}) saw no input in the given "
                          f"batches; its running statistics are unchanged", RuntimeWarning,
                          stacklevel=2)
            continue
        if not bool((count > 1).all()):
            raise ValueError(f"recalibrate: {name} saw one value per channel in total; the "
                             f"unbiased variance needs at least two: pass more or larger batches")
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_((m2 / (count - 1)).to(m.running_var.dtype))
    return model
