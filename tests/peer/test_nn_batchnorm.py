"""A selection of torch's test/test_nn.py BatchNorm tests with torch.nn's BatchNorm1d/2d/3d and
F.batch_norm patched to batchnorm's (the `nn` fixture), each run unpatched too as the control.

Upstream: PyTorch 2.13.0 (git cf30153c4c131c8164ee7798e5022d810682e2cb), test/test_nn.py, class
TestNNDeviceType and TestNN, the CPU instantiations: test_batchnorm_update_stats,
test_batchnorm_simple_average, _test_batchnorm_eval (test_batchnorm_eval), test_batchnorm_affine
via the non-affine buffers, test_batchnorm_buffer_update_when_stats_are_not_tracked,
test_batchnorm_load_state_dict, test_batchnorm_raises_error_if_less_than_one_value_per_channel,
test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not_same_size_as_input,
test_batchnorm_grad and test_batchnorm_nhwc_cpu, reimplemented with the same calls and
assertions. The tests write `nn.BatchNorm1d(...)` and `F.batch_norm(...)`, as upstream does, so
the patch reaches them. test_batchnorm_cudnn_*, *_half, *_nhwc_cuda need CUDA and are skipped.
"""

import pickle
from collections import OrderedDict

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (dev extras)")

from torch.testing._internal.common_utils import gradcheck, gradgradcheck  # noqa: E402


@pytest.fixture
def F(nn):
    return nn.functional


