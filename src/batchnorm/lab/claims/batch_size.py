"""Claim 5: batch norm handles different batch sizes gracefully (tested against Wu & He 2018's
group norm protocol and Ioffe 2017's batch renorm)."""

from __future__ import annotations

import numpy as np

from batchnorm.lab.claims.common import POINTS, fmt, mean_ci, verdict, yerr

NAME = "batch-size"
TITLE = "Graceful with any batch size"
PROMISE = "Batch norm works across batch sizes, small ones included."
THRESHOLD = 0.02
HIGHER_SUPPORTS = False
CRITERION = ("BN's test accuracy at the smallest batch (2; 4 with --quick) is within 2 points of "
             "its accuracy at batch 32: the drop acc(32) - acc(smallest) < 2 points (95% CI over "
             "seeds, paired by seed).")
REFERENCE = ("Wu & He 2018, Table 2 (ResNet-50, ImageNet, top-1 error at batch per GPU 32/16/8/4/"
             "2): BN 23.6 / 23.7 / 24.8 / 27.3 / 34.7, GN 24.1 / 24.2 / 24.0 / 24.2 / 24.1. "
             "Ioffe 2017, Fig. 2 (Inception-v3, normalizing over microbatches of 4): BN 74.2%, "
             "batch renorm 76.5%.")
SETUP = ("Ioffe's MLP (3 x 100 relu), SGD with momentum 0.9; Wu & He's protocol: the same number "
         "of training examples for every batch size and the learning rate scaled linearly with "
         "the batch (0.05 x B / 32). BN, batch renorm, group norm (5 groups) and layer norm "
         "train with batch B; ghost BN trains with batch 128 and normalizes over virtual batches "
         "of B (the multi-device case). At inference, BN models are tested with running, precise "
         "(recalibrated on the training set) and per-test-batch statistics.")

BATCHES = [2, 8, 32, 128]
QUICK_BATCHES = [4, 32]
NORMS = {"batch": "BN", "renorm": "batch renorm", "ghost": "ghost BN (batch 128)",
         "group": "group norm", "layer": "layer norm"}
REFERENCE_BATCH = 32


def _lr(batch: int) -> float:
    return 0.05 * batch / REFERENCE_BATCH


def configs(quick: bool) -> list[dict]:
    examples = 1000 if quick else 6000
    out = []
    for b in (QUICK_BATCHES if quick else BATCHES):
        for norm in NORMS:
            train_batch = 128 if norm == "ghost" else b
            cfg = {"norm": norm, "momentum": 0.9, "batch_size": train_batch,
                   "lr": _lr(train_batch), "steps": max(examples // train_batch, 1), "evals": 5}
            if norm == "ghost":
                cfg["virtual_batch"] = b
            if norm == "batch":
                cfg["inference"] = True
            out.append(cfg)
    return out


def _norm_batch(run: dict) -> int:
    c = run["config"]
    return c["virtual_batch"] if c["norm"] == "ghost" else c["batch_size"]


def _by_batch(runs, norm):
    """{normalization batch: [metrics per seed]}"""
    out = {}
    for r in sorted(runs, key=lambda r: r["config"]["seed"]):
        if r["config"]["norm"] == norm:
            out.setdefault(_norm_batch(r), []).append(r["metrics"])
    return dict(sorted(out.items()))


def evaluate(runs: list[dict], classes: int) -> dict:
    numbers = {}
    drops = {}
    for norm, label in NORMS.items():
        by = _by_batch(runs, norm)
        for b, ms in by.items():
            numbers[f"{label}, batch {b}: test (%)"] = mean_ci([m["final_test"] for m in ms])
        small = min(by)
        drops[norm] = mean_ci(np.subtract([m["final_test"] for m in by[REFERENCE_BATCH]],
                                          [m["final_test"] for m in by[small]]))
        numbers[f"{label}: drop from batch {REFERENCE_BATCH} to {small} (points)"] = drops[norm]
    for b, ms in _by_batch(runs, "batch").items():
        inf = [m["inference"] for m in ms if "inference" in m]
        if not inf:
            continue
        numbers[f"BN trained at {b}, running statistics (%)"] = mean_ci([i["running"] for i in inf])
        numbers[f"BN trained at {b}, precise statistics (%)"] = mean_ci([i["precise"] for i in inf])
        for size in inf[0]["batch"]:
            vals = [i["batch"][size] for i in inf]
            if None not in vals:
                numbers[f"BN trained at {b}, batch statistics, test batch {size} (%)"] = \
                    mean_ci(vals)
    drop = drops["batch"]
    return {
        "metric": f"BN: drop from batch {REFERENCE_BATCH} to {small} (points)",
        "estimate": drop,
        "verdict": verdict(drop, THRESHOLD, HIGHER_SUPPORTS),
        "numbers": numbers,
        "headline": f"drop from batch {REFERENCE_BATCH} to {small}: " + "; ".join(
            f"{NORMS[n].split(' (')[0]} {fmt(d)}" for n, d in drops.items()) + " points",
    }


def plot(runs: list[dict], evaluation: dict):
    import matplotlib.pyplot as plt

    n = evaluation["numbers"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    ax = axes[0]
    for norm, label in NORMS.items():
        batches = list(_by_batch(runs, norm))
        cis = [n[f"{label}, batch {b}: test (%)"] for b in batches]
        ax.errorbar(batches, [c["mean"] * POINTS for c in cis], yerr=yerr(cis), marker="o",
                    capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="normalization batch size", ylabel="final test accuracy (%)",
           title="(a) accuracy vs normalization batch, 95% CI")
    ax.legend(fontsize=8)
    ax = axes[1]
    sizes = ["1", "2", "8", "all"]
    for b in _by_batch(runs, "batch"):
        key = f"BN trained at {b}"
        if f"{key}, running statistics (%)" not in n:
            continue
        line, = ax.plot(sizes, [n[f"{key}, running statistics (%)"]["mean"] * POINTS] * 4, ls="--",
                        label=f"{key}: running")
        ax.plot(sizes, [n[f"{key}, precise statistics (%)"]["mean"] * POINTS] * 4, ls=":",
                color=line.get_color(), label=f"{key}: precise")
        pts = [(s, n[f"{key}, batch statistics, test batch {s} (%)"]["mean"] * POINTS)
               for s in sizes if f"{key}, batch statistics, test batch {s} (%)" in n]
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", color=line.get_color(),
                label=f"{key}: batch stats")
    ax.set(xlabel="test batch size", ylabel="test accuracy (%)",
           title="(b) BN at inference: running / precise / batch statistics")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
