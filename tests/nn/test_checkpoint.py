"""Activation checkpointing updates the running statistics once (pytorch#96136).

Each checkpointed run (torch.utils.checkpoint with use_reentrant True and False, torch.distributed's
composable checkpoint(module), and transformers' gradient checkpointing in both modes) trains a
small conv net for a few steps and is compared with the same net trained without checkpointing:
running statistics, num_batches_tracked and the parameters' gradients must agree to 1e-10 in
float64 (the gradients show that the recomputation normalized with the same batch statistics,
and for batch renorm the same r and d, as the first pass). torch.nn's BatchNorm2d runs beside
it and counts every batch twice.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

import batchnorm

STEPS = 3
LAYERS = {
    "BatchNorm2d": lambda c: batchnorm.BatchNorm2d(c),
    "BatchNormAct2d": lambda c: batchnorm.BatchNormAct2d(c, act="silu"),
    # limits from the first step and a fast EMA: r and d differ from 1 and 0 at once, so a
    # recomputation with the updated running statistics would change the gradients
    "BatchRenorm2d": lambda c: batchnorm.BatchRenorm2d(c, momentum=0.3, rmax_ramp=None,
                                                       dmax_ramp=None, rmax=1.5, dmax=0.5),
    "SyncBatchNorm": lambda c: batchnorm.SyncBatchNorm(c),
    "SyncRenorm2d": lambda c: batchnorm.BatchRenorm2d(c, momentum=0.3, rmax_ramp=None,
                                                      dmax_ramp=None, rmax=1.5, dmax=0.5,
                                                      sync=True),
    "torch.nn.BatchNorm2d": lambda c: torch.nn.BatchNorm2d(c),
}
MODES = ["reentrant", "non_reentrant", "composable", "transformers_reentrant", "transformers"]


class Block(torch.nn.Module):
    def __init__(self, layer: str, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = LAYERS[layer](channels)

    def forward(self, x):
        return self.norm(self.conv(x))


def _blocks(layer: str) -> torch.nn.ModuleList:
    torch.manual_seed(0)
    return torch.nn.ModuleList([Block(layer, 3), Block(layer, 3)]).double()


def _data(batch: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 5, 5, generator=g, dtype=torch.float64) + 2
            for _ in range(STEPS)]


def _wrap(blocks: torch.nn.ModuleList, mode: str | None):
    """The forward of `blocks` with each block checkpointed as `mode` says."""
    if mode is not None and mode.startswith("transformers"):
        return _transformers_net(blocks, use_reentrant=mode == "transformers_reentrant")
    if mode == "composable":  # torch.distributed's checkpoint(module), hooks on the module
        from torch.distributed._composable import checkpoint as checkpoint_module
        for block in blocks:
            checkpoint_module(block)
        mode = None

    def forward(x):
        for block in blocks:
            x = block(x) if mode is None else checkpoint(block, x,
                                                         use_reentrant=mode == "reentrant")
        return x
    return forward


def _transformers_net(blocks, use_reentrant: bool):
    """The blocks inside a transformers model with gradient checkpointing enabled, as a user of
    transformers turns it on."""
    transformers = pytest.importorskip("transformers", reason="transformers is a [dev] extra")
    layers = pytest.importorskip("transformers.modeling_layers",
                                 reason="GradientCheckpointingLayer needs transformers >= 4.52")

    class Layer(layers.GradientCheckpointingLayer):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x):
            return self.block(x)

    class Net(transformers.PreTrainedModel):
        config_class = transformers.PretrainedConfig
        supports_gradient_checkpointing = True

        def __init__(self):
            super().__init__(transformers.PretrainedConfig())
            self.layers = torch.nn.ModuleList([Layer(b) for b in blocks])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    net = Net()
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(net, "activation_checkpointing_enable"):
        net.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert all(layer.gradient_checkpointing for layer in net.layers)
    return net.train()


def train(layer: str, mode: str | None, data: list[torch.Tensor]) -> dict:
    """STEPS steps of SGD; the blocks' state_dict and the last step's gradients."""
    blocks = _blocks(layer)
    return train_with(_wrap(blocks, mode), blocks, data)


def train_with(forward, blocks: torch.nn.Module, data: list[torch.Tensor] | None = None) -> dict:
    opt = torch.optim.SGD(blocks.parameters(), lr=0.1)
    for x in data or _data():
        opt.zero_grad()
        # reentrant checkpointing needs an input that requires grad to run the backward at all
        y = forward(x.clone().requires_grad_())
        (y.square() * torch.linspace(0, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
        grads = {f"{n}.grad": p.grad.clone() for n, p in blocks.named_parameters()}
        opt.step()
    return {**blocks.state_dict(), **grads}


def _errors(got: dict, want: dict) -> dict[str, float]:
    return {k: (got[k].double() - want[k].double()).abs().max().item() for k in want}


OURS = [name for name in LAYERS if not name.startswith("torch")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", OURS)
def test_checkpointed_training_counts_each_batch_once(layer, mode):
    data = _data()
    want, got = train(layer, None, data), train(layer, mode, data)
    assert int(got["0.norm.num_batches_tracked"]) == STEPS
    errors = _errors(got, want)
    assert max(errors.values()) <= 1e-10, {k: e for k, e in errors.items() if e > 1e-10}


@pytest.mark.parametrize("mode", MODES)
def test_torch_nn_batch_norm_counts_each_batch_twice_beside_ours(mode):
    """pytorch#96136, shown: the same checkpointed run with torch.nn.BatchNorm2d."""
    data = _data()
    want, got = train("torch.nn.BatchNorm2d", None, data), train("torch.nn.BatchNorm2d", mode,
                                                                   data)
    assert int(got["0.norm.num_batches_tracked"]) == 2 * STEPS
    assert (got["0.norm.running_mean"] - want["0.norm.running_mean"]).abs().max() > 1e-3


