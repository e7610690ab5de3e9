"""Claim 6: batch norm helps because it reduces internal covariate shift (Ioffe & Szegedy 2015's
explanation), tested as Santurkar et al. 2018 do (arXiv 1805.11604, s2)."""

from __future__ import annotations

import numpy as np

from batchnorm.lab.claims import santurkar
from batchnorm.lab.claims.common import fmt, mean_ci

NAME = "ics"
TITLE = "BN works by reducing internal covariate shift"
PROMISE = ("Batch norm helps training because it reduces internal covariate shift: the change of "
           "a layer's input distribution as the layers below it are updated.")
NOISE_THRESHOLD = 0.03
CRITERION = ("The explanation makes two predictions, and holds only if both do (95% CIs over "
             "seeds, paired by seed): (a) noisy BN, which restores a large covariate shift "
             "after every BN, loses at least 3 points of BN's final test accuracy; (b) BN's ICS "
             "(Santurkar's Definition 2.1, relative gradient change ||G - G'|| / ||G||, mean over "
             "layers 2-4 and probed steps) is smaller than no norm's: log10(ICS BN / ICS no norm) "
             "< 0. Not supported as soon as one prediction fails.")
PREDICTIONS = [
    {"name": "noise", "metric": "BN - noisy BN, final test accuracy (points)",
     "statement": "noisy BN loses at least 3 points of BN's accuracy", "threshold": NOISE_THRESHOLD,
     "higher_supports": True},
    {"name": "ics", "metric": "log10(ICS BN / ICS no norm)",
     "statement": "BN's ICS is smaller than no norm's", "threshold": 0.0,
     "higher_supports": False},
]
REFERENCE = santurkar.REFERENCE
SETUP = santurkar.SETUP
configs = santurkar.configs  # both mechanism claims read the same runs


def evaluate(runs: list[dict], classes: int) -> dict:
    v = santurkar.by_variant(runs)
    acc = {norm: [m["final_test"] for m in ms] for norm, ms in v.items()}
    ics = {norm: [santurkar.ics(m) for m in ms] for norm, ms in v.items()}
    numbers = {}
    for norm, label in santurkar.VARIANTS.items():
        numbers[f"{label}: final test (%)"] = mean_ci(acc[norm])
        numbers[f"{label}: final train (%)"] = mean_ci([m["final_train"] for m in v[norm]])
        numbers[f"{label}: ICS, relative gradient change"] = mean_ci(ics[norm])
        numbers[f"{label}: ICS, l2 gradient change"] = mean_ci(
            [santurkar.ics(m, "l2") for m in v[norm]])
        numbers[f"{label}: ICS, cosine of G and G'"] = mean_ci(
            [santurkar.ics(m, "cosine") for m in v[norm]])
    numbers["BN - no norm, final test accuracy (points)"] = mean_ci(
        np.subtract(acc["batch"], acc["none"]))
    estimates = {
        "noise": mean_ci(np.subtract(acc["batch"], acc["noisy_batch"])),
        "ics": mean_ci(santurkar.log_ratio(ics["batch"], ics["none"])),
    }
    numbers["log10(ICS noisy BN / ICS BN)"] = mean_ci(
        santurkar.log_ratio(ics["noisy_batch"], ics["batch"]))
    result = santurkar.judge(PREDICTIONS, estimates, numbers)
    noise, measured = result["predictions"]
    return {
        **result,
        "headline": f"noisy BN loses {fmt(estimates['noise'])} points of BN's test accuracy "
                    f"({noise['verdict']}); log10(ICS BN / no norm) "
                    f"{fmt(estimates['ics'], 1, 2)} ({measured['verdict']}); test no norm "
                    f"{fmt(numbers['no norm: final test (%)'])}%, BN "
                    f"{fmt(numbers['BN: final test (%)'])}%, noisy BN "
                    f"{fmt(numbers['noisy BN: final test (%)'])}%",
    }


def plot(runs: list[dict], evaluation: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    santurkar.curves(axes[0], runs, "accuracy")
    axes[0].set_title("(a) test accuracy (their Fig. 2)")
    santurkar.curves(axes[1], runs, "loss")
    axes[1].set_title("(b) training loss (Fig. 2)")
    santurkar.over_probes(axes[2], runs, lambda p: np.mean([x["relative"] for x in p["ics"]]),
                          "||G - G'|| / ||G||, mean of layers 2-4", log=True)
    axes[2].set_title("(c) ICS (Definition 2.1): relative change")
    santurkar.over_probes(axes[3], runs, lambda p: np.mean([x["cosine"] for x in p["ics"]]),
                          "cos(G, G'), mean of layers 2-4")
    axes[3].set_title("(d) ICS (Definition 2.1): cos(G, G')")
    fig.tight_layout()
    return fig
