import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab import models, stand_ins, train


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
    with pytest.raises(ValueError, match="norm: expected one of none, batch, renorm, ghost, "
                                         "group, layer, got 'instance'"):
        models.build(_cfg(norm="instance"), (1, 40), 10)


def test_init_std_is_applied():
    torch.manual_seed(0)
    m = models.build(_cfg(init_std=0.5), (1, 40), 10)
    w = m[1].weight.detach()
    assert abs(float(w.std()) - 0.5) < 0.03 and float(m[1].bias.detach().abs().max()) == 0


def test_ghost_stand_in_equals_batchnorm_per_virtual_batch():
    torch.manual_seed(0)
    x = torch.randn(12, 5, 3)
    ghost = stand_ins.GhostBatchNorm1d(5, virtual_batch_size=4)
    want = torch.cat([batchnorm.BatchNorm1d(5)(c) for c in x.split(4)])
    torch.testing.assert_close(ghost(x), want)
    # one virtual batch is plain batch norm, running statistics included
    bn, ghost = batchnorm.BatchNorm1d(5), stand_ins.GhostBatchNorm1d(5, virtual_batch_size=12)
    torch.testing.assert_close(ghost(x), bn(x))
    torch.testing.assert_close(ghost.running_var, bn.running_var)


def test_renorm_stand_in_without_correction_is_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    renorm = stand_ins.BatchRenorm1d(6, warmup_steps=10 ** 6)  # rmax 1, dmax 0 throughout
    bn = batchnorm.BatchNorm1d(6, momentum=0.01)
    for _ in range(3):
        torch.testing.assert_close(renorm(x), bn(x))
    torch.testing.assert_close(renorm.running_mean, bn.running_mean)
    torch.testing.assert_close(renorm.running_var, bn.running_var)


def test_renorm_stand_in_corrects_with_r_and_d():
    torch.manual_seed(0)
    renorm = stand_ins.BatchRenorm1d(4, warmup_steps=0, rmax_steps=0, dmax_steps=0, rmax=3.0,
                                     dmax=5.0)
    renorm.running_mean.fill_(0.5)
    renorm.running_var.fill_(4.0)
    x = torch.randn(64, 4, dtype=torch.float64) * 1.5 + 1.0
    renorm.double()
    y = renorm(x)
    mean, std_b = x.mean(0), (x.var(0, unbiased=False) + 1e-5).sqrt()
    std = (torch.tensor(4.0, dtype=torch.float64) + 1e-5).sqrt()
    want = (x - mean) / std_b * (std_b / std).clamp(1 / 3, 3) + ((mean - 0.5) / std).clamp(-5, 5)
    torch.testing.assert_close(y, want)


def test_recalibrate_stand_in_gives_population_statistics():
    torch.manual_seed(0)
    m = nn.Sequential(batchnorm.BatchNorm1d(3))
    x = torch.randn(40, 3) * 2 + 1
    stand_ins.recalibrate(m, list(x.split(10)))
    torch.testing.assert_close(m[0].running_mean, x.mean(0))
    assert not m.training
