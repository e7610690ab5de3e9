"""Precise batch norm: exact population statistics instead of the training EMA.

Wu & Johnson 2021 ("Rethinking 'Batch' in BatchNorm", arXiv 2105.07576, s3): the EMA in
`running_mean`/`running_var` lags the weights and mixes statistics of many past models. Precise BN
freezes the weights and runs the given batches in training mode, so every layer sees its input
normalized with batch statistics exactly as in training, and for every batch-norm layer collects

    count_k, mean_k, m2_k = sum over batch k of (x - mean_k)^2    (per channel, float64)

merged with Chan's formula (`kernels.native.merge_stats`): the population mean weights each batch
by its size, and the pooled (count, mean, m2) is applied as one batch with momentum 1 through
`rules.update_running_stats`, the rule every training forward applies:

    running_mean = mean,   running_var = m2 / (count - 1)           (Bessel over the total count),

formed in the buffers' accumulation dtype and stored only if finite in the buffers' dtype (an fp16
layer whose population variance exceeds 65504 keeps its statistics, with the rules' warning).
Running statistics that are already non-finite (torch.nn stores a NaN batch's) are reset to 0 and
1 first, so recalibrating repairs them.

Under torch.distributed the per-rank partials are gathered and merged the same way, so every rank
ends with the statistics of all ranks' batches. Non-batch-norm modules run in eval mode during the
passes (dropout off: the statistics describe the activations inference sees). Parameters,
`num_batches_tracked` and every module's training flag are left as they were.

A MaskedBatchNorm's statistics are over the valid positions of its mask only, as in its forward.
A batch whose values at a layer are not finite (a NaN or inf input, an overflow) is left out of
that layer's statistics with a RuntimeWarning naming the layer and the batch index, as the
training forward leaves such a batch out of the running statistics: one corrupt batch should not
turn a whole population estimate into NaN. The other batches still count.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from batchnorm.kernels.native import merge_stats, stats
from batchnorm.rules import update_running_stats
from batchnorm.tools._common import (batch_inputs, batchnorm_types, is_domain, is_frozen,
                                     layer_values, limited, model_device, progress_bar, run_model,
                                     to_device, total_batches)

__all__ = ["recalibrate", "population_stats"]


def _tracked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers with running statistics that training updates (FrozenBatchNorm's never change)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, batchnorm_types()) and not is_frozen(m)
            and m.running_mean is not None}


Key = tuple[str, "int | None"]  # (layer name, domain index for DomainBatchNorm, else None)


def _all_gather_merge(partials: dict[Key, tuple[Tensor, Tensor, Tensor]]
                      ) -> dict[Key, tuple[Tensor, Tensor, Tensor]]:
    """Merge every layer's (count, mean, m2) across ranks: one all_gather of all layers at once."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return partials
    keys = sorted(partials, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    flat = torch.cat([torch.stack(partials[k]).reshape(-1) for k in keys])
    # gloo and nccl both gather; the layout is [layer][count|mean|m2][channel].
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    stacked = torch.stack(gathered)  # (ranks, total)
    merged, offset = {}, 0
    for k in keys:
        c = partials[k][0].numel()
        part = stacked[:, offset:offset + 3 * c].reshape(-1, 3, c)
        merged[k] = merge_stats(part[:, 0], part[:, 1], part[:, 2], dim=0)
        offset += 3 * c
    return merged


def _domain_argument(args: tuple, kwargs: dict):
    return args[1] if len(args) > 1 else kwargs.get("domain")


@torch.no_grad()
def population_stats(model: nn.Module, batches: Iterable, num_batches: int | None = None, *,
                     forward: Callable[[nn.Module, object], object] | None = None,
                     progress: bool = True, domain: int | None = None,
                     description: str = "recalibrate"
                     ) -> dict[Key, tuple[Tensor, Tensor, Tensor]]:
    """Per batch-norm layer (count, mean, m2) in float64 over `batches`, merged across ranks.

    Keys are (layer name, None), or (layer name, k) for each domain k of a DomainBatchNorm. Runs
    the model with its batch norms in training mode and everything else in eval; parameters,
    buffers and training flags are restored afterwards. See `recalibrate` for the arguments.
    """
    layers = _tracked_layers(model)
    partials: dict[Key, list[Tensor]] = {}
    batch_index = -1

    def hook(module, args, kwargs, name):
        key: Key = (name, None)
        if is_domain(module):
            if domain is not None:  # adapt(domain=k): every domain layer runs as domain k
                args = (args[0], domain) + tuple(args[2:])
                kwargs = {k: v for k, v in kwargs.items() if k != "domain"}
            key = (name, int(_domain_argument(args, kwargs)))
        values = layer_values(module, args, kwargs)
        if values is None or values.numel() == 0:
            return args, kwargs
        count, mean, m2 = stats(values.detach().double())
        if not bool(torch.isfinite(mean).all() and torch.isfinite(m2).all()):
            warnings.warn(f"{description}: {name} ({type(module).__name__}) got non-finite values "
                          f"in batch {batch_index}; that batch is left out of its statistics "
                          f"(check the batch's inputs, e.g. torch.isfinite(batch).all())",
                          RuntimeWarning, stacklevel=2)
            return args, kwargs
        if key in partials:
            merged = merge_stats(torch.stack([partials[key][0], count]),
                                 torch.stack([partials[key][1], mean]),
                                 torch.stack([partials[key][2], m2]))
            partials[key] = list(merged)
        else:
            partials[key] = [count, mean, m2]
        return args, kwargs

    modes = {m: m.training for m in model.modules()}
    saved = {name: {k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None}
             for name, m in layers.items()}
    handles = [m.register_forward_pre_hook(
                   lambda mod, args, kwargs, name=name: hook(mod, args, kwargs, name),
                   with_kwargs=True) for name, m in layers.items()]
    device = model_device(model)
    try:
        model.eval()
        for m in layers.values():
            m.train()
        it = limited(batches, num_batches, description)
        bar = progress_bar(it, total_batches(batches, num_batches), description, progress)
        for batch_index, batch in enumerate(bar):
            if forward is None:
                run_model(model, to_device(batch_inputs(batch), device))
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
    # Every rank must gather the same keys, even one that saw no input for some layer or domain.
    for name, m in layers.items():
        domains = range(m.num_domains) if is_domain(m) else [None]
        for k in domains:
            if (name, k) not in partials:
                zeros = torch.zeros(m.num_features, dtype=torch.float64, device=device)
                partials[(name, k)] = [zeros, zeros.clone(), zeros.clone()]
    return _all_gather_merge({k: tuple(v) for k, v in partials.items()})


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable, num_batches: int | None = None, *,
                forward: Callable[[nn.Module, object], object] | None = None,
                progress: bool = True, domain: int | None = None) -> nn.Module:
    """Set every batch norm's running statistics to the exact population statistics of `batches`.

    running_mean = sum_k n_k mean_k / n, running_var = m2 / (n - 1) over all n values per channel
    the layer sees across the batches (and ranks); see the module docstring.

    Args:
        model: any model containing batch norms (torch.nn's, ours, the family's). FrozenBatchNorm
            layers are left alone; a DomainBatchNorm gets each domain's statistics from the calls
            made with that domain.
        batches: an iterable of batches: tensors, (inputs, labels, ...) tuples, or dicts of keyword
            arguments; tensors are moved to the model's device. Unequal sizes are fine.
        num_batches: use only the first `num_batches` batches; None uses them all.
        forward: `forward(model, batch)` for models that are not called as model(inputs).
        progress: show a progress bar (rich, when installed).
        domain: run every DomainBatchNorm as this domain (whatever the model passes it), so only
            that domain's statistics are re-estimated.

    Returns:
        `model`, updated in place.

    Raises:
        ValueError: bad num_batches, or a layer saw only one value per channel (the unbiased
            variance needs two).
    """
    population = population_stats(model, batches, num_batches, forward=forward,
                                  progress=progress, domain=domain, description="recalibrate")
    for (name, k), (count, mean, m2) in population.items():
        m = model.get_submodule(name)
        if not bool((count > 0).all()):
            if k is None:  # a domain no batch was run as is expected; a whole layer is not
                warnings.warn(f"recalibrate: {name} ({type(m).__name__}) saw no input in the "
                              f"given batches; its running statistics are unchanged",
                              RuntimeWarning, stacklevel=2)
            continue
        if not bool((count > 1).all()):
            raise ValueError(f"recalibrate: {name} saw one value per channel in total; the "
                             f"unbiased variance needs at least two: pass more or larger batches")
        running_mean = m.running_mean if k is None else m.running_mean[k]  # a view of row k
        running_var = m.running_var if k is None else m.running_var[k]
        # num_batches_tracked None: recalibrating is not a training step, and its count stays.
        update_running_stats(running_mean, running_var, None, count, mean, m2, momentum=1.0,
                             name=f"recalibrate: {name} ({type(m).__name__})")
    return model
