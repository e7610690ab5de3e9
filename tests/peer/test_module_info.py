"""PyTorch's generic module checks on its BatchNorm1d/2d/3d ModuleInfo entries, with
`module_cls` swapped to batchnorm's, each beside the unpatched entry as the control.

Upstream: PyTorch 2.13.0 (git cf30153c4c131c8164ee7798e5022d810682e2cb, as
`torch.version.git_version` reports it): the entries, their inputs and error inputs are
`torch.testing._internal.common_modules.module_db` from that wheel. The checks reimplement
`TestModule` of its test/test_modules.py (not shipped in the wheel; read at the upstream revision
33263640046f558d38b8e4bc306b1ca6abbf0b1f), those that apply on the CPU: test_forward,
test_factory_kwargs, test_repr, test_pickle, test_non_contiguous_tensors, test_grad,
test_gradgrad, test_memory_format, test_if_train_and_eval_modes_differ, test_device_ctx_init and
test_errors, each in fp32 and fp64 (gradients fp64 only), training and eval, as upstream's
`@modules` decorator instantiates them. Where upstream checks a module only against itself,
`impl="ours"` is also compared with torch.nn's module built from the same constructor input
(outputs, running statistics, repr, state_dict). Three checks are ours: state_dict round trips
with torch.nn both ways, and gradcheck without batched gradients, which tells a failure of the
vmap transform (issue 17) apart from a wrong gradient. test_cpu_gpu_parity and
test_multiple_device_transfer need CUDA and are skipped without it.
"""

import copy
import io
from itertools import chain, product

import pytest
import torch
from torch.testing import assert_close

import batchnorm

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (dev extras)")

from torch._subclasses.meta_utils import assert_metadata_eq  # noqa: E402
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402
from torch.testing._internal.common_utils import (freeze_rng_state, gradcheck,  # noqa: E402
                                                  gradgradcheck)

INFOS = {m.name: m for m in module_db if m.name in ("nn.BatchNorm1d", "nn.BatchNorm2d",
                                                     "nn.BatchNorm3d")}
tree_flatten = torch.utils._pytree.tree_flatten

# Deliberate differences (docs/layers.md, "Differences from torch.nn"), keyed by (entry, module
# input desc, training): the check asserts our side and torch's, then reports the difference as
# xfail with the reason, so it is counted, never silently passed or skipped.
EMPTY_BATCH = ("deliberate difference (docs/layers.md): an empty batch (N=0) in training leaves "
               "num_batches_tracked unchanged, so momentum=None stays the average of the batches "
               "seen; torch.nn counts it")
DIFFERENCES: dict[tuple[str, str, bool], str] = {
    (name, "zero_batch", True): EMPTY_BATCH for name in INFOS}


def cases(dtypes=(torch.float32, torch.float64), modes=(True, False)) -> list:
    """(entry, dtype, training, impl) for every upstream instantiation."""
    return [pytest.param(name, dtype, training, impl,
                         id=f"{name[3:]}-{str(dtype)[6:]}-{'train' if training else 'eval'}-{impl}")
            for name, dtype, training, impl in product(INFOS, dtypes, modes, ("torch", "ours"))]


def entry(name: str, impl: str):
    """The ModuleInfo, its module_cls swapped to ours for impl="ours"."""
    info = INFOS[name]
    if impl == "ours":
        info = copy.copy(info)
        info.module_cls = getattr(batchnorm, info.module_cls.__name__)
        assert info.module_cls.__module__.startswith("batchnorm")
    return info


def inputs(info, dtype, training, requires_grad):
    return [mi for mi in info.module_inputs_func(info, device="cpu", dtype=dtype,
                                                 requires_grad=requires_grad, training=training)
            if mi.forward_input is not None]


def build(info, module_input, dtype, training, **extra):
    c = module_input.constructor_input
    m = info.module_cls(*c.args, **c.kwargs, **extra)
    m.to("cpu").to(dtype)
    m.train(training)
    return m


def forward_args(module_input):
    return module_input.forward_input.args, module_input.forward_input.kwargs


def assert_params_and_buffers_are(module, device, dtype):
    for what, items in (("Parameter", module.named_parameters()),
                        ("Buffer", module.named_buffers())):
        for item_name, item in items:
            assert item.device == torch.device(device), f"{what} {item_name} on {item.device}"
            if item.dtype.is_floating_point:
                assert item.dtype == dtype, f"{what} {item_name} is {item.dtype}, not {dtype}"


