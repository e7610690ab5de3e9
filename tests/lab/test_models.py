import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab import models, train


def _cfg(**kw):
    return train._options(train.make_config(kw))


@pytest.mark.parametrize("norm", list(models.NORMS))
@pytest.mark.parametrize("model, shape", [("mlp", (1, 40)), ("cnn", (1, 40)),
                                          ("cnn", (3, 8, 8)), ("mlp", (1, 8, 8))])
def test_every_norm_builds_and_runs(norm, model, shape):
    m = models.build(_cfg(model=model, norm=norm, virtual_batch=4), shape, 10)
    out = m(torch.randn(8, *shape))
    assert out.shape == (8, 10)
    out.sum().backward()


def test_batch_uses_the_library_layers():
    m = models.build(_cfg(norm="batch"), (1, 40), 10)
    assert sum(isinstance(x, batchnorm.BatchNorm1d) for x in m.modules()) == 3
    m = models.build(_cfg(model="cnn", norm="batch"), (1, 8, 8), 10)
    assert sum(isinstance(x, batchnorm.BatchNorm2d) for x in m.modules()) == 3


def test_unknown_norm_lists_the_names():
    with pytest.raises(ValueError, match="norm: expected one of none, batch, noisy_batch, renorm, "
                                         "ghost, group, layer, got 'instance'"):
        models.build(_cfg(norm="instance"), (1, 40), 10)


def test_init_std_is_applied():
    torch.manual_seed(0)
    m = models.build(_cfg(init_std=0.5), (1, 40), 10)
    w = m[1].weight.detach()
    assert abs(float(w.std()) - 0.5) < 0.03 and float(m[1].bias.detach().abs().max()) == 0


def test_renorm_and_ghost_are_the_library_layers_with_the_run_settings():
    m = models.build(_cfg(norm="renorm", steps=1000), (1, 40), 10)
    renorm = m[2]
    assert isinstance(renorm, batchnorm.BatchRenorm1d)
    # the paper's 5k / 25k / 40k of 100k steps, scaled to this run's 1000
    assert renorm.rmax_ramp == (50, 400) and renorm.dmax_ramp == (50, 250)
    assert renorm.momentum == 0.1
    m = models.build(_cfg(model="cnn", norm="ghost", virtual_batch=8), (3, 8, 8), 10)
    assert isinstance(m[1], batchnorm.GhostBatchNorm2d) and m[1].virtual_batch_size == 8


def test_group_and_layer_norm_normalize_each_example():
    x = torch.randn(4, 100) * 3 + 2
    layer = models.norm_layer("layer", 100, 1, {})
    y = layer(x).detach()
    torch.testing.assert_close(y.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    group = models.norm_layer("group", 100, 1, {"groups": 5})
    y = group(x).detach().view(4, 5, 20)
    torch.testing.assert_close(y.var(2, unbiased=False), torch.ones(4, 5), atol=1e-3, rtol=0)

