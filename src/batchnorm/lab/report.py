"""The lab's outputs: results.json (every run with its full configuration, every claim's numbers
and verdict), plots/*.png, and report.html, self-contained (plots embedded as base64 PNG) so it
opens from disk or as a mail attachment.

The report compares each verdict with the last release's run, whose summary (`summary()` of its
results.json) is committed as `previous.json` beside this module, and says why a verdict changed:
the claim's method changed (its `CHANGED` note says how), or, with the method unchanged, the runs
did (library code, training details shared by all claims).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render to files only

import matplotlib.pyplot as plt  # noqa: E402

import batchnorm  # noqa: E402
from batchnorm.lab.claims import CLAIMS, SANITY  # noqa: E402
from batchnorm.lab.claims.common import fmt  # noqa: E402
from batchnorm.lab.data import Dataset  # noqa: E402
from batchnorm.lab.runner import atomic_write  # noqa: E402

COLORS = {"supported": "#1a7f37", "not supported": "#cf222e", "inconclusive": "#9a6700"}
PREVIOUS = Path(__file__).with_name("previous.json")
UNCONVERGED = ", so that claim compares networks that have not converged"


def summary(results: dict) -> dict:
    """What a later release compares with: the run's setting and each claim's criterion, metric,
    estimate, headline and verdict."""
    keep = ("title", "criterion", "metric", "estimate", "headline", "verdict")
    return {"lab": {k: results["lab"][k] for k in ("version", "seeds", "quick")}
            | {"data": results["lab"]["data"]["name"]},
            "sanity": {m: results["sanity"][m]["text"] for m in ("mlp", "cnn")},
            "claims": {name: {k: c[k] for k in keep if k in c}
                       for name, c in results["claims"].items()}}


def compare(results: dict, previous: dict | None) -> dict:
    """Per claim, the previous and the current verdict, whether it changed, and why."""
    lab = results["lab"]
    if previous is None:
        return {"note": "No summary of a previous run to compare with.", "claims": {}}
    p = previous["lab"]
    same = (p["data"] == lab["data"]["name"] and p["quick"] == lab["quick"]
            and p["seeds"] == lab["seeds"])
    note = (f"The last release's run: batchnorm {p['version']}, {p['data']}, {p['seeds']} seeds"
            f"{', quick' if p['quick'] else ''}")
    if not same:
        return {"note": note + "; a different setting from this run's, so verdicts are not "
                               "compared.", "claims": {}}
    note += f". {previous['source']}" if previous.get("source") else "."
    out = {}
    for name, c in results["claims"].items():
        old = previous["claims"].get(name)
        if old is None:
            left_out = previous.get("left_out", {}).get(name)
            out[name] = {"previous": None, "now": c["verdict"], "changed": False,
                         "why": f"not in the previous summary: {left_out}" if left_out else
                         "new in this release"}
            continue
        changed = old["verdict"] != c["verdict"]
        method = getattr(CLAIMS[name], "CHANGED", None)
        if method:
            why = f"method changed: {method}"
        elif old["criterion"] != c["criterion"]:
            why = "the criterion changed"
        elif changed:
            why = ("same method and criterion: the runs differ (library code or training details "
                   "shared by all claims)")
        else:
            why = "same method and criterion"
        out[name] = {"previous": old["verdict"], "previous_headline": old["headline"],
                     "now": c["verdict"], "changed": changed, "why": why}
    return {"note": note, "claims": out}


def _load_previous() -> dict | None:
    return json.loads(PREVIOUS.read_text()) if PREVIOUS.exists() else None


def _clean(x):
    """JSON without NaN/Infinity (not JSON): a value that is not finite becomes null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _scale(key: str) -> float:
    # accuracies and shares are stored as fractions and shown as percent / points
    return 100.0 if key.endswith(("(%)", "(points)")) or "share" in key else 1.0


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write(out: Path, data: Dataset, runs: dict[str, list[dict]], claims: list[str], seeds: int,
          quick: bool, wall_seconds: float) -> dict:
    sanity = SANITY.evaluate(runs[SANITY.NAME], data.name)
    results = {
        "lab": {"version": batchnorm.__version__, "data": data.describe(), "seeds": seeds,
                "quick": quick, "claims": claims},
        "sanity": {"criterion": SANITY.CRITERION, "reference": SANITY.REFERENCE, **sanity},
        "claims": {},
        "runs": [],
    }
    pngs = {}
    for name in claims:
        claim = CLAIMS[name]
        evaluation = claim.evaluate(runs[name], data.classes)
        stated = ({} if "predictions" in evaluation else
                  {"threshold": claim.THRESHOLD, "higher_supports": claim.HIGHER_SUPPORTS})
        results["claims"][name] = {
            "title": claim.TITLE, "promise": claim.PROMISE, "criterion": claim.CRITERION,
            **stated, "setup": claim.SETUP, "reference": claim.REFERENCE, **evaluation}
        pngs[name] = _png(claim.plot(runs[name], evaluation))
    seen = set()
    for group, rs in runs.items():
        for r in rs:
            key = json.dumps(r["config"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                results["runs"].append({"groups": [g for g, x in runs.items() if r in x],
                                        "config": r["config"], "metrics": r["metrics"]})
    results["previous"] = compare(results, _load_previous())
    results = _clean(results)
    for name, png in pngs.items():
        atomic_write(out / "plots" / f"{name}.png", png)
    atomic_write(out / "results.json", json.dumps(results, indent=1))
    atomic_write(out / "report.html", _html(results, pngs, wall_seconds))
    return results


def _verdict_badge(v: str) -> str:
    return f'<span class="badge" style="background:{COLORS[v]}">{html.escape(v)}</span>'


def _numbers_table(numbers: dict) -> str:
    rows = []
    for key, ci in numbers.items():
        s = _scale(key)
        digits = 1 if s == 100 else 3
        rows.append(f"<tr><td>{html.escape(key)}</td><td>{html.escape(fmt(ci, s, digits))}"
                    f"</td></tr>")
    return ('<table class="numbers"><tr><th>quantity</th><th>mean [95% CI over seeds]</th></tr>'
            + "".join(rows) + "</table>")


def _predictions_table(predictions: list[dict] | None) -> str:
    if not predictions:
        return ""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(p['statement'])}</td><td>{e(p['metric'])}</td>"
        f"<td>{'&ge;' if p['higher_supports'] else '&lt;'} "
        f"{p['threshold'] * _scale(p['metric']):.3g}</td>"
        f"<td>{e(fmt(p['estimate'], _scale(p['metric']), 2))}</td>"
        f"<td>{_verdict_badge(p['verdict'])}</td></tr>" for p in predictions)
    return ("<p><b>Predictions</b> (the claim holds only if all do; stated before running):</p>"
            '<table><tr><th>prediction</th><th>metric</th><th>needs</th>'
            "<th>estimate [95% CI]</th><th>verdict</th></tr>" + rows + "</table>")


