"""Runs the lab: plans the runs of the chosen claims, trains them in a process pool, caches each
finished run, and writes the report. With `--ray ADDRESS` the runs go to a Ray cluster instead of
the local pool; the driver writes their results into the same cache.

Each run is cached as `<out>/cache/<id>.json`, where the id hashes the full configuration, the data
set's fingerprint, the library version and a hash of its source; the file is written to a temporary name and renamed, so
a crash (even SIGKILL) leaves either a whole result or none, and the next invocation runs only what
is missing. Workers are spawned processes with one torch thread each, so a run computes the same
numbers whichever worker runs it, and results.json does not depend on --jobs or on interruptions.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import batchnorm
from batchnorm.lab import train
from batchnorm.lab.claims import CLAIMS, SANITY
from batchnorm.lab.data import Dataset

QUICK_SEEDS = 2


def atomic_write(path: Path, data: bytes | str) -> None:
    """Writes `path` whole or not at all: a temporary file in the same directory, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the library's source: a change to a layer or to training must not reuse runs
    cached by the old code, and the version number alone does not move between releases."""
    digest = hashlib.sha256()
    package = Path(batchnorm.__file__).parent
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def run_id(cfg: dict, data: Dataset) -> str:
    key = json.dumps({"config": cfg, "data": data.fingerprint(), "version": batchnorm.__version__,
                      "code": code_fingerprint()}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def plan(claims: list[str], quick: bool, seeds: int, device: str = "cpu"
         ) -> dict[str, list[dict]]:
    """group (claim name or "sanity") -> full run configurations, seeds innermost."""
    groups = {SANITY.NAME: SANITY.configs(quick)}
    groups.update((name, CLAIMS[name].configs(quick)) for name in claims)
    return {g: [train.make_config({**c, "seed": s, "device": device}) for c in cfgs
                for s in range(seeds)] for g, cfgs in groups.items()}


def _cost(cfg: dict) -> float:
    """A rough relative run time, to order runs within a claim and to weigh the progress bar."""
    per_step = 1.0 + cfg["batch_size"] / 100
    per_step *= 4.0 if cfg["model"] == "cnn" else 1.0
    if cfg["norm"] in ("batch", "renorm", "ghost", "noisy_batch"):
        # ghost BN makes one normalization call per ghost batch, each with its own overhead
        # (simulated workers share one call)
        chunks = cfg["batch_size"] // cfg["virtual_batch"] if cfg["norm"] == "ghost" else 1
        per_step *= 2.0 + 0.5 * (chunks - 1)
    steps = cfg["steps"] + cfg["evals"]  # an evaluation costs about a step
    if cfg["probe_every"]:
        # a probe: a forward and backward per layer and per step size
        steps += cfg["steps"] / cfg["probe_every"] * (2 * cfg["depth"] + 6)
    return steps * per_step


_DATA: Dataset | None = None


def _init_worker(data: Dataset) -> None:
    global _DATA
    import torch

    torch.set_num_threads(1)
    _DATA = data


def _work(cfg: dict) -> tuple[dict, float]:
    start = time.perf_counter()
    metrics = train.train(cfg, _DATA)
    return metrics, time.perf_counter() - start


def _ray_work(cfg: dict, data: Dataset, code: str) -> tuple[dict, float]:
    """One run on a Ray worker, single-threaded like a pool worker. A worker whose batchnorm
    source differs from the driver's would cache its numbers under the driver's code hash, so it
    refuses to run."""
    import torch

    if code_fingerprint() != code:
        raise RuntimeError(f"--ray: this worker's batchnorm source (hash {code_fingerprint()}, "
                           f"version {batchnorm.__version__}) differs from the driver's (hash "
                           f"{code}); install the same batchnorm on every node")
    torch.set_num_threads(1)
    global _DATA
    _DATA = data
    return _work(cfg)


# a run's share of a GPU on a Ray cluster: the lab's models are small, so four share one
RAY_GPU_SHARE = 0.25


def _pool_results(pending: list[str], todo: dict[str, dict], data: Dataset, jobs: int):
    """(run id, metrics, seconds) as the local process pool finishes them."""
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=ctx,
                                initializer=_init_worker, initargs=(data,)) as pool:
        futures = {pool.submit(_work, todo[rid]): rid for rid in pending}
        try:
            for fut in cf.as_completed(futures):
                yield (futures[fut], *fut.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _ray_results(pending: list[str], todo: dict[str, dict], data: Dataset, address: str):
    """(run id, metrics, seconds) as the Ray cluster at `address` finishes them ("local": a
    fresh single-machine instance). The driver alone writes the cache, so results merge into
    it exactly as the pool's do."""
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("--ray needs ray: pip install 'batchnorm[ray]'") from e
    ray.init(address=None if address == "local" else address, log_to_driver=False,
             include_dashboard=False, configure_logging=False)
    try:
        remote = ray.remote(_ray_work)
        data_ref = ray.put(data)
        code = code_fingerprint()
        refs = {}
        for rid in pending:
            gpus = RAY_GPU_SHARE if todo[rid]["device"].startswith("cuda") else 0
            refs[remote.options(num_cpus=1, num_gpus=gpus).remote(todo[rid], data_ref, code)] = rid
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                yield (refs.pop(ref), *ray.get(ref))
    finally:
        ray.shutdown()


