"""Claim 5: batch norm handles different batch sizes gracefully (tested with Wu & He 2018's group
norm protocol and Ioffe 2017's batch renorm)."""

from __future__ import annotations

import numpy as np

from batchnorm.lab.claims import sanity
from batchnorm.lab.claims.common import POINTS, fmt, mean_ci, select, verdict, yerr

NAME = "batch-size"
TITLE = "Graceful with any batch size"
PROMISE = "Batch norm works across batch sizes, small ones included."
THRESHOLD = 0.02
HIGHER_SUPPORTS = False
BASELINE_TOLERANCE = 0.03
CRITERION = ("BN's test accuracy with 4 examples per worker is within 2 points of its accuracy "
             "with 32 (the reference): the drop acc(32) - acc(4) < 2 points (95% CI over seeds, "
             "paired by seed). The comparison counts only if BN at 32 has converged: within 3 "
             "points of the sanity check's MLP.")
CHANGED = ("8 workers with 4-32 examples each, 80,000 training examples (20 epochs) and a cosine "
           "decay, so that BN at 32 converges (the last release trained 1.5 epochs on one "
           "worker, to 17-45%), smallest batch 4 instead of 2, and the separate ghost-BN "
           "variant dropped: BN on 8 workers is ghost BN. Inference moved to its own claim.")
REFERENCE = ("Wu & He 2018, Table 2 (ResNet-50, ImageNet, 8 GPUs, top-1 error at batch per GPU "
             "32/16/8/4/2): BN 23.6 / 23.7 / 24.8 / 27.3 / 34.7, GN 24.1 / 24.2 / 24.0 / 24.2 / "
             "24.1. Ioffe 2017, Fig. 2 (Inception-v3, normalizing over microbatches of 4): BN "
             "74.2%, batch renorm 76.5%.")
SETUP = ("Ioffe's MLP (3 x 100 relu), SGD with momentum 0.9 and a cosine learning-rate decay. "
         "Wu & He's protocol: 8 workers (their 8 GPUs), each with B examples, so the optimizer "
         "batch is 8B; BN and batch renorm normalize each worker's B examples on their own (no "
         "synchronized statistics); group norm (5 groups) does not depend on B. "
         "Every batch size sees the same 80,000 training examples (20 epochs of MNIST-1D; 8,000 "
         "with --quick), long enough for BN at B = 32 to converge, with the learning rate "
         "scaled linearly with the batch: 0.05 x 8B / 32. The no-norm MLP of the sanity check "
         "is the converged reference.")

WORKERS = 8
BATCHES = [4, 8, 16, 32]
QUICK_BATCHES = [4, 32]
# Wu & He's layer norm row is left out: like group norm it does not depend on the batch, and
# group norm is the one they propose for small batches
NORMS = {"batch": "BN", "renorm": "batch renorm", "group": "group norm"}
REFERENCE_BATCH = 32
# 20 (2) epochs of MNIST-1D's 4000 training examples
EXAMPLES, QUICK_EXAMPLES = 80_000, 8_000


def _lr(optimizer_batch: int) -> float:
    return 0.05 * optimizer_batch / REFERENCE_BATCH


def configs(quick: bool) -> list[dict]:
    examples = QUICK_EXAMPLES if quick else EXAMPLES
    out = []
    for b in (QUICK_BATCHES if quick else BATCHES):
        total = WORKERS * b
        for norm in NORMS:
            cfg = {"norm": norm, "workers": WORKERS, "momentum": 0.9, "batch_size": total,
                   "lr": _lr(total), "schedule": "cosine", "steps": max(examples // total, 1),
                   "evals": 5}
            if norm == "batch":
                cfg["inference"] = True  # read by the inference claim
            out.append(cfg)
    # the converged reference: the sanity check's MLP (the same configuration, trained once)
    return out + [sanity.configs(quick)[0]]


def _by_batch(runs, norm):
    """{examples per worker: [metrics per seed]}"""
    out = {}
    for r in sorted(runs, key=lambda r: r["config"]["seed"]):
        c = r["config"]
        if c["norm"] == norm and c["workers"] == WORKERS:
            out.setdefault(c["batch_size"] // c["workers"], []).append(r["metrics"])
    return dict(sorted(out.items()))


def evaluate(runs: list[dict], classes: int) -> dict:
    numbers = {}
    drops = {}
    for norm, label in NORMS.items():
        by = _by_batch(runs, norm)
        for b, ms in by.items():
            numbers[f"{label}, batch {b} per worker: test (%)"] = mean_ci(
                [m["final_test"] for m in ms])
        small = min(by)
        drops[norm] = mean_ci(np.subtract([m["final_test"] for m in by[REFERENCE_BATCH]],
                                          [m["final_test"] for m in by[small]]))
        numbers[f"{label}: drop from batch {REFERENCE_BATCH} to {small} (points)"] = drops[norm]
    mlp = select(runs, workers=1, norm="none", dropout=0.0)
    numbers["sanity MLP, no norm: test (%)"] = mean_ci([m["final_test"] for m in mlp])
    bn_ref = numbers[f"BN, batch {REFERENCE_BATCH} per worker: test (%)"]
    converged = numbers["sanity MLP, no norm: test (%)"]["mean"] - bn_ref["mean"]
    drop = drops["batch"]
    return {
        "metric": f"BN: drop from batch {REFERENCE_BATCH} to {small} (points)",
        "estimate": drop,
        "verdict": verdict(drop, THRESHOLD, HIGHER_SUPPORTS),
        "numbers": numbers,
        "baseline": {"bn_reference": bn_ref["mean"], "mlp": numbers[
            "sanity MLP, no norm: test (%)"]["mean"], "shortfall": converged,
            "converged": converged <= BASELINE_TOLERANCE},
        "headline": f"BN at {REFERENCE_BATCH} per worker {fmt(bn_ref)}% (sanity MLP "
                    f"{fmt(numbers['sanity MLP, no norm: test (%)'])}%); drop from batch "
                    f"{REFERENCE_BATCH} to {small}: " + "; ".join(
                        f"{NORMS[n]} {fmt(d)}" for n, d in drops.items()) + " points",
    }


def plot(runs: list[dict], evaluation: dict):
    import matplotlib.pyplot as plt

    n = evaluation["numbers"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for norm, label in NORMS.items():
        batches = list(_by_batch(runs, norm))
        cis = [n[f"{label}, batch {b} per worker: test (%)"] for b in batches]
        ax.errorbar(batches, [c["mean"] * POINTS for c in cis], yerr=yerr(cis), marker="o",
                    capsize=3, label=label)
    ax.axhline(n["sanity MLP, no norm: test (%)"]["mean"] * POINTS, color="grey", ls="--", lw=1,
               label="sanity MLP (no norm, converged)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="examples per worker (8 workers)", ylabel="final test accuracy (%)",
           title="Accuracy vs batch per worker, same epochs (Wu & He), 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
