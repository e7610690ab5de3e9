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
    # noisy_batch (Santurkar 2018's noisy BN): after each BN, per-channel shift ~ U(-mean, mean)
    # and scale ~ U(1, scale), redrawn every step; a shift of up to one BN standard deviation and
    # a doubled scale move the next layer's input far more than training itself does
    "noise_mean": 1.0,
    "noise_scale": 2.0,
    "virtual_batch": 16,     # ghost: examples per normalization batch
    # batch and renorm (MLP): the batch is split into this many equal slices, each normalized on
    # its own, as on that many devices without synchronized statistics (Wu & He 2018's 8 GPUs)
    "workers": 1,
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
    "schedule": "constant",  # "constant", or "cosine": lr * (1 + cos(pi * step / steps)) / 2
    "batch_size": 128,
    "steps": 1000,
    "evals": 20,             # test-accuracy evaluations, evenly spaced over the steps
    "track_sigmoid": False,  # percentiles of one unit's input to the last activation (Ioffe Fig. 1)
    "inference": False,      # also test with running / precise / batch statistics
    # Santurkar 2018's probes (lab.probes) every this many steps, 0 for none, at step sizes of
    # these multiples of lr along the gradient
    "probe_every": 0,
    "probe_multipliers": [0.25, 0.5, 1.0, 2.0, 4.0],
    "device": "cpu",         # a torch device: "cpu", "cuda", "cuda:1", ...
    "seed": 0,
}

PERCENTILES = (15, 50, 85)


def make_config(overrides: dict) -> dict:
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"lab configuration: unknown key(s) {unknown}; expected keys from "
                         f"{sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **overrides}
    for key in ("depth", "width", "channels", "batch_size", "steps", "evals", "virtual_batch",
                "workers"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"lab configuration: {key} must be a positive int, got {cfg[key]!r}")
    if cfg["batch_size"] % cfg["workers"]:
        raise ValueError(f"lab configuration: batch_size must be a multiple of workers, got "
                         f"batch_size={cfg['batch_size']} and workers={cfg['workers']}")
    if cfg["optimizer"] not in ("sgd", "adam"):
        raise ValueError(f"lab configuration: optimizer must be 'sgd' or 'adam', got "
                         f"{cfg['optimizer']!r}")
    if cfg["schedule"] not in ("constant", "cosine"):
        raise ValueError(f"lab configuration: schedule must be 'constant' or 'cosine', got "
                         f"{cfg['schedule']!r}")
    if not isinstance(cfg["probe_every"], int) or cfg["probe_every"] < 0:
        raise ValueError(f"lab configuration: probe_every must be an int >= 0, got "
                         f"{cfg['probe_every']!r}")
    return cfg


def _options(cfg: dict) -> dict:
    """The model options of a run; renorm's ramp becomes step counts of this run."""
    warmup, dmax_at, rmax_at = (round(share * cfg["steps"]) for share in cfg["renorm_ramp"])
    return {**cfg, "renorm": {"momentum": cfg["renorm_momentum"], "rmax_ramp": (warmup, rmax_at),
                              "dmax_ramp": (warmup, dmax_at)}}


@torch.no_grad()
def _predictions(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(xb).argmax(1) for xb in x.split(batch)])


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    return int((_predictions(model, x, batch) == y).sum()) / len(y)