@pytest.mark.parametrize("name,dtype,training,impl", cases())
def test_forward(name, dtype, training, impl):
    info = entry(name, impl)
    differences = []
    for mi in inputs(info, dtype, training, requires_grad=False):
        args, kwargs = forward_args(mi)
        with freeze_rng_state():
            m = build(info, mi, dtype, training)
            control = build(INFOS[name], mi, dtype, training)
            before = copy.deepcopy(dict(m.named_buffers()))
            out = m(*args, **kwargs)
            assert_close(out, control(*args, **kwargs))
            reason = DIFFERENCES.get((name, mi.desc, training)) if impl == "ours" else None
            if reason is EMPTY_BATCH:
                assert_close(dict(m.named_buffers()), before)  # ours: nothing moved
                assert control.num_batches_tracked == before["num_batches_tracked"] + 1  # torch's
                differences.append(reason)
            else:
                assert_close(dict(m.named_buffers()), dict(control.named_buffers()))
            if mi.reference_fn is not None:
                assert_close(out, mi.reference_fn(m, *args, **kwargs))
            {torch.float32: m.float, torch.float64: m.double}[dtype]()
            m(*args, **kwargs)
            assert_params_and_buffers_are(m, "cpu", dtype)
    if differences:
        pytest.xfail("; ".join(sorted(set(differences))))


@pytest.mark.parametrize("name,dtype,training,impl", cases())
def test_factory_kwargs(name, dtype, training, impl):
    info = entry(name, impl)
    for mi in inputs(info, dtype, training, requires_grad=False):
        m = build(info, mi, torch.float32, training)
        if not list(chain(m.parameters(), m.buffers())):
            continue  # upstream skips modules that create neither
        c = mi.constructor_input
        m = info.module_cls(*c.args, **c.kwargs, device="cpu", dtype=dtype)
        m.train(training)
        assert_params_and_buffers_are(m, "cpu", dtype)


@pytest.mark.parametrize("name,dtype,training,impl", cases())
def test_repr(name, dtype, training, impl):
    info = entry(name, impl)
    for mi in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                      training=training):
        m = build(info, mi, dtype, training)
        assert repr(m) == str(m) == repr(build(INFOS[name], mi, dtype, training))


@pytest.mark.parametrize("name,dtype,training,impl", cases())
def test_pickle(name, dtype, training, impl):
    info = entry(name, impl)
    for mi in inputs(info, dtype, training, requires_grad=False):
        args, kwargs = forward_args(mi)
        with freeze_rng_state():
            m = build(info, mi, dtype, training)
            output = m(*args, **kwargs)
            f = io.BytesIO()
            torch.save(m, f)
            f.seek(0)
            m_copy = torch.load(f, weights_only=False)
            assert type(m_copy) is type(m)
            assert_close(m_copy(*args, **kwargs), output)


@pytest.mark.parametrize("name,dtype,training,impl", cases())
def test_state_dict_round_trip_with_torch(name, dtype, training, impl):
    """Ours (not upstream): torch.nn's state_dict loads strictly into the module and back."""
    info = entry(name, impl)
    for mi in inputs(info, dtype, training, requires_grad=False):
        args, kwargs = forward_args(mi)
        control = build(INFOS[name], mi, dtype, True)
        control(*args, **kwargs)
        with torch.no_grad():
            for p in control.parameters():
                p.uniform_(0.5, 1.5)
        m = build(info, mi, dtype, training)
        m.load_state_dict(control.state_dict())
        assert list(m.state_dict()) == list(control.state_dict())
        assert_close(m.state_dict(), control.state_dict())
        fresh = build(INFOS[name], mi, dtype, training)
        fresh.load_state_dict(m.state_dict())
        control.train(training)
        assert_close(m(*args, **kwargs), control(*args, **kwargs))


def _traverse(obj, func):
    if isinstance(obj, (tuple, list)):
        return type(obj)(_traverse(o, func) for o in obj)
    if isinstance(obj, dict):
        return {k: _traverse(o, func) for k, o in obj.items()}
    if isinstance(obj, torch.Tensor):
        return func(obj)
    return obj


