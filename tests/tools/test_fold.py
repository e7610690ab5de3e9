import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import fold

from tools_helpers import count_bn, randomize_bn


def test_fold_transformers_architectures(hf_model):
    name, model, x = hf_model
    model.eval()
    before = count_bn(model)
    folded, report = fold(model, x)
    assert report.skipped == [], f"{name}: {report}"
    assert len(report.folded) == before
    assert count_bn(folded) == 0
    assert count_bn(model) == before, "fold must not touch the original without inplace=True"
    expected, got = model(x).logits, folded(x).logits
    scale = max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() <= 1e-4 * scale
    assert report.max_error <= 1e-4 * scale


class Zoo(nn.Module):
    """Every foldable layer kind with groups, dilation, bias=False and stride, each followed by
    its batch norm (one without affine parameters)."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(4, 6, 3, groups=2, dilation=2, bias=False)
        self.bn1d = nn.BatchNorm1d(6)
        self.conv2d = nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2)
        self.bn2d = batchnorm.BatchNorm2d(6)
        self.convt2d = nn.ConvTranspose2d(6, 4, 3, groups=2, stride=2, bias=False)
        self.bnt2d = nn.BatchNorm2d(4, affine=False)
        self.conv3d = nn.Conv3d(2, 3, 2)
        self.bn3d = batchnorm.BatchNorm3d(3)
        self.convt1d = nn.ConvTranspose1d(6, 9, 2, groups=3, dilation=2)
        self.bnt1d = batchnorm.BatchNorm1d(9)
        self.linear = nn.Linear(5, 7, bias=False)
        self.bnlin = batchnorm.BatchNorm1d(7)

    def forward(self, a, b, c, d):
        a = self.bn1d(self.conv1d(a))
        b = self.bnt2d(self.convt2d(self.bn2d(self.conv2d(b))))
        return (a, self.bnt1d(self.convt1d(a)), b, self.bn3d(self.conv3d(c)),
                self.bnlin(self.linear(d)))


def zoo_inputs(dtype=torch.float64):
    return (torch.randn(3, 4, 11, dtype=dtype), torch.randn(2, 4, 9, 7, dtype=dtype),
            torch.randn(2, 2, 5, 4, 3, dtype=dtype), torch.randn(3, 5, dtype=dtype))


def test_fold_every_layer_kind_matches_float64_original():
    model = randomize_bn(Zoo()).double().eval()
    inputs = zoo_inputs()
    folded, report = fold(model, inputs, tolerance=1e-10)
    assert len(report.folded) == 6 and report.skipped == []
    assert count_bn(folded) == 0
    for expected, got in zip(model(*inputs), folded(*inputs)):
        assert (got - expected).abs().max().item() <= 1e-10 * max(1.0, expected.abs().max().item())
    assert folded.conv1d.bias is not None and folded.linear.bias is not None


def test_fold_float32_and_inplace():
    model = randomize_bn(Zoo()).eval()
    inputs = zoo_inputs(torch.float32)
    expected = model(*inputs)
    folded, report = fold(model, inputs, inplace=True)
    assert folded is model and count_bn(model) == 0
    assert folded.conv2d.weight.dtype == torch.float32
    for e, g in zip(expected, folded(*inputs)):
        assert (g - e).abs().max().item() <= 1e-5 * max(1.0, e.abs().max().item())


class SharedConv(nn.Module):
    """conv's output feeds bn and the residual; twice is called twice; one module registered
    under two names; only `last` + `bn_last` may fold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.twice = nn.Conv2d(3, 3, 1)
        self.bn_twice = nn.BatchNorm2d(3)
        self.alias = nn.Conv2d(3, 3, 1)
        self.bn_alias = nn.BatchNorm2d(3)
        self.other = nn.Sequential(self.alias)
        self.last = nn.Conv2d(3, 3, 1)
        self.bn_last = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        x = self.bn(y) + y
        x = self.bn_twice(self.twice(x)) + self.twice(x)
        x = self.bn_alias(self.alias(x))
        return self.bn_last(self.last(x))


def test_shared_or_reused_conv_is_not_folded():
    model = randomize_bn(SharedConv()).eval()
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold(model, x)
    assert report.folded == [("bn_last", "last")]
    reasons = dict(report.skipped)
    assert "also feeds something else" in reasons["bn"]
    assert "twice is shared or called more than once" in reasons["bn_twice"]
    assert "alias is shared or called more than once" in reasons["bn_alias"]
    assert count_bn(folded) == len(report.skipped) == 3
    assert torch.equal(folded.conv.weight, model.conv.weight)
    assert (folded(x) - model(x)).abs().max().item() <= 1e-5


def test_linear_on_3d_input_is_not_folded():
    # BatchNorm1d on (N, C, L) normalizes dim 1, not the Linear's output features, even when the
    # sizes coincide; folding into the Linear would scale the wrong axis.
    model = randomize_bn(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).eval()
    x = torch.randn(3, 4, 4)
    folded, report = fold(model, x)
    assert report.folded == [] and "not seen to be 2-D" in report.skipped[0][1]
    torch.testing.assert_close(folded(x), model(x))
    # without a probe the shape is unknown, so the Linear pair is skipped too
    _, report = fold(model, verify=False)
    assert report.folded == []


def test_untracked_statistics_are_skipped():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)).eval()
    _, report = fold(model, torch.randn(2, 2, 3, 3))
    assert "track_running_stats=False" in report.skipped[0][1]


def test_errors():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="call model.eval"):
        fold(model, torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match="verify=True needs example_input"):
        fold(model.eval())
    folded, report = fold(model, verify=False)
    assert report.folded == [("1", "0")] and report.max_error is None
