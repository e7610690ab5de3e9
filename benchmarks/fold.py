"""Fold benchmark: eval-time cost of batch norm in a ResNet-50, and what fold() removes.

Cases, all the transformers ResNet-50 config (ResNetConfig() defaults: microsoft/resnet-50's
architecture) with random weights, eval mode, CPU, one 224x224 image batch:
  unfolded  torch.nn BatchNorm2d after every conv (as built by transformers)
  ours      the same with batchnorm.BatchNorm2d (convert(to="batchnorm"))
  folded    fold() applied: convs with bias, batch norms replaced by Identity
  no_bn     the model built without batch norm: every BatchNorm2d replaced by Identity and every
            conv given a bias, so it does the same work as a folded model should

Timing: the cases run round-robin (so load from other jobs spreads over all of them), warm-up
runs first, then the median of --repeats runs each. Prints one table and writes
benchmarks/results/fold.json (atomically) with the machine's description.

    python benchmarks/fold.py [--batch 1] [--repeats 21] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fold.json")


def setup(batch: int):
    """The four models and the input; one setup for every measurement."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    unfolded = ResNetForImageClassification(ResNetConfig()).eval()
    with torch.no_grad():  # non-trivial statistics, so fold has something to fold
        for m in unfolded.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(batch, 3, 224, 224)
    ours, _ = batchnorm.convert(copy.deepcopy(unfolded), to="batchnorm")
    start = time.perf_counter()
    # Random-weight ResNet-50 logits carry ~1e-4 of float32 rounding either way (53 conv/BN
    # layers), so the probe allows 1e-3 of the output scale instead of the default 1e-4.
    folded, report = batchnorm.fold(unfolded, x, tolerance=1e-3)
    fold_seconds = time.perf_counter() - start
    no_bn = copy.deepcopy(unfolded)
    for name, m in list(no_bn.named_modules()):
        if isinstance(m, _BatchNorm):
            parent, _, attr = name.rpartition(".")
            setattr(no_bn.get_submodule(parent), attr, nn.Identity())
        elif isinstance(m, nn.Conv2d) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_channels))
    models = {"unfolded": unfolded, "ours": ours, "folded": folded, "no_bn": no_bn}
    return models, x, report, fold_seconds


def measure(models: dict, x: torch.Tensor, warmup: int, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def write_atomic(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    # one thread: on a shared 2-core machine more threads spin-wait and time the neighbours
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models, x, report, fold_seconds = setup(args.batch)
    times = measure(models, x, args.warmup, args.repeats)
    median = {name: statistics.median(t) for name, t in times.items()}
    # the minimum is the run least disturbed by other jobs on a shared machine; folded and no_bn
    # compute exactly the same layers, so their ratio is 1 up to that noise
    fastest = {name: min(t) for name, t in times.items()}
    rows = [{"case": name, "median_ms": 1e3 * median[name], "min_ms": 1e3 * fastest[name],
             "vs_unfolded": median[name] / median["unfolded"],
             "vs_no_bn": median[name] / median["no_bn"],
             "min_vs_no_bn": fastest[name] / fastest["no_bn"]} for name in models]

    print(f"ResNet-50 (transformers config), eval, CPU, batch {args.batch}x3x224x224, "
          f"{args.threads} threads, median of {args.repeats} after {args.warmup} warm-up")
    print(f"fold(): {len(report.folded)} folded, {len(report.skipped)} skipped, "
          f"{fold_seconds:.2f} s, max probe error {report.max_error:.2e}")
    print(f"{'case':<10} {'median ms':>10} {'vs unfolded':>12} {'vs no_bn':>9} {'min ms':>8} "
          f"{'min vs no_bn':>13}")
    for r in rows:
        print(f"{r['case']:<10} {r['median_ms']:>10.1f} {r['vs_unfolded']:>12.3f} "
              f"{r['vs_no_bn']:>9.3f} {r['min_ms']:>8.1f} {r['min_vs_no_bn']:>13.3f}")

    write_atomic(args.out, {
        "benchmark": "fold", "model": "transformers ResNetConfig() (ResNet-50)",
        "input": [args.batch, 3, 224, 224], "threads": args.threads, "repeats": args.repeats,
        "warmup": args.warmup, "rows": rows, "times_s": times,
        "fold": {"folded": len(report.folded), "skipped": len(report.skipped),
                 "seconds": fold_seconds, "max_probe_error": report.max_error},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "batchnorm": batchnorm.__version__,
                    "load_average": os.getloadavg()},
    })
    print(f"wrote {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
