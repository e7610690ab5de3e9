"""Claim 7: batch norm makes the loss landscape smoother (Santurkar et al. 2018's explanation,
arXiv 1805.11604, s3)."""

from __future__ import annotations

import math

from batchnorm.lab.claims import santurkar
from batchnorm.lab.claims.common import fmt, mean_ci

NAME = "smoothness"
TITLE = "BN smooths the loss landscape"
PROMISE = ("Batch norm makes the loss landscape smoother: along the gradient, the loss and the "
           "gradient change less, so the gradient predicts the landscape ahead (Santurkar 2018).")
CRITERION = ("Two predictions, both needed (95% CIs over seeds, paired by seed), with quantities "
             "averaged over the probed steps of training: (a) the range of the loss over step "
             "sizes 0-4 x lr along the gradient is at least 2x smaller with BN: log10(no norm / "
             "BN) >= 0.30; (b) the largest change of the gradient over those steps (gradient "
             "predictiveness) is at least 2x smaller with BN: log10(no norm / BN) >= 0.30.")
TWO = math.log10(2)
PREDICTIONS = [
    {"name": "loss", "metric": "log10(loss range no norm / BN)",
     "statement": "the loss range along the gradient is at least 2x smaller with BN",
     "threshold": TWO, "higher_supports": True},
    {"name": "gradient", "metric": "log10(gradient change no norm / BN)",
     "statement": "the gradient change along the gradient is at least 2x smaller with BN",
     "threshold": TWO, "higher_supports": True},
]
QUANTITIES = {"loss": "loss_range", "gradient": "grad_change_range"}
REFERENCE = santurkar.REFERENCE
SETUP = santurkar.SETUP
configs = santurkar.configs  # both mechanism claims read the same runs


def evaluate(runs: list[dict], classes: int) -> dict:
    v = santurkar.by_variant(runs)
    numbers = {}
    for norm, label in santurkar.VARIANTS.items():
        for quantity, text in (("loss_range", "loss range along the gradient"),
                               ("grad_change_range", "gradient change along the gradient"),
                               ("beta", "effective beta-smoothness")):
            numbers[f"{label}: {text}"] = mean_ci([santurkar.landscape(m, quantity)
                                                   for m in v[norm]])

    def none_over_bn(quantity: str) -> dict:
        """log10(no norm / BN) of a landscape quantity, seed by seed."""
        return mean_ci(santurkar.log_ratio(*([santurkar.landscape(m, quantity) for m in v[norm]]
                                             for norm in ("none", "batch"))))

    estimates = {p["name"]: none_over_bn(QUANTITIES[p["name"]]) for p in PREDICTIONS}
    result = santurkar.judge(PREDICTIONS, estimates, numbers)
    numbers["log10(beta-smoothness no norm / BN)"] = none_over_bn("beta")
    loss, grad = result["predictions"]
    return {
        **result,
        "headline": f"log10(no norm / BN): loss range {fmt(loss['estimate'], 1, 2)} "
                    f"({loss['verdict']}), gradient change {fmt(grad['estimate'], 1, 2)} "
                    f"({grad['verdict']}); beta-smoothness "
                    f"{fmt(numbers['log10(beta-smoothness no norm / BN)'], 1, 2)}",
    }


def plot(runs: list[dict], evaluation: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
    norms = ("none", "batch")
    santurkar.over_probes(axes[0], runs, lambda p: p["landscape"]["loss_range"],
                          "loss range over steps 0-4 x lr", norms, log=True)
    axes[0].set_title("(a) loss landscape (their Fig. 4a)")
    santurkar.over_probes(axes[1], runs, lambda p: p["landscape"]["grad_change_range"],
                          "max ||grad(w - eta g) - g||", norms, log=True)
    axes[1].set_title("(b) gradient predictiveness (Fig. 4b)")
    santurkar.over_probes(axes[2], runs, lambda p: p["landscape"]["beta"],
                          "max ||grad change|| / ||eta g||", norms, log=True)
    axes[2].set_title("(c) effective beta-smoothness (Fig. 4c)")
    fig.tight_layout()
    return fig
