"""Claim 3: batch norm allows higher learning rates (Ioffe & Szegedy 2015, s3.3; Santurkar 2018)."""

from __future__ import annotations

import math

import numpy as np

from batchnorm.lab.claims.common import (POINTS, fmt, mean_ci, select, share, trains, verdict,
                                         yerr)

NAME = "learning-rate"
TITLE = "Higher usable learning rates"
PROMISE = "Batch norm lets a network train at much higher learning rates."
THRESHOLD = math.log10(3)
HIGHER_SUPPORTS = True
CRITERION = ("The largest SGD learning rate at which the network trains (finite loss, final test "
             "accuracy >= chance + 10 points) is at least 3x higher with BN: log10 of the ratio "
             ">= 0.48 (95% CI over seeds, paired by seed).")
REFERENCE = ("Santurkar et al. 2018 (VGG, CIFAR-10): BN trains at learning rate 0.5 where the "
             "network without BN needs 0.1. Ioffe & Szegedy 2015, Fig. 3: BN with 5x the learning "
             "rate reaches Inception's accuracy 14.7x sooner.")
SETUP = ("Ioffe's MLP (3 x 100 relu), plain SGD, batch 128, torch's default init; learning rates "
         "over four decades; best test accuracy over training at each rate; a run diverges when "
         "its loss becomes NaN or infinite.")

RATES = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
QUICK_RATES = [0.01, 0.1, 1.0, 10.0]


def _rates(runs: list[dict]) -> list[float]:
    return sorted({r["config"]["lr"] for r in runs})


def configs(quick: bool) -> list[dict]:
    base = {"batch_size": 128, "steps": 100 if quick else 400, "evals": 5 if quick else 10}
    return [{**base, "norm": norm, "lr": lr} for norm in ("none", "batch")
            for lr in (QUICK_RATES if quick else RATES)]


def _largest(runs, norm, classes) -> list[float]:
    """Per seed, the largest rate that trains; half a grid step below the grid when none does."""
    rates = _rates(runs)
    per_rate = [select(runs, norm=norm, lr=lr) for lr in rates]
    floor = rates[0] ** 2 / rates[1]
    return [max([lr for lr, ms in zip(rates, per_rate) if trains(ms[i], classes)], default=floor)
            for i in range(len(per_rate[0]))]


def _best(m) -> float:
    return max([acc for _, acc in m["curve"]], default=m["final_test"])


def evaluate(runs: list[dict], classes: int) -> dict:
    bn, none = _largest(runs, "batch", classes), _largest(runs, "none", classes)
    ratio = mean_ci(np.log10(bn) - np.log10(none))
    numbers = {
        "largest trainable rate, no norm": mean_ci(none),
        "largest trainable rate, BN": mean_ci(bn),
        "log10(largest rate BN / no norm)": ratio,
    }
    for norm, label in (("none", "no norm"), ("batch", "BN")):
        for lr in _rates(runs):
            ms = select(runs, norm=norm, lr=lr)
            numbers[f"{label}, lr {lr:g}: best test (%)"] = mean_ci([_best(m) for m in ms])
            numbers[f"{label}, lr {lr:g}: diverged (share of seeds)"] = share(
                [m["diverged"] for m in ms])
    best = {label: max((v["mean"] for k, v in numbers.items()
                        if k.startswith(f"{label}, lr") and "best" in k)) for label in
            ("no norm", "BN")}
    return {
        "metric": "log10(largest rate BN / no norm)",
        "estimate": ratio,
        "verdict": verdict(ratio, THRESHOLD, HIGHER_SUPPORTS),
        "numbers": numbers,
        "headline": f"largest trainable rate no norm {fmt(numbers['largest trainable rate, no norm'], 1, 2)}, "
                    f"BN {fmt(numbers['largest trainable rate, BN'], 1, 2)}; log10 ratio "
                    f"{fmt(ratio, 1, 2)}; best accuracy over rates no norm "
                    f"{best['no norm'] * POINTS:.1f}%, BN {best['BN'] * POINTS:.1f}%",
    }


def plot(runs: list[dict], evaluation: dict):
    import matplotlib.pyplot as plt

    n = evaluation["numbers"]
    rates = _rates(runs)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, marker in (("no norm", "o"), ("BN", "s")):
        cis = [n[f"{label}, lr {lr:g}: best test (%)"] for lr in rates]
        line = ax.errorbar(rates, [c["mean"] * POINTS for c in cis], yerr=yerr(cis),
                           marker=marker, capsize=3, label=label)
        for lr in rates:
            share = n[f"{label}, lr {lr:g}: diverged (share of seeds)"]["mean"]
            if share > 0:
                ax.scatter([lr], [2 if label == "no norm" else 6], marker="x", s=60,
                           color=line[0].get_color())
                ax.annotate(f"{share:.0%} diverged", (lr, 2 if label == "no norm" else 6),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="SGD learning rate", ylabel="best test accuracy (%)", ylim=(0, 100),
           title="Best test accuracy per learning rate (x: diverged), 95% CI")
    ax.legend()
    fig.tight_layout()
    return fig