def _grads(obj):
    return _traverse(obj, lambda t: t.grad if t.requires_grad else None)


def _zero_grad(obj):
    def zero(t):
        t.grad = None
    _traverse(obj, zero)


@pytest.mark.parametrize("name,dtype,training,impl", cases())
def test_non_contiguous_tensors(name, dtype, training, impl):
    info = entry(name, impl)

    def non_contiguous(obj):
        def make(t):
            if t.dim() == 0:
                return t
            out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
            out.requires_grad = t.requires_grad
            return out
        return _traverse(obj, make)

    for mi in inputs(info, dtype, training, requires_grad=True):
        input_args, input_kwargs = forward_args(mi)
        m = build(info, mi, dtype, training)
        _traverse((input_args, input_kwargs), lambda t: t.retain_grad() if t.requires_grad else t)
        with freeze_rng_state():
            default_output = m(*input_args, **input_kwargs)
            grad_output = default_output.clone().detach_().normal_()
            default_output.backward(grad_output, retain_graph=True)
        default_input_grads = copy.deepcopy(_grads((input_args, input_kwargs)))
        default_param_grads = copy.deepcopy([p.grad for p in m.parameters()])
        nc_inputs = non_contiguous((input_args, input_kwargs))
        nc_grad_output = non_contiguous(grad_output)
        for (in_args, in_kwargs), g_out in product([(input_args, input_kwargs), nc_inputs],
                                                   [grad_output, nc_grad_output]):
            _zero_grad((in_args, in_kwargs))
            _zero_grad(list(m.parameters()))
            with freeze_rng_state():
                out = m(*in_args, **in_kwargs)
                out.backward(copy.deepcopy(g_out), retain_graph=True)
            assert_close(out, default_output)
            assert_close(_grads((in_args, in_kwargs)), default_input_grads, atol=1e-4, rtol=0)
            assert_close([p.grad for p in m.parameters()], default_param_grads)


def _check_gradients(info, dtype, training, check):
    """upstream's _test_gradients_helper: the total derivative, then each parameter alone."""
    for mi in inputs(info, dtype, training, requires_grad=True):
        m = build(info, mi, dtype, training)
        params = tuple(m.parameters())
        input_args, input_kwargs = forward_args(mi)
        assert not input_kwargs  # the BatchNorm entries pass the input positionally

        def fn(*flat):
            with freeze_rng_state():
                return tree_flatten(m(*torch.utils._pytree.tree_unflatten(flat, spec)
                                      [:len(input_args)]))[0]

        flat, spec = tree_flatten(input_args + params)
        assert check(fn, flat, nondet_tol=0.0)
        old = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad = False
        for p, was in zip(params, old):
            p.requires_grad = was
            flat, spec = tree_flatten(input_args + params)
            assert check(fn, flat, nondet_tol=0.0)
            p.requires_grad = False


GRADIENT_CHECKS = {
    "gradcheck": gradcheck,  # upstream test_grad: check_batched_grad=True, fast_mode=True
    "gradcheck_unbatched": lambda fn, x, **kw: gradcheck(fn, x, check_batched_grad=False, **kw),
    "gradgradcheck": gradgradcheck,  # upstream test_gradgrad
}


def _gradient_cases() -> list:
    return [pytest.param(check, *case.values, id=f"{check}-{case.id}")
            for check in GRADIENT_CHECKS for case in cases(dtypes=(torch.float64,))]


@pytest.mark.parametrize("check,name,dtype,training,impl", _gradient_cases())
def test_gradients(check, name, dtype, training, impl):
    _check_gradients(entry(name, impl), dtype, training, GRADIENT_CHECKS[check])


