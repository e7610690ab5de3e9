"""The runs and per-run summaries that the two mechanism claims share (`ics` and `smoothness`):
Santurkar et al. 2018, "How Does Batch Normalization Help Optimization?" (arXiv 1805.11604).

Both claims read the same three networks, no norm, BN and noisy BN (BN followed by noise that
changes every step: `models.StepNoise`), trained with the same plain SGD and probed every
50 steps with `lab.probes` (ICS by their Definition 2.1, and the landscape along the
gradient). The configurations are identical, so the runner trains each once for both claims.
"""

from __future__ import annotations

import math

import numpy as np

from batchnorm.lab.claims.common import POINTS, all_of, band, select, verdict

VARIANTS = {"none": "no norm", "batch": "BN", "noisy_batch": "noisy BN"}
REFERENCE = ("Santurkar et al. 2018 (VGG on CIFAR-10; deep linear networks): BN followed by "
             "random noise that changes the activations' mean and scale at every step trains as "
             "well as BN, though its layers' input distributions are far less stable (Fig. 2); "
             "measured as the change of a layer's gradient when the layers below it are updated, "
             "ICS is not smaller with BN, often larger; along the gradient, the loss and "
             "the gradient change much less with BN, early in training by an order of magnitude "
             "(Fig. 4). They conclude that BN's benefit comes from the smoother landscape, not "
             "from less ICS.")
SETUP = ("Ioffe's MLP (3 x 100 relu), plain SGD at learning rate 0.1 (their VGG's rate; both "
         "networks train at it), batch 128, torch's default init; no norm, BN, and noisy BN: "
         "after every BN, y = s x + m per unit with m ~ U(-1, 1) and s ~ U(1, 2) redrawn every "
         "step (in eval mode its expectation, x 1.5). Every 50 steps (25 with --quick), on that "
         "step's batch: ICS of layers 2-4 (Definition 2.1: ||G - G'|| / ||G|| and cos(G, G')), "
         "and the loss and gradient at step sizes 0.25, 0.5, 1, 2 and 4 x lr along the gradient.")


def configs(quick: bool) -> list[dict]:
    base = {"activation": "relu", "batch_size": 128, "lr": 0.1, "steps": 150 if quick else 1500,
            "evals": 10 if quick else 30, "probe_every": 25 if quick else 50}
    return [{**base, "norm": norm} for norm in VARIANTS]


def by_variant(runs: list[dict]) -> dict[str, list[dict]]:
    return {norm: select(runs, norm=norm) for norm in VARIANTS}


def ics(metrics: dict, quantity: str = "relative") -> float:
    """A run's ICS: `quantity` of Definition 2.1 averaged over the layers and the probed steps."""
    return float(np.mean([layer[quantity] for p in metrics["probes"] for layer in p["ics"]]))


def landscape(metrics: dict, quantity: str) -> float:
    """A run's landscape `quantity` averaged over the probed steps."""
    return float(np.mean([p["landscape"][quantity] for p in metrics["probes"]]))


def log_ratio(a: list[float], b: list[float]) -> list[float]:
    """Per seed, log10(a / b): ratios are compared on a log scale, where 2x and 1/2x are equally
    far from 1 and the mean over seeds is the log of the geometric mean."""
    return [math.log10(x / y) for x, y in zip(a, b)]


def judge(predictions: list[dict], estimates: dict[str, dict], numbers: dict) -> dict:
    """The evaluation of a claim that holds when all its `predictions` do: each one's estimate
    (`estimates[name]`, also recorded in `numbers` under its metric) against its threshold; the
    caller adds the headline."""
    judged = []
    for p in predictions:
        est = numbers[p["metric"]] = estimates[p["name"]]
        judged.append({**p, "estimate": est,
                       "verdict": verdict(est, p["threshold"], p["higher_supports"])})
    return {"metric": "both predictions", "predictions": judged,
            "verdict": all_of([p["verdict"] for p in judged]), "numbers": numbers}


def curves(ax, runs: list[dict], what: str) -> None:
    """Fig. 2: mean and 95% band over seeds of the test accuracy or training loss, per variant."""
    for norm, ms in by_variant(runs).items():
        key = "curve" if what == "accuracy" else "loss"
        scale = POINTS if what == "accuracy" else 1.0
        steps = [s for s, _ in ms[0][key]]
        band(ax, steps, [[v * scale for _, v in m[key]] for m in ms], VARIANTS[norm])
    ax.set(xlabel="training step",
           ylabel="test accuracy (%)" if what == "accuracy" else "training loss")
    ax.legend()


def over_probes(ax, runs: list[dict], value, ylabel: str, norms=tuple(VARIANTS), log=False):
    """A per-probe quantity over training, mean and 95% band over seeds, per variant (geometric
    on a log axis)."""
    for norm, ms in by_variant(runs).items():
        if norm not in norms:
            continue
        steps = [p["step"] for p in ms[0]["probes"]]
        band(ax, steps, [[value(p) for p in m["probes"]] for m in ms], VARIANTS[norm], log=log)
    if log:
        ax.set_yscale("log")
    ax.set(xlabel="training step", ylabel=ylabel)
    ax.legend()