def test_synced_world_of_one_counts_once(tmp_path):
    data = _data()
    want = train("SyncBatchNorm", None, data)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        got = {mode: train("SyncBatchNorm", mode, data) for mode in ("reentrant", "non_reentrant")}
    finally:
        dist.destroy_process_group()
    for mode, state in got.items():
        errors = _errors(state, want)
        assert max(errors.values()) <= 1e-10, (mode, errors)


@pytest.mark.parametrize("inner_reentrant", [True, False])
@pytest.mark.parametrize("outer_reentrant", [True, False])
@pytest.mark.parametrize("layer", ["BatchNorm2d", "BatchRenorm2d"])
def test_nested_checkpoints_count_once(layer, outer_reentrant, inner_reentrant):
    """A checkpoint inside a checkpoint: the inner region runs three times (first pass, the outer
    recomputation, its own recomputation) and still counts once, with the first pass's
    statistics."""
    def run(nested: bool) -> dict:
        outer, inner = _blocks(layer)

        def inner_region(x):
            return inner(x)

        def outer_region(x):
            return checkpoint(inner_region, outer(x), use_reentrant=inner_reentrant)

        return train_with(lambda x: checkpoint(outer_region, x, use_reentrant=outer_reentrant)
                          if nested else inner(outer(x)), torch.nn.ModuleList([outer, inner]))

    want, got = run(False), run(True)
    assert int(got["1.norm.num_batches_tracked"]) == STEPS
    errors = _errors(got, want)
    assert max(errors.values()) <= 1e-10, {k: e for k, e in errors.items() if e > 1e-10}


def test_recomputation_without_a_recorded_first_pass_names_the_layer():
    """Batch renorm needs the running statistics its first pass saw; if the recomputation sees
    another input (a non-deterministic region) it says so instead of normalizing differently."""
    layer = LAYERS["BatchRenorm2d"](3).double()
    calls = []

    def region(x):
        calls.append(1)
        return layer(x + len(calls))  # the recomputation sees a different input

    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    y = checkpoint(region, x, use_reentrant=True)
    with pytest.raises(RuntimeError, match=r"BatchRenorm2d\(3\): recomputing a checkpointed "
                                           r"forward, but no first pass"):
        y.sum().backward()


# ---- SyncBatchNorm on 2 gloo ranks ---------------------------------------------------------

SIZES = [4, 2]


def world_2(rank, world):
    """Per rank: its slice of each step's batch, trained without and with checkpointing."""
    data = _data(sum(SIZES))
    start = sum(SIZES[:rank])
    mine = [x[start:start + SIZES[rank]] for x in data]
    return {(layer, mode): train(layer, mode, mine) for layer in ("SyncBatchNorm", "SyncRenorm2d")
            for mode in (None, "reentrant", "non_reentrant")}


def test_synced_two_ranks_count_once(tmp_path):
    from test_sync import _launch
    ranks = _launch(2, "test_checkpoint:world_2", tmp_path)
    for rank, result in enumerate(ranks):
        for (layer, mode), state in result.items():
            want = result[(layer, None)]
            assert int(state["0.norm.num_batches_tracked"]) == STEPS
            errors = _errors(state, want)
            assert max(errors.values()) <= 1e-10, (rank, layer, mode, errors)
    # the global batch decides: every rank holds the same running statistics
    for key, value in ranks[0][("SyncBatchNorm", "reentrant")].items():
        if "running" in key:
            assert torch.equal(value, ranks[1][("SyncBatchNorm", "reentrant")][key]), key
