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


@pytest.mark.parametrize("path", ["aten small batch", "kernel update", "torch ops update"])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_statistics_follow_the_reference_update_rule(monkeypatch, momentum, path):
    if path != "aten small batch":
        monkeypatch.setattr(F, "_SMALL_NUMEL", 0)
    if path == "torch ops update":
        monkeypatch.setattr(batchnorm.kernels, "update_running_stats", lambda *args: None)
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    tracked = torch.tensor(0)
    ref_mean, ref_var, ref_tracked = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), 0
    for step in range(4):
        x = torch.randn(6 + step, 4, 3) * (step + 1) + step
        F.batch_norm(x, running_mean, running_var, training=True, momentum=momentum,
                     num_batches_tracked=tracked)
        mean, var = reference.batch_stats(x)
        ref_mean, ref_var, ref_tracked = reference.update_running_stats(
            ref_mean, ref_var, ref_tracked, mean, var, x.numel() // 4, momentum)
        assert_close_scaled(running_mean, ref_mean, 1e-5, "running_mean")
        assert_close_scaled(running_var, ref_var, 1e-5, "running_var")
        assert tracked.item() == ref_tracked


def test_running_statistics_updated_by_the_kernel_bump_their_autograd_versions(monkeypatch):
    # The Numba update writes through numpy views; autograd must still see the in-place change
    # (as it does torch.nn's), or a graph that saved the old values would use the new ones.
    monkeypatch.setattr(F, "_SMALL_NUMEL", 0)
    bn = batchnorm.BatchNorm2d(3)
    versions = [t._version for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
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

def _spy_small_path(monkeypatch):
    from batchnorm.kernels import small
    taken = []
    train = small.train

    def spy(*args):
        y = train(*args)
        taken.append(y is not None)
        return y

    monkeypatch.setattr(small, "train", spy)
    return taken


@pytest.mark.parametrize("shape", [(100, 100), (32, 16, 8, 8), (7, 3, 5), (600, 130)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_small_batch_takes_the_aten_path_and_matches_torch_nn(monkeypatch, shape, momentum):
    taken = _spy_small_path(monkeypatch)
    layer = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}
    ours = layer[len(shape)](shape[1], momentum=momentum)
    ref = getattr(torch.nn, layer[len(shape)].__name__)(shape[1], momentum=momentum)
    for step in range(3):
        x = (torch.randn(shape) * (step + 1) + step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        dy = torch.randn(shape)
        ours(x).backward(dy)
        ref(x_ref).backward(dy)
        assert_close_scaled(x.grad, x_ref.grad, 1e-5, "dx")
    assert taken == [True] * 3
    for key, value in ref.state_dict().items():
        assert_close_scaled(ours.state_dict()[key], value, 1e-6, key)
    assert_close_scaled(ours.weight.grad, ref.weight.grad, 1e-5, "dweight")
    assert_close_scaled(ours.bias.grad, ref.bias.grad, 1e-5, "dbias")


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
def test_small_batch_with_residual_and_activation_matches_the_reference(monkeypatch, activation):
    taken = _spy_small_path(monkeypatch)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 5, 4, 4, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    z = torch.randn(6, 5, 4, 4, generator=g, dtype=torch.float64).requires_grad_()
    weight = (torch.rand(5, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()
    dy = torch.randn(6, 5, 4, 4, generator=g, dtype=torch.float64)
    leaves = (x, z, weight, bias)
    y = F.batch_norm(x, None, None, weight, bias, True, residual=z, activation=activation)
    grads = torch.autograd.grad(y, leaves, dy)
    mean, var = reference.batch_stats(x)
    y_ref = reference.activate(reference.normalize(x, mean, var, weight, bias, 1e-5) + z,
                               activation, 0.01)
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    assert taken == [True]
    assert_close_scaled(y, y_ref, 1e-10, "y")
    for got, want, name in zip(grads, grads_ref, ("dx", "dz", "dweight", "dbias")):
        assert_close_scaled(got, want, 1e-10, name)


def test_residual_of_another_dtype_takes_the_regular_path(monkeypatch):
    taken = _spy_small_path(monkeypatch)
    x, z = torch.randn(6, 5, 4, 4), torch.randn(6, 5, 4, 4, dtype=torch.float64)
    y = F.batch_norm(x, None, None, training=True, residual=z, activation="relu")
    assert taken == [] and y.dtype == torch.float32
    expected = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True) + z)
    assert_close_scaled(y, expected, 1e-5, "y")


@pytest.mark.parametrize("offset,takes_aten", [(0.0, True), (10.0, False)])
def test_long_batch_takes_aten_only_within_our_tolerance(monkeypatch, offset, takes_aten):
    """At 16k rows aten's unshifted fp32 sums drift by ~3e-5 of the output at |mean|/std = 10,
    over our 1e-5: that batch must take our kernels, a centred one may take aten."""
    taken = _spy_small_path(monkeypatch)
    x = (torch.randn(16384, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
         + offset).float()
    y = F.batch_norm(x, None, None, training=True)
    assert taken == [takes_aten]
    mean, var = reference.batch_stats(x)
    assert_close_scaled(y, reference.normalize(x.double(), mean, var, None, None, 1e-5), 1e-5, "y")


def test_small_batch_whose_mean_dwarfs_the_std_takes_our_kernels(monkeypatch):
    taken = _spy_small_path(monkeypatch)
    x = (torch.randn(100, 100, dtype=torch.float64) * 1e-2 + 1e4).float()
    running_mean, running_var = torch.zeros(100), torch.zeros(100)
    F.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    assert taken == [False]
    mean, var = reference.batch_stats(x)
    assert ((running_var.double() - var * 100 / 99).abs() / var).max() < 1e-3
    assert_close_scaled(running_mean, mean, 1e-6)
    # The criterion has teeth: aten's unshifted fp32 sums, which torch.nn uses, fail it.
    ref = torch.nn.BatchNorm1d(100, momentum=1.0, affine=False)
    ref(x)
    assert ((ref.running_var.double() - var * 100 / 99).abs() / var).max() > 1e-2


def test_small_batch_whose_variance_overflows_leaves_running_statistics_alone():
    bn = batchnorm.BatchNorm1d(4)
    x = torch.randn(8, 4) * 3e19  # finite values, variance beyond fp32
    with pytest.warns(RuntimeWarning, match=r"BatchNorm1d\(4\).*not finite"):
        bn(x)
    assert torch.equal(bn.running_var, torch.ones(4)) and bn.num_batches_tracked.item() == 0


def test_small_batch_refused_with_cumulative_average_counts_once(monkeypatch):
    """A batch `kernels.small` refuses has changed nothing: the regular path counts it once."""
    taken = _spy_small_path(monkeypatch)
    bn = batchnorm.BatchNorm1d(100, momentum=None, affine=False)
    first = torch.randn(100, 100, dtype=torch.float64).float()
    refused = (torch.randn(100, 100, dtype=torch.float64) * 1e-2 + 1e4).float()
    bn(first)
    bn(refused)
    assert taken == [True, False] and bn.num_batches_tracked.item() == 2
    (m1, v1), (m2, v2) = reference.batch_stats(first), reference.batch_stats(refused)
    assert_close_scaled(bn.running_mean, (m1 + m2) / 2, 1e-6)
    assert_close_scaled(bn.running_var, (v1 + v2) / 2 * 100 / 99, 1e-6)


def test_small_batch_running_variance_below_eps_is_within_its_stated_bound(monkeypatch):
    """The running variance comes from aten's fp32 invstd: within 2^-23 * (var + eps) of exact,
    even when var << eps (kernels/small.py)."""
    taken = _spy_small_path(monkeypatch)
    x = (torch.randn(64, 8, dtype=torch.float64) * 1e-4).float()
    bn = batchnorm.BatchNorm1d(8, momentum=1.0, affine=False)
    bn(x)
    assert taken == [True]
    _, var = reference.batch_stats(x)
    bound = 2.0**-23 * (var + 1e-5) * 64 / 63 + 2.0**-24 * var
    assert ((bn.running_var.double() - var * 64 / 63).abs() <= bound).all()


_BYTES_OF_1x32x112x112 = 32 * 112 * 112 * 4


@pytest.fixture
def one_torch_thread():
    """torch on one thread (the aten path's values-per-channel limit is per thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape,fmt,activation,max_bytes,takes_aten", [
    ((64, 32, 16, 16), torch.channels_last, "identity", None, True),   # aten's CL kernel
    ((64, 32, 16, 16), torch.channels_last, "relu", None, False),      # fused: ours
    ((64, 32, 16, 16), torch.contiguous_format, "identity", None, False),
    ((1, 32, 224, 224), torch.channels_last, "identity", None, True),  # 50176 values per channel
    ((1, 32, 225, 224), torch.channels_last, "identity", None, False),  # past them (1 thread)
    ((1, 32, 112, 112), torch.channels_last, "identity", _BYTES_OF_1x32x112x112, True),
    ((1, 32, 112, 113), torch.channels_last, "identity", _BYTES_OF_1x32x112x112, False),
])
def test_channels_last_batches_take_aten_only_unfused_and_within_its_limits(
        monkeypatch, one_torch_thread, shape, fmt, activation, max_bytes, takes_aten):
    if max_bytes is not None:  # the real limit, 32 MB, would make a slow test
        monkeypatch.setattr(F, "_ATEN_ROWS_BYTES", max_bytes)
    taken = _spy_small_path(monkeypatch)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=fmt).requires_grad_()
    running_mean, running_var = torch.zeros(32), torch.ones(32)
    y = F.batch_norm(x, running_mean, running_var, training=True, activation=activation)
    assert taken == ([True] if takes_aten else [])
    mean, var = reference.batch_stats(x.detach())
    expected = reference.activate(reference.normalize(x.detach().double(), mean, var, None, None,
                                                      1e-5), activation, 0.01)
    assert_close_scaled(y, expected, 1e-5, "y")
    m = x.numel() // 32
    # aten's fp32 variance at 50k values on one thread is up to ~1e-5 off (relative), which moves
    # an eval output by half that: within the 1e-5 the outputs are held to, so the batch variance
    # is held to 2e-5 (x momentum 0.1 here).
    assert_close_scaled(running_var, 0.9 + 0.1 * var * m / (m - 1), 2e-6, "running_var")
    assert y.is_contiguous(memory_format=fmt)


def test_small_batch_with_strided_running_statistics_takes_the_regular_path(monkeypatch):
    """`kernels.small` writes the running statistics' memory as contiguous: a strided view of
    them (or an int32 count) must go the regular way, and still get torch.nn's update."""
    taken = _spy_small_path(monkeypatch)
    x = torch.randn(16, 4)
    storage = torch.zeros(8), torch.ones(8)
    running_mean, running_var = storage[0][::2], storage[1][::2]
    F.batch_norm(x, running_mean, running_var, training=True, momentum=0.5)
    F.batch_norm(x, torch.zeros(4), torch.ones(4), training=True, momentum=None,
                 num_batches_tracked=torch.tensor(0, dtype=torch.int32))
    assert taken == []
    ref = torch.nn.BatchNorm1d(4, momentum=0.5, affine=False)
    ref(x)
    assert_close_scaled(running_mean, ref.running_mean, 1e-6, "running_mean")
    assert_close_scaled(running_var, ref.running_var, 1e-6, "running_var")
    assert torch.equal(storage[0][1::2], torch.zeros(4)) and torch.equal(storage[1][1::2],
                                                                         torch.ones(4))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_small_batch_in_float64_updates_like_torch_nn(monkeypatch, momentum):
    taken = _spy_small_path(monkeypatch)
    ours = batchnorm.BatchNorm2d(6, momentum=momentum, dtype=torch.float64)
    ref = torch.nn.BatchNorm2d(6, momentum=momentum, dtype=torch.float64)
    for step in range(3):
        x = torch.randn(5, 6, 4, 4, dtype=torch.float64) * (step + 1) + step
        assert_close_scaled(ours(x), ref(x), 1e-10, "y")
    assert taken == [True] * 3
    for key, value in ref.state_dict().items():
        assert_close_scaled(ours.state_dict()[key], value, 1e-10, key)
