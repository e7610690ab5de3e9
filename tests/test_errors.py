"""Every documented error: its type and the words that tell the user what happened and what to do."""

import doctest

import pytest
import torch

import batchnorm
from batchnorm import functional as F


@pytest.mark.parametrize("layer,shape,expected", [
    (batchnorm.BatchNorm1d, (4, 3, 2, 2), "expected 2D or 3D input (got 4D input"),
    (batchnorm.BatchNorm2d, (4, 3, 2), "expected 4D input (got 3D input"),
    (batchnorm.BatchNorm3d, (4, 3, 2, 2), "expected 5D input (got 4D input"),
])
def test_wrong_rank(layer, shape, expected):
    with pytest.raises(ValueError, match=r"\(3\): " + expected.replace("(", r"\(")):
        layer(3)(torch.randn(shape))


def test_channel_mismatch_names_layer_expected_and_shape():
    with pytest.raises(batchnorm.ArgumentError, match=r"BatchNorm2d\(64\) expected input with 64 "
                                                      r"channels \(dim 1\), got shape "
                                                      r"\(8, 32, 7, 7\)"):
        batchnorm.BatchNorm2d(64)(torch.randn(8, 32, 7, 7))
    with pytest.raises(RuntimeError):  # what torch.nn raises for it, so code catching that works
        torch.nn.BatchNorm2d(64)(torch.randn(8, 32, 7, 7))


@pytest.mark.parametrize("arg", ["running_mean", "running_var", "weight", "bias"])
def test_mis_sized_per_channel_tensor_is_named_in_torchs_words(arg):
    """Only `arg` is wrong: the message names it, never the input's channel count."""
    tensors = {"running_mean": torch.zeros(10), "running_var": torch.ones(10),
               "weight": torch.ones(10), "bias": torch.zeros(10), arg: torch.ones(9)}
    with pytest.raises(RuntimeError, match=rf"^batch_norm: {arg} should contain 10 elements not "
                                           rf"9 \(one per channel of the input of shape "
                                           rf"\(2, 10\)\)$") as info:
        F.batch_norm(torch.randn(2, 10), **tensors)
    assert isinstance(info.value, ValueError)
    with pytest.raises(RuntimeError, match=rf"{arg} should contain 10 elements not 9"):
        torch.nn.functional.batch_norm(torch.randn(2, 10), **tensors)  # torch's words


@pytest.mark.parametrize("shape", [(1, 100), (1, 5, 1, 1)])
def test_single_value_per_channel_in_training(shape):
    layer = batchnorm.BatchNorm1d(shape[1]) if len(shape) == 2 else batchnorm.BatchNorm2d(shape[1])
    with pytest.raises(ValueError, match=r"training needs more than one value per channel.*"
                                         r"use eval mode, BatchRenorm, or GroupNorm"):
        layer(torch.randn(shape))
    assert layer.eval()(torch.randn(shape)).shape == shape  # eval mode is the documented way out


@pytest.mark.parametrize("momentum", [-0.1, 1.5, 0.0])
def test_any_finite_momentum_is_used_as_torch_uses_it(momentum):
    """Outside [0, 1] the average extrapolates: torch.nn does that, and so do we."""
    x = torch.randn(3, 4)
    ours = batchnorm.BatchNorm1d(4, momentum=momentum)
    theirs = torch.nn.BatchNorm1d(4, momentum=momentum)
    ours(x), theirs(x)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


