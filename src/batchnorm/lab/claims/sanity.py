"""Sanity check: our no-norm MLP and CNN against Greydanus 2020's MNIST-1D table."""

from __future__ import annotations

from batchnorm.lab.claims import regularization
from batchnorm.lab.claims.common import fmt, mean_ci, select

NAME = "sanity"
TOLERANCE = 0.06
PUBLISHED = {"mlp": 0.68, "cnn": 0.94}  # Greydanus 2020, MNIST-1D, 4000 train / 1000 test
REFERENCE = ("Greydanus 2020 (MNIST-1D, 4000 train / 1000 test, length 40): logistic 32%, MLP "
             "68%, CNN 94%, GRU 91%, human 96%.")
CRITERION = "Without normalization, our MLP and CNN reach within 6 points of 68% and 94%."


def configs(quick: bool) -> list[dict]:
    # The MLP is the regularization claim's no-norm run (one configuration, run once); the CNN
    # is Greydanus's: 3 conv layers of 25 channels, Adam at 0.01, batch 100.
    cnn = {"model": "cnn", "optimizer": "adam", "lr": 0.01, "batch_size": 100,
           "steps": 120 if quick else 1500, "evals": 4 if quick else 15}
    return [{**regularization.base(quick), "norm": "none"}, cnn]


def evaluate(runs: list[dict], data_name: str) -> dict:
    out = {}
    for model in ("mlp", "cnn"):
        ci = mean_ci([m["final_test"] for m in select(runs, model=model, norm="none",
                                                      dropout=0.0)])
        row = {"ours": ci, "published": PUBLISHED[model] if data_name == "mnist1d" else None}
        if row["published"] is not None:
            row["within_tolerance"] = abs(ci["mean"] - row["published"]) <= TOLERANCE
        row["text"] = fmt(ci) + "%"
        out[model] = row
    return out
