"""The machine profile: measured timings from which `dispatch.choose` picks aten or ours.

Whether aten (torch.nn's kernel) or our Numba kernels win a CPU call depends on the machine and
on the shape, not on a size alone: small calls are overhead-bound (a Python autograd.Function
and kernel host code cost more than torch.nn's whole step), large ones memory-bound (our fused
kernels make fewer passes), and in between caches, vector tails and torch's per-plane loop
(a many-channel 2x2 NCHW map is slow there at any size) move the crossover in ways no simple
formula follows. So the profile is a table: for each mode (training step, fused eval call) and
layout, aten's and our time on a sweep of shapes like real networks' layers (ResNet's,
MobileNetV2's, MLPs'), small to memory-bound. A call is placed in the plane of

    (log2 values, log2 run)    run = the contiguous inner length: H*W for NCHW, C otherwise

and takes the backend that the inverse-distance-weighted mean of log(aten / ours) of its two
nearest measured shapes favours; a tie goes to aten, torch.nn's own kernel.

`batchnorm tune` (`measure()`) times the sweep and stores the table in the user cache
directory, keyed by the machine's description; without one for this machine,
`default-profile.json` beside this file applies: the same measurement, made on the 2-core EPYC
of `benchmarks/results`.

Accuracy is not the profile's business: the aten route only ever takes training batches where
its fp32 sums are as accurate as ours, whatever the timings say (`aten_accurate`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

MODES = ("train", "eval_fused")
LAYOUTS = ("nchw", "channels_last", "rows")
BACKENDS = ("aten", "numba")

# The most values per channel a channels-last or (N, C) fp32 training batch may have on the aten
# route. torch's kernel sums those layouts in fp32 row by row, and its error grows with the sum's
# length and the channel's |mean| / std: at 16384 values per channel and |mean| = 3 std it stays
# within 1e-5 of the output, at 32768 it reaches 1.7e-5, at 131072 and mean 0 3e-5 (measured,
# torch 2.13, against the float64 reference; ours stays below 1e-6). Contiguous NCHW sums are
# within 2e-6 at any size, fp64 ones at any size and layout.
ATEN_ACCURATE_VALUES_PER_CHANNEL = 1 << 14

_DEFAULTS = Path(__file__).with_name("default-profile.json")
_MAX_DECIDED = 4096
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


@dataclasses.dataclass(frozen=True)
class Timing:
    """One measured shape: its values and contiguous run (the module docstring), and the median
    seconds of aten's call and ours."""

    values: int
    run: int
    aten: float
    numba: float


@dataclasses.dataclass(frozen=True)
class Profile:
    """timings["train/nchw"] are the training steps (forward and backward) of contiguous NCHW
    batches, and so on for every mode x layout of MODES, LAYOUTS."""

    timings: dict[str, tuple[Timing, ...]]
    machine: str = "defaults"
    # (training, fused, dtype, shape, strides) -> backend: a network repeats a few dozen shapes,
    # and a call must cost about what torch.nn's does, so each is decided once.
    _decided: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def backend(self, x: Tensor, training: bool, fused: bool) -> str:
        """"aten" or "numba" for a CPU fp32/fp64 call on x: eval with nothing fused is one affine
        pass whoever runs it, so torch's; a training batch whose statistics aten's fp32 sums
        would get less accurately than ours (`aten_accurate`), ours; otherwise the faster by
        the measurements nearest to x's shape (`faster`). Strides that neither kernel reads
        contiguously go to torch's."""
        key = (training, fused, x.dtype, x.shape, x.stride())
        decided = self._decided.get(key)
        if decided is None:
            if len(self._decided) >= _MAX_DECIDED:  # dynamic shapes: forget, don't grow
                self._decided.clear()
            decided = self._decided[key] = self._decide(x, training, fused)
        return decided

    def _decide(self, x: Tensor, training: bool, fused: bool) -> str:
        layout = dense_layout(x)
        if layout is None or not (training or fused):
            return "aten"
        if training and not aten_accurate(x, layout):
            return "numba"
        return self.faster("train" if training else "eval_fused", layout, x)

    def faster(self, mode: str, layout: str, x: Tensor) -> str:
        """"aten" or "numba": the backend the measurements nearest to x's shape favour."""
        return self._interpolate(mode, layout, x.numel(),
                                 _spatial(x) if layout == "nchw" else x.shape[1])

    def _interpolate(self, mode: str, layout: str, values: int, run: int) -> str:
        here = (math.log2(values), math.log2(run))
        nearest = sorted(((math.dist(here, (math.log2(t.values), math.log2(t.run))), t)
                          for t in self.timings[f"{mode}/{layout}"]), key=lambda d_t: d_t[0])[:2]
        weights = [1 / (distance + 1e-3) for distance, _ in nearest]
        log_ratio = sum(w * math.log(t.aten / t.numba) for w, (_, t) in zip(weights, nearest))
        return "aten" if log_ratio <= 0 else "numba"

    def to_json(self) -> dict:
        return {"machine": self.machine,
                "timings": {key: [dataclasses.asdict(t) for t in rows]
                            for key, rows in self.timings.items()}}

    @classmethod
    def from_json(cls, stored: dict) -> Profile:
        timings = {key: tuple(Timing(**t) for t in rows)
                   for key, rows in stored["timings"].items()}
        missing = {f"{m}/{lay}" for m in MODES for lay in LAYOUTS} - {
            key for key, rows in timings.items() if rows}
        if missing:
            raise ValueError(f"profile: no timings for {', '.join(sorted(missing))}")
        return cls(timings=timings, machine=stored["machine"])