@pytest.mark.parametrize("momentum,error,words", [
    ("0.1", TypeError, r"momentum must be a float or None \(cumulative average\), got str '0.1'"),
    (True, TypeError, r"momentum must be a float or None.*got bool True"),
    (float("nan"), ValueError, r"momentum must be finite .*got nan; use e.g. 0.1, or None"),
    (float("inf"), ValueError, r"momentum must be finite"),
])
def test_momentum_that_is_not_a_finite_number(momentum, error, words):
    layer = batchnorm.BatchNorm1d(4, momentum=momentum)  # constructs, as torch.nn's does
    with pytest.raises(error, match=r"BatchNorm1d\(4\): " + words):
        layer(torch.randn(3, 4))
    with pytest.raises(error, match=words):
        F.batch_norm(torch.randn(3, 4), torch.zeros(4), torch.ones(4), training=True,
                     momentum=momentum)
    layer.eval()(torch.randn(3, 4))  # unused in eval: not checked there


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_must_be_positive_in_training(eps):
    layer = batchnorm.BatchNorm2d(4, eps=eps)  # constructs, as torch.nn's does
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\): eps must be positive during "
                                         r"training, but got .*use e.g. 1e-5") as info:
        layer(torch.randn(2, 4, 3, 3))
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, batchnorm.ArgumentError)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        torch.nn.BatchNorm2d(4, eps=eps)(torch.randn(2, 4, 3, 3))  # torch's words


def test_eps_in_eval_may_be_zero_but_not_negative():
    x = torch.randn(2, 4, 3, 3)
    ours = batchnorm.BatchNorm2d(4, eps=0.0).eval()
    theirs = torch.nn.BatchNorm2d(4, eps=0.0).eval()
    torch.testing.assert_close(ours(x), theirs(x))
    with pytest.raises(batchnorm.ArgumentError, match=r"BatchNorm2d\(4\): eps must be "
                                                      r"non-negative, but got -1.0"):
        batchnorm.BatchNorm2d(4, eps=-1.0).eval()(x)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        torch.nn.BatchNorm2d(4, eps=-1.0).eval()(x)
    with pytest.raises(TypeError, match=r"BatchNorm2d\(4\): eps must be a float, got str"):
        batchnorm.BatchNorm2d(4, eps="1e-5")(x)


@pytest.mark.parametrize("num_features", [0, -3, 2.5, True])
def test_num_features_must_be_positive_int(num_features):
    with pytest.raises(ValueError, match=r"BatchNorm2d: num_features must be a positive int, got"):
        batchnorm.BatchNorm2d(num_features)


@pytest.mark.parametrize("arg", ["weight", "bias", "running_mean", "running_var"])
def test_per_channel_tensor_of_wrong_shape(arg):
    tensors = dict(running_mean=torch.zeros(4), running_var=torch.ones(4), weight=torch.ones(4),
                   bias=torch.zeros(4))
    tensors[arg] = torch.ones(4, 1)
    with pytest.raises(batchnorm.ArgumentError, match=rf"batch_norm: {arg} must have shape \(4,\) "
                                                      rf"to match the "
                                         rf"input's 4 channels, got shape \(4, 1\)"):
        F.batch_norm(torch.randn(3, 4), **tensors)


@pytest.mark.parametrize("arg", ["weight", "running_var"])
def test_per_channel_tensor_on_another_device(arg):
    tensors = dict(running_mean=torch.zeros(4), running_var=torch.ones(4), weight=torch.ones(4),
                   bias=torch.zeros(4))
    tensors[arg] = torch.ones(4, device="meta")
    with pytest.raises(batchnorm.ArgumentError, match=rf"{arg} is on meta but the input is on "
                                                      rf"cpu; move the layer with .to\('cpu'\)"):
        F.batch_norm(torch.randn(3, 4), **tensors)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_input(dtype):
    with pytest.raises(TypeError, match=rf"BatchNorm1d\(4\): expected a floating-point input, got "
                                        rf"dtype {dtype}; convert it first"):
        batchnorm.BatchNorm1d(4)(torch.ones(3, 4, dtype=dtype))


def test_momentum_none_needs_num_batches_tracked():
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        F.batch_norm(torch.randn(3, 4), torch.zeros(4), torch.ones(4), training=True,
                     momentum=None)


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match="activation must be one of identity, relu, leaky_relu, "
                                         "silu, gelu_tanh, got 'tanh'"):
        F.batch_norm(torch.randn(3, 4), None, None, activation="tanh")


def test_argument_error_example_runs():
    result = doctest.testmod(batchnorm.errors, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
