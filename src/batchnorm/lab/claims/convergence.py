"""Claim 1: batch norm makes training converge faster (Ioffe & Szegedy 2015, s4.1)."""

from __future__ import annotations

import math

import numpy as np

from batchnorm.lab.claims.common import POINTS, band, fmt, mean_ci, select, verdict

NAME = "convergence"
TITLE = "Faster convergence"
PROMISE = "Batch norm makes a network reach a given accuracy in fewer steps."
THRESHOLD = 2.0
HIGHER_SUPPORTS = True
CRITERION = ("With the same SGD learning rate, the BN network reaches the no-norm network's final "
             "test accuracy in at most half the steps (speedup >= 2x, 95% CI over seeds).")
REFERENCE = ("Ioffe & Szegedy 2015, s4.1 (MNIST, 3 hidden x 100 sigmoid, batch 60, 50k steps): "
             "the BN curve is higher and faster; sigmoid-input percentiles stay stable with BN and "
             "drift without. Fig. 3 (Inception, ImageNet): 72.2% in 31.0M steps without BN, 13.3M "
             "with BN (2.3x), 2.1M with BN and 5x the learning rate (14.7x).")
SETUP = ("Ioffe's MLP (3 x 100 sigmoid), plain SGD at learning rate 0.5 for both, batch 60, "
         "torch's default init; test accuracy every 1/30 of training; the 15/50/85th percentiles "
         "of the first unit's input to the last sigmoid, on the test set.")


def configs(quick: bool) -> list[dict]:
    # lr 0.5: a usual plain-SGD rate for sigmoid MLPs with cross-entropy, fixed before running
    base = {"activation": "sigmoid", "batch_size": 60, "lr": 0.5, "steps": 200 if quick else 1500,
            "evals": 10 if quick else 30, "track_sigmoid": True}
    return [{**base, "norm": norm} for norm in ("none", "batch")]


def _final(curve) -> float:
    # the last three evaluations, so one noisy point does not set the target
    return float(np.mean([acc for _, acc in curve[-3:]]))


def _steps_to(curve, target: float) -> float:
    return next((step for step, acc in curve if acc >= target - 1e-12), math.inf)


def evaluate(runs: list[dict], classes: int) -> dict:
    none, bn = select(runs, norm="none"), select(runs, norm="batch")
    speedups, s_none, s_bn = [], [], []
    for a, b in zip(none, bn):
        target = _final(a["curve"])
        s_none.append(_steps_to(a["curve"], target))
        s_bn.append(_steps_to(b["curve"], target))
        speedups.append(s_none[-1] / s_bn[-1])
    ci = mean_ci(speedups)
    # Ioffe's Fig. 1(b, c): without BN the distribution of a sigmoid's input drifts during
    # training; how far its median moves from the first evaluation to the last measures that
    drift = {label: mean_ci([abs(m["percentiles"][-1][2] - m["percentiles"][0][2]) for m in ms])
             for label, ms in (("none", none), ("batch", bn))}
    numbers = {
        "final test accuracy, no norm (%)": mean_ci([_final(m["curve"]) for m in none]),
        "final test accuracy, BN (%)": mean_ci([_final(m["curve"]) for m in bn]),
        "steps to no-norm final accuracy, no norm": mean_ci(s_none),
        "steps to no-norm final accuracy, BN": mean_ci(s_bn),
        "speedup (x)": ci,
        "median sigmoid input, change from first to last evaluation, no norm": drift["none"],
        "median sigmoid input, change from first to last evaluation, BN": drift["batch"],
    }
    return {
        "metric": "speedup (x)",
        "estimate": ci,
        "verdict": verdict(ci, THRESHOLD, HIGHER_SUPPORTS),
        "numbers": numbers,
        "headline": f"speedup {fmt(ci, 1, 2, 'x')}; final accuracy no norm "
                    f"{fmt(numbers['final test accuracy, no norm (%)'])}%, BN "
                    f"{fmt(numbers['final test accuracy, BN (%)'])}%",
    }


def plot(runs: list[dict], evaluation: dict):
    import matplotlib.pyplot as plt

    none, bn = select(runs, norm="none"), select(runs, norm="batch")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    for label, ms in (("no norm", none), ("BN", bn)):
        steps = [s for s, _ in ms[0]["curve"]]
        band(ax, steps, [[a * POINTS for _, a in m["curve"]] for m in ms], label)
    ax.set(xlabel="training step", ylabel="test accuracy (%)",
           title="(a) test accuracy, mean and 95% CI")
    ax.legend()
    for ax, label, ms in ((axes[1], "no norm", none), (axes[2], "BN", bn)):
        p = np.asarray(ms[0]["percentiles"])
        for col, q in zip((1, 2, 3), (15, 50, 85)):
            ax.plot(p[:, 0], p[:, col], label=f"{q}th percentile")
        ax.set(xlabel="training step", ylabel="input to the last sigmoid",
               title=f"({'b' if label == 'no norm' else 'c'}) {label}, seed 0")
        ax.legend()
    fig.tight_layout()
    return fig
