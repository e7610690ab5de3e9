"""PyTorch's `nn.functional.batch_norm` OpInfo samples run through `batchnorm.functional.batch_norm`,
each beside `torch.nn.functional.batch_norm` on the same sample as the control.

Upstream: PyTorch 2.13.0 (git cf30153c4c131c8164ee7798e5022d810682e2cb):
`torch.testing._internal.common_methods_invocations.op_db`, the entry "nn.functional.batch_norm"
(the "without_cudnn" variant has the same samples and differs on CUDA only). The checks are those
test/test_ops.py and test/test_ops_gradients.py / test_ops_fwd_gradients.py run on an OpInfo, with
the entry's own flags: forward (here against torch's function in float64, and the running
statistics it updates in place), test_fn_grad (gradcheck with check_batched_grad), test_fn_gradgrad
(gradgradcheck), test_forward_mode_AD (gradcheck with check_forward_ad and batched forward grads),
test_fn_fwgrad_bwgrad (gradgradcheck with check_fwd_over_rev), in float64; plus gradcheck without
batched gradients, which tells a vmap failure (issue 17) apart from a wrong gradient.

Our functional mirrors torch's positional arguments (input, running_mean, running_var, weight,
bias, training, momentum, eps), so a sample's args and kwargs pass unchanged, and takes every
sample as torch's does: momentum -1.0 in training (which extrapolates the average), momentum
-1.2 in eval (where it is unused), and the (0,) input (an empty output).
"""

import pytest
import torch
from torch.testing import assert_close

import batchnorm

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (dev extras)")

from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

OP = next(o for o in op_db if o.name == "nn.functional.batch_norm" and o.variant_test_name == "")
FUNCTIONS = {"torch": torch.nn.functional.batch_norm, "ours": batchnorm.functional.batch_norm}


def samples(dtype):
    return list(OP.sample_inputs("cpu", dtype, requires_grad=True))


def describe(sample) -> str:
    kw = sample.kwargs
    mode = "train" if kw.get("training", False) else "eval"
    stats = "stats" if sample.args[0] is not None else "nostats"
    return f"{'x'.join(map(str, sample.input.shape)) or 'scalar'}-{mode}-{stats}" + "".join(
        f"-{k}{kw[k]}" for k in ("momentum", "eps") if k in kw)


def cases() -> list:
    return [pytest.param(i, impl, id=f"{i}-{describe(sample)}-{impl}")
            for i, sample in enumerate(samples(torch.float64)) for impl in FUNCTIONS]


def fresh(sample, dtype=None):
    """The sample's tensors cloned (running statistics too, which a training call updates)."""
    def clone(v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.detach().to(dtype or v.dtype).clone().requires_grad_(v.requires_grad)
    return clone(sample.input), [clone(a) for a in sample.args], dict(sample.kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("index,impl", cases())
def test_forward(index, impl, dtype):
    sample = samples(dtype)[index]
    x, args, kwargs = fresh(sample)
    out = FUNCTIONS[impl](x, *args, **kwargs)
    x64, args64, _ = fresh(sample, torch.float64)
    expected = torch.nn.functional.batch_norm(x64, *args64, **kwargs)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out.double(), expected, atol=1e-5 if dtype == torch.float32 else 1e-10,
                 rtol=1e-5 if dtype == torch.float32 else 1e-10)
    for got, want in zip(args[:2], args64[:2]):  # running_mean, running_var after the call
        if got is not None:
            assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


def _differentiable(sample, impl):
    """fn(*tensors that require grad) -> output, and those tensors (upstream's gradcheck wrapper
    over the sample's differentiable inputs)."""
    x, args, kwargs = fresh(sample)
    tensors = [t for t in [x, *args] if isinstance(t, torch.Tensor) and t.requires_grad]

    def fn(*inputs):
        it = iter(inputs)
        full = [next(it) if isinstance(t, torch.Tensor) and t.requires_grad else t
                for t in [x, *args]]
        return FUNCTIONS[impl](*full, **kwargs)
    return fn, tensors


GRADIENT_CHECKS = {
    # test_fn_grad
    "grad": lambda fn, xs: torch.autograd.gradcheck(
        fn, xs, check_batched_grad=OP.check_batched_grad, fast_mode=True),
    "grad_unbatched": lambda fn, xs: torch.autograd.gradcheck(fn, xs, check_batched_grad=False),
    # test_fn_gradgrad
    "gradgrad": lambda fn, xs: torch.autograd.gradgradcheck(
        fn, xs, check_batched_grad=OP.check_batched_gradgrad, fast_mode=True),
    # test_forward_mode_AD
    "forward_ad": lambda fn, xs: torch.autograd.gradcheck(
        fn, xs, check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False,
        check_batched_forward_grad=OP.check_batched_forward_grad),
    # test_fn_fwgrad_bwgrad
    "fwgrad_bwgrad": lambda fn, xs: torch.autograd.gradgradcheck(
        fn, xs, check_fwd_over_rev=True, check_rev_over_rev=False, check_undefined_grad=False,
        check_batched_grad=False),
}


def _gradient_cases() -> list:
    return [pytest.param(check, *case.values, id=f"{check}-{case.id}")
            for check in GRADIENT_CHECKS for case in cases()]


@pytest.mark.parametrize("check,index,impl", _gradient_cases())
def test_gradients(check, index, impl):
    sample = samples(torch.float64)[index]
    fn, tensors = _differentiable(sample, impl)
    assert tensors
    assert GRADIENT_CHECKS[check](fn, tensors)
