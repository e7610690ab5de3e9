"""DomainBatchNorm1d/2d/3d: batch norm with one set of running statistics per domain."""

import pytest
import torch

import batchnorm
from batchnorm import reference

TIGHT = {"atol": 1e-10, "rtol": 1e-10}


@pytest.mark.parametrize("shared_affine", [True, False])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_matches_per_domain_reference_over_steps(shared_affine, as_tensor):
    torch.manual_seed(0)
    k, c = 3, 4
    layer = batchnorm.DomainBatchNorm2d(c, k, momentum=0.3, shared_affine=shared_affine,
                                        dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    rm, rv, nbt = torch.zeros(k, c, dtype=torch.float64), torch.ones(k, c, dtype=torch.float64), [0] * k
    for domain in (2, 0, 2, 1, 2):
        x = (torch.randn(3, c, 4, 5, dtype=torch.float64) * (domain + 1) + domain).requires_grad_()
        y = layer(x, torch.tensor(domain) if as_tensor else domain)
        dy = torch.randn_like(y)
        y.backward(dy)
        xr = x.detach().clone().requires_grad_()
        w = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()
        yr, mean, var = reference.batch_norm_train(xr, w if shared_affine else w[domain],
                                                   b if shared_affine else b[domain], 1e-5)
        yr.backward(dy)
        torch.testing.assert_close(y, yr, **TIGHT)
        torch.testing.assert_close(x.grad, xr.grad, **TIGHT)
        torch.testing.assert_close(layer.weight.grad, w.grad, **TIGHT)
        torch.testing.assert_close(layer.bias.grad, b.grad, **TIGHT)
        rm[domain], rv[domain], nbt[domain] = reference.update_running_stats(
            rm[domain], rv[domain], nbt[domain], mean, var, 3 * 4 * 5, 0.3)
        torch.testing.assert_close(layer.running_mean, rm, **TIGHT)
        torch.testing.assert_close(layer.running_var, rv, **TIGHT)
        assert layer.num_batches_tracked.tolist() == nbt
        layer.zero_grad()
    layer.eval()
    x = torch.randn(2, c, 3, 3, dtype=torch.float64)
    for domain in range(k):
        w = layer.weight.detach() if shared_affine else layer.weight.detach()[domain]
        b = layer.bias.detach() if shared_affine else layer.bias.detach()[domain]
        expected = reference.normalize(x, rm[domain], rv[domain], w, b, 1e-5)
        torch.testing.assert_close(layer(x, domain), expected, **TIGHT)


def test_one_domain_is_batchnorm():
    torch.manual_seed(1)
    domain, bn = batchnorm.DomainBatchNorm1d(3, 1), batchnorm.BatchNorm1d(3)
    for _ in range(3):
        x = torch.randn(6, 3, 4) * 2 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = domain(x1, 0), bn(x2)
        y1.sum().backward()
        y2.sum().backward()
        torch.testing.assert_close(y1, y2)
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(domain.weight.grad, bn.weight.grad)
    torch.testing.assert_close(domain.running_var[0], bn.running_var)
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(domain.eval()(x, 0), bn.eval()(x))


def test_gradcheck_fp64():
    layer = batchnorm.DomainBatchNorm1d(2, 2, shared_affine=False, track_running_stats=False,
                                        dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x, 1), (x,))


def test_batchnorm_state_dict_seeds_every_domain():
    bn = torch.nn.BatchNorm2d(4)
    bn.train()(torch.randn(8, 4, 3, 3) * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_()
    layer = batchnorm.DomainBatchNorm2d(4, 3, shared_affine=False)
    layer.load_state_dict(bn.state_dict())
    for name in ("running_mean", "running_var", "weight", "bias"):
        assert torch.equal(getattr(layer, name), getattr(bn, name).detach().expand(3, 4)), name
    assert layer.num_batches_tracked.tolist() == [1, 1, 1]
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(layer.eval()(x, 2), bn.eval()(x))


def test_errors():
    layer = batchnorm.DomainBatchNorm1d(3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(IndexError, match=r"DomainBatchNorm1d\(3\): domain 2 is out of range for "
                                         r"num_domains=2 \(expected 0 <= domain < 2\)"):
        layer(x, 2)
    with pytest.raises(IndexError, match=r"domain -1 is out of range"):
        layer(x, torch.tensor(-1))
    with pytest.raises(TypeError, match=r"domain must be an int or an integer tensor, got float"):
        layer(x, 1.0)
    with pytest.raises(TypeError, match=r"got a tensor of dtype torch.float32"):
        layer(x, torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"one index per call.*shape \(4,\).*once per domain"):
        layer(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"num_domains must be a positive int, got 0"):
        batchnorm.DomainBatchNorm2d(3, 0)
