"""Every layer under every autograd transform, on every backend (issue 17, "correct under every
transform").

gradcheck and gradgradcheck in float64 are the oracle (finite differences): first order, forward
mode, batched gradients (is_grads_batched, i.e. vmap over the backward), double backward and
forward-over-reverse. torch.func's transforms, the meta device and jit.trace are compared with
torch.nn. Each backend is reached with `batchnorm.use_backend`; the default route of a large
batch (our Numba kernels) is checked against torch.nn's double backward directly, since finite
differences over 10^5 inputs would take hours.
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call, grad, jvp, vmap

import batchnorm
from batchnorm.kernels import dispatch
from tests.conftest import assert_close_scaled

BACKENDS = ["aten", "composite", "numba", "native"]


def _renorm(c):
    """Batch renorm with r and d clipped (far-off running statistics): the gradient treats them as
    constants (Ioffe 2017), which is the true derivative only where they are clipped, so this is
    where finite differences can check it."""
    layer = batchnorm.BatchRenorm2d(c, momentum=0.0, rmax=1.5, dmax=1.0, rmax_ramp=None,
                                    dmax_ramp=None)
    layer.running_mean.fill_(50.0)
    layer.running_var.fill_(100.0)
    return layer


# name -> (layer factory, input shape, extra forward arguments)
LAYERS = {
    "BatchNorm1d (N, C)": (lambda c: batchnorm.BatchNorm1d(c), (5, 3), {}),
    "BatchNorm1d (N, C, L)": (lambda c: batchnorm.BatchNorm1d(c), (3, 2, 4), {}),
    "BatchNorm2d": (lambda c: batchnorm.BatchNorm2d(c), (3, 2, 3, 3), {}),
    "BatchNorm3d": (lambda c: batchnorm.BatchNorm3d(c), (2, 2, 2, 2, 3), {}),
    "BatchNormAct2d relu": (lambda c: batchnorm.BatchNormAct2d(c, act="relu"), (3, 2, 3, 3), {}),
    "BatchNormAct2d silu": (lambda c: batchnorm.BatchNormAct2d(c, act="silu"), (3, 2, 3, 3), {}),
    "BatchRenorm2d": (_renorm, (3, 2, 3, 3), {}),
    "GhostBatchNorm2d": (lambda c: batchnorm.GhostBatchNorm2d(c, virtual_batch_size=2),
                         (4, 2, 2, 3), {}),
    "MaskedBatchNorm1d": (lambda c: batchnorm.MaskedBatchNorm1d(c), (3, 2, 4),
                          {"mask": torch.tensor([[True] * 4, [True, True, False, False],
                                                 [True, True, True, False]])}),
    "DomainBatchNorm2d": (lambda c: batchnorm.DomainBatchNorm2d(c, num_domains=2),
                          (3, 2, 3, 3), {"domain": 1}),
    "SyncBatchNorm (world of one)": (lambda c: batchnorm.SyncBatchNorm(c), (3, 2, 3, 3), {}),
}


def _inputs(shape, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.7
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _function(layer, extra, backend):
    """x, weight, bias -> the layer's training output, on `backend`; a ReLU layer's output is
    squared so that its second derivative is not zero almost everywhere."""
    weight, bias = layer.weight, layer.bias

    def f(x, w, b):
        with batchnorm.use_backend(backend):
            y = functional_call(layer, {"weight": w, "bias": b}, (x,), extra)
        return y * y if getattr(layer, "activation", None) == "relu" else y
    leaves = [weight.detach().double().add(0.3).requires_grad_(), bias.detach().double()
              .add(0.1).requires_grad_()]
    return f, leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_first_and_second_order_forward_mode_and_batched_gradients(name, backend):
    factory, shape, extra = LAYERS[name]
    layer = factory(shape[1]).double().train()
    for channels_last in ([False, True] if len(shape) == 4 else [False]):
        f, params = _function(layer, extra, backend)
        x = _inputs(shape, channels_last)
        assert gradcheck(f, (x, *params), check_forward_ad=True, check_batched_grad=True,
                         check_backward_ad=True, fast_mode=True)
        assert gradgradcheck(f, (x, *params), check_fwd_over_rev=True, check_batched_grad=True,
                             fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_second_order(backend):
    layer = batchnorm.BatchNormAct2d(2, act="silu").double().eval()
    layer.running_mean.fill_(0.4)
    layer.running_var.fill_(1.7)
    f, params = _function(layer, {}, backend)
    x = _inputs((3, 2, 3, 3), channels_last=False)
    assert gradgradcheck(f, (x, *params), check_fwd_over_rev=True, fast_mode=True)


@pytest.mark.parametrize("shape,fmt", [((16, 96, 32, 32), torch.contiguous_format),
                                       ((32, 8, 32, 32), torch.channels_last)])
def test_gradient_penalty_on_the_default_route_of_a_large_batch_matches_torch_nn(shape, fmt):
    """A WGAN-GP/R1 penalty: the gradient of |dL/dx|^2 needs the backward's own graph. These
    batches run on our kernels by default (measured faster; aten's channels-last sums are not
    accurate at 32768 values a channel); the second-order terms must be torch.nn's."""
    x = (torch.randn(shape) * 2 + 1).contiguous(memory_format=fmt)
    assert dispatch.choose(x, training=True, fused=False) == "numba"
    results = []
    for layer in (batchnorm.BatchNorm2d(shape[1]), torch.nn.BatchNorm2d(shape[1])):
        layer.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        xi = x.clone().requires_grad_()
        out = layer(xi)
        (g,) = torch.autograd.grad((out.sin()).sum(), xi, create_graph=True)
        penalty = g.pow(2).sum()
        results.append(torch.autograd.grad(penalty, (xi, layer.weight)))
    for ours, theirs in zip(*results):
        assert_close_scaled(ours, theirs, 1e-4)