@pytest.mark.parametrize("name,dtype,training,impl", cases())
def test_memory_format(name, dtype, training, impl):
    info = entry(name, impl)

    def formats(mi):
        ranks = {t.dim() for t in tree_flatten(mi.forward_input.args)[0]}
        special = torch.channels_last if 4 in ranks else torch.channels_last_3d if 5 in ranks else None
        if special is None:
            return [torch.contiguous_format], [torch.preserve_format, torch.contiguous_format]
        return ([torch.contiguous_format, special],
                [torch.preserve_format, torch.contiguous_format, special])

    def to_format(fmt, obj):
        def convert(t):
            if ((fmt == torch.channels_last and t.dim() != 4)
                    or (fmt == torch.channels_last_3d and t.dim() != 5)):
                return t.clone().detach().requires_grad_(t.requires_grad)
            return t.clone().to(memory_format=fmt).detach().requires_grad_(t.requires_grad)
        return _traverse(obj, convert)

    def check_out_format(outputs, input_format):
        for t in outputs:
            if t.dim() == 4 and input_format == torch.channels_last:
                assert t.is_contiguous(memory_format=torch.channels_last)
            elif t.dim() == 5 and input_format == torch.channels_last_3d:
                assert t.is_contiguous(memory_format=torch.channels_last_3d)
            else:
                assert t.is_contiguous()

    for mi in inputs(info, dtype, training, requires_grad=True):
        input_formats, module_formats = formats(mi)
        with freeze_rng_state():
            m = build(info, mi, dtype, training)
            args, kwargs = forward_args(mi)
            desired = m(*args, **kwargs)
            diff_inputs = [t for t in tree_flatten((args, list(m.parameters())))[0]
                           if t.requires_grad]
            if training:
                ref_grad_outputs = torch.rand_like(desired)
                ref_grads = torch.autograd.grad(desired, diff_inputs, ref_grad_outputs)
            for input_format in input_formats:
                d_args = to_format(input_format, mi.forward_input.args)
                for module_format in module_formats:
                    m.to(memory_format=module_format)
                    out = m(*d_args)
                    if (input_format, module_format) != (torch.contiguous_format,) * 2:
                        assert_close(out, desired)
                    check_out_format([out], input_format)
                    if training:
                        diff_inputs = [t for t in tree_flatten((d_args, list(m.parameters())))[0]
                                       if t.requires_grad]
                        grads = torch.autograd.grad(out, diff_inputs,
                                                    torch.empty_like(out).copy_(ref_grad_outputs))
                        if (input_format, module_format) != (torch.contiguous_format,) * 2:
                            assert_close(grads, ref_grads)
                        check_out_format(grads, input_format)


@pytest.mark.parametrize("name,dtype,training,impl", cases(modes=(True,)))
def test_if_train_and_eval_modes_differ(name, dtype, training, impl):
    info = entry(name, impl)
    for mi in inputs(info, dtype, training, requires_grad=False):
        m = build(info, mi, dtype, training)
        delattr(m, "training")
        args, kwargs = forward_args(mi)
        with pytest.raises(AttributeError, match="'training'"):
            m(*args, **kwargs)
        assert info.train_and_eval_differ  # what upstream asserts on that AttributeError


def _assert_equal(a, b, *_):
    assert a == b, f"{a!r} != {b!r}"


@pytest.mark.parametrize("name,dtype,training,impl", cases())
def test_device_ctx_init(name, dtype, training, impl):
    info = entry(name, impl)
    for mi in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                      training=training):
        c = mi.constructor_input
        m_cpu = info.module_cls(*c.args, **c.kwargs)
        with torch.device("meta"):
            m = info.module_cls(*c.args, **c.kwargs)
        pairs = list(chain(zip(m.parameters(), m_cpu.parameters()),
                           zip(m.buffers(), m_cpu.buffers())))
        assert len(pairs) == len(list(chain(m_cpu.parameters(), m_cpu.buffers())))
        for p_meta, p_cpu in pairs:
            assert p_meta.is_meta
            assert_metadata_eq(_assert_equal, p_meta, p_cpu)


@pytest.mark.parametrize("name,dtype,training,impl", cases())
def test_errors(name, dtype, training, impl):
    info = entry(name, impl)
    # Generated from torch's entry: the function picks the input's rank by comparing module_cls
    # with torch.nn.BatchNorm1d/2d by identity, which our classes are not.
    for error_input in info.module_error_inputs_func(INFOS[name], device="cpu", dtype=dtype,
                                                     requires_grad=False, training=training):
        mi = error_input.module_error_input
        c = mi.constructor_input
        if error_input.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                info.module_cls(*c.args, **c.kwargs)
        else:
            m = info.module_cls(*c.args, **c.kwargs)
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                m(*mi.forward_input.args, **mi.forward_input.kwargs)
