"""Batch-norm kernels vs torch.nn eager on CPU: one table of medians, written to results/.

    .venv/bin/python benchmarks/kernels.py [--runs 11] [--threads 2] [--quick] [--out PATH]

For every case (shape x layout x mode) `setup` builds the inputs once; the speed of `ours`
(batchnorm's layers / functional) and `torch` (torch.nn.BatchNorm*, followed by torch.relu or
silu for the BN+ReLU and BN+SiLU modes) is timed alternately on the same tensors, and the memory
floor is the time of the minimal passes over the tensor (2 forward: read x, write y; 5
forward+backward: + read dy, read x, write dx) at the copy bandwidth measured on a tensor of the
same size in the same run (`dst.copy_(src)` moves 2 passes; its fastest run). Every timed call
allocates its outputs, as a training step does, so allocation and first-touch page faults count
against both providers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import batchnorm
from batchnorm import functional as BF

SHAPES = [(32, 64, 56, 56), (64, 256, 14, 14), (256, 128, 8, 8), (8, 32, 112, 112),
          (32, 2048, 7, 7), (512, 1024), (16, 64, 32, 32, 8)]
SMALL = [(100, 100), (32, 16, 8, 8)]
# A small case's call takes ~0.2 ms, where a scheduler hiccup of the same size moves a median of
# 15: those cases take this many times the runs (a second at most).
SMALL_RUNS_FACTOR = 20
MODES = {"train fwd": 2, "train fwd+bwd": 5, "eval fwd": 2, "BN+ReLU fwd+bwd": 5,
         "BN+SiLU fwd+bwd": 5}
# The epilogue modes: our fused (or, per `kernels.fused_activations`, unfused) activation against
# torch.nn's batch norm followed by torch's op.
EPILOGUES = {"BN+ReLU fwd+bwd": ("relu", torch.relu),
             "BN+SiLU fwd+bwd": ("silu", torch.nn.functional.silu)}
LAYER = {2: (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d), 3: (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d),
         4: (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d), 5: (batchnorm.BatchNorm3d, torch.nn.BatchNorm3d)}


def layouts(shape):
    if len(shape) == 4:
        return {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
    if len(shape) == 5:
        return {"NCDHW": torch.contiguous_format, "NDHWC": torch.channels_last_3d}
    return {"NC": torch.contiguous_format}


def setup(shape, fmt, mode):
    """The tensors and the two callables of one case; shared by the speed and floor measures."""
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(mode.endswith("bwd"))
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    ours_cls, torch_cls = LAYER[len(shape)]
    ours, ref = ours_cls(shape[1]), torch_cls(shape[1])
    training = not mode.startswith("eval")
    ours.train(training)
    ref.train(training)
    act, torch_act = EPILOGUES.get(mode, ("identity", None))

    def run_ours():
        if torch_act is not None:
            y = BF.batch_norm(x, ours.running_mean, ours.running_var, ours.weight, ours.bias,
                              True, ours.momentum, ours.eps,
                              num_batches_tracked=ours.num_batches_tracked, activation=act)
        else:
            y = ours(x)
        if x.requires_grad:
            x.grad = ours.weight.grad = ours.bias.grad = None
            y.backward(dy)

    def run_torch():
        y = ref(x)
        if torch_act is not None:
            y = torch_act(y)
        if x.requires_grad:
            x.grad = ref.weight.grad = ref.bias.grad = None
            y.backward(dy)

    grad = torch.enable_grad() if x.requires_grad else torch.no_grad()
    return x, run_ours, run_torch, grad


def median_times(fns, runs, warmup=3, stat=statistics.median):
    """Medians (s) of `runs` timed calls of each fn, interleaved so load drifts hit all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, samples):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [stat(s) for s in samples], [min(s) for s in samples]


