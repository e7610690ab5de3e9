"""Every documented error: its type and the words that tell the user what happened and what to do."""

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
    with pytest.raises(ValueError, match=r"BatchNorm2d\(64\) expected input with 64 channels "
                                         r"\(dim 1\), got shape \(8, 32, 7, 7\)"):
        batchnorm.BatchNorm2d(64)(torch.randn(8, 32, 7, 7))


@pytest.mark.parametrize("shape", [(1, 100), (1, 5, 1, 1)])
def test_single_value_per_channel_in_training(shape):
    layer = batchnorm.BatchNorm1d(shape[1]) if len(shape) == 2 else batchnorm.BatchNorm2d(shape[1])
    with pytest.raises(ValueError, match=r"training needs more than one value per channel.*"
                                         r"use eval mode, BatchRenorm, or GroupNorm"):
        layer(torch.randn(shape))
    assert layer.eval()(torch.randn(shape)).shape == shape  # eval mode is the documented way out


@pytest.mark.parametrize("momentum", [-0.1, 1.5, "0.1"])
def test_momentum_out_of_range(momentum):
    with pytest.raises(ValueError, match=r"BatchNorm1d\(4\): momentum must be a float in \[0, 1\] "
                                         r"or None.*got"):
        batchnorm.BatchNorm1d(4, momentum=momentum)
    with pytest.raises(ValueError, match="momentum must be"):
        F.batch_norm(torch.randn(3, 4), torch.zeros(4), torch.ones(4), training=True,
                     momentum=momentum)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\): eps must be a positive float, got"):
        batchnorm.BatchNorm2d(4, eps=eps)


@pytest.mark.parametrize("num_features", [0, -3, 2.5, True])
def test_num_features_must_be_positive_int(num_features):
    with pytest.raises(ValueError, match=r"BatchNorm2d: num_features must be a positive int, got"):
        batchnorm.BatchNorm2d(num_features)


@pytest.mark.parametrize("arg", ["weight", "bias", "running_mean", "running_var"])
def test_per_channel_tensor_of_wrong_shape(arg):
    tensors = dict(running_mean=torch.zeros(4), running_var=torch.ones(4), weight=torch.ones(4),
                   bias=torch.zeros(4))
    tensors[arg] = torch.ones(4, 1)
    with pytest.raises(ValueError, match=rf"batch_norm: {arg} must have shape \(4,\) to match the "
                                         rf"input's 4 channels, got shape \(4, 1\)"):
        F.batch_norm(torch.randn(3, 4), **tensors)


@pytest.mark.parametrize("arg", ["weight", "running_var"])
def test_per_channel_tensor_on_another_device(arg):
    tensors = dict(running_mean=torch.zeros(4), running_var=torch.ones(4), weight=torch.ones(4),
                   bias=torch.zeros(4))
    tensors[arg] = torch.ones(4, device="meta")
    with pytest.raises(ValueError, match=rf"{arg} is on meta but the input is on cpu; move the "
                                         rf"layer with .to\('cpu'\)"):
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
