"""BatchRenorm1d/2d/3d against Algorithm 1 of Ioffe 2017 (arXiv 1702.03275) in float64."""

import pytest
import torch

import batchnorm
from batchnorm import functional as F
from batchnorm import reference

TIGHT = {"atol": 1e-10, "rtol": 1e-10}


def _affine(layer):
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


def _compare_steps(layer, limits, shape, steps=4):
    """Train `layer` for `steps` batches next to the reference; `limits(step)` -> (rmax, dmax)."""
    momentum, eps, count = layer.momentum, layer.eps, shape[0] * shape[2:].numel()
    rm, rv, nbt = torch.zeros(shape[1]), torch.ones(shape[1]), 0
    clipped = []
    for step in range(steps):
        # Mean 2 and std 3 against running statistics that start at 0 and 1: r and d clip.
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
        y = layer(x)
        dy = torch.randn_like(y)
        y.backward(dy)
        xr = x.detach().clone().requires_grad_()
        w = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()
        rmax, dmax = limits(step)
        yr, mean, var = reference.batch_renorm_train(xr, w, b, rm, rv, eps, rmax, dmax)
        yr.backward(dy)
        clipped.append(bool(((var + eps).sqrt() / (rv + eps).sqrt() > rmax).any()))
        torch.testing.assert_close(y, yr, **TIGHT)
        torch.testing.assert_close(x.grad, xr.grad, **TIGHT)
        torch.testing.assert_close(layer.weight.grad, w.grad, **TIGHT)
        torch.testing.assert_close(layer.bias.grad, b.grad, **TIGHT)
        rm, rv, nbt = reference.update_running_stats(rm, rv, nbt, mean, var, count, momentum)
        torch.testing.assert_close(layer.running_mean, rm, **TIGHT)
        torch.testing.assert_close(layer.running_var, rv, **TIGHT)
        assert int(layer.num_batches_tracked) == nbt
        layer.zero_grad()
    return rm, rv, clipped


@pytest.mark.parametrize("cls, shape", [(batchnorm.BatchRenorm1d, (6, 3)),
                                        (batchnorm.BatchRenorm1d, (4, 3, 5)),
                                        (batchnorm.BatchRenorm2d, (4, 3, 5, 7)),
                                        (batchnorm.BatchRenorm3d, (2, 3, 3, 4, 5))])
def test_fixed_limits_match_reference_over_steps(cls, shape):
    torch.manual_seed(0)
    layer = _affine(cls(3, momentum=0.3, rmax=1.5, dmax=0.5, rmax_ramp=None, dmax_ramp=None,
                        dtype=torch.float64))
    rm, rv, clipped = _compare_steps(layer, lambda step: (1.5, 0.5), torch.Size(shape))
    assert clipped[0], "the test data should make r clip"
    layer.eval()
    x = torch.randn(shape, dtype=torch.float64)
    expected = reference.normalize(x, rm, rv, layer.weight.detach(), layer.bias.detach(), 1e-5)
    torch.testing.assert_close(layer(x), expected, **TIGHT)


def test_ramped_limits_follow_the_schedule():
    torch.manual_seed(1)
    layer = _affine(batchnorm.BatchRenorm2d(3, momentum=0.2, rmax=3.0, dmax=5.0,
                                            rmax_ramp=(1, 3), dmax_ramp=(1, 2),
                                            dtype=torch.float64))
    schedule = {0: (1.0, 0.0), 1: (1.0, 0.0), 2: (2.0, 5.0), 3: (3.0, 5.0)}
    _compare_steps(layer, schedule.__getitem__, torch.Size((4, 3, 2, 3)))


def test_default_schedule_is_the_papers():
    layer = batchnorm.BatchRenorm2d(4)
    assert (layer.momentum, layer.rmax, layer.dmax) == (0.01, 3.0, 5.0)
    for step, (rmax, dmax) in {0: (1, 0), 5000: (1, 0), 15000: (1 + 2 * 10 / 35, 2.5),
                               25000: (1 + 2 * 20 / 35, 5), 40000: (3, 5), 90000: (3, 5)}.items():
        layer.num_batches_tracked.fill_(step)
        got = layer.clip_limits()
        assert got[0].item() == pytest.approx(rmax) and got[1].item() == pytest.approx(dmax)


