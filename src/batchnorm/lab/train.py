"""One training run: a configuration in, plain numbers out (curves, accuracies, statistics).

A configuration is `DEFAULTS` with a claim's overrides; every key is listed and commented here, and
an unknown key is an error, so a result saved with its configuration can be rerun exactly.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

import batchnorm
from batchnorm.lab import models
from batchnorm.lab.data import Dataset

DEFAULTS: dict = {
    "model": "mlp",          # "mlp": Ioffe's 3 x 100 MLP; "cnn": Greydanus's 3-layer CNN
    "depth": 3,              # hidden (mlp) or convolution (cnn) layers
    "width": 100,            # mlp hidden units
    "channels": 25,          # cnn channels
    "activation": "relu",    # "relu" or "sigmoid"
    "norm": "none",          # a key of models.NORMS
    "virtual_batch": 16,     # ghost: examples per normalization batch
    "groups": 5,             # group norm: channel groups (splits both 100 and 25 evenly)
    # renorm: rmax 1 -> 3 and dmax 0 -> 5 (Ioffe 2017); the paper's 5k / 25k / 40k steps, as
    # shares of a 100k-step run, here as shares of this run's steps: warmup, dmax, rmax
    "renorm_ramp": [0.05, 0.25, 0.40],
    # renorm's running-statistics momentum: the paper's 0.01 assumes 100k+ steps; runs here are
    # 60 to 4000 steps, so renorm keeps BN's 0.1, under which its running statistics settle
    "renorm_momentum": 0.1,
    "dropout": 0.0,          # after every hidden activation
    "init_std": None,        # None: torch's default init; a number: N(0, std^2) weights, zero bias
    "optimizer": "sgd",      # "sgd" or "adam"
    "lr": 0.1,
    "momentum": 0.0,         # sgd only
    "batch_size": 128,
    "steps": 1000,
    "evals": 20,             # test-accuracy evaluations, evenly spaced over the steps
    "track_sigmoid": False,  # percentiles of one unit's input to the last activation (Ioffe Fig. 1)
    "inference": False,      # also test with running / precise / batch statistics
    "seed": 0,
}

PERCENTILES = (15, 50, 85)
INFERENCE_BATCHES = (1, 2, 8, "all")


def make_config(overrides: dict) -> dict:
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"lab configuration: unknown key(s) {unknown}; expected keys from "
                         f"{sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **overrides}
    for key in ("depth", "width", "channels", "batch_size", "steps", "evals", "virtual_batch"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"lab configuration: {key} must be a positive int, got {cfg[key]!r}")
    if cfg["optimizer"] not in ("sgd", "adam"):
        raise ValueError(f"lab configuration: optimizer must be 'sgd' or 'adam', got "
                         f"{cfg['optimizer']!r}")
    return cfg


def _options(cfg: dict) -> dict:
    """The model options of a run; renorm's ramp becomes step counts of this run."""
    warmup, dmax_at, rmax_at = (round(share * cfg["steps"]) for share in cfg["renorm_ramp"])
    return {**cfg, "renorm": {"momentum": cfg["renorm_momentum"], "rmax_ramp": (warmup, rmax_at),
                              "dmax_ramp": (warmup, dmax_at)}}


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum())
                  for xb, yb in zip(x.split(batch), y.split(batch)))
    return correct / len(y)


def _batches(n: int, batch: int, generator: torch.Generator):
    """Endless shuffled epochs of full batches: a last batch of one would break batch norm."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            yield order[start:start + batch]


def _inference(model: nn.Module, x_train, x_test, y_test, batch: int) -> dict:
    """Test accuracy with running, precise (recalibrated) and per-test-batch statistics."""
    out = {"running": _accuracy(model, x_test, y_test)}
    precise = batchnorm.recalibrate(copy.deepcopy(model), list(x_train.split(batch)),
                                    progress=False)
    out["precise"] = _accuracy(precise, x_test, y_test)
    out["batch"] = {}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for size in INFERENCE_BATCHES:
        model.eval()
        for m in norms:
            m.train()
        b = len(y_test) if size == "all" else size
        try:
            with torch.no_grad():
                correct = sum(int((model(xb).argmax(1) == yb).sum())
                              for xb, yb in zip(x_test.split(b), y_test.split(b)))
            out["batch"][str(size)] = correct / len(y_test)
        except ValueError:  # one value per channel: batch statistics don't exist
            out["batch"][str(size)] = None
    return out


def train(cfg: dict, data: Dataset) -> dict:
    """Trains the model of `cfg` on `data`; deterministic given cfg["seed"] on one thread."""
    torch.manual_seed(cfg["seed"])
    generator = torch.Generator().manual_seed(cfg["seed"])
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    model = models.build(_options(cfg), data.shape, data.classes)
    if cfg["optimizer"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])

    seen: list[torch.Tensor] = []
    if cfg["track_sigmoid"]:
        last_act = [m for m in model.modules() if isinstance(m, tuple(models.ACTIVATIONS.values()))]
        last_act[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0][:, 0]))
    eval_steps = {math.ceil(i * cfg["steps"] / cfg["evals"]) for i in range(1, cfg["evals"] + 1)}

    curve, loss_curve, percentiles, window = [], [], [], []
    diverged = False
    batches = _batches(len(y_train), min(cfg["batch_size"], len(y_train)), generator)
    for step in range(1, cfg["steps"] + 1):
        model.train()
        idx = next(batches)
        seen.clear()
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.item())
        if step in eval_steps:
            seen.clear()
            curve.append([step, _accuracy(model, x_test, y_test)])
            loss_curve.append([step, float(np.mean(window))])
            window = []
            if cfg["track_sigmoid"]:
                unit = torch.cat(seen).numpy()
                percentiles.append([step] + np.percentile(unit, PERCENTILES).tolist())

    result = {
        "diverged": diverged,
        "steps_done": step if not diverged else step - 1,
        "curve": curve,
        "loss": loss_curve,
        "final_test": _accuracy(model, x_test, y_test),
        "final_train": _accuracy(model, x_train, y_train),
    }
    if cfg["track_sigmoid"]:
        result["percentiles"] = percentiles
    if cfg["inference"] and not diverged:
        result["inference"] = _inference(model, x_train, x_test, y_test, cfg["batch_size"])
    return result
