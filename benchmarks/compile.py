"""First-call torch.compile time of a transformers ResNet, torch.nn's batch norm vs ours.

    .venv/bin/python benchmarks/compile.py [--threads 2] [--batch 32] [--size 64]
                                           [--timeout 1800] [--quick] [--out PATH]

The model is ResNetForImageClassification(ResNetConfig(depths=[1, 1, 1, 1])) with a 10-class
head, random init; `ours` is the same after `batchnorm.convert(model, to="batchnorm")`. For each
mode (eval: forward under no_grad; train: forward, cross-entropy, backward) and variant, a fresh
Python process builds the model, wraps it in `torch.compile` and times its first call (Dynamo's
trace, AOTAutograd, Inductor's code generation and C++ compile, and the run itself), then the
median of 3 later calls for scale. Each process gets a new empty TORCHINDUCTOR_CACHE_DIR, so
neither side reuses compiled graphs; Numba's on-disk cache of our kernels stays, as it does for
an installed package (it plays the part of torch's prebuilt aten kernels). A process past
--timeout is killed with its compile workers and reported as such. Results go to
results/compile-cpu.json with the machine description; --quick (a 4-stage ResNet 16-128 wide,
batch 8, 32x32, eval only, 240 s timeout) writes only with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as bench  # noqa: E402  (benchmarks/kernels.py: the machine and the results writer)

import batchnorm  # noqa: E402

VARIANTS = ("torch", "ours")
LABELS = 10
# ResNetConfig's arguments, full size and --quick.
CONFIG = {False: {"depths": [1, 1, 1, 1]},
          True: {"depths": [1, 1, 1, 1], "layer_type": "basic", "embedding_size": 16,
                 "hidden_sizes": [16, 32, 64, 128]}}


def build(quick):
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(num_labels=LABELS, **CONFIG[quick]))


def child(spec):
    """In the fresh process: the first compiled call's seconds, and later calls' median ms."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = build(spec["quick"])
    if spec["variant"] == "ours":
        model, _ = batchnorm.convert(model, to="batchnorm")
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"])
    labels = torch.randint(0, LABELS, (spec["batch"],))
    compiled = torch.compile(model)
    if spec["mode"] == "eval":
        model.eval()

        def call():
            with torch.no_grad():
                compiled(pixel_values=x)
    else:
        model.train()

        def call():
            compiled(pixel_values=x, labels=labels).loss.backward()
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    later = []
    for _ in range(3):
        start = time.perf_counter()
        call()
        later.append(time.perf_counter() - start)
    print(json.dumps({"first_call_s": first, "later_call_ms": statistics.median(later) * 1e3}))


def measure(spec, timeout):
    """One case in a fresh process with an empty Inductor cache: its result or why none came."""
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
        # A session of its own, so that a timeout ends the compile workers too.
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
            env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"status": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed (exit {proc.returncode}): {last}"}
    return {"status": "ok", **json.loads(stdout.strip().splitlines()[-1])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--timeout", type=int, help="seconds per process (default: 1800, 240 "
                                                     "with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a narrow ResNet, batch 8, 32x32, eval only, 240 s timeout")
    parser.add_argument("--out", help="results file (default: results/compile-cpu.json, none "
                                      "with --quick)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    modes = ("eval", "train")
    if args.quick:
        modes, args.batch, args.size = ("eval",), 8, 32
    args.timeout = args.timeout or (240 if args.quick else 1800)
    out = bench.results_path(args.out, args.quick, "compile-cpu.json")
    info = bench.machine()
    info["threads"] = args.threads
    model = "ResNetConfig({})".format(
        ", ".join(f"{k}={v!r}" for k, v in CONFIG[args.quick].items()))
    print(f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} threads, "
          f"{model}, batch {args.batch}x3x{args.size}x{args.size}; first call of "
          f"torch.compile(model) in a fresh process with an empty Inductor cache; ratio = ours / "
          f"torch (> 1: ours compiles slower); load average {info['loadavg_start'][0]:.1f}")
    header = (f"{'mode':<6} {'torch s':>8} {'ours s':>8} {'ratio':>6} {'torch later ms':>15} "
              f"{'ours later ms':>14}")
    print(header)
    print("-" * len(header))
    rows, summary = [], {}
    for mode in modes:
        result = {}
        for variant in VARIANTS:
            spec = {"variant": variant, "mode": mode, "batch": args.batch, "size": args.size,
                    "threads": args.threads, "quick": args.quick}
            result[variant] = measure(spec, args.timeout)
            rows.append({"mode": mode, "variant": variant, **result[variant]})
        torch_, ours = result["torch"], result["ours"]
        if torch_["status"] == ours["status"] == "ok":
            ratio = summary[f"ratio ours/torch, {mode}"] = (ours["first_call_s"]
                                                            / torch_["first_call_s"])
            print(f"{mode:<6} {torch_['first_call_s']:8.1f} {ours['first_call_s']:8.1f} "
                  f"{ratio:6.2f} {torch_['later_call_ms']:15.1f} {ours['later_call_ms']:14.1f}",
                  flush=True)
        else:
            print(f"{mode:<6} " + "; ".join(f"{v}: {r['status']}" for v, r in result.items()
                                             if r["status"] != "ok"), flush=True)
    if out:
        bench.write_results(out, info, model=model, batch=args.batch, size=args.size,
                            timeout_s=args.timeout, rows=rows, summary=summary)


if __name__ == "__main__":
    main()
