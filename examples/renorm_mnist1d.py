"""Batch renorm vs batch norm at batch size 4 on MNIST-1D (Ioffe 2017, arXiv 1702.03275, Fig. 2).

The paper trains Inception-v3 with batch norm over microbatches of 4 and finds batch renorm ahead
(BN 74.2%, renorm 76.5%): with 4 samples the batch statistics are noisy and differ from the running
statistics that inference uses, and renorm trains with the latter. This script repeats the
comparison on a small 1-D CNN: same data, seeds, optimizer and steps for both; the only change is
the normalization layer. Test accuracy is measured in eval mode, i.e. on the running statistics.

Settings (fixed before the first run, not tuned):
    data: MNIST-1D built locally (4000 train / 1000 test, length 40), inputs standardized with
        the training set's mean and std
    model: Conv1d(1,32,5) N ReLU, Conv1d(32,32,3,stride 2) N ReLU, Conv1d(32,32,3,stride 2) N ReLU,
        Linear(320, 10); N = BatchNorm1d (momentum 0.1, torch's default) or BatchRenorm1d
        (momentum 0.01, the paper's)
    training: batch size 4, Adam lr 1e-3, 6 epochs = 6000 steps, seeds 0 1 2
    renorm schedule: the paper's step counts divided by 10: plain BN for 500 steps, then rmax
        1 -> 3 by step 4000 and dmax 0 -> 5 by step 2500 (linear ramps)

Run: python examples/renorm_mnist1d.py [--steps 6000] [--seeds 0 1 2] [--norms bn renorm]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import batchnorm


def load_data():
    from mnist1d.data import get_dataset_args, make_dataset  # builds locally; never get_dataset
    data = make_dataset(get_dataset_args())
    x, x_test = (torch.tensor(data[k], dtype=torch.float32).unsqueeze(1) for k in ("x", "x_test"))
    mean, std = x.mean(), x.std()
    return ((x - mean) / std, torch.tensor(data["y"]).long(),
            (x_test - mean) / std, torch.tensor(data["y_test"]).long())


def make_model(norm: str) -> torch.nn.Module:
    def norm_layer(c):
        if norm == "bn":
            return batchnorm.BatchNorm1d(c)
        return batchnorm.BatchRenorm1d(c, rmax=3.0, dmax=5.0, rmax_ramp=(500, 4000),
                                       dmax_ramp=(500, 2500))
    return torch.nn.Sequential(
        torch.nn.Conv1d(1, 32, 5, padding=2), norm_layer(32), torch.nn.ReLU(),
        torch.nn.Conv1d(32, 32, 3, stride=2, padding=1), norm_layer(32), torch.nn.ReLU(),
        torch.nn.Conv1d(32, 32, 3, stride=2, padding=1), norm_layer(32), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(320, 10))


def run(norm: str, seed: int, steps: int, data) -> float:
    x, y, x_test, y_test = data
    torch.manual_seed(seed)
    model = make_model(norm)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for step in range(steps):
        if len(order) < 4:
            order = torch.randperm(len(x), generator=gen)
        idx, order = order[:4], order[4:]
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--norms", nargs="+", choices=("bn", "renorm"), default=["bn", "renorm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data()
    results = {}
    for norm in args.norms:
        accs = []
        for seed in args.seeds:
            start = time.perf_counter()
            accs.append(run(norm, seed, args.steps, data))
            print(f"{norm:7s} seed {seed}: test accuracy {accs[-1]:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        results[norm] = {"accuracies": accs, "mean": float(np.mean(accs)),
                         "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0}
    for norm, r in results.items():
        print(f"{norm:7s} mean test accuracy {r['mean']:.4f} +- {r['std']:.4f} over seeds "
              f"{args.seeds}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "seeds": args.seeds, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
