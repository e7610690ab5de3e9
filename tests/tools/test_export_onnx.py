import contextlib

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import export_onnx

from tools_helpers import randomize_bn

onnx = pytest.importorskip("onnx", reason="extra 'onnx' not installed: "
                                          "pip install 'batchnorm[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime cannot be installed here")
pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript")


def cnn():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), batchnorm.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2), batchnorm.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 6), batchnorm.BatchNorm1d(6))).eval()


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


# torch.onnx.export's own graph optimizer (optimize=True, its default) fuses BatchNormalization
# into Conv/Gemm; with optimize=False the nodes stay unless fold_bn folded them first.
@pytest.mark.parametrize("fold_bn, optimize, batchnorm_nodes",
                         [(False, False, 3), (True, True, 0)])
def test_onnx_export_runs_in_onnxruntime(tmp_path, fold_bn, optimize, batchnorm_nodes):
    model, x = cnn(), torch.randn(2, 3, 8, 8)
    path = tmp_path / "model.onnx"
    report = export_onnx(model, (x,), path, fold_bn=fold_bn, optimize=optimize)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("BatchNormalization") == batchnorm_nodes
    assert (report is not None) == fold_bn
    with torch.no_grad():
        expected = model(x)
    error = (run_onnx(path, x) - expected).abs().max().item()
    assert error <= 1e-5 * max(1, expected.abs().max().item())
    assert type(model[1]) is batchnorm.BatchNorm2d  # the user's model is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_onnx_export_needs_eval_mode(tmp_path):
    with pytest.raises(ValueError, match="call model.eval"):
        export_onnx(cnn().train(), (torch.randn(2, 3, 8, 8),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


class FusedResidual(nn.Module):
    """Every fused activation, and a residual added before the activation."""

    def __init__(self):
        super().__init__()
        acts = ("relu", "leaky_relu", "silu", "gelu_tanh", "identity")
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norms = nn.ModuleList(batchnorm.BatchNormAct2d(4, act=a, negative_slope=0.2)
                                   for a in acts)

    def forward(self, x):
        y = self.conv(x)
        for norm in self.norms:
            y = norm(y, residual=y)
        return y


@pytest.mark.parametrize("backend", [None, "numba", "native"])
def test_plain_torch_onnx_export(tmp_path, backend):
    """torch.onnx.export(dynamo=True) with no translation table: the default eval route exports
    torch's BatchNormalization; a forced kernel backend's custom ops decompose to their composite
    math (kernels/__init__.py)."""
    model, x = randomize_bn(FusedResidual()).eval(), torch.randn(2, 3, 6, 6)
    path = tmp_path / "direct.onnx"
    with batchnorm.use_backend(backend) if backend else contextlib.nullcontext():
        program = torch.onnx.export(model, (x,), dynamo=True, optimize=False)
    program.save(str(path))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("BatchNormalization") == (5 if backend is None else 0)
    with torch.no_grad():
        expected = model(x)
    error = (run_onnx(path, x) - expected).abs().max().item()
    assert error <= 1e-5 * max(1, expected.abs().max().item())
