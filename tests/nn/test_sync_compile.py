"""SyncBatchNorm under torch.compile(fullgraph=True) on 2 gloo ranks (pytorch#161302, #156680).

A small conv net with our SyncBatchNorm and a synced BatchNormAct trains 3 SGD steps compiled
with fullgraph=True (a graph break would raise), eagerly, and in one process on the concatenated
batch (torch.nn's BatchNorm2d, an unsynced BatchNormAct); parameters and running statistics must
agree to 1e-5 (fp32). Gradients are averaged over the ranks eagerly after the backward, as DDP
would (DDP's own compiled path splits the graph at its buckets).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as TF

import batchnorm

STEPS = 3
SIZES = [5, 3]
# "eager" checks what fullgraph promises (dynamo traces the whole step without a break) in seconds;
# aot_eager also traces the backward through AOTAutograd as Inductor does, and inductor compiles
# it: each takes minutes on 2 cores, so they run under the slow marker.
FAST, SLOW = ["eager"], ["aot_eager", "inductor"]


def net(sync: bool) -> torch.nn.Module:
    """Synced: SyncBatchNorm and a synced BatchNormAct (the fused activation on the traced path
    too); else torch.nn's BatchNorm2d and a local BatchNormAct, for the single process."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, bias=False),
        batchnorm.SyncBatchNorm(4) if sync else torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, bias=False),
        batchnorm.BatchNormAct2d(4, act="leaky_relu", negative_slope=0.2, sync=sync),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def _data():
    g = torch.Generator().manual_seed(5)
    n = sum(SIZES)
    return [(torch.randn(n, 2, 7, 7, generator=g) * 2 + 1, torch.randint(0, 3, (n,), generator=g))
            for _ in range(STEPS)]


def _train(model, forward, rank, world) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start, n, total = sum(SIZES[:rank]), SIZES[rank], sum(SIZES)
    for x, t in _data():
        opt.zero_grad()
        out = forward(x[start:start + n])
        # scaled so that the averaged gradient is that of the mean loss over the global batch
        (TF.cross_entropy(out, t[start:start + n], reduction="sum") * world / total).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def world_2(rank, world, backends=FAST):
    eager = net(sync=True)
    result = {"eager": _train(eager, eager, rank, world)}
    for backend in backends:
        model = net(sync=True)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        result[backend] = _train(model, compiled, rank, world)
    return result


def world_2_slow(rank, world):
    return world_2(rank, world, SLOW)


def _single_process() -> dict:
    model = net(sync=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, t in _data():
        opt.zero_grad()
        TF.cross_entropy(model(x), t).backward()
        opt.step()
    return model.state_dict()


def _check(ranks, backends):
    want = _single_process()
    for rank, result in enumerate(ranks):
        for run in ["eager", *backends]:
            for key, expected in want.items():
                got = result[run][key].double()
                scale = max(1.0, expected.double().abs().max().item())
                err = (got - expected.double()).abs().max().item() / scale
                assert err <= 1e-5, (rank, run, key, err)
                if run != "eager":
                    err = (got - result["eager"][key].double()).abs().max().item() / scale
                    assert err <= 1e-5, (rank, run, "vs eager", key, err)


def test_fullgraph_compile_trains_like_eager_and_one_process(tmp_path):
    from test_sync import _launch
    _check(_launch(2, "test_sync_compile:world_2", tmp_path), FAST)


@pytest.mark.slow
def test_fullgraph_compile_through_aot_autograd_and_inductor(tmp_path):
    from test_sync import _launch
    # a rank still compiling keeps the other waiting in the first collective: long timeouts
    _check(_launch(2, "test_sync_compile:world_2_slow", tmp_path, timeout_s=900,
                   join_timeout_s=1200), SLOW)
