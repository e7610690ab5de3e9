"""The machine profile: the sizes at which `dispatch.choose` moves from torch's kernel to ours.

Whether aten (torch.nn's kernel) or our Numba kernels win a training step depends on the machine:
small batches are overhead-bound (a Python autograd.Function and kernel host code cost more than
torch.nn's whole step), large ones memory-bound (our fused kernels make fewer passes). Where the
crossover lies differs between a 2-core VM, a laptop and a 64-core server, so it is measured there:
`batchnorm tune` (`measure()`) times both on a sweep of sizes and stores the result in the user
cache directory, keyed by the machine's description. Without a profile for this machine the
defaults below apply; they are conservative in that each lets aten take only what it measured
faster at on every machine we have run (the 2-core EPYC of `benchmarks/results`).

Accuracy is not the profile's business: the aten route only ever takes training batches where its
fp32 sums are as accurate as ours (contiguous NCHW, where torch accumulates in double; and small
or short-column batches), whatever the timings say. Channels-last batches above `small_values`
always take ours: aten's unshifted fp32 sums there drift to 2.3e-5 of the output at 100k values per
channel even at mean 0 (measured, torch 2.13).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

# The most values a training batch of any layout may have on the aten route: there aten's fp32
# sums stay within our 1e-5 of the output for |mean| up to a few std (measured, torch 2.13).
_ATEN_ACCURATE_VALUES = 1 << 16


@dataclasses.dataclass(frozen=True)
class Profile:
    """Training batches of at most `small_values` values take aten in every layout; contiguous
    NCHW ones up to `aten_nchw_max_values`; (N, C) ones up to `aten_rows_max` values per
    channel. Defaults measured on a 2-core EPYC (README, docs/kernels.md): a small step is
    ~150 us in torch.nn, our eager path's fixed costs alone ~300 us; (N, C) 512x1024 ran 0.5x on
    our row walk."""

    small_values: int = 1 << 16
    aten_nchw_max_values: int = 1 << 16
    aten_rows_max: int = 1 << 14
    machine: str = "defaults"


def machine() -> str:
    """What a profile is valid for: the CPU, its core count, torch's threads, torch's version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}; {os.cpu_count()} cores; {torch.get_num_threads()} torch threads; "
            f"torch {torch.__version__}; {sys.platform}")


def path() -> Path:
    """$BATCHNORM_PROFILE, else profile.json in the user cache directory ($XDG_CACHE_HOME or
    ~/.cache on Linux and macOS, %LOCALAPPDATA% on Windows)."""
    if os.environ.get("BATCHNORM_PROFILE"):
        return Path(os.environ["BATCHNORM_PROFILE"])
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        base = Path(os.environ["LOCALAPPDATA"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "batchnorm" / "profile.json"


@functools.cache
def current() -> Profile:
    """This machine's stored profile, or the defaults (no file, another machine's, unreadable)."""
    try:
        stored = json.loads(path().read_text())
        if stored.get("machine") == machine():
            fields = {f.name for f in dataclasses.fields(Profile)}
            return Profile(**{k: v for k, v in stored.items() if k in fields})
    except (OSError, ValueError, TypeError):
        pass
    return Profile()


def triton_wins(x: Tensor) -> bool:
    """Whether the Triton kernels measured faster than torch's for x's class (layout, dtype,
    path) in the committed `benchmarks/results/kernels-cuda.json`; no measurement: False."""
    from batchnorm.kernels import cuda
    return cuda.path_key(x) in cuda.WINS


def _step_time(backend: str, x: Tensor, dy: Tensor, layer: torch.nn.Module) -> float:
    from batchnorm.kernels.dispatch import use_backend
    with use_backend(backend):
        start = time.perf_counter()
        layer(x).backward(dy)
        return time.perf_counter() - start


def _aten_wins_up_to(shapes: list[tuple[int, ...]], fmt: torch.memory_format, runs: int,
                     report) -> int:
    """The largest size of `shapes` (ascending) up to which aten's training step was at least as
    fast as ours at every size (0 if never), medians of interleaved runs."""
    import batchnorm
    largest = 0
    for shape in shapes:
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(shape).contiguous(memory_format=fmt)
        layer = batchnorm.BatchNorm2d(shape[1]) if len(shape) == 4 else batchnorm.BatchNorm1d(
            shape[1])
        times: dict[str, list[float]] = {"aten": [], "numba": []}
        for backend in times:  # warm-up: compiles the kernels
            _step_time(backend, x, dy, layer)
        for _ in range(runs):
            for backend in times:
                times[backend].append(_step_time(backend, x, dy, layer))
        aten, ours = statistics.median(times["aten"]), statistics.median(times["numba"])
        report(f"  {'x'.join(map(str, shape)):>16} {str(fmt)[6:]:<18} aten {aten * 1e3:8.3f} ms"
               f"  ours {ours * 1e3:8.3f} ms")
        if aten > ours:
            break
        largest = x.numel()
    return largest


def measure(report=print, runs: int = 15, max_values: int = 1 << 23) -> Profile:
    """Time aten against our kernels on a sweep of training steps (medians of `runs`, batches of
    up to `max_values` values) and return the profile."""
    nchw = [(8, 16, side, side) for side in (8, 16, 32, 64, 128, 256)
            if 8 * 16 * side * side <= max_values]
    rows = [(m, 256) for m in (64, 256, 1024, 4096, 16384, 65536) if m * 256 <= max_values]
    report("NCHW (contiguous)")
    nchw_max = _aten_wins_up_to(nchw, torch.contiguous_format, runs, report)
    report("channels-last")
    last_max = _aten_wins_up_to(nchw, torch.channels_last, runs, report)
    report("(N, C)")
    rows_max = _aten_wins_up_to(rows, torch.contiguous_format, runs, report)
    small = min(max(min(nchw_max, last_max, rows_max), 1 << 12), _ATEN_ACCURATE_VALUES)
    return Profile(small_values=small, aten_nchw_max_values=max(nchw_max, small),
                   aten_rows_max=min(max(rows_max // 256, small // 256), 1 << 14), machine=machine())


def store(measured: Profile) -> Path:
    """Write the profile atomically to `path()`; later processes pick it up."""
    target = path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(dataclasses.asdict(measured), tmp, indent=1)
    os.replace(tmp.name, target)
    current.cache_clear()
    return target