def _comparison(change: dict) -> str:
    if change["previous"] is None:
        return "new"  # no verdict to compare with: a new claim, or one whose runs did not finish
    return "<b>changed</b>" if change["changed"] else "same"


def _changes(previous: dict, claims: dict) -> str:
    e = html.escape
    rows = []
    for name, c in previous["claims"].items():
        was = "—" if c["previous"] is None else _verdict_badge(c["previous"])
        rows.append(f"<tr><td>{e(claims[name]['title'])}</td><td>{was}</td>"
                    f"<td>{_verdict_badge(c['now'])}</td>"
                    f"<td>{_comparison(c)}</td>"
                    f"<td>{e(c['why'])}</td></tr>")
    table = ("<table><tr><th>claim</th><th>last release</th><th>now</th><th></th><th>why</th>"
             "</tr>" + "".join(rows) + "</table>") if rows else ""
    return f"<h2>Against the last release</h2><p>{e(previous['note'])}</p>{table}"


def _html(results: dict, pngs: dict[str, bytes], wall_seconds: float) -> str:
    lab = results["lab"]
    d = lab["data"]
    e = html.escape
    parts = [f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>batchnorm lab report</title><style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; color: #1f2328; line-height: 1.45; }}
table {{ border-collapse: collapse; margin: 0.8em 0; }}
th, td {{ border: 1px solid #d0d7de; padding: 0.35em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f6f8fa; }}
.badge {{ color: white; padding: 0.15em 0.6em; border-radius: 1em; white-space: nowrap;
          font-weight: 600; }}
.side {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }}
.side > div {{ background: #f6f8fa; padding: 0.6em 1em; border-radius: 6px; }}
img {{ max-width: 100%; }}
.numbers td:last-child {{ font-family: monospace; }}
.small {{ color: #59636e; font-size: 0.9em; }}
</style></head><body>
<h1>What batch normalization buys: the batchnorm lab</h1>
<p class="small">batchnorm {e(lab['version'])}; data <b>{e(d['name'])}</b> ({d['train']} train /
{d['test']} test, examples of shape {tuple(d['shape'])}, {d['classes']} classes); {lab['seeds']}
seeds{' (quick mode: short runs, small grids)' if lab['quick'] else ''}; numbers are means with
95% Student-t confidence intervals over seeds; accuracies in percent.</p>
<h2>Verdicts</h2>
<table><tr><th>claim</th><th>criterion (stated before running)</th><th>our numbers</th>
<th>verdict</th></tr>"""]
    for name, c in results["claims"].items():
        parts.append(f'<tr><td><a href="#{e(name)}">{e(c["title"])}</a></td>'
                     f'<td>{e(c["criterion"])}</td><td>{e(c["headline"])}</td>'
                     f'<td>{_verdict_badge(c["verdict"])}</td></tr>')
    parts.append("</table>")
    parts.append(_changes(results["previous"], results["claims"]))
    s = results["sanity"]
    parts.append(f"<h2>Sanity check</h2><p>{e(s['criterion'])} Reference: {e(s['reference'])}</p>"
                 "<table><tr><th>model (no normalization)</th><th>ours</th><th>published</th>"
                 "<th>within 6 points</th></tr>")
    for model in ("mlp", "cnn"):
        row = s[model]
        pub = "—" if row["published"] is None else f"{row['published'] * 100:.0f}%"
        ok = "—" if row["published"] is None else ("yes" if row["within_tolerance"] else "no")
        parts.append(f"<tr><td>{model.upper()}</td><td>{e(row['text'])}</td><td>{pub}</td>"
                     f"<td>{ok}</td></tr>")
    parts.append("</table>")
    if "batch-size" in results["claims"]:
        b = results["claims"]["batch-size"]["baseline"]
        parts.append(f"<p>Converged baseline of the batch-size claim: BN with 32 examples per "
                     f"worker reaches {b['bn_reference'] * 100:.1f}%, the MLP above "
                     f"{b['mlp'] * 100:.1f}%: {'within' if b['converged'] else 'more than'} 3 "
                     f"points{'' if b['converged'] else UNCONVERGED}.</p>")
    for name, c in results["claims"].items():
        img = base64.b64encode(pngs[name]).decode()
        parts.append(f"""<h2 id="{e(name)}">{e(c['title'])} <span class="small">({e(name)})</span>
{_verdict_badge(c['verdict'])}</h2>
<p><b>Promise.</b> {e(c['promise'])}</p>
<p><b>Criterion.</b> {e(c['criterion'])}</p>
<div class="side"><div><b>Literature</b><p>{e(c['reference'])}</p></div>
<div><b>Ours</b><p>{e(c['headline'])}</p><p class="small">{e(c['setup'])}</p></div></div>
{_predictions_table(c.get('predictions'))}
<img alt="plot for {e(name)}" src="data:image/png;base64,{img}">
{_numbers_table(c['numbers'])}""")
    parts.append(f"""<p class="small">{len(results['runs'])} distinct runs; this invocation took
{wall_seconds:.0f} s (cached runs are not rerun). Every run's full configuration and metrics are in
results.json; rerun with <code>batchnorm lab</code>.</p></body></html>""")
    return "\n".join(parts)