def _spatial(x: Tensor) -> int:
    spatial = 1
    for size in x.shape[2:]:
        spatial *= size
    return spatial


def dense_layout(x: Tensor) -> str | None:
    """"nchw" (contiguous, spatial > 1), "rows" ((N, C), or contiguous with spatial size 1),
    "channels_last", or None for any other strides."""
    if x.is_contiguous():
        return "nchw" if x.ndim > 2 and _spatial(x) > 1 else "rows"
    fmt = _CHANNELS_LAST.get(x.ndim)
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return "channels_last"
    return None


def aten_accurate(x: Tensor, layout: str) -> bool:
    """Whether torch's training kernel computes x's statistics as accurately as ours."""
    return (layout == "nchw" or x.dtype == torch.float64
            or x.numel() // x.shape[1] <= ATEN_ACCURATE_VALUES_PER_CHANNEL)


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
def defaults() -> Profile:
    """The profile measured on the machine of `benchmarks/results` (`default-profile.json`)."""
    return Profile.from_json(json.loads(_DEFAULTS.read_text()))


@functools.cache
def current() -> Profile:
    """This machine's stored profile, or the defaults (no file, another machine's, unreadable)."""
    try:
        stored = json.loads(path().read_text())
        if stored.get("machine") == machine():
            return Profile.from_json(stored)
    except (OSError, ValueError, TypeError, KeyError):
        pass
    return defaults()


def triton_wins(x: Tensor) -> bool:
    """Whether the Triton kernels measured faster than torch's for x's class (layout, dtype,
    path) in the committed `benchmarks/results/kernels-cuda.json`; no measurement: False."""
    from batchnorm.kernels import cuda
    return cuda.path_key(x) in cuda.WINS


# The sweep: shapes of real networks' batch norms (ResNet's stem and stages, MobileNetV2's
# expanded and many-channel 8x8, 4x4 and 2x2 maps, at batch 16 and at large batches) and of
# MLPs, small to memory-bound.
SWEEP = {
    "nchw": [(8, 16, 8, 8), (16, 64, 4, 4), (16, 160, 2, 2), (16, 960, 2, 2), (16, 1280, 2, 2),
             (16, 384, 4, 4), (16, 576, 4, 4), (16, 32, 8, 8), (16, 192, 8, 8), (16, 24, 16, 16),
             (16, 96, 16, 16), (16, 144, 16, 16), (16, 16, 32, 32), (16, 32, 32, 32),
             (16, 96, 32, 32), (32, 64, 56, 56), (128, 1280, 2, 2), (128, 960, 4, 4),
             (64, 512, 8, 8), (32, 1024, 7, 7)],
    "rows": [(64, 256), (512, 1024), (4096, 256), (16384, 64), (65536, 32)],
}
SWEEP["channels_last"] = SWEEP["nchw"]


def _call(backend: str, mode: str, x: Tensor, dy: Tensor, layer: torch.nn.Module) -> float:
    from batchnorm import functional
    from batchnorm.kernels.dispatch import use_backend
    with use_backend(backend):
        start = time.perf_counter()
        if mode == "train":
            layer(x).backward(dy)
        else:
            with torch.no_grad():
                functional.batch_norm(x, layer.running_mean, layer.running_var, layer.weight,
                                      layer.bias, activation="relu")
        return time.perf_counter() - start


def _timings(mode: str, layout: str, runs: int, max_values: int, report) -> tuple[Timing, ...]:
    """aten's and our median time, of `runs` interleaved calls, for each sweep shape."""
    import batchnorm
    measured = []
    for shape in SWEEP[layout]:
        if torch.Size(shape).numel() > max_values:
            continue
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(mode == "train")
        dy = torch.randn(shape).contiguous(memory_format=fmt)
        layer = (batchnorm.BatchNorm2d if len(shape) == 4 else batchnorm.BatchNorm1d)(shape[1])
        times: dict[str, list[float]] = {backend: [] for backend in BACKENDS}
        for backend in times:  # warm-up: compiles or loads the kernels
            _call(backend, mode, x, dy, layer)
        for _ in range(runs):
            for backend in times:
                times[backend].append(_call(backend, mode, x, dy, layer))
        aten, ours = statistics.median(times["aten"]), statistics.median(times["numba"])
        run = _spatial(x) if layout == "nchw" else shape[1]
        measured.append(Timing(values=x.numel(), run=run, aten=aten, numba=ours))
        report(f"  {mode:<10} {layout:<13} {'x'.join(map(str, shape)):>14}  aten "
               f"{aten * 1e3:8.3f} ms  ours {ours * 1e3:8.3f} ms")
    return tuple(measured)


def measure(report=print, runs: int = 15, max_values: int = 1 << 23) -> Profile:
    """Time aten against our kernels on the sweep (medians of `runs`, batches of up to
    `max_values` values)."""
    return Profile(timings={f"{mode}/{layout}": _timings(mode, layout, runs, max_values, report)
                            for mode in MODES for layout in LAYOUTS}, machine=machine())


def store(measured: Profile, target: Path | None = None) -> Path:
    """Write the profile atomically to `target` (default `path()`); later processes pick it up."""
    target = target or path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(measured.to_json(), tmp, indent=1)
    os.replace(tmp.name, target)
    current.cache_clear()
    return target
