"""Train the DDP example's CNN with Ray Train on a local Ray cluster, SyncBatchNorm over gloo.

    python examples/ray_train_syncbn.py --workers 2 --steps 100

`ray.train.torch.TorchTrainer` starts the workers and their process group (gloo on CPU);
`prepare_model` wraps the model in DistributedDataParallel, after `convert_sync_batchnorm` made
its batch norms synced (torch.nn.SyncBatchNorm would be refused on CPU). The same data, model and
loss weighting as examples/ddp_syncbn.py. Needs `ray[train]`, the [scale] extra.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def train_loop(config: dict) -> None:
    """One Ray Train worker: the DDP example's loop, with Ray's rank and process group."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import ray.train
    import ray.train.torch

    import batchnorm

    sys.path.insert(0, config["examples"])
    from ddp_syncbn import make_batch, make_model

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(0)
    model = batchnorm.convert_sync_batchnorm(make_model())
    ddp = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=config["lr"], momentum=0.9)
    generator = torch.Generator().manual_seed(1000 + rank)
    local_n = config["batch"] + 8 * rank
    global_n = sum(config["batch"] + 8 * r for r in range(world))
    losses = []
    for _ in range(config["steps"]):
        images, labels = make_batch(local_n, generator)
        loss = F.cross_entropy(ddp(images), labels, reduction="sum") * world / global_n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean_loss = loss.detach() / world
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item())
    stats = torch.cat([b for name, b in model.named_buffers() if name.endswith(("mean", "var"))])
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    # Every worker merged the same gathered statistics, so the running statistics agree exactly;
    # a worker's exception fails trainer.fit(). Ray streams the workers' output to the driver.
    if not all(torch.equal(g, stats) for g in gathered):
        raise RuntimeError("running statistics differ between workers")
    if rank == 0:
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        print(f"loss {first:.4f} -> {last:.4f}; running statistics identical on {world} workers",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16, help="worker r uses batch + 8*r samples")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--storage", default=os.path.join(tempfile.gettempdir(), "ray_syncbn"),
                        help="where Ray Train keeps the run's files")
    args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(num_cpus=args.workers, include_dashboard=False)
    try:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"steps": args.steps, "batch": args.batch, "lr": args.lr,
                               "examples": HERE},
            scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(storage_path=os.path.abspath(args.storage)))
        trainer.fit()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
