"""Claim 4: batch norm makes training robust to the weight initialization (Ioffe & Szegedy 2015,
s3.3: BN makes a layer's output invariant to the scale of its weights)."""

from __future__ import annotations


from batchnorm.lab.claims.common import (POINTS, fmt, mean_ci, select, share, share_difference,
                                         trains, verdict, yerr)

NAME = "initialization"
TITLE = "Robustness to initialization"
PROMISE = "With batch norm, the scale of the initial weights hardly matters."
THRESHOLD = 0.2
HIGHER_SUPPORTS = True
CRITERION = ("Over the grid of init std x learning rate x seed, the share of runs that train "
             "(finite loss, final test accuracy >= chance + 10 points) is at least 20 points "
             "higher with BN (Newcombe's 95% interval for the difference of two Wilson shares).")
CHANGED = ("the share of runs that train is pooled over settings and seeds, with Wilson intervals "
           "and Newcombe's interval for the difference, instead of a Student-t interval over "
           "per-seed shares (which left [0, 100]).")
REFERENCE = ("Ioffe & Szegedy 2015, s3.3: with BN, BN(aW x) = BN(W x), so back-propagation is "
             "unaffected by the scale of the parameters, which should make training less "
             "sensitive to initialization (argued, not measured, in the paper).")
SETUP = ("Ioffe's MLP (3 x 100 relu), plain SGD, batch 128; every linear layer's weights drawn "
         "from N(0, std^2) with zero biases, std in {0.01, 0.05, 0.5, 1, 5}; learning rates 0.01 "
         "and 0.1 (rates at which the no-norm network trains from torch's default init).")

STDS = [0.01, 0.05, 0.5, 1.0, 5.0]
QUICK_STDS = [0.01, 0.5, 5.0]
RATES = [0.01, 0.1]


def configs(quick: bool) -> list[dict]:
    base = {"batch_size": 128, "steps": 60 if quick else 300, "evals": 5}
    return [{**base, "norm": norm, "init_std": std, "lr": lr} for norm in ("none", "batch")
            for lr in RATES for std in (QUICK_STDS if quick else STDS)]


def _grid(runs):
    return (sorted({r["config"]["init_std"] for r in runs}),
            sorted({r["config"]["lr"] for r in runs}))


def evaluate(runs: list[dict], classes: int) -> dict:
    stds, rates = _grid(runs)
    shares = {}
    numbers = {}
    for norm, label in (("none", "no norm"), ("batch", "BN")):
        every = []
        for lr in rates:
            for std in stds:
                ms = select(runs, norm=norm, lr=lr, init_std=std)
                ok = [trains(m, classes) for m in ms]
                every += ok
                numbers[f"{label}, lr {lr:g}, std {std:g}: test (%)"] = mean_ci(
                    [m["final_test"] for m in ms])
                numbers[f"{label}, lr {lr:g}, std {std:g}: seeds that train (share)"] = share(ok)
        shares[label] = share(every)
        numbers[f"{label}: settings that train (share)"] = shares[label]
    # The two networks' runs are paired by seed and setting; the interval for independent
    # shares ignores the pairing, which for positively correlated outcomes makes it wider, so a
    # verdict reached with it is not an artefact of the pairing
    diff = share_difference(shares["BN"], shares["no norm"])
    numbers["share difference BN - no norm"] = diff
    return {
        "metric": "share difference BN - no norm",
        "chance": 1 / classes,
        "estimate": diff,
        "verdict": verdict(diff, THRESHOLD, HIGHER_SUPPORTS),
        "numbers": numbers,
        "headline": f"settings that train: no norm "
                    f"{fmt(numbers['no norm: settings that train (share)'], POINTS, 0)}%, BN "
                    f"{fmt(numbers['BN: settings that train (share)'], POINTS, 0)}%; "
                    f"difference {fmt(diff, POINTS, 0)} points",
    }


def plot(runs: list[dict], evaluation: dict):
    import matplotlib.pyplot as plt

    n = evaluation["numbers"]
    stds, rates = _grid(runs)
    fig, axes = plt.subplots(1, len(rates), figsize=(13, 3.8), squeeze=False)
    for ax, lr in zip(axes[0], rates):
        for label, marker in (("no norm", "o"), ("BN", "s")):
            cis = [n[f"{label}, lr {lr:g}, std {std:g}: test (%)"] for std in stds]
            line = ax.errorbar(stds, [c["mean"] * POINTS for c in cis], yerr=yerr(cis),
                               marker=marker, capsize=3, label=label)
            for std, c in zip(stds, cis):
                share = n[f"{label}, lr {lr:g}, std {std:g}: seeds that train (share)"]["mean"]
                ax.annotate(f"{share:.0%}", (std, c["mean"] * POINTS), fontsize=7,
                            textcoords="offset points", xytext=(3, 5),
                            color=line[0].get_color())
        ax.axhline((evaluation["chance"] + 0.10) * POINTS, color="grey", ls="--", lw=1,
                   label="chance + 10 points")
        ax.set_xscale("log")
        ax.set(xlabel="init weight std", ylabel="final test accuracy (%)", ylim=(0, 100),
               title=f"lr {lr:g}: accuracy, 95% CI (labels: share of seeds that train)")
        ax.legend()
    fig.tight_layout()
    return fig