def copy_time(x, runs):
    """The fastest of `runs` copies of x: the floor is a lower bound, and a median copy time
    swung 3x between cases of the same size on this VM."""
    src = x.detach().clone()
    dst = torch.empty_like(src)
    _, (t,) = median_times([lambda: dst.copy_(src)], runs)
    return t


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    import numba
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0], "torch": torch.__version__,
            "numba": numba.__version__, "batchnorm": batchnorm.__version__,
            "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="first shape and the small ones only")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "kernels-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    cases = [(s, name, fmt, mode) for s in (SHAPES[:1] if args.quick else SHAPES)
             for name, fmt in layouts(s).items() for mode in MODES]
    cases += [(s, name, fmt, "train fwd+bwd") for s in SMALL for name, fmt in list(layouts(s).items())[:1]]
    print(f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']}, numba {info['numba']}, "
          f"{args.threads} threads, medians of {args.runs} runs ({args.runs * SMALL_RUNS_FACTOR} for "
          f"the small cases); ratio = torch / ours (> 1: ours "
          f"faster); floor = minimal passes at this run's copy bandwidth; min ratio = ratio of the "
          f"fastest runs (less sensitive to other processes on the cores); load average "
          f"{info['loadavg_start'][0]:.1f}")
    header = (f"{'case':<44} {'ours ms':>9} {'torch ms':>9} {'ratio':>6} {'floor ms':>9} "
              f"{'ours/floor':>10} {'min ratio':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    for shape, lname, fmt, mode in cases:
        x, run_ours, run_torch, grad = setup(shape, fmt, mode)
        runs = args.runs * (SMALL_RUNS_FACTOR if shape in SMALL else 1)
        with grad:
            (t_ours, t_torch), (min_ours, min_torch) = median_times([run_ours, run_torch], runs)
        floor = copy_time(x, args.runs) * MODES[mode] / 2
        label = f"{mode} {'x'.join(map(str, shape))} {lname}"
        row = {"case": label, "mode": mode, "shape": list(shape), "layout": lname,
               "ours_ms": t_ours * 1e3, "torch_ms": t_torch * 1e3, "ratio": t_torch / t_ours,
               "floor_ms": floor * 1e3, "ours_over_floor": t_ours / floor,
               "ours_min_ms": min_ours * 1e3, "torch_min_ms": min_torch * 1e3,
               "ratio_of_mins": min_torch / min_ours}
        rows.append(row)
        print(f"{label:<44} {row['ours_ms']:9.3f} {row['torch_ms']:9.3f} {row['ratio']:6.2f} "
              f"{row['floor_ms']:9.3f} {row['ours_over_floor']:10.2f} {row['ratio_of_mins']:9.2f}",
              flush=True)
    summary = summarize(rows)
    print()
    for key, value in summary.items():
        print(f"{key:<58} {value:.2f}")
    if not args.quick:
        write_results(args.out, info, args.runs, rows, summary)


def write_results(path, info, runs, rows, summary):
    """The run as JSON at `path`, atomically: a crash mid-write keeps the old results."""
    info["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as f:
        json.dump({"machine": info, "runs": runs, "rows": rows, "summary": summary}, f, indent=1)
    os.replace(partial, path)
    print(f"wrote {path}")


def summarize(rows):
    """The medians over the shape set that issue 3's acceptance reads."""
    def med(mode, layouts_, key):
        vals = [r[key] for r in rows if r["mode"] == mode and r["layout"] in layouts_
                and tuple(r["shape"]) in SHAPES]
        return statistics.median(vals) if vals else float("nan")
    channels_first, channels_last = ("NCHW", "NCDHW", "NC"), ("NHWC", "NDHWC")
    out = {
        "median ratio train fwd+bwd, NCHW (target >= 2.5)": med("train fwd+bwd", channels_first, "ratio"),
        "median ratio train fwd+bwd, channels-last (target >= 1.5)": med("train fwd+bwd", channels_last, "ratio"),
        "median ratio BN+ReLU fwd+bwd, NCHW (target >= 3.5)": med("BN+ReLU fwd+bwd", channels_first, "ratio"),
        "median ours/floor train fwd+bwd, all layouts (target <= 2)": med("train fwd+bwd", channels_first + channels_last, "ours_over_floor"),
        "min ratio over all cases (target >= 1)": min(r["ratio"] for r in rows),
        "median ratio BN+SiLU fwd+bwd, NCHW (no target)": med("BN+SiLU fwd+bwd", channels_first, "ratio"),
    }
    out.update({
        "  same, ratio of fastest runs: train fwd+bwd, NCHW": med("train fwd+bwd", channels_first, "ratio_of_mins"),
        "  same, ratio of fastest runs: train fwd+bwd, channels-last": med("train fwd+bwd", channels_last, "ratio_of_mins"),
        "  same, ratio of fastest runs: BN+ReLU fwd+bwd, NCHW": med("BN+ReLU fwd+bwd", channels_first, "ratio_of_mins"),
        "  same, ratio of fastest runs: min over all cases": min(r["ratio_of_mins"] for r in rows),
    })
    for r in rows:
        if tuple(r["shape"]) in SMALL:
            out[f"ratio small {r['case']} (target >= 1)"] = r["ratio"]
            out[f"  same for {r['case']}, ratio of fastest runs"] = r["ratio_of_mins"]
    return out


if __name__ == "__main__":
    main()
