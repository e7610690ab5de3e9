"""BatchNormAct1d/2d/3d against the float64 definition act(bn(x) + residual), and torch.nn."""

import pytest
import torch

import batchnorm
from batchnorm import reference
from tests.conftest import assert_close_scaled

ACTS = ["identity", "relu", "leaky_relu", "silu", "gelu_tanh"]


def _reference(x, weight, bias, residual, act, slope, eps=1e-5):
    pre = reference.batch_norm_train(x, weight, bias, eps)[0]
    return reference.activate(pre if residual is None else pre + residual.double(), act, slope)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference_outputs_grads_and_running_stats(act, with_residual):
    torch.manual_seed(0)
    layer = batchnorm.BatchNormAct2d(3, act=act, negative_slope=0.2, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), 0
    for _ in range(3):
        x = (torch.randn(4, 3, 5, 7, dtype=torch.float64) * 2 + 1).requires_grad_()
        z = torch.randn_like(x).requires_grad_() if with_residual else None
        y = layer(x, z)
        dy = torch.randn_like(y)
        y.backward(dy)
        xr = x.detach().clone().requires_grad_()
        zr = z.detach().clone().requires_grad_() if with_residual else None
        w = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()
        yr = _reference(xr, w, b, zr, act, 0.2)
        yr.backward(dy)
        torch.testing.assert_close(y, yr, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(x.grad, xr.grad, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(layer.weight.grad, w.grad, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(layer.bias.grad, b.grad, atol=1e-10, rtol=1e-10)
        if with_residual:
            torch.testing.assert_close(z.grad, zr.grad, atol=1e-10, rtol=1e-10)
        mean, var = reference.batch_stats(x.detach())
        rm, rv, nbt = reference.update_running_stats(rm, rv, nbt, mean, var, 4 * 5 * 7, 0.1)
        torch.testing.assert_close(layer.running_mean, rm, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(layer.running_var, rv, atol=1e-10, rtol=1e-10)
        layer.zero_grad()
    layer.eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    expected = reference.activate(reference.normalize(x, rm, rv, layer.weight.detach(),
                                                      layer.bias.detach(), 1e-5), act, 0.2)
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-10)


def test_gradcheck_fp64():
    torch.manual_seed(1)
    layer = batchnorm.BatchNormAct1d(3, act="silu", track_running_stats=False,
                                     dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, z: layer(x, z), (x, z))


def test_state_dict_is_batchnorms_and_loads_both_ways():
    plain = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    plain.train()(torch.randn(8, 4, 3, 3))
    fused = batchnorm.BatchNormAct2d(4, act=torch.nn.ReLU())
    fused.load_state_dict(plain[0].state_dict())
    assert fused.state_dict().keys() == plain[0].state_dict().keys()
    x = torch.randn(8, 4, 3, 3)
    torch.testing.assert_close(fused.eval()(x), plain.eval()(x))
    torch.nn.BatchNorm2d(4).load_state_dict(fused.state_dict())


class SiLUSubclass(torch.nn.SiLU):
    """Keeps nn.SiLU's forward: the same function, fused."""


class ShiftedSiLU(torch.nn.SiLU):
    """A forward of its own: not nn.SiLU's function, so never fused."""

    def forward(self, x):
        return super().forward(x) + 1


def _transformers_silu():
    return pytest.importorskip("transformers.activations").SiLUActivation()


@pytest.mark.parametrize("act, expected", [
    (torch.nn.ReLU(), "relu"), (torch.nn.ReLU, "relu"), (torch.nn.SiLU(), "silu"),
    (SiLUSubclass(), "silu"), (_transformers_silu, "silu"),
    ("swish", "silu"), (None, "identity"), (torch.nn.Identity(), "identity"),
    (torch.nn.GELU(approximate="tanh"), "gelu_tanh"), (torch.nn.LeakyReLU(0.3), "leaky_relu")])
def test_act_by_name_module_or_class(act, expected):
    act = act() if callable(act) and not isinstance(act, (type, torch.nn.Module)) else act
    layer = batchnorm.BatchNormAct1d(2, act=act)
    assert layer.activation == expected and "act" not in layer._modules
    if expected == "leaky_relu":
        assert layer.negative_slope == 0.3


def test_matches_torch_nn_sequence_fp32():
    torch.manual_seed(2)
    ours = batchnorm.BatchNormAct3d(3, act="leaky_relu", negative_slope=0.1)
    theirs = torch.nn.BatchNorm3d(3)
    x = torch.randn(2, 3, 3, 4, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = ours(x)
    y2 = torch.nn.functional.leaky_relu(theirs(x2), 0.1)
    torch.testing.assert_close(y, y2)
    y.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("backend", ["aten", "composite", "numba", "native"])
@pytest.mark.parametrize("training", [True, False])
def test_negative_leaky_relu_slope_matches_torch_nn(backend, training):
    """A negative slope flips the sign the kernels' backward reads leaky_relu's derivative from;
    such a slope is applied after the kernel, on every backend."""
    ours = batchnorm.BatchNormAct2d(3, act=torch.nn.LeakyReLU(-0.3)).double().train(training)
    theirs = torch.nn.BatchNorm2d(3).double().train(training)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with batchnorm.use_backend(backend):
        y = ours(x)
        torch.autograd.gradcheck(lambda t: ours(t), (x.detach().clone().requires_grad_(),))
    y2 = torch.nn.functional.leaky_relu(theirs(x2), -0.3)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(torch.autograd.grad(y, x, y.detach().sin())[0],
                               torch.autograd.grad(y2, x2, y2.detach().sin())[0])


def test_errors_name_layer_and_fix():
    with pytest.raises(ValueError, match=r"BatchNormAct2d\(4\): unknown activation 'tanh'.*relu"):
        batchnorm.BatchNormAct2d(4, act="tanh")
    # FrozenBatchNorm fuses or refuses: it has no unfused form
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d\(4\): .*no fused kernel.*after a "
                                         r"BatchNorm layer"):
        batchnorm.FrozenBatchNorm2d(4, act=torch.nn.Tanh())
    with pytest.raises(ValueError, match=r"no fused kernel"):
        batchnorm.FrozenBatchNorm2d(4, act=torch.nn.GELU())
    with pytest.raises(ValueError, match=r"unknown activation 'relu6'"):
        batchnorm.BatchNormAct2d(4, act="relu6")  # a name must be a fused one
    with pytest.raises(ValueError, match=r"negative_slope must be a number, got 'steep'"):
        batchnorm.BatchNormAct2d(4, act="leaky_relu", negative_slope="steep")
    with pytest.raises(ValueError, match=r"residual must have the input's shape"):
        batchnorm.BatchNormAct2d(4)(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 2))
    with pytest.raises(ValueError, match=r"BatchNormAct2d\(4\): expected 4D input \(got 3D"):
        batchnorm.BatchNormAct2d(4)(torch.randn(2, 4, 3))


@pytest.mark.parametrize("act", [torch.nn.ReLU6(), torch.nn.Hardswish, torch.nn.Tanh(),
                                 torch.nn.GELU(), ShiftedSiLU()], ids=repr)
def test_unfused_activation_is_a_submodule_applied_after(act):
    """timm's BatchNormAct2d takes any act_layer; ours fuses what it can and applies the rest
    after the kernel: the output, gradients and running statistics are torch.nn's
    act(BatchNorm2d(x) + residual), and torch.nn BatchNorm2d state_dicts load both ways."""
    module = act() if isinstance(act, type) else act
    ours = batchnorm.BatchNormAct2d(3, act=act).double()
    assert ours.activation == "identity" and type(ours.act) is type(module)
    assert "(act): " in repr(ours) and "act='identity'" not in repr(ours)
    theirs = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 2.0)
        theirs.bias.uniform_(-1.0, 1.0)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3).requires_grad_()
    z = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    x2, z2 = x.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    y, y2 = ours(x, z), module(theirs(x2) + z2)
    assert_close_scaled(y, y2, 1e-10, "output")
    grad = torch.randn_like(y)
    y.backward(grad)
    y2.backward(grad)
    assert_close_scaled(x.grad, x2.grad, 1e-10, "dx")
    assert_close_scaled(z.grad, z2.grad, 1e-10, "dresidual")
    assert_close_scaled(ours.weight.grad, theirs.weight.grad, 1e-10, "dweight")
    assert_close_scaled(ours.running_var, theirs.running_var, 1e-10, "running_var")
    torch.nn.BatchNorm2d(3).double().load_state_dict(ours.state_dict())


def test_unfused_activation_with_parameters_adds_its_keys():
    layer = batchnorm.BatchNormAct2d(3, act=torch.nn.PReLU())
    assert list(layer.state_dict())[-1] == "act.weight"
    assert any(p is layer.act.weight for p in layer.parameters())
