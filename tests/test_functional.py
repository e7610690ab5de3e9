"""functional.batch_norm: the running-statistics rules, numerics and the float64 reference."""

import warnings

import pytest
import torch

import batchnorm
from batchnorm import functional as F, reference
from batchnorm.kernels import native
from tests.conftest import assert_close_scaled


def test_reference_forward_and_backward_match_autograd_of_torch_in_float64():
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y_torch = torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    dy = torch.randn_like(y_torch)
    y_torch.backward(dy)
    y, _, _ = reference.batch_norm_train(x.detach(), w.detach(), b.detach(), 1e-5)
    dx, dw, db = reference.batch_norm_train_backward(dy, x.detach(), w.detach(), 1e-5)
    for ours, theirs in [(y, y_torch), (dx, x.grad), (dw, w.grad), (db, b.grad)]:
        assert_close_scaled(ours, theirs, 1e-12)


@pytest.mark.parametrize("backend", ["aten", "composite", "numba", "native"])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_statistics_follow_the_reference_update_rule(momentum, backend):
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    tracked = torch.tensor(0)
    ref_mean, ref_var, ref_tracked = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), 0
    for step in range(4):
        x = torch.randn(6 + step, 4, 3) * (step + 1) + step
        with batchnorm.use_backend(backend):
            F.batch_norm(x, running_mean, running_var, training=True, momentum=momentum,
                         num_batches_tracked=tracked)
        mean, var = reference.batch_stats(x)
        ref_mean, ref_var, ref_tracked = reference.update_running_stats(
            ref_mean, ref_var, ref_tracked, mean, var, x.numel() // 4, momentum)
        assert_close_scaled(running_mean, ref_mean, 1e-5, "running_mean")
        assert_close_scaled(running_var, ref_var, 1e-5, "running_var")
        assert tracked.item() == ref_tracked


@pytest.mark.parametrize("backend", ["aten", "numba"])
def test_running_statistics_updates_bump_their_autograd_versions(backend):
    # Autograd must see the in-place change (as it does torch.nn's), or a graph that saved the
    # old values would use the new ones.
    bn = batchnorm.BatchNorm2d(3)
    versions = [t._version for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    with batchnorm.use_backend(backend):
        bn(torch.randn(4, 3, 5, 5))
    assert bn.num_batches_tracked.item() == 1
    for before, t in zip(versions, (bn.running_mean, bn.running_var, bn.num_batches_tracked)):
        assert t._version > before


def _variance_relative_error(stats_fn):
    x = (torch.randn(64, 8, 16, 16, dtype=torch.float64) * 1e-2 + 1e4).float()
    _, var_ref = reference.batch_stats(x)
    count, _, m2 = stats_fn(x)
    return ((m2 / count).double() - var_ref).abs().max().item() / var_ref.min().item()


def _textbook_stats(x):
    """E[x^2] - E[x]^2 in fp32: the formula that loses every digit when |mean| >> std."""
    dims = native.reduce_dims(x)
    count = torch.full((x.shape[1],), x.numel() / x.shape[1])
    mean = x.mean(dims)
    return count, mean, ((x * x).mean(dims) - mean * mean) * count


def test_variance_is_accurate_when_the_mean_dwarfs_the_std():
    assert _variance_relative_error(native.stats) < 1e-3
    assert _variance_relative_error(batchnorm.kernels.stats) < 1e-3  # through the custom op
    # The criterion has teeth: the textbook formula fails it by orders of magnitude.
    assert _variance_relative_error(_textbook_stats) > 1e-1


def test_merge_stats_is_chans_formula_and_ignores_empty_partials():
    parts = [torch.randn(n, 3, dtype=torch.float64) * 5 + 100 for n in (4, 1, 9)]
    counts = torch.tensor([[4.0] * 3, [0.0] * 3, [1.0] * 3, [9.0] * 3], dtype=torch.float64)
    means = torch.stack([parts[0].mean(0), torch.full((3,), float("nan"), dtype=torch.float64),
                         parts[1].mean(0), parts[2].mean(0)])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) for p in parts[:1]] + [torch.zeros(3, dtype=torch.float64)]
                      + [((p - p.mean(0)) ** 2).sum(0) for p in parts[1:]])
    total, mean, m2 = native.merge_stats(counts, means, m2s)
    everything = torch.cat(parts)
    assert torch.equal(total, torch.full((3,), 14.0, dtype=torch.float64))
    assert_close_scaled(mean, everything.mean(0), 1e-12)
    assert_close_scaled(m2, ((everything - everything.mean(0)) ** 2).sum(0), 1e-10)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_leaves_running_statistics_alone_and_warns_once_per_layer(bad):
    bn, other = batchnorm.BatchNorm2d(3), batchnorm.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 1] = bad
    with pytest.warns(RuntimeWarning, match=r"BatchNorm2d\(3\).*not finite.*left unchanged"):
        y = bn(x)
    assert torch.isnan(y[:, 2]).all()  # the output still shows the problem
    assert torch.isfinite(y[:, :2]).all()
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bn(x)
        other(x)
    assert len(caught) == 1 and "BatchNorm2d(3)" in str(caught[0].message)


def test_empty_batch_returns_empty_output_and_changes_nothing():
    bn = batchnorm.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = bn(x)
    assert y.shape == (0, 3, 4, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert bn.num_batches_tracked.item() == 0
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))


def test_training_without_running_stats_uses_batch_statistics():
    x = torch.randn(8, 3) * 4 + 1
    y = F.batch_norm(x, None, None, training=False)
    expected, _, _ = reference.batch_norm_train(x, None, None, 1e-5)
    assert_close_scaled(y, expected, 1e-5)