def test_torch_func_transforms_match_torch_nn():
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 2 + 1
    t = torch.randn_like(x)
    ours, ref = batchnorm.BatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()
    # jvp: torch.nn refuses to update captured buffers here; its functional form has none
    _, tangent = jvp(ours, (x,), (t,))
    _, expected = jvp(lambda v: torch.nn.functional.batch_norm(v, None, None, training=True),
                      (x,), (t,))
    assert_close_scaled(tangent, expected, 1e-10)
    assert ours.num_batches_tracked.item() == 1  # the update happened, once, outside the transform
    # grad of a functional_call, buffers updated like an eager step
    params = dict(ours.named_parameters())
    before = ours.running_mean.clone()
    grads = grad(lambda p: functional_call(ours, p, (x,)).pow(3).sum())(params)
    expected_grads = torch.autograd.grad(ref(x).pow(3).sum(), list(ref.parameters()))
    for ours_grad, theirs in zip(grads.values(), expected_grads):
        assert_close_scaled(ours_grad, theirs, 1e-10)
    assert not torch.equal(ours.running_mean, before)
    # vmap: eval and untracked training batch per sample, like torch.nn
    batched = torch.randn(4, 6, 3, 4, 4, dtype=torch.float64)
    ours.eval(), ref.eval()
    ref.load_state_dict(ours.state_dict())
    assert_close_scaled(vmap(ours)(batched), vmap(ref)(batched), 1e-12)
    untracked = batchnorm.BatchNorm2d(3, track_running_stats=False).double()
    ref_untracked = torch.nn.BatchNorm2d(3, track_running_stats=False).double()
    assert_close_scaled(vmap(untracked)(batched), vmap(ref_untracked)(batched), 1e-12)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): vmap.*replace_all_batch_norm_modules_"):
        vmap(batchnorm.BatchNorm2d(3).double())(batched)


@pytest.mark.parametrize("training", [True, False])
def test_meta_device_forward_matches_torch_nn(training):
    ours = batchnorm.BatchNormAct2d(4, device="meta").train(training)
    ref = torch.nn.BatchNorm2d(4, device="meta").train(training)
    x = torch.empty(2, 4, 5, 5, device="meta").contiguous(memory_format=torch.channels_last)
    y, y_ref = ours(x), ref(x)
    assert y.is_meta and y.shape == y_ref.shape and y.stride() == y_ref.stride()


def test_jit_trace_records_the_composite_math():
    layer = batchnorm.BatchNorm2d(3).eval()
    layer.running_mean.normal_()
    x = torch.randn(4, 3, 5, 5)
    traced = torch.jit.trace(layer, x)
    other = torch.randn(2, 3, 7, 7)
    assert_close_scaled(traced(other), layer(other), 1e-6)