def test_patch_reaches_the_classes_and_isinstance_holds(nn, impl):
    bn = nn.BatchNorm2d(3)
    assert (type(bn).__module__.startswith("batchnorm")) == (impl == "ours")
    assert isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
    assert isinstance(nn.BatchNorm1d(3), torch.nn.modules.batchnorm._NormBase)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_batchnorm_update_stats(nn, dtype):
    module = nn.BatchNorm1d(3).to(dtype=dtype)
    data = torch.rand(4, 3, dtype=dtype)
    old_mean, old_var = module.running_mean.clone(), module.running_var.clone()
    old_tracked = module.num_batches_tracked.clone()
    module(data)
    assert not torch.equal(old_mean, module.running_mean)
    assert not torch.equal(old_var, module.running_var)
    assert_close(old_tracked + 1, module.num_batches_tracked)
    assert_close(module.running_mean, 0.9 * old_mean + 0.1 * data.mean(0))
    assert_close(module.running_var, 0.9 * old_var + 0.1 * data.var(0, unbiased=True))
    module.eval()
    old_mean, old_var = module.running_mean.clone(), module.running_var.clone()
    old_tracked = module.num_batches_tracked.clone()
    module(data)
    assert torch.equal(old_mean, module.running_mean)
    assert torch.equal(old_var, module.running_var)
    assert torch.equal(old_tracked, module.num_batches_tracked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_batchnorm_simple_average(nn, dtype):
    """momentum=None: the running statistics are the average over the batches seen."""
    module = nn.BatchNorm1d(3, momentum=None).to(dtype=dtype)
    zeros, ones = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    assert_close(module.running_mean, zeros)
    assert_close(module.running_var, ones)
    data1, data2 = torch.rand(4, 3, dtype=dtype), torch.rand(4, 3, dtype=dtype)
    res1 = module(data1)
    running_mean1, running_var1 = module.running_mean.clone(), module.running_var.clone()
    assert not torch.equal(running_mean1, zeros) and not torch.equal(running_var1, ones)
    module.reset_running_stats()
    assert_close(module.running_mean, zeros)
    assert_close(module.running_var, ones)
    res2 = module(data2)
    running_mean2, running_var2 = module.running_mean.clone(), module.running_var.clone()
    module.reset_running_stats()
    res3, res4 = module(data1), module(data2)
    assert_close(res3, res1)
    assert_close(res4, res2)
    assert_close(module.running_mean, (running_mean1 + running_mean2) / 2)
    assert_close(module.running_var, (running_var1 + running_var2) / 2)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_batchnorm_eval(nn, ndim, dtype):
    """Eval is deterministic, batch size 1 included; without tracking, eval equals training."""
    module = nn.BatchNorm1d(3).to(dtype=dtype).eval()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad = torch.rand([3] * ndim, dtype=dtype)
    res1 = module(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    data.grad.zero_()
    res2 = module(data)
    res2.backward(grad)
    assert_close(res1, res2)
    assert_close(grad1, data.grad)
    one = torch.rand([1, 3] + [3] * (ndim - 2), dtype=dtype)  # batch size 1 in eval
    assert_close(module(one), (one - module.running_mean[(..., *[None] * (ndim - 2))])
                 / torch.sqrt(module.running_var + module.eps)[(..., *[None] * (ndim - 2))])

    module = nn.BatchNorm1d(3, track_running_stats=False).to(dtype=dtype)
    data = torch.rand(4, 3, dtype=dtype, requires_grad=True)
    grad = torch.rand(4, 3, dtype=dtype)
    res1 = module(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    module.eval()
    data.grad.zero_()
    res2 = module(data)
    res2.backward(grad)
    assert_close(res1, res2)
    assert_close(grad1, data.grad)


def test_batchnorm_non_affine(nn):
    """affine=False: no parameters, torch.nn's buffers and keys, plain normalization."""
    bn = nn.BatchNorm2d(3, affine=False)
    assert bn.weight is None and bn.bias is None and not list(bn.parameters())
    assert list(bn.state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    out = bn.double()(x)
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    assert_close(out, (x - mean) / torch.sqrt(var + bn.eps))


def test_batchnorm_buffer_update_when_stats_are_not_tracked(nn):
    """track_running_stats switched off after construction: the buffers stay, nothing moves."""
    bn = nn.BatchNorm1d(4, track_running_stats=True)
    bn.track_running_stats = False
    num_batches = bn.num_batches_tracked.clone()
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    bn(torch.rand(32, 4))
    assert torch.equal(num_batches, bn.num_batches_tracked)
    assert torch.equal(running_mean, bn.running_mean)
    assert torch.equal(running_var, bn.running_var)


def test_batchnorm_load_state_dict(nn):
    bn = nn.BatchNorm2d(3)
    assert_close(bn.state_dict()["num_batches_tracked"], torch.tensor(0))
    bn.num_batches_tracked = torch.tensor(10)
    assert_close(bn.state_dict()["num_batches_tracked"], torch.tensor(10))
    bn.load_state_dict(OrderedDict(), strict=False)
    assert_close(bn.state_dict()["num_batches_tracked"], torch.tensor(10))
    with torch.device("meta"):
        meta_bn = nn.BatchNorm2d(3)
    assert meta_bn.num_batches_tracked.device == torch.device("meta")
    meta_bn.load_state_dict(OrderedDict(), assign=True, strict=False)
    assert_close(meta_bn.state_dict()["num_batches_tracked"], torch.tensor(0))


def test_batchnorm_load_state_dict_version_upgrade(nn):
    """A version-1 checkpoint (before num_batches_tracked) loads strictly: _load_from_state_dict
    fills the missing counter in with the module's own (torch >= 2.1 keeps it; older set 0)."""
    old = nn.BatchNorm2d(3)
    old.running_mean.fill_(0.5)
    state = old.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    bn = nn.BatchNorm2d(3)
    bn.num_batches_tracked.fill_(7)
    bn.load_state_dict(state, strict=True)
    assert_close(bn.num_batches_tracked, torch.tensor(7))
    assert_close(bn.running_mean, torch.full((3,), 0.5))


def test_batchnorm_raises_error_if_less_than_one_value_per_channel(nn):
    x = torch.rand(10)[None, :, None]
    with pytest.raises(ValueError):
        nn.BatchNorm1d(10)(x)


@pytest.mark.parametrize("arg", ["running_mean", "running_var", "weight", "bias"])
def test_batchnorm_raises_error_if_per_channel_tensor_is_not_same_size_as_input(F, arg):
    inputs = {"running_mean": torch.rand(10), "running_var": torch.rand(10),
              "weight": None, "bias": None}
    for size in (9, 11):
        args = dict(inputs, **{arg: torch.rand(size)})
        with pytest.raises(RuntimeError):
            F.batch_norm(torch.rand(2, 10), args["running_mean"], args["running_var"],
                         weight=args["weight"], bias=args["bias"])


@pytest.mark.parametrize("training", [False, True])
def test_batchnorm_grad(F, training):
    """_test_batchnorm_grad: gradcheck and gradgradcheck of F.batch_norm in float64 (with
    batched gradients, as torch's _assertGradAndGradgradChecks), a zero running variance kept
    finite by eps."""
    bs, n_feat, size_feat = 4, 5, 6
    dtype = torch.float64
    x = torch.arange(bs * n_feat * size_feat, requires_grad=True, dtype=dtype).view(
        bs, n_feat, size_feat)
    weight = torch.arange(1, n_feat + 1, requires_grad=True, dtype=dtype)
    bias = torch.arange(n_feat, requires_grad=True, dtype=dtype)
    running_mean = 1 - torch.arange(n_feat, dtype=dtype)
    running_var = 2 * torch.arange(n_feat, dtype=dtype)
    args = (x, running_mean, running_var, weight, bias, training, 0.1, 0.0001)
    assert gradcheck(F.batch_norm, args)
    assert gradgradcheck(F.batch_norm, args)


@pytest.mark.parametrize("shape", [(4, 8, 10, 10), (4, 1, 9, 9)])
def test_batchnorm_nhwc_cpu(nn, shape):
    """Channels-last and contiguous give the same output and gradients; the output stays
    channels-last."""
    bn = nn.BatchNorm2d(shape[1]).double()
    ref_bn = nn.BatchNorm2d(shape[1]).double()
    ref_bn.load_state_dict(bn.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    inp = x.clone().to(memory_format=torch.channels_last).requires_grad_()
    ref = x.clone().requires_grad_()
    grad = torch.randn(shape, dtype=torch.float64)
    out, ref_out = bn(inp), ref_bn(ref)
    out.backward(grad.to(memory_format=torch.channels_last))
    ref_out.backward(grad)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert ref_out.is_contiguous()
    assert_close(out, ref_out)
    assert_close(inp.grad, ref.grad)
    assert_close(bn.weight.grad, ref_bn.weight.grad)
    assert_close(bn.running_mean, ref_bn.running_mean)


def test_batchnorm_pickle_keeps_class_and_state(nn):
    bn = nn.BatchNorm3d(2)
    bn(torch.randn(3, 2, 2, 2, 2))
    copy = pickle.loads(pickle.dumps(bn))
    assert type(copy) is type(bn)
    assert_close(copy.state_dict(), bn.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (test_batchnorm_cudnn_*)")
def test_batchnorm_cuda_matches_cpu(nn):
    bn = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    gpu = nn.BatchNorm2d(3).cuda()
    assert_close(gpu(x.cuda()).cpu(), bn(x), atol=1e-5, rtol=1e-5)
