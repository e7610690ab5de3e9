"""The promises of batch norm, one module each, plus the sanity check against MNIST-1D's paper: five
benefits, inference without a batch, and the two explanations of why it works (less internal
covariate shift, a smoother landscape), which share their runs through `santurkar`.

A claim module names its `TITLE`, the `PROMISE` as articles state it, the `CRITERION` it states
before running (with `THRESHOLD` and whether a higher metric supports it), the `REFERENCE` result
from the literature, and three functions:

- `configs(quick)`: the run configurations (overrides of `train.DEFAULTS`, without a seed);
- `evaluate(runs, classes)`: numbers from the finished runs, with 95% CIs over seeds, and the
  verdict; a claim that makes several predictions (`PREDICTIONS`: each a metric, threshold and
  direction) reports each one's estimate and verdict, and its verdict is `common.all_of` them;
- `plot(runs, evaluation)`: one matplotlib figure with labelled axes.

`runs` is a list of `{"config": ..., "metrics": ...}`, one per configuration and seed.
"""

from __future__ import annotations

from batchnorm.lab.claims import (batch_size, convergence, ics, inference, initialization,
                                  learning_rate, regularization, sanity, smoothness)

CLAIMS = {m.NAME: m for m in (convergence, regularization, learning_rate, initialization,
                              batch_size, inference, ics, smoothness)}
SANITY = sanity
