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


def wilson(successes: int, trials: int, z: float = float(stats.norm.ppf(0.975))) -> dict:
    """A share with Wilson's 95% score interval (Wilson 1927; Newcombe 1998, method 3): unlike
    the Student-t interval over 0/1 values it stays inside [0, 1] and is not empty when every
    trial agrees. `n` is the number of trials."""
    if trials < 1:
        raise ValueError(f"wilson: expected at least one trial, got trials={trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"wilson: expected 0 <= successes <= trials, got successes={successes}, "
                         f"trials={trials}")
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials ** 2))
    return {"mean": p, "lo": max(0.0, centre - half), "hi": min(1.0, centre + half),
            "n": trials, "successes": successes}


def share_difference(a: dict, b: dict) -> dict:
    """Share a minus share b, both from `wilson`, with Newcombe's hybrid score interval (Newcombe
    1998, method 10): lo = d - sqrt((p_a - l_a)^2 + (u_b - p_b)^2), hi = d + sqrt((u_a - p_a)^2
    + (p_b - l_b)^2); inside [-1, 1] by construction."""
    d = a["mean"] - b["mean"]
    lo = d - math.sqrt((a["mean"] - a["lo"]) ** 2 + (b["hi"] - b["mean"]) ** 2)
    hi = d + math.sqrt((a["hi"] - a["mean"]) ** 2 + (b["mean"] - b["lo"]) ** 2)
    return {"mean": d, "lo": lo, "hi": hi, "n": min(a["n"], b["n"])}


def share(flags) -> dict:
    """The Wilson share of true values among `flags`."""
    flags = [bool(f) for f in flags]
    return wilson(sum(flags), len(flags))


def verdict(ci: dict, threshold: float, higher_supports: bool = True) -> str:
    """Supported when the whole 95% interval lies on the promise's side of the threshold stated in
    advance, not supported when it lies wholly on the other side, inconclusive otherwise."""
    if ci["lo"] is None:
        return INCONCLUSIVE
    holds = ci["lo"] >= threshold if higher_supports else ci["hi"] < threshold
    fails = ci["hi"] < threshold if higher_supports else ci["lo"] >= threshold
    return SUPPORTED if holds else NOT_SUPPORTED if fails else INCONCLUSIVE


def all_of(verdicts: list[str]) -> str:
    """The verdict on a hypothesis that makes several predictions, each with its own verdict: it is
    supported when every prediction is, not supported as soon as one prediction fails, and
    inconclusive otherwise."""
    if NOT_SUPPORTED in verdicts:
        return NOT_SUPPORTED
    return SUPPORTED if all(v == SUPPORTED for v in verdicts) else INCONCLUSIVE


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


def band(ax, x, ys, label, log: bool = False, **kw):
    """Mean line with a 95% CI band over seeds (rows of ys). With `log`, both are taken of log10
    values (the geometric mean and its interval), so the band fits a log axis instead of
    reaching below zero."""
    ys = np.asarray(ys, dtype=float)
    ys = np.log10(ys) if log else ys
    back = (lambda v: 10 ** v) if log else (lambda v: v)
    mean = ys.mean(0)
    line, = ax.plot(x, back(mean), label=label, **kw)
    if len(ys) > 1:
        half = stats.t.ppf(0.975, len(ys) - 1) * ys.std(0, ddof=1) / math.sqrt(len(ys))
        ax.fill_between(x, back(mean - half), back(mean + half), color=line.get_color(),
                        alpha=0.2)
    return line


def yerr(cis: list[dict], scale: float = POINTS):
    """matplotlib's asymmetric error bars from CIs; none from a single seed."""
    if cis[0]["lo"] is None:
        return None
    return [[(c["mean"] - c["lo"]) * scale for c in cis], [(c["hi"] - c["mean"]) * scale
                                                         for c in cis]]
