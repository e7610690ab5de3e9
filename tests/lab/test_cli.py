"""The command end to end, in subprocesses, as a user runs it."""

import base64
import html
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import matplotlib.image
import numpy as np
import pytest

import batchnorm
from batchnorm import cli
from batchnorm.lab import train
from batchnorm.lab.claims import CLAIMS
from batchnorm.lab import report
from batchnorm.lab.claims.common import all_of, mean_ci, verdict
from conftest import lab

VERDICTS = {"supported", "not supported", "inconclusive"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    proc = lab("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_quick_report_states_every_claim_with_its_verdict(quick):
    out, proc = quick
    results = json.loads((out / "results.json").read_text())
    assert list(results["claims"]) == list(CLAIMS)
    assert results["lab"]["seeds"] == 2 and results["lab"]["quick"]
    page = (out / "report.html").read_text()
    verdict_table = page[page.index("<h2>Verdicts</h2>"):page.index("<h2>Sanity check</h2>")]
    for name, c in results["claims"].items():
        assert c["verdict"] in VERDICTS
        # the stated verdict follows from the stated estimates and thresholds
        if "predictions" in c:
            for p in c["predictions"]:
                assert p["verdict"] == verdict(p["estimate"], p["threshold"], p["higher_supports"])
                assert html.escape(p["statement"]) in page
            assert c["verdict"] == all_of([p["verdict"] for p in c["predictions"]])
        else:
            assert c["verdict"] == verdict(c["estimate"], c["threshold"], c["higher_supports"])
        row = verdict_table[verdict_table.index(f'href="#{name}"'):]
        row = row[:row.index("</tr>")]
        assert CLAIMS[name].CRITERION in html.unescape(row)
        assert f">{c['verdict']}</span>" in row
        assert c["title"] in proc.stdout and c["verdict"] in proc.stdout


def test_quick_report_numbers_match_the_runs(quick):
    out, _ = quick
    results = json.loads((out / "results.json").read_text())
    reg = [r for r in results["runs"] if "regularization" in r["groups"]]

    def gaps(norm):
        rs = sorted((r for r in reg if r["config"]["norm"] == norm and not r["config"]["dropout"]),
                    key=lambda r: r["config"]["seed"])
        return [r["metrics"]["final_train"] - r["metrics"]["final_test"] for r in rs]

    want = mean_ci(np.subtract(gaps("none"), gaps("batch")))
    got = results["claims"]["regularization"]["estimate"]
    assert got["mean"] == pytest.approx(want["mean"]) and got["lo"] == pytest.approx(want["lo"])
    for r in results["runs"]:
        assert set(r["config"]) == set(train.DEFAULTS)  # the full configuration, rerunnable
    assert results["lab"]["version"] == batchnorm.__version__
    sanity = results["sanity"]
    cnn = [r["metrics"]["final_test"] for r in results["runs"] if r["config"]["model"] == "cnn"]
    assert sanity["cnn"]["ours"]["mean"] == pytest.approx(np.mean(cnn))


def test_quick_report_compares_with_the_committed_previous_run(quick):
    out, _ = quick
    results = json.loads((out / "results.json").read_text())
    previous = json.loads(report.PREVIOUS.read_text())
    # the committed summary is of a full run; a quick run is another setting and says so
    assert not previous["lab"]["quick"]
    assert "not compared" in results["previous"]["note"]
    page = (out / "report.html").read_text()
    assert "<h2>Against the last release</h2>" in page


def _results(claims: dict, seeds=5, quick=False) -> dict:
    return {"lab": {"version": "x", "seeds": seeds, "quick": quick,
                    "data": {"name": "mnist1d"}},
            "sanity": {"mlp": {"text": "66%"}, "cnn": {"text": "90%"}},
            "claims": {n: {"title": n, "criterion": CLAIMS[n].CRITERION, "metric": "m",
                           "estimate": {"mean": 1}, "headline": "h", "verdict": v}
                       for n, v in claims.items()}}


def test_comparison_says_what_changed_and_why():
    old = report.summary(_results({"convergence": "inconclusive", "regularization": "supported"}))
    new = _results({"convergence": "supported", "regularization": "not supported",
                    "ics": "not supported"})
    got = report.compare(new, old)["claims"]
    # convergence's method changed, and its note says how
    assert got["convergence"]["changed"]
    assert got["convergence"]["why"] == "method changed: " + CLAIMS["convergence"].CHANGED
    # regularization's did not: the change comes from the runs
    assert got["regularization"]["changed"] and got["regularization"]["why"].startswith(
        "same method and criterion")
    assert got["ics"] == {"previous": None, "now": "not supported", "changed": False,
                          "why": "new in this release"}
    old["left_out"] = {"ics": "its runs did not finish"}
    assert report.compare(new, old)["claims"]["ics"]["why"] == (
        "not in the previous summary: its runs did not finish")
    other = report.compare(new, report.summary(_results({}, seeds=3)))
    assert other["claims"] == {} and "not compared" in other["note"]


def test_quick_report_is_self_contained_with_rendered_plots(quick):
    out, _ = quick
    page = (out / "report.html").read_text()
    assert not re.search(r'(src|href)="(https?:|file:|/)', page)
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(CLAIMS)
    for name, b64 in zip(CLAIMS, embedded):
        png = base64.b64decode(b64)
        assert png == (out / "plots" / f"{name}.png").read_bytes()
        image = matplotlib.image.imread(io.BytesIO(png))
        assert image.shape[0] > 200 and image.shape[1] > 500
        # not a blank canvas: a plot draws many distinct colours
        assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 50


@pytest.mark.parametrize("kind", ["idx", "npz", "digits"])
def test_other_data(kind, idx_dir, npz_file, tmp_path):
    spec = {"idx": str(idx_dir), "npz": str(npz_file), "digits": "digits"}[kind]
    out = tmp_path / "out"
    proc = lab("--quick", "--data", spec, "--claims", "learning-rate", "--seeds", "1", "--out",
               str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["claims"]) == ["learning-rate"]
    assert results["lab"]["data"]["shape"] == [1, 8, 8]
    assert results["claims"]["learning-rate"]["verdict"] == "inconclusive"  # one seed: no CI
    assert results["sanity"]["mlp"]["published"] is None  # MNIST-1D's table does not apply


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: p / "missing.npz", "missing.npz"),
    (lambda p: (p / "bad.npz").write_bytes(b"garbage") and p / "bad.npz",
     "bad.npz: not a readable .npz file"),
])
def test_bad_data_exits_nonzero_and_writes_nothing(tmp_path, capsys, make_bad, message):
    path = make_bad(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["lab", "--data", str(path), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(),
                    reason="checks the error where CUDA is missing")
def test_cuda_without_a_gpu_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["lab", "--device", "cuda", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "--device: lab configuration: device 'cuda' asked for, but torch sees no CUDA" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ray_runs_merge_into_the_same_cache(tmp_path):
    pytest.importorskip("ray", reason="--ray needs the optional ray package (batchnorm[ray])")
    args = ["--quick", "--seeds", "1", "--claims", "learning-rate"]
    pool, ray = tmp_path / "pool", tmp_path / "ray"
    assert lab(*args, "--jobs", "2", "--out", str(pool)).returncode == 0
    proc = lab(*args, "--ray", "local", "--out", str(ray))
    assert proc.returncode == 0, proc.stderr
    # the same numbers whichever executor trained them
    assert (ray / "results.json").read_bytes() == (pool / "results.json").read_bytes()
    # a second sweep on Ray into the pool's cache trains only what is missing
    before = {f.name for f in (pool / "cache").glob("*.json")}
    proc = lab("--quick", "--seeds", "1", "--claims", "learning-rate", "inference", "--ray",
               "local", "--out", str(pool))
    assert proc.returncode == 0, proc.stderr
    after = {f.name for f in (pool / "cache").glob("*.json")}
    results = json.loads((pool / "results.json").read_text())
    assert before < after and len(after) == len(results["runs"])
    first = json.loads((ray / "results.json").read_text())
    assert results["claims"]["learning-rate"] == first["claims"]["learning-rate"]


def test_unknown_claim_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["lab", "--claims", "speed", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "--claims: expected any of convergence" in capsys.readouterr().err


def test_sigkill_then_resume_gives_the_same_results(tmp_path):
    args = ["--quick", "--claims", "learning-rate", "--seeds", "1", "--jobs", "1"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-m", "batchnorm", "lab", "--no-progress", *args,
                             "--out", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while len(list((killed / "cache").glob("*.json"))) < 3:
            assert proc.poll() is None, "the lab finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the lab and its workers: one session we started
        proc.wait()
    cached = list((killed / "cache").glob("*.json"))
    for f in cached:
        json.loads(f.read_text())  # whole files only: written under a temporary name, renamed
    assert not (killed / "results.json").exists()
    resumed = lab(*args, "--out", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert lab(*args, "--out", str(clean)).returncode == 0
    assert (killed / "results.json").read_bytes() == (clean / "results.json").read_bytes()
    assert len(list((killed / "cache").glob("*.json"))) > len(cached)


def test_comparison_table_says_new_where_the_last_release_has_no_verdict():
    compared = {"note": "n", "claims": {
        "a": {"previous": None, "now": "supported", "changed": False, "why": "new in this release"},
        "b": {"previous": "inconclusive", "now": "supported", "changed": True, "why": "w"},
        "c": {"previous": "supported", "now": "supported", "changed": False, "why": "w"}}}
    page = report._changes(compared, {n: {"title": n} for n in "abc"})
    cells = [row.split("</td><td>")[3] for row in page.split("<tr>")[2:]]
    assert cells == ["new", "<b>changed</b>", "same"]
