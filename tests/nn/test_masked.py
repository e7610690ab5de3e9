"""MaskedBatchNorm1d/2d/3d against batch norm over the valid positions only, in float64."""

import pytest
import torch

import batchnorm
from batchnorm import functional as F
from batchnorm import reference

TIGHT = {"atol": 1e-10, "rtol": 1e-10}


def _lengths_mask(lengths, length):
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("cls, shape, mask_fn", [
    (batchnorm.MaskedBatchNorm1d, (6, 3), lambda: torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)),
    (batchnorm.MaskedBatchNorm1d, (4, 3, 9), lambda: _lengths_mask([9, 5, 2, 7], 9)),
    (batchnorm.MaskedBatchNorm2d, (3, 3, 4, 5), lambda: torch.rand(3, 4, 5) > 0.4),
    (batchnorm.MaskedBatchNorm2d, (3, 3, 4, 5), lambda: torch.rand(3, 1, 5) > 0.4),  # broadcast
    (batchnorm.MaskedBatchNorm3d, (2, 3, 2, 3, 4), lambda: torch.rand(2, 2, 3, 4) > 0.3)])
def test_matches_reference_over_steps(cls, shape, mask_fn):
    torch.manual_seed(0)
    layer = cls(3, momentum=0.2, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), 0
    for _ in range(3):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
        mask = mask_fn()
        y = layer(x, mask)
        dy = torch.randn_like(y)
        y.backward(dy)
        xr = x.detach().clone().requires_grad_()
        w = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()
        yr, mean, var = reference.masked_batch_norm_train(xr, mask, w, b, 1e-5)
        yr.backward(dy)
        torch.testing.assert_close(y, yr, **TIGHT)
        torch.testing.assert_close(x.grad, xr.grad, **TIGHT)
        torch.testing.assert_close(layer.weight.grad, w.grad, **TIGHT)
        torch.testing.assert_close(layer.bias.grad, b.grad, **TIGHT)
        padded = ~mask.expand((shape[0],) + shape[2:]).unsqueeze(1).expand(shape)
        assert (x.grad[padded] == 0).all() and (y[padded] == 0).all()
        count = int(mask.expand((shape[0],) + shape[2:]).sum())
        rm, rv, nbt = reference.update_running_stats(rm, rv, nbt, mean, var, count, 0.2)
        torch.testing.assert_close(layer.running_mean, rm, **TIGHT)
        torch.testing.assert_close(layer.running_var, rv, **TIGHT)
        layer.zero_grad()
    layer.eval()
    x = torch.randn(shape, dtype=torch.float64)
    mask = mask_fn()
    expected = torch.where(mask.expand((shape[0],) + shape[2:]).unsqueeze(1), reference.normalize(
        x, rm, rv, layer.weight.detach(), layer.bias.detach(), 1e-5), 0.0)
    torch.testing.assert_close(layer(x, mask), expected, **TIGHT)


def test_all_true_mask_and_no_mask_are_batchnorm():
    torch.manual_seed(1)
    masked, bn = batchnorm.MaskedBatchNorm2d(3), batchnorm.BatchNorm2d(3)
    for mask in (torch.ones(4, 5, 6, dtype=torch.bool), None):
        x = torch.randn(4, 3, 5, 6) * 2 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = masked(x1, mask), bn(x2)
        y1.sum().backward()
        y2.sum().backward()
        torch.testing.assert_close(y1, y2)
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(masked.running_var, bn.running_var)


def test_padded_rows_equal_batchnorm_on_the_unpadded_rows():
    """Sequences of lengths 7, 3, 5 padded to 7 (with garbage): BatchNorm1d on the 15 real steps."""
    torch.manual_seed(2)
    lengths = [7, 3, 5]
    masked, bn = batchnorm.MaskedBatchNorm1d(4), batchnorm.BatchNorm1d(4)
    x = torch.randn(3, 4, 7) * 3 + 2
    mask = _lengths_mask(lengths, 7)
    x = torch.where(mask.unsqueeze(1), x, 1e3)
    x.requires_grad_()
    y = masked(x, mask)
    rows = torch.cat([x[i, :, :n] for i, n in enumerate(lengths)], dim=1).T  # (15, 4)
    expected = bn(rows)
    torch.testing.assert_close(torch.cat([y[i, :, :n] for i, n in enumerate(lengths)], 1).T,
                               expected)
    torch.testing.assert_close(masked.running_mean, bn.running_mean)
    torch.testing.assert_close(masked.running_var, bn.running_var)


def test_all_padding_changes_nothing():
    layer = batchnorm.MaskedBatchNorm1d(3)
    y = layer(torch.randn(4, 3, 5), torch.zeros(4, 5, dtype=torch.bool))
    assert (y == 0).all() and int(layer.num_batches_tracked) == 0


def test_gradcheck_fp64():
    torch.manual_seed(3)
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, dtype=torch.float64, requires_grad=True)
    mask = _lengths_mask([5, 2, 4], 5)
    assert torch.autograd.gradcheck(
        lambda x, w, b: F.masked_batch_norm(x, mask, None, None, w, b, True), (x, w, b))


def test_state_dict_is_batchnorms():
    bn = torch.nn.BatchNorm1d(4)
    bn.train()(torch.randn(8, 4))
    masked = batchnorm.MaskedBatchNorm1d(4)
    masked.load_state_dict(bn.state_dict())
    assert masked.state_dict().keys() == bn.state_dict().keys()
    torch.nn.BatchNorm1d(4).load_state_dict(masked.state_dict())


def test_errors():
    layer = batchnorm.MaskedBatchNorm1d(3)
    x = torch.randn(4, 3, 10)
    with pytest.raises(TypeError, match=r"MaskedBatchNorm1d\(3\): mask must be a bool tensor.*"
                                        r"torch.int64.*mask.bool\(\)"):
        layer(x, torch.ones(4, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask must be broadcastable to the input's batch and "
                                         r"spatial shape \(N, \*spatial\) = \(4, 10\).*got shape "
                                         r"\(4, 11\)"):
        layer(x, torch.ones(4, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"no channel dimension.*\(4, 3, 10\)"):
        layer(x, torch.ones(4, 3, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"more than one value per channel.*one valid position"):
        layer(x, torch.zeros(4, 10, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True)
              & (torch.arange(4) == 0)[:, None])
