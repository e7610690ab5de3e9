"""FrozenBatchNorm1d/2d/3d: the inference affine of batch norm, and freeze/unfreeze."""

import pytest
import torch

import batchnorm
from batchnorm import reference

TIGHT = {"atol": 1e-10, "rtol": 1e-10}


def _trained_bn(cls, c, dtype=torch.float64):
    bn = cls(c, dtype=dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(7)
    return bn


@pytest.mark.parametrize("frozen_cls, shape", [(batchnorm.FrozenBatchNorm1d, (5, 3)),
                                               (batchnorm.FrozenBatchNorm1d, (5, 3, 4)),
                                               (batchnorm.FrozenBatchNorm2d, (2, 3, 4, 5)),
                                               (batchnorm.FrozenBatchNorm3d, (2, 3, 2, 3, 4))])
def test_matches_reference_and_never_changes(frozen_cls, shape):
    torch.manual_seed(0)
    frozen = frozen_cls(3, dtype=torch.float64)
    frozen.load_state_dict(_trained_bn(torch.nn.BatchNorm1d, 3).state_dict())
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    for mode in (True, False):
        y = frozen.train(mode)(x)
        expected = reference.normalize(x, frozen.running_mean, frozen.running_var, frozen.weight,
                                       frozen.bias, frozen.eps)
        torch.testing.assert_close(y, expected, **TIGHT)
    a, b = frozen.scale_shift()
    torch.testing.assert_close(y, x * a.view((1, 3) + (1,) * (x.ndim - 2))
                               + b.view((1, 3) + (1,) * (x.ndim - 2)), **TIGHT)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (a.view((1, 3) + (1,) * (x.ndim - 2))).expand_as(x),
                               **TIGHT)
    assert list(frozen.parameters()) == []
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gradcheck_fp64():
    frozen = batchnorm.FrozenBatchNorm2d(3, act="silu", dtype=torch.float64)
    frozen.load_state_dict(_trained_bn(torch.nn.BatchNorm2d, 3).state_dict())
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(frozen, (x,))


def test_freeze_unfreeze_round_trip_keeps_values_and_outputs():
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), _trained_bn(torch.nn.BatchNorm2d, 3, torch.float32),
        torch.nn.Sequential(_trained_bn(batchnorm.BatchNormAct2d, 3, torch.float32)),
        torch.nn.Flatten(), _trained_bn(batchnorm.BatchRenorm1d, 12, torch.float32),
        _trained_bn(batchnorm.GhostBatchNorm1d, 12, torch.float32),
        batchnorm.MaskedBatchNorm1d(12))
    x = torch.randn(4, 2, 4, 4)
    expected = model.eval()[:6](x)
    frozen = batchnorm.freeze(model.train())
    kinds = [type(m).__name__ for m in frozen.modules()]
    assert kinds.count("FrozenBatchNorm2d") == 2 and kinds.count("FrozenBatchNorm1d") == 2
    assert "MaskedBatchNorm1d" in kinds  # its forward takes a mask: left alone
    assert frozen[2][0].activation == "relu"
    torch.testing.assert_close(frozen[:6](x), expected)  # frozen even in train mode
    thawed = batchnorm.unfreeze(frozen)
    assert type(thawed[1]) is batchnorm.BatchNorm2d and type(thawed[2][0]) is batchnorm.BatchNormAct2d
    assert type(thawed[4]) is batchnorm.BatchNorm1d and thawed[1].weight.requires_grad
    assert int(thawed[1].num_batches_tracked) == 7
    torch.testing.assert_close(thawed.eval()[:6](x), expected)


def test_freeze_a_single_layer_returns_the_frozen_layer():
    frozen = batchnorm.freeze(torch.nn.BatchNorm3d(4))
    assert type(frozen) is batchnorm.FrozenBatchNorm3d
    assert type(batchnorm.unfreeze(frozen)) is batchnorm.BatchNorm3d


def test_state_dict_loads_both_ways_and_from_torchvision_style():
    bn = _trained_bn(torch.nn.BatchNorm2d, 4)
    frozen = batchnorm.FrozenBatchNorm2d(4, dtype=torch.float64)
    frozen.load_state_dict(bn.state_dict())
    assert frozen.state_dict().keys() == bn.state_dict().keys()
    torch.nn.BatchNorm2d(4, dtype=torch.float64).load_state_dict(frozen.state_dict())
    no_counter = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    batchnorm.FrozenBatchNorm2d(4, dtype=torch.float64).load_state_dict(no_counter)


def test_errors():
    with pytest.raises(ValueError, match=r"freeze: 1 \(BatchNorm2d\) has no running statistics"):
        batchnorm.freeze(torch.nn.Sequential(torch.nn.ReLU(),
                                             torch.nn.BatchNorm2d(3, track_running_stats=False)))
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d\(3\): expected 4D input \(got 2D"):
        batchnorm.FrozenBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"num_features must be a positive int, got 0"):
        batchnorm.FrozenBatchNorm1d(0)
