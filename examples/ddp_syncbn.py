"""Train a small CNN with DistributedDataParallel and SyncBatchNorm on CPU (gloo).

    torchrun --standalone --nproc_per_node 2 examples/ddp_syncbn.py --steps 100

Each rank draws its own batch of synthetic 8x8 images (3 classes: horizontal stripes, vertical
stripes, a centred blob, plus noise), and the ranks deliberately use different batch sizes:
SyncBatchNorm normalizes with the statistics of the global batch, merged exactly across uneven
(or empty) per-rank batches. torch.nn.SyncBatchNorm cannot do this on CPU; batchnorm's runs on
any torch.distributed backend.
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.distributed as dist
import torch.nn.functional as F

import batchnorm


def make_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy 1x8x8 images and their labels in {0, 1, 2}."""
    labels = torch.randint(0, 3, (n,), generator=generator)
    stripes = (torch.arange(8) % 2).float()
    patterns = torch.stack([stripes[:, None].expand(8, 8), stripes[None, :].expand(8, 8),
                            torch.zeros(8, 8).index_fill_(0, torch.arange(3, 5), 1) *
                            torch.zeros(8, 8).index_fill_(1, torch.arange(3, 5), 1)])
    images = patterns[labels] + 0.8 * torch.randn(n, 8, 8, generator=generator)
    return images[:, None], labels


def make_model() -> torch.nn.Module:
    # Plain torch.nn layers: convert_sync_batchnorm swaps the batch norms for SyncBatchNorm.
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1, stride=2), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16, help="rank r uses batch + 8*r samples")
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun provides rank, world size and the address
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = batchnorm.convert_sync_batchnorm(make_model())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)

    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    local_n = args.batch + 8 * rank
    global_n = sum(args.batch + 8 * r for r in range(world))
    losses = []
    for _ in range(args.steps):
        images, labels = make_batch(local_n, generator)
        # DDP averages gradients over ranks; weighting each rank's summed loss by world/global_n
        # gives every sample the same weight although the ranks' batches differ in size.
        loss = F.cross_entropy(ddp(images), labels, reduction="sum") * world / global_n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean_loss = loss.detach() / world
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item())

    # Every rank merged the same gathered statistics, so the running statistics agree exactly.
    stats = torch.cat([b for name, b in model.named_buffers() if name.endswith(("mean", "var"))])
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    if not all(torch.equal(g, stats) for g in gathered):
        raise RuntimeError("running statistics differ between ranks")
    if rank == 0:
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        print(f"loss {first:.4f} -> {last:.4f}; running statistics identical on {world} ranks")
    # Free DDP before the process group: torch 2.13's DDP destroys the gloo group it holds from
    # a destructor that keeps the GIL while joining gloo threads that need it, which can hang.
    del ddp
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
