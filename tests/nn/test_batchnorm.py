"""BatchNorm1d/2d/3d against torch.nn.BatchNorm* (the oracle torch users already trust)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import batchnorm
from tests.conftest import TOLERANCE, assert_close_scaled

OURS = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d,
        5: batchnorm.BatchNorm3d}
TORCH = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
         5: torch.nn.BatchNorm3d}


@st.composite
def layer_cases(draw):
    ndim = draw(st.sampled_from([2, 3, 4, 5]))
    batch = draw(st.integers(1, 6))
    spatial = [draw(st.integers(1, 5)) for _ in range(ndim - 2)]
    if batch * math.prod(spatial) == 1:
        batch = 2  # training needs M > 1; that error has its own test
    return dict(
        shape=(batch, draw(st.integers(1, 7)), *spatial),
        channels_last=ndim >= 4 and draw(st.booleans()),
        affine=draw(st.booleans()),
        track_running_stats=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 0.5, None])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
    )


def _make_pair(shape, affine, track_running_stats, momentum, dtype):
    kwargs = dict(affine=affine, track_running_stats=track_running_stats, momentum=momentum,
                  dtype=dtype)
    ours, ref = OURS[len(shape)](shape[1], **kwargs), TORCH[len(shape)](shape[1], **kwargs)
    if affine:  # non-trivial gamma/beta so that their gradients and use are really checked
        with torch.no_grad():
            ref.weight.uniform_(0.5, 2.0)
            ref.bias.uniform_(-1.0, 1.0)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _input(shape, channels_last, dtype, offset=3.0, scale=2.0):
    x = torch.randn(shape, dtype=dtype) * scale + offset
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4
                         else torch.channels_last_3d)
    return x


@settings(max_examples=320)
@given(layer_cases())
def test_parity_with_torch_nn_over_training_steps_then_eval(case):
    shape, dtype = case["shape"], case["dtype"]
    tol = TOLERANCE[dtype]
    ours, ref = _make_pair(shape, case["affine"], case["track_running_stats"], case["momentum"],
                           dtype)
    for step in range(3):
        x = _input(shape, case["channels_last"], dtype, offset=step)
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_ref = ours(x_ours), ref(x_ref)
        assert_close_scaled(y_ours, y_ref, tol, f"output step {step}")
        assert y_ours.dtype == dtype
        if case["channels_last"]:
            fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            assert y_ours.is_contiguous(memory_format=fmt)
        dy = torch.randn_like(y_ref)
        y_ours.backward(dy)
        y_ref.backward(dy)
        assert_close_scaled(x_ours.grad, x_ref.grad, tol, "input grad")
        if case["affine"]:
            assert_close_scaled(ours.weight.grad, ref.weight.grad, tol, "weight grad")
            assert_close_scaled(ours.bias.grad, ref.bias.grad, tol, "bias grad")
        for key, value in ref.state_dict().items():
            assert_close_scaled(ours.state_dict()[key], value, tol, key)
    ours.eval(), ref.eval()
    x = _input(shape, case["channels_last"], dtype)
    assert_close_scaled(ours(x), ref(x), tol, "eval output")


@pytest.mark.parametrize("layer,shape", [(batchnorm.BatchNorm1d, (6, 4)),
                                         (batchnorm.BatchNorm2d, (3, 4, 5, 5))])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(layer, shape, training):
    bn = layer(shape[1], dtype=torch.float64).train(training)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0), bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    bn.momentum = 0.0  # keep the running statistics fixed across gradcheck's many evaluations
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return batchnorm.functional.batch_norm(x, bn.running_mean, bn.running_var, w, b,
                                               training, 0.0, bn.eps)

    assert torch.autograd.gradcheck(f, (x, bn.weight, bn.bias))


def test_state_dict_round_trip_both_ways():
    ref = torch.nn.BatchNorm2d(5)
    ref(torch.randn(4, 5, 3, 3) * 2 + 1)
    ours = batchnorm.BatchNorm2d(5)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    for key in ref.state_dict():
        assert torch.equal(ours.state_dict()[key], ref.state_dict()[key])
    ours(torch.randn(4, 5, 3, 3))
    back = torch.nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.running_var, ours.running_var)
    assert back.num_batches_tracked.item() == 2


def test_old_checkpoint_without_num_batches_tracked_loads():
    ref = torch.nn.BatchNorm1d(3)
    state = ref.state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}  # torch.nn's pre-0.4.1 checkpoints
    ours = batchnorm.BatchNorm1d(3)
    ours.load_state_dict(state)
    assert ours.num_batches_tracked.item() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_float_parameters_matches_float_computation(dtype):
    ours = batchnorm.BatchNorm2d(6)
    ref = torch.nn.BatchNorm2d(6)
    x = torch.randn(4, 6, 5, 5) * 3 + 2
    y = ours(x.to(dtype))
    y_ref = ref(x.to(dtype).float())  # same rounded input, computed in fp32
    assert y.dtype == dtype and ours.running_mean.dtype == torch.float32
    eps = torch.finfo(dtype).eps
    assert (y.float() - y_ref).abs().max().item() <= 4 * eps * y_ref.abs().max().item()
    assert_close_scaled(ours.running_var, ref.running_var, 1e-5, "running_var")


def test_is_a_torch_batchnorm_for_user_code():
    bn = batchnorm.BatchNorm2d(4)
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
    assert repr(bn) == repr(torch.nn.BatchNorm2d(4))


def test_affine_without_bias_matches_torch():
    ours, ref = batchnorm.BatchNorm1d(3, bias=False), torch.nn.BatchNorm1d(3, bias=False)
    assert ours.bias is None and list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(5, 3, requires_grad=True)
    y = ours(x)
    y.sum().backward()
    assert_close_scaled(y, ref(x), 1e-5, "output")


@pytest.mark.parametrize("layer,shape,kwargs", [
    (batchnorm.BatchNorm1d, (6, 4, 3), {"affine": False}),
    (batchnorm.BatchNorm2d, (6, 4, 5, 5), {"momentum": None}),
    (batchnorm.BatchNorm3d, (6, 4, 2, 3, 3), {"bias": False})])
def test_torch_jit_script_compiles_the_torch_nn_layer_on_the_same_state(layer, shape, kwargs):
    """torch.jit.script compiles torch.nn's layer in place of ours (`__prepare_scriptable__`),
    holding our Parameters and buffers: it trains them as torch.nn would."""
    ours = layer(4, **kwargs)
    torch_cls = getattr(torch.nn, layer.__name__)
    reference = torch_cls(4, **kwargs)
    scripted = torch.jit.script(torch.nn.Sequential(ours))
    x = torch.randn(shape)
    for _ in range(2):
        torch.testing.assert_close(scripted(x), reference(x))
    torch.testing.assert_close(dict(ours.named_buffers()), dict(reference.named_buffers()))
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in reference.named_parameters()]
    scripted.eval()
    reference.eval()
    torch.testing.assert_close(scripted(x), reference(x))


@pytest.mark.parametrize("layer", [
    lambda: batchnorm.BatchNormAct2d(4), lambda: batchnorm.BatchRenorm2d(4),
    lambda: batchnorm.GhostBatchNorm2d(4, virtual_batch_size=2),
    lambda: batchnorm.MaskedBatchNorm2d(4), lambda: batchnorm.FrozenBatchNorm2d(4),
    lambda: batchnorm.BatchNorm2d(4, sync=True), lambda: batchnorm.SyncBatchNorm(4)])
def test_torch_jit_script_of_a_layer_without_torch_equivalent_says_what_to_use(layer):
    module = layer()
    with pytest.raises(RuntimeError, match=rf"{type(module).__name__}\(4\).*: torch.jit.script "
                                           r"cannot compile this layer.*use torch.jit.trace or "
                                           r"torch.export.*convert\(model, to='torch'\)"):
        torch.jit.script(torch.nn.Sequential(torch.nn.Identity(), module))
