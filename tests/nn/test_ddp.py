"""DistributedDataParallel with two forwards before one backward (a GAN discriminator on real and
fake batches, contrastive pairs), broadcast_buffers=True, on 2 gloo ranks (pytorch#22095,
#175024).

DDP copies rank 0's buffers into every rank at the start of each forward, and batch norm updates
them in place. torch.nn's batch norm saves its running statistics for the backward, so where the
backward checks them (cuDNN's kernel, as reported) the second forward invalidates the first
forward's graph: "modified by an inplace operation". On CPU, torch 2.13's kernel does not check
them and torch.nn runs through here too: that failure needs CUDA and was not run. Ours never
saves the running statistics on any device (they do not enter the training output's gradient),
which is tested directly below; the DDP step's parameters are compared with one process computing
the same losses, and for SyncBatchNorm also the running statistics (the global batch's, the same
on every rank).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as TF

import batchnorm

STEPS = 3
SIZES = [4, 2]
NORMS = {
    "BatchNorm2d": lambda c: batchnorm.BatchNorm2d(c),
    "BatchNormAct2d": lambda c: batchnorm.BatchNormAct2d(c, act="leaky_relu", negative_slope=0.2),
    "SyncBatchNorm": lambda c: batchnorm.SyncBatchNorm(c),
    "torch.nn.BatchNorm2d": lambda c: torch.nn.BatchNorm2d(c),
}


# torch 2.13 renamed broadcast_buffers (deprecated) to forward_sync_buffers
BROADCAST_BUFFERS = ({"forward_sync_buffers": True} if "forward_sync_buffers" in
                     inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                     else {"broadcast_buffers": True})


def discriminator(norm: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), NORMS[norm](4), torch.nn.LeakyReLU(0.2),
        torch.nn.Conv2d(4, 4, 3), NORMS[norm](4), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 1)).double()


def _data():
    g = torch.Generator().manual_seed(3)
    n = sum(SIZES)
    return [(torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64),
             torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64) * 2 + 1)
            for _ in range(STEPS)]


def _gan_loss(d_real, d_fake):
    """The discriminator's loss, summed over the samples (scaled by the caller)."""
    return (TF.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real), reduction="sum")
            + TF.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake),
                                                  reduction="sum"))


def world_2(rank, world):
    result = {}
    start, n, total = sum(SIZES[:rank]), SIZES[rank], sum(SIZES)
    for norm in NORMS:
        model = discriminator(norm)
        ddp = torch.nn.parallel.DistributedDataParallel(model, **BROADCAST_BUFFERS)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        try:
            for real, fake in _data():
                opt.zero_grad()
                d_real = ddp(real[start:start + n])  # forward 1
                d_fake = ddp(fake[start:start + n])  # forward 2, before any backward
                # DDP averages gradients over ranks: world/total makes it the mean over all
                (_gan_loss(d_real, d_fake) * world / total).backward()
                opt.step()
            result[norm] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        except RuntimeError as error:
            result[norm] = str(error)
        del ddp  # free DDP's reducer before the group goes (see docs/sync.md)
    return result


def _oracle(norm: str) -> dict:
    """One process: each rank's slices through the model with that rank's batch statistics
    (or, for SyncBatchNorm, the concatenated batch), the losses summed as DDP averages them."""
    model = discriminator(norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    synced = norm == "SyncBatchNorm"
    slices = [slice(0, sum(SIZES))] if synced else [
        slice(sum(SIZES[:r]), sum(SIZES[:r + 1])) for r in range(len(SIZES))]
    for real, fake in _data():
        opt.zero_grad()
        loss = sum(_gan_loss(model(real[s]), model(fake[s])) for s in slices) / sum(SIZES)
        loss.backward()
        opt.step()
    return model.state_dict()


def test_two_forwards_before_backward_with_broadcast_buffers(tmp_path):
    from test_sync import _launch
    ranks = _launch(2, "test_ddp:world_2", tmp_path)
    for norm in ("BatchNorm2d", "BatchNormAct2d", "SyncBatchNorm", "torch.nn.BatchNorm2d"):
        states = [r[norm] for r in ranks]
        assert not isinstance(states[0], str), f"{norm}: {states[0]}"
        want = _oracle(norm)
        for key, expected in want.items():
            if key.split(".")[-1] not in ("weight", "bias") and norm != "SyncBatchNorm":
                continue  # local statistics: each rank's own (rank 0's are broadcast)
            err = (states[0][key].double() - expected.double()).abs().max().item()
            assert err <= 1e-10, (norm, key, err)
            assert torch.equal(states[0][key], states[1][key]), (norm, key)
        # two forwards per step, each counted
        assert int(states[0]["1.num_batches_tracked"]) == 2 * STEPS


def _saved_tensors(output: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor the autograd graph of `output` keeps for its backward."""
    seen, stack, saved = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_") and isinstance(getattr(node, attr), torch.Tensor):
                saved.append(getattr(node, attr))
        saved.extend(getattr(node, "saved_tensors", None) or ())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return saved


@pytest.mark.parametrize("norm", ["BatchNorm2d", "BatchNormAct2d", "torch.nn.BatchNorm2d"])
def test_training_graph_keeps_no_running_statistics(norm):
    """Why a second forward (or DDP's buffer copy) cannot invalidate the first one's graph."""
    layer = NORMS[norm](3).double()
    y = layer(torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True))
    buffers = {layer.running_mean.data_ptr(), layer.running_var.data_ptr()}
    kept = [t for t in _saved_tensors(y) if t.numel() and t.data_ptr() in buffers]
    if norm.startswith("torch"):
        assert kept, "torch.nn's batch norm keeps its running statistics for the backward"
    else:
        assert not kept, f"{norm}'s training graph keeps a running-statistics buffer"
