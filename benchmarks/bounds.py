"""What issue 3's targets ask of any kernel behind a Python autograd.Function, measured.

    .venv/bin/python benchmarks/bounds.py [--runs 15] [--threads 2] [--out PATH]

For each training case of benchmarks/kernels.py (fwd+bwd, and BN+ReLU in NCHW) this times, in
the same interleaved loop, torch.nn, ours, and `FlatPasses`: an autograd.Function that moves
exactly the bytes of the minimal passes with torch's own flat kernels and does no math
(forward: y = copy of x, one read and one write; backward: dx = x + dy, two reads and a write;
outputs from our pool, as ours). It stands for batch-norm kernels running at the speed of
torch's flat elementwise ops, with the least Python a custom autograd.Function can have. So

- torch / flat: the ratio such kernels would reach against torch.nn, the attainable ceiling of
  the "N x faster than eager" targets for this design;
- flat / floor: how far they sit from the memory floor as benchmarks/kernels.py measures it
  (`kernels.floors`: the fastest of back-to-back copies of the tensor, which stay in the L3 when
  it fits), the ceiling of the "within 2x of the floor" target; bare / floor: the same two torch
  kernels called bare, without autograd or any Python around them;
- x / dram: the same against the floor at DRAM copy bandwidth (a tensor 4x the L3).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import kernels as bench  # noqa: E402  (benchmarks/kernels.py: the cases and the timing)

from batchnorm.kernels import cpu_memory  # noqa: E402


TIMES = ("torch", "ours", "flat", "bare", "floor", "dram")
RATIOS = (("torch", "ours"), ("torch", "flat"), ("ours", "floor"), ("flat", "floor"),
          ("bare", "floor"), ("ours", "dram"), ("flat", "dram"), ("bare", "dram"))


class FlatPasses(torch.autograd.Function):
    """y = x and dx = x + dy: the minimal passes' bytes at torch's flat-op speed, no math."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x)
        return cpu_memory.empty_like(x).copy_(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        channels = x.shape[1]
        return (torch.add(x, dy, out=cpu_memory.empty_like(x)), torch.empty(channels),
                torch.empty(channels))


def bare_passes(x, dy):
    def run():
        cpu_memory.empty_like(x).copy_(x)
        torch.add(x, dy, out=cpu_memory.empty_like(x))
    return run


def flat_step(x, dy):
    weight = torch.ones(x.shape[1], requires_grad=True)
    bias = torch.zeros(x.shape[1], requires_grad=True)

    def run():
        y = FlatPasses.apply(x, weight, bias)
        x.grad = weight.grad = bias.grad = None
        y.backward(dy)
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "bounds-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = bench.machine()
    dram_rate = bench.dram_copy(info, args.runs)
    cases = [(s, name, fmt, "train fwd+bwd") for s in bench.SHAPES
             for name, fmt in bench.layouts(s).items()]
    cases += [(s, name, fmt, "BN+ReLU fwd+bwd") for s in bench.SHAPES
              for name, fmt in list(bench.layouts(s).items())[:1]]
    columns = [f"{t}_ms" for t in TIMES] + [f"{a}_over_{b}" for a, b in RATIOS]
    header = f"{'case':<40}" + "".join(f" {c.replace('_over_', '/'):>11}" for c in columns)
    print(f"# {info['cpu']}, {args.threads} threads, medians of {args.runs} interleaved runs; "
          f"dram = floor at the copy bandwidth of a {info['dram_copy']['bytes'] >> 20} MB tensor")
    print(header)
    print("-" * len(header))
    rows = []
    for shape, lname, fmt, mode in cases:
        x, run_ours, run_torch, grad = bench.setup(shape, fmt, mode)
        dy = torch.randn(shape).contiguous(memory_format=fmt)
        with grad:
            medians, _ = bench.median_times(
                [run_torch, run_ours, flat_step(x, dy), bare_passes(x.detach(), dy)], args.runs)
        floors = bench.floors(x, bench.MODES[mode], args.runs, dram_rate)
        label = f"{mode} {'x'.join(map(str, shape))} {lname}"
        times = dict(zip(TIMES, medians + list(floors)))
        row = {"case": label, "mode": mode, "shape": list(shape), "layout": lname}
        row.update({f"{k}_ms": t * 1e3 for k, t in times.items()})
        row.update({f"{a}_over_{b}": times[a] / times[b] for a, b in RATIOS})
        rows.append(row)
        print(f"{label:<40}" + "".join(f" {row[c]:11.3f}" for c in columns), flush=True)
    summary = summarize(rows)
    print()
    for key, value in summary.items():
        print(f"{key:<66} {value:.2f}")
    bench.write_results(args.out, info, runs=args.runs, rows=rows, summary=summary)


def summarize(rows):
    """Issue 3's medians, for ours and for the flat passes."""
    def med(mode, layouts_, key):
        return statistics.median(r[key] for r in rows if r["mode"] == mode
                                 and r["layout"] in layouts_)
    first, last = ("NCHW", "NCDHW", "NC"), ("NHWC", "NDHWC")
    out = {}
    for what, layouts_, mode, target in (
            ("train fwd+bwd, NCHW", first, "train fwd+bwd", ">= 2.5"),
            ("train fwd+bwd, channels-last", last, "train fwd+bwd", ">= 1.5"),
            ("BN+ReLU fwd+bwd, NCHW", first, "BN+ReLU fwd+bwd", ">= 3.5")):
        out[f"median torch/ours {what} (target {target})"] = med(mode, layouts_, "torch_over_ours")
        out[f"  median torch/flat {what}: the ceiling"] = med(mode, layouts_, "torch_over_flat")
    for key in ("ours_over_floor", "flat_over_floor", "bare_over_floor"):
        out[f"median {key.split('_')[0]}/floor train fwd+bwd, all layouts (target <= 2)"] = med(
            "train fwd+bwd", first + last, key)
    for key in ("ours_over_dram", "flat_over_dram", "bare_over_dram"):
        out[f"  same, {key.split('_')[0]}/DRAM floor"] = med("train fwd+bwd", first + last, key)
    return out


if __name__ == "__main__":
    main()
