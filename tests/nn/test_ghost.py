"""GhostBatchNorm1d/2d/3d against batch norm per virtual batch (Hoffer et al. 2017) in float64."""

import pytest
from hypothesis import given, settings, strategies as st
import torch

import batchnorm
from batchnorm import functional as F
from batchnorm import reference

TIGHT = {"atol": 1e-10, "rtol": 1e-10}


@pytest.mark.parametrize("cls, shape, vbs, sizes", [
    (batchnorm.GhostBatchNorm1d, (12, 3), 4, [4, 4, 4]),
    (batchnorm.GhostBatchNorm1d, (11, 3), 4, [4, 4, 3]),       # smaller last chunk
    (batchnorm.GhostBatchNorm1d, (9, 3), 4, [4, 5]),           # a lone sample joins the last chunk
    (batchnorm.GhostBatchNorm1d, (9, 3, 2), 4, [4, 4, 1]),     # ...unless it has spatial values
    (batchnorm.GhostBatchNorm2d, (7, 3, 3, 5), 3, [3, 3, 1]),
    (batchnorm.GhostBatchNorm3d, (5, 2, 2, 3, 3), 2, [2, 2, 1])])
def test_matches_reference_over_steps(cls, shape, vbs, sizes):
    torch.manual_seed(0)
    layer = cls(shape[1], momentum=0.2, virtual_batch_size=vbs, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    assert F.virtual_batch_sizes(shape[0], vbs, torch.Size(shape[2:]).numel()) == sizes
    rm, rv, nbt = torch.zeros(shape[1]), torch.ones(shape[1]), 0
    for _ in range(3):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
        y = layer(x)
        dy = torch.randn_like(y)
        y.backward(dy)
        xr = x.detach().clone().requires_grad_()
        w = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()
        yr = reference.ghost_batch_norm_train(xr, w, b, 1e-5, sizes)
        yr.backward(dy)
        torch.testing.assert_close(y, yr, **TIGHT)
        torch.testing.assert_close(x.grad, xr.grad, **TIGHT)
        torch.testing.assert_close(layer.weight.grad, w.grad, **TIGHT)
        torch.testing.assert_close(layer.bias.grad, b.grad, **TIGHT)
        # The chunks merged with Chan's formula: the statistics of the whole batch.
        mean, var = reference.batch_stats(x.detach())
        rm, rv, nbt = reference.update_running_stats(rm, rv, nbt, mean, var,
                                                     x[:, 0].numel(), 0.2)
        torch.testing.assert_close(layer.running_mean, rm, **TIGHT)
        torch.testing.assert_close(layer.running_var, rv, **TIGHT)
        layer.zero_grad()


@pytest.mark.parametrize("n", [5, 8])
def test_virtual_batch_at_least_n_is_batchnorm(n):
    torch.manual_seed(1)
    ghost = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=8)
    bn = batchnorm.BatchNorm2d(3)
    for _ in range(3):
        x = torch.randn(n, 3, 4, 4) * 2 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ghost(x1), bn(x2)
        y1.sum().backward()
        y2.sum().backward()
        torch.testing.assert_close(y1, y2)
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(ghost.weight.grad, bn.weight.grad)
    torch.testing.assert_close(ghost.running_var, bn.running_var)
    torch.testing.assert_close(ghost.num_batches_tracked, bn.num_batches_tracked)


def test_eval_takes_any_batch_size_and_is_batchnorm():
    ghost = batchnorm.GhostBatchNorm1d(3, virtual_batch_size=4)
    ghost.train()(torch.randn(16, 3))
    bn = batchnorm.BatchNorm1d(3)
    bn.load_state_dict(ghost.state_dict())
    for n in (1, 3, 7):
        x = torch.randn(n, 3)
        torch.testing.assert_close(ghost.eval()(x), bn.eval()(x))


def test_without_running_stats_normalizes_per_chunk_in_eval_too():
    ghost = batchnorm.GhostBatchNorm1d(3, virtual_batch_size=4, track_running_stats=False).eval()
    x = torch.randn(8, 3, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), reference.ghost_batch_norm_train(
        x, ghost.weight, ghost.bias, 1e-5, [4, 4]), **TIGHT)


def test_gradcheck_fp64():
    torch.manual_seed(2)
    x = torch.randn(7, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: F.ghost_batch_norm(x, None, None, w, b, True, virtual_batch_size=3),
        (x, w, b))


def test_errors():
    with pytest.raises(ValueError, match=r"GhostBatchNorm2d\(4\): virtual_batch_size must be a "
                                         r"positive int.*got 0"):
        batchnorm.GhostBatchNorm2d(4, virtual_batch_size=0)
    with pytest.raises(ValueError, match=r"virtual_batch_size must be a positive int.*2.5"):
        batchnorm.GhostBatchNorm1d(4, virtual_batch_size=2.5)
    with pytest.raises(ValueError, match=r"more than one value per channel.*larger "
                                         r"virtual_batch_size"):
        batchnorm.GhostBatchNorm1d(4, virtual_batch_size=1)(torch.randn(4, 4))


def test_empty_batch_changes_nothing():
    layer = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2)
    assert layer(torch.randn(0, 3, 2, 2)).shape == (0, 3, 2, 2)
    assert int(layer.num_batches_tracked) == 0


@settings(max_examples=25)
@given(n=st.integers(2, 13), c=st.integers(1, 4), length=st.sampled_from([None, 1, 3, 7]),
       vbs=st.integers(1, 14))
def test_any_shape_matches_reference(n, c, length, vbs):
    shape = (n, c) if length is None else (n, c, length)
    sizes = F.virtual_batch_sizes(n, vbs, length or 1)
    assert sum(sizes) == n and max(sizes) <= vbs + 1
    x = torch.randn(shape, dtype=torch.float64)
    layer = batchnorm.GhostBatchNorm1d(c, virtual_batch_size=vbs, dtype=torch.float64)
    if vbs * (length or 1) == 1:  # every virtual batch holds one value per channel
        with pytest.raises(ValueError, match="more than one value per channel"):
            layer(x)
        return
    torch.testing.assert_close(layer(x), reference.ghost_batch_norm_train(x, None, None, 1e-5,
                                                                          sizes), **TIGHT)
    mean, var = reference.batch_stats(x)
    torch.testing.assert_close(layer.running_mean, 0.1 * mean, **TIGHT)
