"""Claim 2: batch norm regularizes (Ioffe & Szegedy 2015, s3.4: it can replace dropout)."""

from __future__ import annotations

import numpy as np

from batchnorm.lab.claims.common import POINTS, fmt, mean_ci, select, verdict, yerr

NAME = "regularization"
TITLE = "A regularizing effect"
PROMISE = "Batch norm regularizes: the model generalizes better, reducing the need for dropout."
THRESHOLD = 0.01
HIGHER_SUPPORTS = True
CRITERION = ("The generalization gap (final train minus test accuracy) with BN is at least 1 point "
             "smaller than without normalization (95% CI over seeds, paired by seed).")
REFERENCE = ("Ioffe & Szegedy 2015, s3.4 and s4.2.1: BN regularizes; removing dropout from the "
             "BN-Inception did not hurt validation accuracy. Hoffer et al. 2017 (ghost BN): "
             "normalizing over small virtual batches adds noise that improves generalization in "
             "large-batch training.")
SETUP = ("Ioffe's MLP (3 x 100 relu), Adam at learning rate 0.01 (Greydanus 2020's MNIST-1D "
         "setting), batch 128, trained long enough to fit the training set; variants: no norm, "
         "BN, ghost BN with virtual batches of 8/16/32, dropout 0.2 without BN.")

# the no-norm run here is also the sanity check's MLP (same configuration, run once)
BASE = {"optimizer": "adam", "lr": 0.01, "batch_size": 128}
VARIANTS = {  # label -> overrides
    "no norm": {"norm": "none", "dropout": 0.0},
    "BN": {"norm": "batch"},
    "ghost BN, 8": {"norm": "ghost", "virtual_batch": 8},
    "ghost BN, 16": {"norm": "ghost", "virtual_batch": 16},
    "ghost BN, 32": {"norm": "ghost", "virtual_batch": 32},
    "dropout 0.2": {"norm": "none", "dropout": 0.2},
}


def base(quick: bool) -> dict:
    return {**BASE, "steps": 120 if quick else 1200, "evals": 4 if quick else 12}


def configs(quick: bool) -> list[dict]:
    return [{**base(quick), **v} for v in VARIANTS.values()]


def evaluate(runs: list[dict], classes: int) -> dict:
    res = {label: select(runs, **v) for label, v in VARIANTS.items()}
    gaps = {label: [m["final_train"] - m["final_test"] for m in ms] for label, ms in res.items()}
    reduction = mean_ci(np.subtract(gaps["no norm"], gaps["BN"]))
    numbers = {}
    for label, ms in res.items():
        numbers[f"{label}: train (%)"] = mean_ci([m["final_train"] for m in ms])
        numbers[f"{label}: test (%)"] = mean_ci([m["final_test"] for m in ms])
        numbers[f"{label}: gap (points)"] = mean_ci(gaps[label])
    numbers["gap reduction by BN (points)"] = reduction
    return {
        "metric": "gap reduction by BN (points)",
        "estimate": reduction,
        "verdict": verdict(reduction, THRESHOLD, HIGHER_SUPPORTS),
        "numbers": numbers,
        "headline": f"gap no norm {fmt(numbers['no norm: gap (points)'])}, BN "
                    f"{fmt(numbers['BN: gap (points)'])}; reduction {fmt(reduction)} points; "
                    f"test no norm {fmt(numbers['no norm: test (%)'])}%, BN "
                    f"{fmt(numbers['BN: test (%)'])}%",
    }


def plot(runs: list[dict], evaluation: dict):
    import matplotlib.pyplot as plt

    n = evaluation["numbers"]
    labels = list(VARIANTS)
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    for offset, part in ((-0.2, "train"), (0.2, "test")):
        cis = [n[f"{label}: {part} (%)"] for label in labels]
        axes[0].bar(x + offset, [c["mean"] * POINTS for c in cis], 0.4, label=part,
                    yerr=yerr(cis), capsize=3)
    axes[0].set(ylabel="final accuracy (%)", title="(a) train and test accuracy, 95% CI")
    cis = [n[f"{label}: gap (points)"] for label in labels]
    axes[1].bar(x, [c["mean"] * POINTS for c in cis], 0.6, yerr=yerr(cis), capsize=3,
                color="tab:red")
    axes[1].set(ylabel="train - test (points)", title="(b) generalization gap, 95% CI")
    for ax in axes:
        ax.set_xticks(x, labels, rotation=20)
        ax.set_xlabel("variant")
    axes[0].legend()
    fig.tight_layout()
    return fig

