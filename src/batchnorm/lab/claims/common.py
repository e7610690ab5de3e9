"""Statistics and selection shared by the claims."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"

# the runs' metrics are 0..1 accuracies; reports show percentage points
POINTS = 100.0


def mean_ci(values) -> dict:
    """Mean and two-sided 95% Student-t interval over seeds; no interval from one seed."""
    v = np.asarray([x for x in values], dtype=float)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": len(v)}
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(v)}


def verdict(ci: dict, threshold: float, higher_supports: bool = True) -> str:
    """Supported when the whole 95% interval lies on the promise's side of the threshold stated in
    advance, not supported when it lies wholly on the other side, inconclusive otherwise."""
    if ci["lo"] is None:
        return INCONCLUSIVE
    holds = ci["lo"] >= threshold if higher_supports else ci["hi"] < threshold
    fails = ci["hi"] < threshold if higher_supports else ci["lo"] >= threshold
    return SUPPORTED if holds else NOT_SUPPORTED if fails else INCONCLUSIVE


def select(runs: list[dict], **where) -> list[dict]:
    """Metrics of the runs whose configuration matches `where`, ordered by seed."""
    hits = [r for r in runs if all(r["config"][k] == v for k, v in where.items())]
    return [r["metrics"] for r in sorted(hits, key=lambda r: r["config"]["seed"])]


def seeds(runs: list[dict]) -> list[int]:
    return sorted({r["config"]["seed"] for r in runs})


def trains(metrics: dict, classes: int) -> bool:
    """A run trains when its loss stayed finite and it ends at least 10 points above chance."""
    return not metrics["diverged"] and metrics["final_test"] >= 1 / classes + 0.10


def fmt(ci: dict, scale: float = POINTS, digits: int = 1, unit: str = "") -> str:
    """`61.2 [58.3, 64.1]` (mean and 95% CI)."""
    if ci["lo"] is None:
        return f"{ci['mean'] * scale:.{digits}f}{unit} (one seed: no CI)"
    return (f"{ci['mean'] * scale:.{digits}f}{unit} [{ci['lo'] * scale:.{digits}f}, "
            f"{ci['hi'] * scale:.{digits}f}]")


def band(ax, x, ys, label, **kw):
    """Mean line with a 95% CI band over seeds (rows of ys)."""
    ys = np.asarray(ys, dtype=float)
    mean = ys.mean(0)
    line, = ax.plot(x, mean, label=label, **kw)
    if len(ys) > 1:
        half = stats.t.ppf(0.975, len(ys) - 1) * ys.std(0, ddof=1) / math.sqrt(len(ys))
        ax.fill_between(x, mean - half, mean + half, color=line.get_color(), alpha=0.2)
    return line


def yerr(cis: list[dict], scale: float = POINTS):
    """matplotlib's asymmetric error bars from CIs; none from a single seed."""
    if cis[0]["lo"] is None:
        return None
    return [[(c["mean"] - c["lo"]) * scale for c in cis], [(c["hi"] - c["mean"]) * scale
                                                         for c in cis]]
