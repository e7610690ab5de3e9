"""Claim 8: a batch-norm network needs no batch at inference (Summers & Dinneen 2020, arXiv
1906.03548, s3.1: the running statistics differ from the batch statistics the network trained
with, most at small batches)."""

from __future__ import annotations

import numpy as np

from batchnorm.lab.claims import batch_size
from batchnorm.lab.claims.common import POINTS, fmt, mean_ci, verdict

NAME = "inference"
TITLE = "Inference without a batch"
PROMISE = ("At inference a batch-norm network uses its running statistics: it predicts one "
           "example at a time, as well as with the batch statistics it was trained with.")
THRESHOLD = 0.01
HIGHER_SUPPORTS = False
CRITERION = ("For BN trained with 4 examples per worker (batch-size claim), the test accuracy "
             "with the running statistics (eval mode, which predicts one example at a time as in "
             "a batch) is at most 1 point below the accuracy with the statistics it trained with "
             "(test batches of 32, each worker's 4 normalized on their own): acc(as in training) - "
             "acc(running) < 1 point, 95% CI over seeds, paired by seed.")
REFERENCE = ("Summers & Dinneen 2020 (CIFAR-100, ImageNet, ...): at inference the moving "
             "averages differ from the batch statistics seen in training, the more so the smaller "
             "the batch; mixing the example's own statistics into them (inference example "
             "weighting) recovers accuracy, up to several points at small batches, and ghost "
             "batches regularize. Wu & Johnson 2021: precise population statistics beat the EMA "
             "when it lags the weights.")
SETUP = ("The batch-size claim's BN networks (8 workers, 4 to 32 examples each, 20 epochs), "
         "tested on the test set with: the running statistics (EMA, worker 0's as DDP keeps); "
         "precise statistics (batchnorm.recalibrate over the training set in training "
         "batches); batch statistics as in training, which is ghost BN at inference (test "
         "batches of 8B, each worker's B "
         "normalized on their own; the test examples that fill whole batches) and of all 1000 "
         "test examples at once (125 per worker); "
         "eval mode one example at a time against one batch of all; and batchnorm.eval_gap on "
         "test batches of the training size (shift of the batch mean in running standard "
         "deviations, ratio of the standard deviations, mean over layers).")


AGREE = "eval one example at a time agrees with one batch (%)"


def configs(quick: bool) -> list[dict]:
    return [c for c in batch_size.configs(quick) if c.get("inference")]


def _by_batch(runs):
    """{examples per worker: [inference metrics per seed]}"""
    out = {}
    for r in sorted(runs, key=lambda r: r["config"]["seed"]):
        c = r["config"]
        if "inference" in r["metrics"]:
            out.setdefault(c["batch_size"] // c["workers"], []).append(r["metrics"]["inference"])
    return dict(sorted(out.items()))


def evaluate(runs: list[dict], classes: int) -> dict:
    by = _by_batch(runs)
    numbers = {}
    for b, inf in by.items():
        key = f"BN trained at {b} per worker"
        numbers[f"{key}, running statistics (%)"] = mean_ci([i["running"] for i in inf])
        numbers[f"{key}, precise statistics (%)"] = mean_ci([i["precise"] for i in inf])
        for size in inf[0]["batch"]:
            vals = [i["batch"][size] for i in inf]
            if None not in vals:
                what = ("as in training, test batch" if size == inf[0]["train_batch"] else
                        "batch statistics, test batch")
                numbers[f"{key}, {what} {size} (%)"] = mean_ci(vals)
        numbers[f"{key}, {AGREE}"] = mean_ci(
            [i["batch1_agreement"] for i in inf])
        numbers[f"{key}, eval_gap mean shift (running sd)"] = mean_ci(
            [i["eval_gap"]["mean_gap"] for i in inf])
        numbers[f"{key}, eval_gap sd ratio"] = mean_ci([i["eval_gap"]["std_ratio"] for i in inf])
        numbers[f"{key}, as in training - running (points)"] = mean_ci(
            np.subtract([i["batch"][i["train_batch"]] for i in inf],
                        [i["running"] for i in inf]))
    small = min(by)
    gap = numbers[f"BN trained at {small} per worker, as in training - running (points)"]
    return {
        "metric": f"BN trained at {small} per worker, as in training - running (points)",
        "estimate": gap,
        "verdict": verdict(gap, THRESHOLD, HIGHER_SUPPORTS),
        "numbers": numbers,
        "headline": "statistics as in training minus running statistics: " + "; ".join(
            f"trained at {b}: "
            f"{fmt(numbers[f'BN trained at {b} per worker, as in training - running (points)'])}"
            for b in by) + " points; one example at a time = one batch: " + ", ".join(
            f"{numbers[f'BN trained at {b} per worker, {AGREE}']['mean']:.0%}" for b in by),
    }


def plot(runs: list[dict], evaluation: dict):
    import matplotlib.pyplot as plt

    n = evaluation["numbers"]
    by = _by_batch(runs)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    ax = axes[0]
    kinds = ["running", "precise", "as in training (ghost)", "all 1000 at once"]
    for b, inf in by.items():
        key = f"BN trained at {b} per worker"
        keys = [f"{key}, running statistics (%)", f"{key}, precise statistics (%)",
                f"{key}, as in training, test batch {inf[0]['train_batch']} (%)",
                f"{key}, batch statistics, test batch all (%)"]
        pts = [(k, n[q]["mean"] * POINTS) for k, q in zip(kinds, keys) if q in n]
        ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=f"trained at {b}")
    ax.set(xlabel="statistics used at inference", ylabel="test accuracy (%)",
           title="(a) BN at inference: accuracy by statistics")
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=8)
    ax = axes[1]
    batches = list(by)
    for q, label in (("eval_gap mean shift (running sd)", "mean shift / running sd"),
                     ("eval_gap sd ratio", "sd ratio batch / running")):
        ax.plot(batches, [n[f"BN trained at {b} per worker, {q}"]["mean"] for b in batches],
                marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="examples per worker in training",
           ylabel="eval_gap on test batches of that size",
           title="(b) train/eval gap per layer (batchnorm.eval_gap), mean over layers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
