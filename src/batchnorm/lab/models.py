"""The lab's models: the Ioffe MLP and a small CNN, each with a `norm` picked from one registry.

- `mlp`: Ioffe & Szegedy 2015, s4.1: `depth` hidden layers of `width` units (3 x 100), sigmoid or
  relu, then a linear classifier.
- `cnn`: Greydanus 2020's MNIST-1D CNN: 3 convolutions of 25 channels, stride 2, then a linear
  classifier; Conv1d for (1, L) sequences, Conv2d for (C, H, W) images.

Each hidden block is `linear/conv -> norm -> activation (-> dropout)`, the placement of the BN paper.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

import batchnorm

# name -> factory(channels, dims, options) with dims 1 for (N, C) and (N, C, L) input, 2 for
# (N, C, H, W). `options` carries the per-norm settings of the run's configuration.
NormFactory = Callable[[int, int, dict], nn.Module]


def _batch(c: int, dims: int, options: dict) -> nn.Module:
    return (batchnorm.BatchNorm1d if dims == 1 else batchnorm.BatchNorm2d)(c)


def _renorm(c: int, dims: int, options: dict) -> nn.Module:
    cls = batchnorm.BatchRenorm1d if dims == 1 else batchnorm.BatchRenorm2d
    return cls(c, **options["renorm"])


def _ghost(c: int, dims: int, options: dict) -> nn.Module:
    cls = batchnorm.GhostBatchNorm1d if dims == 1 else batchnorm.GhostBatchNorm2d
    return cls(c, virtual_batch_size=options["virtual_batch"])


NORMS: dict[str, NormFactory] = {
    "none": lambda c, dims, options: nn.Identity(),
    "batch": _batch,
    "renorm": _renorm,
    "ghost": _ghost,
    # GroupNorm over (N, C) input normalizes each example over its channel groups; with one
    # group it is layer norm (Wu & He 2018 define LN over all of C, H, W, which GroupNorm(1, C) is).
    "group": lambda c, dims, options: nn.GroupNorm(options["groups"], c),
    "layer": lambda c, dims, options: nn.GroupNorm(1, c),
}

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def norm_layer(name: str, channels: int, dims: int, options: dict) -> nn.Module:
    if name not in NORMS:
        raise ValueError(f"norm: expected one of {', '.join(NORMS)}, got {name!r}")
    return NORMS[name](channels, dims, options)


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def _block(layer: nn.Module, channels: int, dims: int, cfg: dict) -> list[nn.Module]:
    block = [layer, norm_layer(cfg["norm"], channels, dims, cfg), _activation(cfg["activation"])]
    if cfg["dropout"]:
        block.append(nn.Dropout(cfg["dropout"]))
    return block


def build(cfg: dict, shape: tuple[int, ...], classes: int) -> nn.Sequential:
    """The model of a run configuration (see `train.DEFAULTS`) for examples of `shape`."""
    if cfg["model"] == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(shape)
        for _ in range(cfg["depth"]):
            layers += _block(nn.Linear(width, cfg["width"]), cfg["width"], 1, cfg)
            width = cfg["width"]
        layers.append(nn.Linear(width, classes))
    elif cfg["model"] == "cnn":
        dims = len(shape) - 1
        if dims not in (1, 2):
            raise ValueError(f"model: cnn expects (C, L) or (C, H, W) examples, got shape {shape}")
        # Greydanus's 1d CNN: kernel 5, stride 2, padding 1; images use 3x3 kernels.
        conv, kernel = (nn.Conv1d, 5) if dims == 1 else (nn.Conv2d, 3)
        layers, channels = [], shape[0]
        for _ in range(cfg["depth"]):
            layers += _block(conv(channels, cfg["channels"], kernel, 2, 1), cfg["channels"], dims,
                             cfg)
            channels = cfg["channels"]
        with torch.no_grad():
            flat = nn.Sequential(*layers).eval()(torch.zeros(1, *shape)).numel()
        layers += [nn.Flatten(), nn.Linear(flat, classes)]
    else:
        raise ValueError(f"model: expected 'mlp' or 'cnn', got {cfg['model']!r}")
    model = nn.Sequential(*layers)
    if cfg["init_std"] is not None:
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, cfg["init_std"])
                nn.init.zeros_(m.bias)
    return model
