"""ONNX export: batch norms as standard BatchNormalization nodes, or folded away.

`export_onnx` exports a copy of an eval-mode model whose batch norms are converted to torch.nn
(ONNX BatchNormalization, which every runtime fuses) or, with `fold=True`, folded into the
preceding convolutions (no normalization node left), written atomically. The user's model is not
touched. Needs the `onnx` extra (onnx, onnxscript; onnxruntime to run it).

Plain `torch.onnx.export(model, args, dynamo=True)` works on our layers too: eval mode exports
torch's batch norm, and with a kernel backend forced our custom ops decompose to standard ops
(kernels/__init__.py registers their decompositions).
"""

from __future__ import annotations

import copy
import os
import tempfile

import torch
from torch import nn

from batchnorm.tools.convert import convert
from batchnorm.tools.fold import FoldReport, fold

__all__ = ["export_onnx"]


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