@pytest.mark.parametrize("cls, shape", [(batchnorm.BatchRenorm1d, (5, 3)),
                                        (batchnorm.BatchRenorm2d, (4, 3, 5, 5))])
def test_rmax_1_dmax_0_is_batchnorm(cls, shape):
    """Algorithm 1 with r = 1, d = 0 is batch norm: outputs, gradients, running statistics."""
    torch.manual_seed(2)
    renorm = _affine(cls(3, momentum=0.1, rmax=1.0, dmax=0.0, rmax_ramp=None, dmax_ramp=None))
    bn = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d}[len(shape) - 2 or 1](3)
    bn.load_state_dict(renorm.state_dict())
    for _ in range(3):
        x = torch.randn(shape) * 2 + 3
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = renorm(x1), bn(x2)
        dy = torch.randn_like(y1)
        y1.backward(dy)
        y2.backward(dy)
        torch.testing.assert_close(y1, y2)
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(renorm.weight.grad, bn.weight.grad)
        torch.testing.assert_close(renorm.bias.grad, bn.bias.grad)
        torch.testing.assert_close(renorm.running_mean, bn.running_mean)
        torch.testing.assert_close(renorm.running_var, bn.running_var)
    x = torch.randn(shape)
    torch.testing.assert_close(renorm.eval()(x), bn.eval()(x))


def test_gradcheck_fp64():
    """With r and d clipped in every channel they are locally constant, so the numerical
    derivative (which perturbs them) and the analytic one (which holds them fixed) agree."""
    torch.manual_seed(3)
    x = (torch.randn(6, 3, 4, dtype=torch.float64) * 3 + 2).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return F.batch_renorm(x, torch.zeros(3, dtype=torch.float64),
                              torch.ones(3, dtype=torch.float64), w, b, True, rmax=1.2, dmax=0.1)
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_state_dict_is_batchnorms():
    renorm = batchnorm.BatchRenorm2d(4)
    bn = torch.nn.BatchNorm2d(4)
    bn.train()(torch.randn(4, 4, 3, 3))
    renorm.load_state_dict(bn.state_dict())
    assert renorm.state_dict().keys() == bn.state_dict().keys()
    torch.testing.assert_close(renorm.running_var, bn.running_var)


def test_errors():
    with pytest.raises(ValueError, match=r"BatchRenorm2d\(4\): rmax must be a number >= 1.*0.5"):
        batchnorm.BatchRenorm2d(4, rmax=0.5)
    with pytest.raises(ValueError, match=r"dmax must be a number >= 0.*-1"):
        batchnorm.BatchRenorm1d(4, dmax=-1)
    with pytest.raises(ValueError, match=r"rmax_ramp must be None.*\(start, end\).*\(10, 5\)"):
        batchnorm.BatchRenorm1d(4, rmax_ramp=(10, 5))
    with pytest.raises(ValueError, match=r"needs track_running_stats=True"):
        batchnorm.BatchRenorm3d(4, track_running_stats=False)
    with pytest.raises(ValueError, match=r"more than one value per channel.*eval mode"):
        batchnorm.BatchRenorm1d(4)(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"batch_renorm: batch renorm needs running_mean"):
        F.batch_renorm(torch.randn(4, 3), None, None, training=True)
    with pytest.raises(ValueError, match=r"BatchRenorm1d\(4\) expected input with 4 channels"):
        batchnorm.BatchRenorm1d(4)(torch.randn(4, 3))


def test_empty_and_nonfinite_batches_leave_the_statistics_alone():
    layer = batchnorm.BatchRenorm1d(3)
    assert layer(torch.randn(0, 3)).shape == (0, 3)
    x = torch.randn(4, 3)
    x[1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"BatchRenorm1d\(3\): the batch statistics are not "
                                            r"finite"):
        y = layer(x)
    assert y[:, 2].isnan().all()
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_var, torch.ones(3))
