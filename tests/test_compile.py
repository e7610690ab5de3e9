"""torch.compile(fullgraph=True) and torch.export see our ops as opaque nodes and match eager."""

import copy

import pytest
import torch

import batchnorm
from batchnorm import kernels
from tests.conftest import assert_close_scaled


def _small_convnet(momentum):
    # Convs feeding batch norm have no bias: its true gradient is 0 and would compare noise.
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=False), batchnorm.BatchNorm2d(8, momentum=momentum),
        torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, bias=False),
        batchnorm.BatchNorm2d(4, momentum=momentum))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fullgraph_compile_matches_eager_in_training_and_eval(momentum):
    """torch.nn.BatchNorm2d(momentum=None) fails under fullgraph in torch 2.13; ours must not."""
    eager = _small_convnet(momentum)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(3):
        x = torch.randn(4, 3, 10, 10) + step
        y_eager, y_compiled = eager(x), compiled(x)
        assert_close_scaled(y_compiled, y_eager, 1e-5, f"train output step {step}")
        # A fixed random projection: sum(y^2) of a normalized output is ~constant, and its
        # near-zero gradient would measure cancellation noise, not our kernels.
        probe = torch.randn_like(y_eager)
        (y_eager * probe).sum().backward()
        (y_compiled * probe).sum().backward()
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
        assert_close_scaled(p_compiled.grad, p_eager.grad, 1e-5, f"grad {name}")
    for (name, b_eager), b_compiled in zip(eager.named_buffers(), compiled_model.buffers()):
        assert_close_scaled(b_compiled, b_eager, 1e-5, name)
    eager.eval(), compiled_model.eval()
    x = torch.randn(2, 3, 10, 10)
    assert_close_scaled(compiled(x), eager(x), 1e-5, "eval output")


def test_export_sees_torchs_batch_norm_by_default_and_our_ops_when_forced():
    model = _small_convnet(0.1).eval()
    x = torch.randn(2, 3, 10, 10)
    exported = torch.export.export(model, (x,))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert sum("batch_norm" in t for t in targets) == 2, targets  # what exporters translate
    assert_close_scaled(exported.module()(x), model(x), 1e-6)
    fused = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), batchnorm.BatchNormAct2d(8)).eval()
    with batchnorm.use_backend("numba"):
        exported = torch.export.export(fused, (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.batchnorm.forward.default) == 1
    assert_close_scaled(exported.module()(x), fused(x), 1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_custom_ops_pass_torch_library_opcheck(training):
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    z = torch.randn_like(x, requires_grad=True)
    count, mean, m2 = kernels.stats(x.detach())
    invstd = torch.rsqrt(m2 / count + 1e-5)
    torch.library.opcheck(kernels.stats, (x.detach(),))
    torch.library.opcheck(kernels.forward, (x, mean, invstd, weight, bias, z, "silu", 0.0, training,
                                            1e-5))
    dy = torch.randn_like(x)
    torch.library.opcheck(kernels.backward, (dy, x.detach(), mean, invstd, weight.detach(),
                                             bias.detach(), z.detach(), None, "silu", 0.0,
                                             training, None, None, None, True))


def test_custom_op_forward_gradients_match_eager_function():
    """The registered autograd of batchnorm::forward and the eager autograd.Function agree."""
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    count, mean, m2 = kernels.stats(x.detach())
    invstd = torch.rsqrt(m2 / count + 1e-5)
    y_op = kernels.forward(x, mean, invstd, weight, None, None, "relu", 0.0, True, 1e-5)
    grads_op = torch.autograd.grad(y_op.sin().sum(), (x, weight))
    y_fn = kernels.BatchNormFunction.apply(x, weight, None, None, None, None, 1e-5, "relu", 0.0,
                                           [], kernels.implementation(x))
    grads_fn = torch.autograd.grad(y_fn.sin().sum(), (x, weight))
    assert_close_scaled(y_op, y_fn, 1e-12)
    for a, b in zip(grads_op, grads_fn):
        assert_close_scaled(a, b, 1e-12)


def test_non_finite_guard_holds_under_compile():
    bn = batchnorm.BatchNorm1d(3, momentum=None)
    compiled = torch.compile(bn, fullgraph=True)
    compiled(torch.randn(8, 3))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    y = compiled(x)
    assert torch.isnan(y[:, 1]).all()
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    compiled(torch.randn(8, 3))
    assert bn.num_batches_tracked.item() == 2