@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "silu", "gelu_tanh"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_residual_and_activation_gradcheck(act, training):
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def f(x, z, w, b):
        return F.batch_norm(x, rm, rv, w, b, training, 0.0, 1e-5, residual=z, activation=act,
                            negative_slope=0.1)

    assert torch.autograd.gradcheck(f, (x, z, w, b))
    mean, var = reference.batch_stats(x.detach()) if training else (rm, rv - 0.0)
    pre = reference.normalize(x.detach(), mean, var, w.detach(), b.detach(), 1e-5) + z.detach()
    assert_close_scaled(f(x, z, w, b), reference.activate(pre, act, 0.1), 1e-10)


# ---- small CPU batches: aten's fused kernel (kernels.small), checked afterwards ---------------


BACKENDS_ON_CPU = ["aten", "composite", "numba", "native"]


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("shape", [(100, 100), (32, 16, 8, 8), (7, 3, 5), (600, 130)])
def test_every_backend_matches_torch_nn_with_running_statistics(backend, shape):
    ours, ref = batchnorm.BatchNorm1d(shape[1]), torch.nn.BatchNorm1d(shape[1])
    if len(shape) == 4:
        ours, ref = batchnorm.BatchNorm2d(shape[1]), torch.nn.BatchNorm2d(shape[1])
    for step in range(3):
        x = (torch.randn(shape) * 2 + step).requires_grad_()
        with batchnorm.use_backend(backend):
            y = ours(x)
        y_ref = ref(x)
        dy = torch.randn(shape)
        dx, = torch.autograd.grad(y, x, dy)
        dx_ref, = torch.autograd.grad(y_ref, x, dy)
        assert_close_scaled(y, y_ref, 1e-5, f"{backend} y")
        assert_close_scaled(dx, dx_ref, 1e-5, f"{backend} dx")
        assert_close_scaled(ours.running_mean, ref.running_mean, 1e-6, f"{backend} running_mean")
        assert_close_scaled(ours.running_var, ref.running_var, 1e-5, f"{backend} running_var")
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3


def test_aten_route_is_torch_nn_to_the_bit():
    ours, ref = batchnorm.BatchNorm1d(100), torch.nn.BatchNorm1d(100)
    x = torch.randn(100, 100, requires_grad=True)
    with batchnorm.use_backend("aten"):
        y = ours(x)
    assert torch.equal(y, ref(x)) and torch.equal(ours.running_mean, ref.running_mean)


def test_overflowing_variance_leaves_running_statistics_alone():
    bn = batchnorm.BatchNorm1d(4)
    x = torch.randn(8, 4) * 3e19  # finite values, variance beyond fp32
    with pytest.warns(RuntimeWarning, match=r"BatchNorm1d\(4\).*not finite"):
        bn(x)
    assert torch.equal(bn.running_var, torch.ones(4)) and bn.num_batches_tracked.item() == 0


@pytest.mark.parametrize("backend", ["aten", "composite", "native"])
def test_half_precision_variance_beyond_its_range_is_not_stored(backend):
    """fp16 buffers hold at most 65504: a running variance above that would be stored as inf (and
    eval would then output zeros); the guard checks the value as stored. With momentum 0.1 the
    same batch moves the buffer to ~1.4e4, which fits and is stored."""
    x = (torch.randn(16, 4) * 400).half()  # variance ~1.6e5
    overflowing = batchnorm.BatchNorm1d(4, momentum=None).half()
    fitting = batchnorm.BatchNorm1d(4, momentum=0.1).half()
    with batchnorm.use_backend(backend):
        with pytest.warns(RuntimeWarning, match=r"BatchNorm1d\(4\).*overflow"):
            overflowing(x)
        fitting(x)
    assert torch.equal(overflowing.running_var, torch.ones(4, dtype=torch.half))
    assert overflowing.num_batches_tracked.item() == 0
    expected = 0.9 + 0.1 * x.double().var(0)
    torch.testing.assert_close(fitting.running_var.double(), expected, rtol=2e-3, atol=0)
    assert fitting.num_batches_tracked.item() == 1


@pytest.mark.parametrize("backend", ["aten", "numba"])
def test_running_variance_below_eps_is_within_its_stated_bound(backend):
    """aten's route forms the running variance from its fp32 invstd: within 2^-23 (var + eps) of
    exact, even when var << eps (kernels/aten.py); ours from m2 directly."""
    x = (torch.randn(64, 8, dtype=torch.float64) * 1e-4).float()
    bn = batchnorm.BatchNorm1d(8, momentum=1.0, affine=False)
    with batchnorm.use_backend(backend):
        bn(x)
    _, var = reference.batch_stats(x)
    bound = 2.0**-23 * (var + 1e-5) * 64 / 63 + 2.0**-24 * var
    assert ((bn.running_var.double() - var * 64 / 63).abs() <= bound).all()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_float64_updates_like_torch_nn(momentum):
    ours = batchnorm.BatchNorm1d(50, momentum=momentum).double()
    ref = torch.nn.BatchNorm1d(50, momentum=momentum).double()
    for step in range(3):
        x = torch.randn(40, 50, dtype=torch.float64) * (step + 1) + step
        assert_close_scaled(ours(x), ref(x), 1e-10)
        assert_close_scaled(ours.running_mean, ref.running_mean, 1e-12)
        assert_close_scaled(ours.running_var, ref.running_var, 1e-12)
