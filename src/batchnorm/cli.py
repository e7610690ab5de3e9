"""The `batchnorm` command (also `python -m batchnorm`); one subcommand per tool, starting with
`lab`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _lab_parser(sub) -> None:
    from batchnorm.lab.claims import CLAIMS

    p = sub.add_parser("lab", help="measure what batch norm buys on real data and write a report",
                       description="Trains small networks with and without batch norm, tests "
                                   "its promises and the explanations of why it works with seeds "
                                   "and confidence intervals, and writes report.html, "
                                   "results.json and plots/ to --out.")
    p.add_argument("--data", default="mnist1d",
                   help="mnist1d (default, built locally), digits (sklearn), or a path: a directory "
                        "of MNIST idx files (optionally .gz), a directory of CIFAR-10 binary "
                        "batches, or an .npz with x_train, y_train, x_test, y_test")
    p.add_argument("--claims", nargs="+", default=list(CLAIMS), metavar="CLAIM",
                   help=f"any of {', '.join(CLAIMS)} (default: all)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per configuration (default 5; 2 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="short runs and small grids: a smoke test of the whole pipeline")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: the number of cores)")
    p.add_argument("--out", type=Path, default=Path("lab-report"),
                   help="output directory (default lab-report/); its cache/ lets a rerun resume")
    p.add_argument("--fresh", action="store_true", help="ignore cached runs and rerun everything")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cpu",
                   help="torch device every run trains on: cpu (default), cuda, cuda:N; part of "
                        "each run's configuration, so its cache entries are its own")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run the sweep's configurations on the Ray cluster at ADDRESS (host:port, "
                        "auto, or local for a fresh instance on this machine) instead of --jobs "
                        "local processes; results merge into the same cache (needs "
                        "batchnorm[ray])")
    p.set_defaults(func=_lab)


def _lab(args, parser) -> int:
    from batchnorm.lab import data as lab_data
    from batchnorm.lab import train
    from batchnorm.lab.claims import CLAIMS
    from batchnorm.lab.runner import QUICK_SEEDS, run_lab

    claims = [c for item in args.claims for c in item.split(",") if c]
    unknown = [c for c in claims if c not in CLAIMS]
    if unknown:
        parser.error(f"--claims: expected any of {', '.join(CLAIMS)}, got {', '.join(unknown)}")
    claims = [c for c in CLAIMS if c in claims]  # canonical order, no duplicates
    seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else 5)
    if seeds < 1:
        parser.error(f"--seeds: expected a positive number, got {seeds}")
    if args.jobs < 1:
        parser.error(f"--jobs: expected a positive number, got {args.jobs}")
    if args.ray is None or args.ray == "local":
        # runs on this machine: its device must exist here (a cluster's nodes are checked there)
        try:
            train.device_of({"device": args.device})
        except (ValueError, RuntimeError) as e:
            parser.error(f"--device: {e}")
    try:
        # loaded before anything is written: a bad file leaves no partial output behind
        data = lab_data.load(args.data)
    except lab_data.DataError as e:
        print(f"batchnorm lab: error: {e}", file=sys.stderr)
        return 2
    if args.ray is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            parser.error("--ray: needs the ray package (pip install 'batchnorm[ray]')")
    results = run_lab(data, claims, seeds, args.quick, args.jobs, args.out, args.fresh,
                      show_progress=not args.no_progress, device=args.device,
                      ray_address=args.ray)
    width = max(len(c["title"]) for c in results["claims"].values())
    for c in results["claims"].values():
        print(f"{c['title']:<{width}}  {c['verdict']:<14} {c['headline']}")
    print(f"report: {args.out / 'report.html'}")
    return 0


def _tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="measure where our kernels beat torch's on this machine",
                       description="Times torch's batch-norm kernel against ours on a sweep of "
                                   "training steps and fused eval calls shaped like real "
                                   "networks' layers and stores the timings in the user cache "
                                   "directory (or $BATCHNORM_PROFILE); later runs route by "
                                   "them. About a minute.")
    p.add_argument("--runs", type=int, default=15, help="timed runs per size and backend")
    p.add_argument("--out", type=Path, help="write the profile here instead")
    p.set_defaults(func=_tune)


def _tune(args, parser) -> int:
    from batchnorm.kernels import profile

    if args.runs < 1:
        parser.error(f"--runs: expected a positive number, got {args.runs}")
    measured = profile.measure(runs=args.runs)
    print(f"profile: {profile.store(measured, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchnorm",
                                     description="batchnorm: batch normalization for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    _lab_parser(sub)
    _tune_parser(sub)
    args = parser.parse_args(argv)
    sub_parser = sub.choices[args.command]
    return args.func(args, sub_parser)


if __name__ == "__main__":
    sys.exit(main())
