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


class _Workers:
    """Batch norm on `workers` simulated devices without synchronized statistics, as
    DistributedDataParallel trains it: in training mode each worker's equal slice of the batch is
    normalized with its own statistics, and every worker starts the step from worker 0's running
    statistics (DDP broadcasts rank 0's buffers before each forward) and keeps worker 0's update.
    One library call does all workers at once: the slices become channel groups of one
    (N / workers, workers * C, ...) tensor, with the layer's weight and bias repeated per worker.
    Eval mode is the layer's own. The subclasses add the call."""

    workers: int

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        n, c, rest = x.shape[0], x.shape[1], x.shape[2:]
        if n % self.workers:
            raise ValueError(f"{type(self).__name__}({c}): a batch of {n} examples does not "
                             f"split into {self.workers} workers' equal slices")
        return (x.reshape(self.workers, n // self.workers, c, *rest).transpose(0, 1)
                .reshape(n // self.workers, self.workers * c, *rest))

    def _unfold(self, y: torch.Tensor, n: int) -> torch.Tensor:
        c, rest = y.shape[1] // self.workers, y.shape[2:]
        return y.reshape(n // self.workers, self.workers, c, *rest).transpose(0, 1).reshape(
            n, c, *rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.workers == 1:
            return super().forward(x)
        self._check_input_dim(x)
        running = [self.running_mean.repeat(self.workers), self.running_var.repeat(self.workers)]
        y = self._call(self._fold(x), *running, self.weight.repeat(self.workers),
                       self.bias.repeat(self.workers))
        with torch.no_grad():
            self.running_mean.copy_(running[0][:self.num_features])
            self.running_var.copy_(running[1][:self.num_features])
        return self._unfold(y, x.shape[0])


class WorkerBatchNorm1d(_Workers, batchnorm.BatchNorm1d):
    def __init__(self, num_features: int, workers: int) -> None:
        super().__init__(num_features)
        self.workers = workers

    def _call(self, x, running_mean, running_var, weight, bias):
        return batchnorm.functional.batch_norm(
            x, running_mean, running_var, weight, bias, True, self.momentum, self.eps,
            num_batches_tracked=self.num_batches_tracked)


class WorkerBatchRenorm1d(_Workers, batchnorm.BatchRenorm1d):
    def __init__(self, num_features: int, workers: int, **renorm) -> None:
        super().__init__(num_features, **renorm)
        self.workers = workers

    def _call(self, x, running_mean, running_var, weight, bias):
        rmax, dmax = self.clip_limits()
        return batchnorm.functional.batch_renorm(
            x, running_mean, running_var, weight, bias, True, self.momentum, self.eps,
            rmax=rmax, dmax=dmax, num_batches_tracked=self.num_batches_tracked)


def _batch(c: int, dims: int, options: dict) -> nn.Module:
    workers = options.get("workers", 1)
    if workers > 1:
        if dims != 1:
            raise ValueError(f"workers: simulated workers are for the MLP's (N, C) layers, got "
                             f"workers={workers} with a {dims}d CNN")
        return WorkerBatchNorm1d(c, workers)
    return (batchnorm.BatchNorm1d if dims == 1 else batchnorm.BatchNorm2d)(c)


def _renorm(c: int, dims: int, options: dict) -> nn.Module:
    workers = options.get("workers", 1)
    if workers > 1:
        if dims != 1:
            raise ValueError(f"workers: simulated workers are for the MLP's (N, C) layers, got "
                             f"workers={workers} with a {dims}d CNN")
        return WorkerBatchRenorm1d(c, workers, **options["renorm"])
    cls = batchnorm.BatchRenorm1d if dims == 1 else batchnorm.BatchRenorm2d
    return cls(c, **options["renorm"])


class StepNoise(nn.Module):
    """Santurkar et al. 2018's "noisy BN" (arXiv 1805.11604, s2.1): after a batch norm, a random
    per-unit shift and scale that change every training step, y = s_t * x + m_t with
    m_t ~ U(-mean, mean) and s_t ~ U(1, scale) drawn per channel by `resample()` (the training
    loop calls it once per step), so the next layer's input distribution moves at every step
    however stable BN made it. In eval mode the noise is replaced by its expectation (shift 0,
    scale (1 + scale) / 2), as dropout rescales: the noise models covariate shift during training,
    not a different network at test time."""

    def __init__(self, channels: int, mean: float, scale: float, seed: int) -> None:
        super().__init__()
        if mean < 0 or scale < 1:
            raise ValueError(f"StepNoise: expected mean >= 0 and scale >= 1, got mean={mean}, "
                             f"scale={scale}")
        self.channels, self.mean, self.scale = channels, mean, scale
        self._generator = torch.Generator().manual_seed(seed)
        self.shift = torch.zeros(channels)
        self.gain = torch.ones(channels)

    def resample(self) -> None:
        u = torch.rand(2, self.channels, generator=self._generator)
        self.shift = (2 * u[0] - 1) * self.mean
        self.gain = 1 + u[1] * (self.scale - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x * ((1 + self.scale) / 2)
        view = (1, -1) + (1,) * (x.dim() - 2)  # per channel, broadcast over examples and length
        return x * self.gain.to(x).view(view) + self.shift.to(x).view(view)


def _noisy(c: int, dims: int, options: dict) -> nn.Module:
    # one generator per layer, seeded from torch's generator, which the run's seed has set
    seed = int(torch.randint(2**62, (1,)))
    return nn.Sequential(_batch(c, dims, options),
                         StepNoise(c, options["noise_mean"], options["noise_scale"], seed))


def _ghost(c: int, dims: int, options: dict) -> nn.Module:
    cls = batchnorm.GhostBatchNorm1d if dims == 1 else batchnorm.GhostBatchNorm2d
    return cls(c, virtual_batch_size=options["virtual_batch"])


NORMS: dict[str, NormFactory] = {
    "none": lambda c, dims, options: nn.Identity(),
    "batch": _batch,
    "noisy_batch": _noisy,
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
