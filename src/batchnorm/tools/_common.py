"""What the tools share: which modules are batch norms, how a batch is fed to a model, the outputs
as a flat list of tensors, and the progress bar."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree

import batchnorm.nn as family


def batchnorm_types(foldable: bool = False) -> tuple[type, ...]:
    """Every batch-norm layer type: torch.nn's, ours and the family's subclass _BatchNorm, except
    FrozenBatchNorm (a plain Module on purpose). With `foldable`, only those whose eval forward is
    act(weight * (x - running_mean) / sqrt(running_var + eps) + bias) on the one input, so fold
    may replace them by a scale, a shift and the activation (`activation_module`)."""
    if not foldable:
        return (_BatchNorm, family.FrozenBatchNormBase)
    # Renorm and ghost batch norm are plain batch norm on the running statistics in eval; masked
    # and domain batch norm take a second argument that changes what they compute.
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
            family.BatchNormBase, family.FrozenBatchNormBase)


def takes_second_argument(module: nn.Module) -> bool:
    """Masked and domain batch norm: a mask or a domain index changes what they compute."""
    return isinstance(module, (family.MaskedBatchNormBase, family.DomainBatchNormBase))


def layer_values(module: nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
    """The values a batch-norm call's statistics are over, from its arguments (as a forward
    pre-hook sees them): the input, or for a MaskedBatchNorm with a mask the input's valid
    positions as an (M, C) tensor. None for a mask the layer's forward will refuse (it raises its
    own error then). The input may be passed as `input=`."""
    x = args[0] if args else kwargs["input"]
    mask = args[1] if len(args) > 1 else kwargs.get("mask")
    if not isinstance(module, family.MaskedBatchNormBase) or mask is None:
        return x
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        return None
    try:
        mask = torch.broadcast_to(mask, x.shape[:1] + x.shape[2:])
    except RuntimeError:
        return None
    return x.movedim(1, -1)[mask]


def is_domain(module: nn.Module) -> bool:
    return isinstance(module, family.DomainBatchNormBase)


def is_frozen(module: nn.Module) -> bool:
    """FrozenBatchNorm normalizes with its statistics in train mode as in eval; never updates."""
    return isinstance(module, family.FrozenBatchNormBase)


def activation_module(layer: nn.Module) -> nn.Module:
    """The torch.nn module for a layer's activation (BatchNormAct, FrozenBatchNorm): the fused
    one's, or the unfused module a BatchNormAct holds as `act`."""
    if getattr(layer, "act", None) is not None:
        return layer.act
    act = getattr(layer, "activation", "identity")
    slope = getattr(layer, "negative_slope", 0.01)
    return {"identity": nn.Identity, "relu": nn.ReLU, "silu": nn.SiLU,
            "leaky_relu": lambda: nn.LeakyReLU(slope),
            "gelu_tanh": lambda: nn.GELU(approximate="tanh")}[act]()


def model_device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def to_device(value, device: torch.device | None):
    if device is None:
        return value
    return _pytree.tree_map(lambda v: v.to(device) if isinstance(v, Tensor) else v, value)


def run_model(model: nn.Module, inputs):
    """model(inputs): a tensor is the one argument, a tuple/list the positional arguments, a dict
    the keyword arguments."""
    with torch.no_grad():
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)


def batch_inputs(batch):
    """The model input inside a data-loader batch: a tensor as is, (inputs, labels, ...) -> inputs,
    a dict (Hugging Face style) as keyword arguments."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty batch tuple; expected (inputs, ...) or a tensor")
        return batch[0]
    return batch


def output_tensors(output) -> list[Tensor]:
    """Every tensor in a model's output (tensor, tuple, dict, Hugging Face ModelOutput)."""
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    return [t for t in _pytree.tree_leaves(output) if isinstance(t, Tensor)]


def limited(batches: Iterable, num_batches: int | None, what: str) -> Iterator:
    if num_batches is not None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0:
            raise ValueError(f"{what}: num_batches must be a positive int or None, got "
                             f"{num_batches!r}")
        return itertools.islice(batches, num_batches)
    return iter(batches)


def progress_bar(iterator: Iterator, total: int | None, description: str, enabled: bool):
    """A rich progress bar over `iterator` when `enabled` and rich is installed (extra `tools`)."""
    if not enabled:
        return iterator
    try:
        from rich.progress import track
    except ImportError:
        return iterator
    return track(iterator, total=total, description=description, transient=True)


def total_batches(batches, num_batches: int | None) -> int | None:
    try:
        n = len(batches)
    except TypeError:
        return num_batches
    return n if num_batches is None else min(n, num_batches)
