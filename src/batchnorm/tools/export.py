"""ONNX export: batch norms as standard BatchNormalization nodes, or folded away.

Our layers run their math in `batchnorm::` custom ops (DESIGN.md, "The kernel boundary"), which
ONNX has no operator for. An eval-mode batch norm is exactly torch.nn's, so `export_onnx` exports
a copy whose batch norms are converted to torch.nn (ONNX BatchNormalization, which every runtime
fuses) or, with `fold=True`, folded into the preceding convolutions (no normalization node left).
The user's model is not touched. Needs the `onnx` extra (onnx, onnxscript; onnxruntime to run it).

For calling `torch.onnx.export` directly on a model with our layers, `onnx_translations()` is the
`custom_translation_table` that writes the eval-mode `batchnorm::forward` op in standard ONNX: a
BatchNormalization node with scale a, bias b, mean 0 and variance 1 (so it computes a*x + b
exactly as our kernel does), then the residual and the fused activation.
"""

from __future__ import annotations

import copy
import os
import tempfile

import torch
from torch import nn

from batchnorm.tools.convert import convert
from batchnorm.tools.fold import FoldReport, fold

__all__ = ["export_onnx", "onnx_translations"]


def export_onnx(model: nn.Module, args: tuple, path: str | os.PathLike, *, fold_bn: bool = False,
                dim: int | None = None, **export_kwargs) -> FoldReport | None:
    """Export an eval-mode model with batch norms to an ONNX file, written atomically.

    Args:
        model: in eval mode; not modified.
        args: the example positional inputs, as for `torch.onnx.export`.
        path: the .onnx file to write.
        fold_bn: fold the batch norms into the layers that feed them first (checked on `args`).
        dim: for rank-agnostic layers (SyncBatchNorm), as in `convert`.
        **export_kwargs: passed to `torch.onnx.export` (e.g. dynamic_shapes, opset_version).

    Returns:
        the FoldReport when fold_bn, else None.

    Raises:
        ValueError: the model has modules in training mode.
        ImportError: onnx / onnxscript are missing (pip install 'batchnorm[onnx]').
    """
    if any(m.training for m in model.modules()):
        raise ValueError("export_onnx: the model is in training mode; call model.eval() first "
                         "(an exported batch norm normalizes with the running statistics)")
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it; fail with the install hint)
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError("export_onnx needs onnx and onnxscript: pip install 'batchnorm[onnx]'"
                          ) from error
    inputs = args if isinstance(args, tuple) else (args,)
    exported = copy.deepcopy(model)
    report = None
    if fold_bn:
        exported, report = fold(exported, inputs, inplace=True)
    exported, _ = convert(exported, to="torch", dim=dim)
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".onnx")
    os.close(fd)
    try:
        program = torch.onnx.export(exported, inputs, **export_kwargs)
        # external_data=False: one self-contained file, so the atomic rename moves all of it.
        program.save(tmp, external_data=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return report


def onnx_translations() -> dict:
    """`custom_translation_table` for `torch.onnx.export(..., dynamo=True)` of eval-mode models
    with our layers: `torch.onnx.export(model, args, custom_translation_table=onnx_translations())`.

    Raises:
        ImportError: onnxscript is missing (pip install 'batchnorm[onnx]').
    """
    try:
        from onnxscript import opset18 as op
    except ImportError as error:
        raise ImportError("onnx_translations needs onnxscript: pip install 'batchnorm[onnx]'"
                          ) from error

    def forward(x, mean, invstd, weight=None, bias=None, z=None, act: str = "identity",
                act_param: float = 0.01, training: bool = False):
        # a = weight * invstd, b = bias - mean * a: kernels.native.scale_shift, in ONNX ops
        a = invstd if weight is None else op.Mul(weight, invstd)
        b = op.Neg(op.Mul(mean, a)) if bias is None else op.Sub(bias, op.Mul(mean, a))
        zeros = op.Sub(a, a)
        y = op.BatchNormalization(x, a, b, zeros, op.Add(zeros, op.CastLike(1.0, a)),
                                  epsilon=0.0)
        if z is not None:
            y = op.Add(y, z)
        if act == "relu":
            return op.Relu(y)
        if act == "leaky_relu":
            return op.LeakyRelu(y, alpha=act_param)
        if act == "silu":
            return op.Mul(y, op.Sigmoid(y))
        if act == "gelu_tanh":  # 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))
            inner = op.Mul(op.CastLike(0.7978845608028654, y),
                           op.Add(y, op.Mul(op.CastLike(0.044715, y), op.Mul(y, op.Mul(y, y)))))
            return op.Mul(op.Mul(op.CastLike(0.5, y), y),
                          op.Add(op.CastLike(1.0, y), op.Tanh(inner)))
        return y

    return {torch.ops.batchnorm.forward.default: forward}
