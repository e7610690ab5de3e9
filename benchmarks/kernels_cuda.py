"""CUDA kernel benchmark: ours (the Triton kernels of batchnorm.kernels.cuda) vs eager PyTorch.

    python benchmarks/kernels_cuda.py [--repeats 20] [--out benchmarks/results/kernels-cuda.json]

Cases: issue 3's shape set at batch x4, fp32 and bf16, NCHW and channels-last; passes: train fwd,
train fwd+bwd (our BatchNorm1d/2d/3d vs torch.nn's, cuDNN or PyTorch's native CUDA kernels), and
BN+ReLU fwd+bwd (ours with the fused relu epilogue vs torch.nn's BN followed by F.relu). Each row
also gives its HBM floor: the bytes of the minimal passes (forward: read x, write y; backward: read
dy and x, write dx; 2 and 3 passes of the tensor) at the device-to-device copy bandwidth measured in
the same run. Times are medians of --repeats runs (CUDA events) after warm-up.

Every row records `class` = cuda.path_key(x) (layout, dtype, fused or split path); the dispatch's
table of wins (`cuda.load_wins`) reads this file: only classes where Triton measured faster run there.
Needs a CUDA GPU and triton; without them it exits with a message and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

import batchnorm
from batchnorm import functional, kernels

SHAPES = [(128, 64, 56, 56), (256, 256, 14, 14), (1024, 128, 8, 8), (32, 32, 112, 112),
          (128, 2048, 7, 7), (2048, 1024), (64, 64, 32, 32, 8)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("train fwd", "fwd+bwd", "bn+relu fwd+bwd")
# Minimal passes over the tensor: forward reads x and writes y; the backward reads dy and x and
# writes dx (a relu mask of 1 bit per value is not counted).
FLOOR_PASSES = {"train fwd": 2, "fwd+bwd": 5, "bn+relu fwd+bwd": 5}
OURS = {2: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d, 5: batchnorm.BatchNorm3d}
TORCH = {2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def time_ms(fn, repeats: int, warmup: int = 5) -> float:
    """Median milliseconds of fn() over `repeats` runs, each timed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (a copy reads and writes nbytes)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_ms(lambda: dst.copy_(src), repeats) / 1e3)


def setup(shape, dtype, channels_last: bool, step: str, device: str = "cuda"):
    """One case: (ours, theirs, x), two closures running `step` on the same input, and that input.
    The single setup both timings use (STYLE.md 10)."""
    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    x.requires_grad_(step != "train fwd")
    dy = torch.randn_like(x)
    c = shape[1]
    ours = OURS[x.ndim](c, device=device)
    theirs = TORCH[x.ndim](c, device=device)
    if step == "bn+relu fwd+bwd":
        def run_ours():
            functional.batch_norm(x, ours.running_mean, ours.running_var, ours.weight, ours.bias,
                                  True, 0.1, 1e-5, activation="relu").backward(dy)

        def run_theirs():
            torch.nn.functional.relu(theirs(x)).backward(dy)
    elif step == "fwd+bwd":
        def run_ours():
            ours(x).backward(dy)

        def run_theirs():
            theirs(x).backward(dy)
    else:
        def run_ours():
            ours(x)

        def run_theirs():
            theirs(x)
    return _on_triton(run_ours), run_theirs, x


def _on_triton(run):
    """`run` with the Triton kernels forced: this run measures them in every class, including
    those the current results file sends to torch's kernel (the next table is built from it)."""
    def forced():
        with batchnorm.use_backend("triton"):
            run()
    return forced


def cases():
    for shape in SHAPES:
        for dtype_name, dtype in DTYPES.items():
            for channels_last in ((False, True) if len(shape) > 2 else (False,)):
                for step in PASSES:
                    yield shape, dtype_name, dtype, channels_last, step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per case (>= 10)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results"
                        / "kernels-cuda.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"benchmarks/kernels_cuda.py needs a CUDA GPU: torch.cuda.is_available() is "
                 f"False (torch {torch.__version__}); nothing was measured")
    cuda = kernels._cuda()
    if cuda is None:
        sys.exit("benchmarks/kernels_cuda.py needs triton (pip install triton); nothing was "
                 "measured")
    torch.backends.cudnn.benchmark = True

    largest = max(torch.Size(s).numel() for s in SHAPES) * 4
    bandwidth = copy_bandwidth(largest, args.repeats)
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bandwidth / 1e9:.0f} GB/s")
    header = (f"{'case':<44} {'class':<22} {'ours ms':>8} {'torch ms':>9} {'speedup':>8} "
              f"{'floor ms':>9} {'% floor':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for shape, dtype_name, dtype, channels_last, step in cases():
        run_ours, run_theirs, x = setup(shape, dtype, channels_last, step)
        if kernels.implementation(x) is not cuda:
            sys.exit(f"dispatch did not pick the Triton kernels for {tuple(shape)} {dtype_name}")
        ours_ms = time_ms(run_ours, args.repeats)
        torch_ms = time_ms(run_theirs, args.repeats)
        floor_ms = FLOOR_PASSES[step] * x.numel() * x.element_size() / bandwidth * 1e3
        layout = "channels-last" if channels_last else "nchw"
        row = dict(shape=list(shape), layout=layout, dtype=dtype_name, step=step,
                   ours_ms=ours_ms, torch_ms=torch_ms, speedup=torch_ms / ours_ms,
                   floor_ms=floor_ms, floor_fraction=floor_ms / ours_ms,
                   **{"class": list(cuda.path_key(x))})
        rows.append(row)
        name = f"{step} {'x'.join(map(str, shape))} {dtype_name} {layout}"
        print(f"{name:<44} {'/'.join(row['class']):<22} {ours_ms:8.3f} {torch_ms:9.3f} "
              f"{row['speedup']:7.2f}x {floor_ms:9.3f} {100 * row['floor_fraction']:7.0f}%")
        del run_ours, run_theirs, x
        torch.cuda.empty_cache()

    print("\nmedian speedup over eager PyTorch (targets: fwd+bwd >= 1.0x in every layout and "
          "dtype, bn+relu fwd+bwd >= 1.5x)")
    for step in PASSES:
        for layout in ("nchw", "channels-last"):
            for dtype_name in DTYPES:
                group = [r["speedup"] for r in rows
                         if (r["step"], r["layout"], r["dtype"]) == (step, layout, dtype_name)]
                print(f"  {step:<16} {layout:<14} {dtype_name}: {statistics.median(group):.2f}x "
                      f"(min {min(group):.2f}x)")
    machine = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                   cuda=torch.version.cuda, triton=cuda.triton.__version__,
                   python=platform.python_version(), copy_bandwidth_GBps=bandwidth / 1e9)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(machine=machine, repeats=args.repeats, cases=rows),
                                   indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