def _batches(n: int, batch: int, generator: torch.Generator):
    """Endless shuffled epochs of full batches: a last batch of one would break batch norm."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            yield order[start:start + batch]


def _batch_statistics(model: nn.Module, x, y, size: int) -> float | None:
    """Test accuracy when every batch norm normalizes each test batch of `size` with that batch's
    own statistics, as in training (ghost BN: per virtual batch; workers: per worker's slice),
    over the test examples that fill whole batches; None where a batch (or slice) of one value
    per channel has no variance. Runs on a copy: training mode moves running statistics."""
    n = len(y) // size * size
    x, y = x[:n], y[:n]
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    try:
        return int((_predictions(model, x, size) == y).sum()) / len(y)
    except ValueError:  # the library refuses to normalize one value per channel
        return None


def _inference(model: nn.Module, x_train, x_test, y_test, cfg: dict) -> dict:
    """Summers & Dinneen 2020's questions (arXiv 1906.03548, s3.1, s3.2): test accuracy with the
    running statistics (EMA), with precise ones (`batchnorm.recalibrate` on the training set in
    training batches), and with batch statistics of test batches of several sizes; the train/eval
    gap per layer (`batchnorm.eval_gap` on test batches of the normalization size); and whether
    eval mode predicts the same one example at a time as in one batch."""
    batch = cfg["batch_size"]
    out = {"running": _accuracy(model, x_test, y_test)}
    whole = _predictions(model, x_test, len(x_test))
    out["batch1_agreement"] = int((_predictions(model, x_test, 1) == whole).sum()) / len(whole)
    precise = batchnorm.recalibrate(copy.deepcopy(model), list(x_train.split(batch)),
                                    progress=False)
    out["precise"] = _accuracy(precise, x_test, y_test)
    norm_batch = norm_batch_of(cfg)
    gaps = batchnorm.eval_gap(model, list(x_test.split(norm_batch)))
    out["eval_gap"] = {"mean_gap": float(np.mean([g["mean_gap"] for g in gaps])),
                       "std_ratio": float(np.mean([g["std_ratio"] for g in gaps]))}
    # test batches of the training batch are normalized as in training: per ghost batch, per
    # worker's slice
    sizes = sorted({1, 2, 8, batch, len(y_test)})
    out["batch"] = {("all" if size == len(y_test) else str(size)):
                    _batch_statistics(model, x_test, y_test, size) for size in sizes}
    out["train_batch"] = str(batch)
    return out


def norm_batch_of(cfg: dict) -> int:
    """The examples a batch norm of this run normalizes over in training."""
    return cfg["virtual_batch"] if cfg["norm"] == "ghost" else cfg["batch_size"] // cfg["workers"]


def _schedule(cfg: dict):
    if cfg["schedule"] == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1 + math.cos(math.pi * step / cfg["steps"]))


def device_of(cfg: dict) -> torch.device:
    """The run's device; a clear error where this machine does not have it."""
    try:
        device = torch.device(cfg["device"])
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"lab configuration: device must be 'cpu' or 'cuda[:N]', got "
                         f"{cfg['device']!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"lab configuration: device {cfg['device']!r} asked for, but torch "
                             f"sees no CUDA device here (torch {torch.__version__}, "
                             f"torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"lab configuration: device {cfg['device']!r} asked for, but torch "
                             f"sees {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    return device


def _probe(model, opt, x, y, cfg) -> dict:
    """Santurkar's ICS and landscape at this step (lab.probes); the parameters before and after
    the optimizer's step are the real training step's."""
    from batchnorm.lab import probes

    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    record = {"landscape": probes.landscape(model, before, x, y, opt.param_groups[0]["lr"],
                                            cfg["probe_multipliers"])}
    opt.step()
    after = {k: v.detach().clone() for k, v in model.named_parameters()}
    record["ics"] = probes.ics(model, before, after, x, y)
    return record


def train(cfg: dict, data: Dataset) -> dict:
    """Trains the model of `cfg` on `data`; deterministic given cfg["seed"] on one thread."""
    device = device_of(cfg)
    torch.manual_seed(cfg["seed"])
    generator = torch.Generator().manual_seed(cfg["seed"])
    x_train, y_train = (torch.from_numpy(a).to(device) for a in (data.x_train, data.y_train))
    x_test, y_test = (torch.from_numpy(a).to(device) for a in (data.x_test, data.y_test))
    model = models.build(_options(cfg), data.shape, data.classes).to(device)
    noise = [m for m in model.modules() if isinstance(m, models.StepNoise)]
    if cfg["optimizer"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))

    seen: list[torch.Tensor] = []
    if cfg["track_sigmoid"]:
        last_act = [m for m in model.modules() if isinstance(m, tuple(models.ACTIVATIONS.values()))]
        last_act[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0][:, 0]))
    eval_steps = {math.ceil(i * cfg["steps"] / cfg["evals"]) for i in range(1, cfg["evals"] + 1)}

    curve, loss_curve, percentiles, window, probed = [], [], [], [], []
    diverged = False
    batches = _batches(len(y_train), min(cfg["batch_size"], len(y_train)), generator)
    for step in range(1, cfg["steps"] + 1):
        model.train()
        for m in noise:
            m.resample()
        idx = next(batches).to(device)
        seen.clear()
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["probe_every"] and (step == 1 or step % cfg["probe_every"] == 0):
            probed.append({"step": step, **_probe(model, opt, x_train[idx], y_train[idx], cfg)})
        else:
            opt.step()
        scheduler.step()
        window.append(loss.item())
        if step in eval_steps:
            seen.clear()
            curve.append([step, _accuracy(model, x_test, y_test)])
            loss_curve.append([step, float(np.mean(window))])
            window = []
            if cfg["track_sigmoid"]:
                unit = torch.cat(seen).cpu().numpy()
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
    if cfg["probe_every"]:
        result["probes"] = probed
    if cfg["inference"] and not diverged:
        result["inference"] = _inference(model, x_train, x_test, y_test, cfg)
    return result