def _load_cached(path: Path, cfg: dict) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record["metrics"] if record.get("config") == cfg else None


def execute(groups: dict[str, list[dict]], data: Dataset, out: Path, jobs: int, fresh: bool,
            progress=None, ray_address: str | None = None) -> dict[str, dict]:
    """Runs every configuration not in the cache, in a local process pool or on the Ray cluster at
    `ray_address`; returns run id -> {"config", "metrics"}."""
    cache = out / "cache"
    todo: dict[str, dict] = {}
    group_of: dict[str, int] = {}
    for i, cfgs in enumerate(groups.values()):
        for cfg in cfgs:
            rid = run_id(cfg, data)
            todo[rid] = cfg
            group_of.setdefault(rid, i)
    done: dict[str, dict] = {}
    if not fresh:
        for rid, cfg in todo.items():
            metrics = _load_cached(cache / f"{rid}.json", cfg)
            if metrics is not None:
                done[rid] = {"config": cfg, "metrics": metrics}
    # claim by claim, so an interrupted lab has whole claims to show; within a claim the longest
    # runs first, so the pool does not end waiting on one long run
    pending = sorted((rid for rid in todo if rid not in done),
                     key=lambda r: (group_of[r], -_cost(todo[r])))
    if progress is not None:
        progress.start(len(todo), len(done), sum(_cost(c) for c in todo.values()),
                       sum(_cost(todo[r]) for r in done))
    if pending:
        results = (_ray_results(pending, todo, data, ray_address) if ray_address else
                   _pool_results(pending, todo, data, jobs))
        for rid, metrics, seconds in results:
            record = {"id": rid, "config": todo[rid], "data": data.describe(),
                      "version": batchnorm.__version__, "metrics": metrics,
                      "seconds": round(seconds, 3)}
            atomic_write(cache / f"{rid}.json", json.dumps(record))
            done[rid] = {"config": todo[rid], "metrics": metrics}
            if progress is not None:
                progress.advance(_cost(todo[rid]))
    return done


class Progress:
    """A rich progress bar: runs done of total and the time left, weighted by estimated cost."""

    def __init__(self) -> None:
        from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._bar = Progress(TextColumn("lab"), BarColumn(),
                             TextColumn("{task.fields[runs]}/{task.fields[total_runs]} runs"),
                             TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
        self._task = None

    def start(self, total_runs: int, done_runs: int, total_cost: float, done_cost: float) -> None:
        self._bar.start()
        self._task = self._bar.add_task("lab", total=total_cost, completed=done_cost,
                                        runs=done_runs, total_runs=total_runs)

    def advance(self, cost: float) -> None:
        runs = self._bar.tasks[0].fields["runs"] + 1
        self._bar.update(self._task, advance=cost, runs=runs)

    def stop(self) -> None:
        if self._task is not None:
            self._bar.stop()


def run_lab(data: Dataset, claims: list[str], seeds: int, quick: bool, jobs: int, out: Path,
            fresh: bool, show_progress: bool = True, device: str = "cpu",
            ray_address: str | None = None) -> dict:
    """Everything `batchnorm lab` does after parsing its arguments; returns results.json's dict."""
    from batchnorm.lab import report

    start = time.perf_counter()
    groups = plan(claims, quick, seeds, device)
    progress = Progress() if show_progress else None
    try:
        done = execute(groups, data, out, jobs, fresh, progress, ray_address)
    finally:
        if progress is not None:
            progress.stop()
    runs = {g: [done[run_id(c, data)] for c in cfgs] for g, cfgs in groups.items()}
    results = report.write(out, data, runs, claims, seeds, quick,
                           wall_seconds=time.perf_counter() - start)
    return results
