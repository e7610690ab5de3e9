"""Batch-norm kernels vs torch.nn eager on CPU: one table of medians per kind of input data.

    .venv/bin/python benchmarks/kernels.py [--runs 15] [--threads 2] [--data all] [--quick]
                                           [--out PATH]

For every case (data kind x shape x layout x mode) `setup` builds the inputs once; the speed of
`ours` (batchnorm's layers / functional) and `torch` (torch.nn.BatchNorm*, followed by torch.relu
or silu for the BN+ReLU and BN+SiLU modes) is timed alternately on the same tensors. Every timed
call allocates its outputs, as a training step does, so allocation and first-touch page faults
count against both providers.

The input `x` is one of the kinds in DATA: standard normal, or shifted and scaled per channel as
the inputs of real layers are (synthetic offsets, their relu, or the per-channel mean and std of
a BatchNorm2d input captured in transformers' ResNet-50 and MobileNetV2). Which path our layers
take can depend on the data (aten's kernel is used only where its unshifted sums stay accurate),
so each kind gets its own table and summary, and a last table divides each case's ratio by its
randn ratio.

The memory floor is the time of the minimal passes over the tensor (2 forward: read x, write y;
5 forward+backward: + read dy, read x, write dx), two ways: at the copy bandwidth measured on a
tensor of the same size in the same run (`dst.copy_(src)` moves 2 passes; its fastest run; in
cache when the tensor fits the L3), and at the DRAM copy bandwidth (the fastest copy of a tensor
4x the L3). Results go to results/kernels-cpu.json: rows carry their data kind, the summary is
keyed by data kind. --quick runs the first shape and the small ones and writes only with --out.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import platform
import re
import statistics
import subprocess
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
# The kinds of input data: how each case's x is drawn (dy is always standard normal).
DATA = {
    "randn": "torch.randn",
    "offset": "randn * scale + offset, per channel, offset ~ U(-2, 3), scale ~ U(0.3, 3)",
    "relu-offset": "relu of the offset kind: the input of a batch norm placed after an activation",
    "captured": "randn * std + mean, per channel, with the mean and std of the input of a "
                "BatchNorm2d of transformers' ResNet-50 or MobileNetV2 (random init, train-mode "
                "forward of randn images), resampled to the case's channels",
}
LAYER = {2: (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d), 3: (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d),
         4: (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d), 5: (batchnorm.BatchNorm3d, torch.nn.BatchNorm3d)}


def layouts(shape):
    if len(shape) == 4:
        return {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
    if len(shape) == 5:
        return {"NCDHW": torch.contiguous_format, "NDHWC": torch.channels_last_3d}
    return {"NC": torch.contiguous_format}


def setup(shape, fmt, mode, data="randn"):
    """The tensors and the two callables of one case; shared by the speed and floor measures."""
    torch.manual_seed(0)
    x = inputs(shape, data).contiguous(memory_format=fmt).requires_grad_(mode.endswith("bwd"))
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


def inputs(shape, data):
    """x of one case: standard normal, shifted and scaled per channel for the other kinds."""
    x = torch.randn(shape)
    if data == "randn":
        return x
    mean, std, _ = channel_stats(data, shape[1])
    per_channel = (1, -1) + (1,) * (len(shape) - 2)
    x = x * std.view(per_channel) + mean.view(per_channel)
    return x.relu() if data == "relu-offset" else x


def channel_stats(data, channels):
    """(mean, std, source) per channel of a data kind other than randn."""
    if data in ("offset", "relu-offset"):
        generator = torch.Generator().manual_seed(channels)
        offset = torch.empty(channels).uniform_(-2, 3, generator=generator)
        scale = torch.empty(channels).uniform_(0.3, 3, generator=generator)
        return offset, scale, "synthetic"
    # The nearest channel count; among equals ResNet-50's before MobileNetV2's and the deepest
    # layer, so that a stem (which sees the zero-mean image) is taken only when nothing else fits.
    _, _, source, mean, std = min(
        captured(), key=lambda c: (abs(len(c[3]) - channels), c[0], -c[1]))
    index = torch.arange(channels) * len(mean) // channels
    return mean[index], std[index], source


@functools.cache
def captured():
    """(model rank, depth, source, mean, std) of the input of every BatchNorm2d of transformers'
    ResNet-50 and MobileNetV2, random init, in one forward of 4 randn 224x224 images in training
    mode, so each layer sees what the batch-normalized layers before it give, as in training."""
    from transformers import MobileNetV2Config, MobileNetV2Model, ResNetConfig, ResNetModel

    torch.manual_seed(0)
    stats = []

    def capture(module, args, output, rank, source):
        stats.append((rank, len(stats), source, args[0].mean((0, 2, 3)), args[0].std((0, 2, 3))))

    for rank, (label, model) in enumerate((("ResNet-50", ResNetModel(ResNetConfig())),
                                           ("MobileNetV2", MobileNetV2Model(MobileNetV2Config())))):
        hooks = [m.register_forward_hook(functools.partial(capture, rank=rank,
                                                           source=f"{label} {name}"))
                 for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad():
            model.train()(torch.randn(4, 3, 224, 224))
        for hook in hooks:
            hook.remove()
    return stats


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


def l3_bytes():
    """The L3 cache of the machine in bytes, summed over its instances; None if unknown."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    instances = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu*/cache/index*"):
        try:
            with open(f"{index}/level") as level, open(f"{index}/size") as size, \
                    open(f"{index}/shared_cpu_list") as shared:
                if level.read().strip() == "3":
                    value = size.read().strip()  # "8192K"
                    instances[shared.read().strip()] = (int(value[:-1]) * units[value[-1]]
                                                        if value[-1] in units else int(value))
        except (OSError, ValueError):
            continue
    if instances:
        return sum(instances.values())
    try:
        found = re.search(r"L3 cache:\s+(\d+)", subprocess.run(
            ["lscpu", "-B"], capture_output=True, text=True).stdout)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def dram_copy(info, runs):
    """Seconds per byte of the fastest copy of a tensor 4x the L3 (256 MB when the L3 is
    unknown), recorded in `info`: source and destination together are 8x the L3, so no copy
    reads the last one's data from cache."""
    l3 = l3_bytes()
    nbytes = 4 * l3 if l3 else 256 << 20
    rate = copy_time(torch.ones(nbytes // 4), runs) / nbytes
    info["dram_copy"] = {"bytes": nbytes, "GB_per_s": 2 / rate / 1e9}
    return rate


def floors(x, passes, runs, dram_rate):
    """The case's memory floor (s) two ways: `passes` passes over x at this run's fastest copy
    of a tensor of x's size, and at the DRAM copy rate of `dram_copy` (a copy moves 2 passes)."""
    return copy_time(x, runs) * passes / 2, dram_rate * x.nbytes * passes / 2


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
    parser.add_argument("--data", nargs="+", choices=[*DATA, "all"], default=["all"],
                        help="kinds of input data (default: all)")
    parser.add_argument("--quick", action="store_true", help="first shape and the small ones only")
    parser.add_argument("--out", help="results file (default: results/kernels-cpu.json, none "
                                      "with --quick)")
    args = parser.parse_args(argv)
    out = results_path(args.out, args.quick, "kernels-cpu.json")
    kinds = list(DATA) if "all" in args.data else [k for k in DATA if k in args.data]
    torch.set_num_threads(args.threads)
    info = machine()
    dram_rate = dram_copy(info, args.runs)
    cases = [(s, name, fmt, mode) for s in (SHAPES[:1] if args.quick else SHAPES)
             for name, fmt in layouts(s).items() for mode in MODES]
    cases += [(s, name, fmt, "train fwd+bwd") for s in SMALL for name, fmt in list(layouts(s).items())[:1]]
    print(f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']}, numba {info['numba']}, "
          f"{args.threads} threads, medians of {args.runs} runs ({args.runs * SMALL_RUNS_FACTOR} for "
          f"the small cases); ratio = torch / ours (> 1: ours faster); floor = minimal passes at "
          f"this run's copy bandwidth of a tensor of the case's size, DRAM = at the copy bandwidth "
          f"of a {info['dram_copy']['bytes'] >> 20} MB tensor "
          f"({info['dram_copy']['GB_per_s']:.1f} GB/s moved); "
          f"min ratio = ratio of the fastest runs (less sensitive to other processes on the "
          f"cores); load average {info['loadavg_start'][0]:.1f}")
    rows, summaries = [], {}
    for data in kinds:
        print(f"\n## data: {data} ({DATA[data]})")
        header = (f"{'case':<44} {'ours ms':>9} {'torch ms':>9} {'ratio':>6} {'floor ms':>9} "
                  f"{'ours/floor':>10} {'DRAM ms':>8} {'ours/DRAM':>9} {'min ratio':>9}")
        print(header)
        print("-" * len(header))
        for shape, lname, fmt, mode in cases:
            rows.append(measure(shape, lname, fmt, mode, data, args.runs, dram_rate))
            r = rows[-1]
            print(f"{r['case']:<44} {r['ours_ms']:9.3f} {r['torch_ms']:9.3f} {r['ratio']:6.2f} "
                  f"{r['floor_ms']:9.3f} {r['ours_over_floor']:10.2f} {r['dram_floor_ms']:8.3f} "
                  f"{r['ours_over_dram_floor']:9.2f} {r['ratio_of_mins']:9.2f}", flush=True)
        summaries[data] = summarize([r for r in rows if r["data"] == data])
        print()
        for key, value in summaries[data].items():
            print(f"{key:<66} {value:.2f}")
    versus = versus_randn(rows)
    if versus:
        print_versus(versus)
    if out:
        write_results(out, info, runs=args.runs, data=DATA, rows=rows, summary=summaries,
                      versus_randn=versus)


def measure(shape, lname, fmt, mode, data, runs, dram_rate):
    """One row: the medians and fastest runs of ours and torch, and the two floors."""
    x, run_ours, run_torch, grad = setup(shape, fmt, mode, data)
    case_runs = runs * (SMALL_RUNS_FACTOR if shape in SMALL else 1)
    with grad:
        (t_ours, t_torch), (min_ours, min_torch) = median_times([run_ours, run_torch], case_runs)
    floor, dram_floor = floors(x, MODES[mode], runs, dram_rate)
    return {"case": f"{mode} {'x'.join(map(str, shape))} {lname}", "data": data,
            "data_source": channel_stats(data, shape[1])[2] if data != "randn" else "randn",
            "mode": mode, "shape": list(shape), "layout": lname,
            "ours_ms": t_ours * 1e3, "torch_ms": t_torch * 1e3, "ratio": t_torch / t_ours,
            "floor_ms": floor * 1e3, "ours_over_floor": t_ours / floor,
            "dram_floor_ms": dram_floor * 1e3, "ours_over_dram_floor": t_ours / dram_floor,
            "ours_min_ms": min_ours * 1e3, "torch_min_ms": min_torch * 1e3,
            "ratio_of_mins": min_torch / min_ours}


def versus_randn(rows):
    """{case: {data kind: its ratio / the randn ratio}} for every kind measured besides randn."""
    randn = {r["case"]: r["ratio"] for r in rows if r["data"] == "randn"}
    out = {}
    for r in rows:
        if r["data"] != "randn" and r["case"] in randn:
            out.setdefault(r["case"], {})[r["data"]] = r["ratio"] / randn[r["case"]]
    return out


def print_versus(versus):
    kinds = list(next(iter(versus.values())))
    header = f"{'case':<44}" + "".join(f" {k:>12}" for k in kinds)
    print("\n## ratio of each data kind / randn ratio (< 1: we gain less on that data)")
    print(header)
    print("-" * len(header))
    for case, by_kind in versus.items():
        print(f"{case:<44}" + "".join(f" {by_kind[k]:12.2f}" for k in kinds))
    print(f"{'median':<44}" + "".join(
        f" {statistics.median(v[k] for v in versus.values()):12.2f}" for k in kinds))


def results_path(out, quick, name):
    """Where a run writes: --out if given, else results/`name`; a --quick run only to --out."""
    return out or (None if quick else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", name))


def write_results(path, info, **fields):
    """The run, {"machine": info, **fields}, as JSON at `path`, atomically: a crash mid-write
    keeps the old results."""
    info["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as f:
        json.dump({"machine": info, **fields}, f, indent=1)
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
        "  same, ours/DRAM floor": med("train fwd+bwd", channels_first + channels_last, "ours_over_dram_floor"),
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
