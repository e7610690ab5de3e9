"""The tools with the family layers: convert to and from each kind, fold through fused
activations and frozen layers, recalibrate/adapt per DomainBatchNorm domain."""

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import TARGETS, adapt, convert, eval_gap, fold, recalibrate

from tools_helpers import count_bn, randomize_bn


def cnn():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, groups=3), nn.BatchNorm2d(6), nn.SiLU(),
        nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
        nn.BatchNorm1d(5), nn.LeakyReLU(0.2)))


X = torch.randn(8, 3, 8, 8)


def _close(a, b, tol=1e-5):
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("to", ["renorm", "ghost", "frozen", "act", "batchnorm"])
def test_convert_to_each_kind_keeps_eval_outputs(to):
    original = cnn().eval()
    model, changes = convert(copy.deepcopy(original), to=to)
    assert len(changes) == 4
    assert all(type(m) in TARGETS[to] for m in model.modules()
               if isinstance(m, (nn.modules.batchnorm._BatchNorm,
                                 batchnorm.nn.FrozenBatchNormBase)))
    with torch.no_grad():
        _close(model(X), original(X))


def test_convert_to_act_fuses_the_following_activation_and_back():
    original = cnn()
    model, _ = convert(copy.deepcopy(original), to="act")
    activations = [model[i].activation for i in (1, 4, 7, 10)]
    assert activations == ["relu", "silu", "identity", "leaky_relu"]
    assert model[10].negative_slope == 0.2
    assert all(isinstance(model[i], nn.Identity) for i in (2, 5, 11))
    for mode in (True, False):  # training mode too: batch statistics, then the activation
        original.train(mode), model.train(mode)
        with torch.no_grad():
            _close(model(X), original(X))
    # back to torch.nn: the fused activation becomes a module again, the function is kept
    back, changes = convert(copy.deepcopy(model), to="torch")
    assert isinstance(back[1], nn.Sequential) and isinstance(back[1][1], nn.ReLU)
    back.eval(), original.eval()
    with torch.no_grad():
        _close(back(X), original(X))


def test_frozen_round_trip_and_fold_in_training_mode():
    original = cnn().eval()
    frozen, _ = convert(copy.deepcopy(original), to="frozen")
    frozen.train()  # frozen layers use their statistics in training mode too
    with torch.no_grad():
        _close(frozen(X), original(X))
    folded, report = fold(frozen, X)
    assert len(report.folded) == 4 and count_bn(folded) == 0
    thawed, changes = convert(frozen, to="batchnorm")
    assert all(type(c.after) is type and c.before.__name__.startswith("Frozen") for c in changes)
    assert isinstance(thawed[1].weight, nn.Parameter)
    thawed.eval()
    with torch.no_grad():
        _close(thawed(X), original(X))


def test_fold_act_fused_layers_leaves_the_activation():
    model, _ = convert(cnn(), to="act")
    model.eval()
    folded, report = fold(model, X)
    assert len(report.folded) == 4
    assert isinstance(folded[1], nn.ReLU) and isinstance(folded[4], nn.SiLU)
    assert isinstance(folded[10], nn.LeakyReLU) and folded[10].negative_slope == 0.2
    with torch.no_grad():
        _close(folded(X), model(X))


class TwoDomains(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = batchnorm.DomainBatchNorm2d(4, num_domains=2)
        self.masked = batchnorm.MaskedBatchNorm2d(4)

    def forward(self, x, domain=0):
        return self.masked(self.norm(self.conv(x), domain))


def test_domain_and_masked_layers_are_reported_not_folded_and_not_converted():
    model = TwoDomains().eval()
    _, report = fold(model, X)
    assert {name for name, _ in report.skipped} == {"norm", "masked"}
    _, changes = convert(model, to="torch")
    assert changes == []


def test_adapt_one_domain_keeps_the_others():
    model = TwoDomains()
    source = [torch.randn(6, 3, 8, 8) for _ in range(2)]
    target = [torch.randn(n, 3, 8, 8) * 3 + 2 for n in (5, 9)]
    recalibrate(model, source, progress=False)  # model(x) runs as domain 0
    domain0 = model.norm.running_mean[0].clone(), model.norm.running_var[0].clone()
    adapt(model, target, domain=1, progress=False)
    assert torch.equal(model.norm.running_mean[0], domain0[0])
    assert torch.equal(model.norm.running_var[0], domain0[1])
    with torch.no_grad():
        values = torch.cat([model.conv(x) for x in target]).double().transpose(0, 1).reshape(4, -1)
    _close(model.norm.running_mean[1].double(), values.mean(1))
    _close(model.norm.running_var[1].double(), values.var(1))
    gaps = eval_gap(model, target, forward=lambda m, x: m(x, domain=1))
    assert gaps[0]["layer"] in {"norm", "masked"}


def test_convert_to_sync_and_back_without_distributed():
    original = cnn()
    model, _ = convert(copy.deepcopy(original), to="act")
    model[7] = batchnorm.BatchNorm2d(4)  # a plain layer of ours between the fused ones
    model[7].load_state_dict(original[7].state_dict())
    synced, changes = convert(model, to="sync")
    assert type(synced[7]) is batchnorm.SyncBatchNorm and synced[1].sync
    assert type(synced[1]) is batchnorm.BatchNormAct2d and len(changes) == 4
    for mode in (True, False):  # not initialized: synced layers are plain batch norm
        original.train(mode), synced.train(mode)
        with torch.no_grad():
            _close(synced(X), original(X))
    synced.eval()
    folded, report = fold(synced, X)
    assert len(report.folded) == 4
    # back: SyncBatchNorm remembers it replaced a 2d layer, so no dim= is needed
    back, _ = convert(synced, to="batchnorm")
    assert type(back[7]) is batchnorm.BatchNorm2d and not back[7].sync
