"""Training step of real models, torch.nn's batch norm vs ours: one table of medians.

    .venv/bin/python benchmarks/models.py [--runs 15] [--threads 2] [--batch 16] [--size 64]
                                          [--quick] [--out PATH]

Models from transformers configs, random init, built offline: ResNet-10 (ResNet-18's basic
blocks, one per stage), MobileNetV2 and EfficientNet-B0, each with a 10-class head
(cross-entropy on fixed random labels). For each model and layout (NCHW, channels-last) three
copies of the same weights run interleaved in one loop: `torch` (torch.nn.BatchNorm2d, as
transformers builds it), `batchnorm` (`batchnorm.convert(model, to="batchnorm")`) and `act`
(`convert(to="act")`: the activation after each batch norm fused into it). A step is forward,
loss, backward, SGD step and zero_grad. Medians of --runs steps after 3 warm-up steps (the first
call of our kernels compiles or loads them from Numba's cache); ratio = torch / ours (> 1: ours
faster), ratio of fastest = the same for the fastest step of each. Results go to
results/models-cpu.json with the machine description; --quick (MobileNetV2 only, batch 8, 32x32,
5 runs) writes only with --out.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as bench  # noqa: E402  (benchmarks/kernels.py: the timing and the results writer)

import batchnorm  # noqa: E402

VARIANTS = ("batchnorm", "act")
LAYOUTS = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}
LABELS = 10


def build(name):
    """A transformers image classifier with random weights, from its config alone."""
    import transformers as tf

    configs = {
        # ResNet-18's blocks and widths, one block a stage: a step stays well under a second.
        "ResNet-10": lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
            layer_type="basic", depths=[1, 1, 1, 1], hidden_sizes=[64, 128, 256, 512],
            num_labels=LABELS)),
        "MobileNetV2": lambda: tf.MobileNetV2ForImageClassification(tf.MobileNetV2Config(
            num_labels=LABELS)),
        # EfficientNetConfig() is B7; width and depth 1.0 with a 1280-wide head are B0.
        "EfficientNet-B0": lambda: tf.EfficientNetForImageClassification(tf.EfficientNetConfig(
            width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280, num_labels=LABELS)),
    }
    return configs[name]()


def setup(name, fmt, batch, size):
    """The three models (torch, batchnorm, act) of one case, each with its step, and the number
    of layers each conversion changed."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    labels = torch.randint(0, LABELS, (batch,))
    model = build(name).to(memory_format=fmt).train()
    models, changed = {"torch": model}, {}
    for variant in VARIANTS:
        models[variant], changes = batchnorm.convert(
            copy.deepcopy(model), to=variant, example_input=x if variant == "act" else None)
        changed[variant] = len(changes)
    return {v: training_step(m, x, labels) for v, m in models.items()}, changed


def training_step(model, x, labels):
    # A small rate: steps on random labels should not drive the weights anywhere unusual.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        model(pixel_values=x, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--quick", action="store_true",
                        help="MobileNetV2 only, batch 8, 32x32 images, 5 runs")
    parser.add_argument("--out", help="results file (default: results/models-cpu.json, none "
                                      "with --quick)")
    args = parser.parse_args(argv)
    names = ["ResNet-10", "MobileNetV2", "EfficientNet-B0"]
    if args.quick:
        names, args.batch, args.size, args.runs = ["MobileNetV2"], 8, 32, 5
    out = bench.results_path(args.out, args.quick, "models-cpu.json")
    torch.set_num_threads(args.threads)
    info = bench.machine()
    print(f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} threads, "
          f"batch {args.batch}x3x{args.size}x{args.size}, training step (forward, cross-entropy, "
          f"backward, SGD), medians of {args.runs} interleaved steps; ratio = torch / ours (> 1: "
          f"ours faster); load average {info['loadavg_start'][0]:.1f}")
    header = (f"{'model':<16} {'layout':<14} {'variant':<10} {'layers':>6} {'ours ms':>9} "
              f"{'torch ms':>9} {'ratio':>6} {'ratio of fastest':>16}")
    print(header)
    print("-" * len(header))
    rows = []
    for name in names:
        for layout, fmt in LAYOUTS.items():
            steps, changed = setup(name, fmt, args.batch, args.size)
            medians, fastest = bench.median_times(list(steps.values()), args.runs)
            median, best = dict(zip(steps, medians)), dict(zip(steps, fastest))
            for variant in VARIANTS:
                row = {"model": name, "layout": layout, "variant": variant,
                       "layers_converted": changed[variant],
                       "ours_ms": median[variant] * 1e3, "torch_ms": median["torch"] * 1e3,
                       "ratio": median["torch"] / median[variant],
                       "ours_min_ms": best[variant] * 1e3, "torch_min_ms": best["torch"] * 1e3,
                       "ratio_of_mins": best["torch"] / best[variant]}
                rows.append(row)
                print(f"{name:<16} {layout:<14} {variant:<10} {row['layers_converted']:6d} "
                      f"{row['ours_ms']:9.1f} {row['torch_ms']:9.1f} {row['ratio']:6.2f} "
                      f"{row['ratio_of_mins']:16.2f}", flush=True)
    summary = {f"median ratio {variant}, {layout}": statistics.median(
        r["ratio"] for r in rows if r["variant"] == variant and r["layout"] == layout)
        for variant in VARIANTS for layout in LAYOUTS}
    summary["min ratio over all cases"] = min(r["ratio"] for r in rows)
    summary["min ratio of fastest over all cases"] = min(r["ratio_of_mins"] for r in rows)
    print()
    for key, value in summary.items():
        print(f"{key:<40} {value:.2f}")
    if out:
        bench.write_results(out, info, runs=args.runs, batch=args.batch, size=args.size,
                            labels=LABELS, rows=rows, summary=summary)


if __name__ == "__main__":
    main()
