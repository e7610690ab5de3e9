"""Fold eval-mode batch norms into the convolution or linear layer that feeds them.

For a layer computing z = W x + c followed by batch norm with running statistics (mu, var), in eval

    y = gamma * (z - mu) / sqrt(var + eps) + beta = a * z + b,   a = gamma / sqrt(var + eps),
                                                                b = beta - mu * a
      = (a W) x + (a c + b)

so the pair becomes one layer with weight a*W (scaled per output channel) and bias a*c + b.
`a` and `b` come from `kernels.native.scale_shift`, the one folding helper the frozen layers and
eval kernels also use; the products are formed in float64 and cast back to the weight's dtype.

Pairs are found by tracing with torch.fx, which sees data flow rather than module order (a
Sequential conv, bn pair is not enough: the conv's output may also feed a residual). A pair folds
only when
  - the batch norm's input is exactly the layer's output, and that output feeds nothing else;
  - the layer and the batch norm each run once per forward and are registered under one name (a
    shared or reused conv would change every other use: pytorch#104593 is torch.fx's fuser getting
    this wrong);
  - the batch norm has running statistics (with track_running_stats=False eval uses batch ones);
  - for Linear, the probe run showed 2-D input, so the normalized dimension is the Linear's output.
A module whose forward torch.fx cannot trace (shape-dependent Python, asserts on inputs) is not
analysed as a whole: its children are traced instead, and batch norms inside an untraceable region
are reported as skipped, never folded on a guess.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.fx.experimental.meta_tracer import MetaTracer
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.nn.batchnorm import fused_activation
from batchnorm.kernels.native import scale_shift
from batchnorm.tools._common import (activation_module, batchnorm_types, is_frozen,
                                     output_tensors, run_model, takes_second_argument)

__all__ = ["fold", "FoldReport"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class FoldReport:
    """What `fold` did. `folded`: (batch norm, layer it went into); `skipped`: (batch norm, why);
    `untraced`: (module, torch.fx's error) for regions analysed through their children;
    `max_error`: largest |folded - original| output difference on the probe (None without
    verify)."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)
    max_error: float | None = None

    def __str__(self) -> str:
        error = "" if self.max_error is None else f", max probe error {self.max_error:.2e}"
        lines = [f"folded {len(self.folded)} batch norms, skipped {len(self.skipped)}{error}"]
        lines += [f"  folded  {bn} -> {layer}" for bn, layer in self.folded]
        lines += [f"  skipped {bn}: {why}" for bn, why in self.skipped]
        return "\n".join(lines)


def _is_leaf(m: nn.Module) -> bool:
    """Batch norms (ours and the family's subclass torch.nn's), and subclasses of the foldable
    layers that keep their forward (e.g. transformers' EfficientNetDepthwiseConv2d), are single
    call_module nodes; torch.fx's default only keeps modules defined in torch.nn."""
    if isinstance(m, batchnorm_types()):
        return True
    base = next((t for t in _CONVS + _TRANSPOSED + (nn.Linear,) if isinstance(m, t)), None)
    return base is not None and type(m).forward is base.forward


def _traced_whole(m: nn.Module) -> bool:
    """Leaves of the traces: `_is_leaf`'s, and activations that BatchNormAct fuses (subclasses of
    nn.SiLU, Hugging Face's SiLUActivation), which convert(to="act") looks for as modules."""
    return _is_leaf(m) or fused_activation(m) is not None


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _traced_whole(m) or super().is_leaf_module(m, qualname)


class _MetaTracer(MetaTracer):
    """Proxies that carry meta tensors, so shape-dependent Python (e.g. TF-style padding computed
    from int(x.shape[-2])) traces for the shapes the probe saw."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _traced_whole(m) or super().is_leaf_module(m, qualname)


def _split_args(module: nn.Module, seen: tuple | None) -> tuple[dict, dict]:
    """(meta_args, concrete_args) for tracing `module`: the probe's tensor arguments as meta
    tensors, every other defaulted argument at its default (so flags like
    output_hidden_states=False do not become proxies used in control flow)."""
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    meta = {}
    if seen is not None:
        args, kwargs = seen
        bound = dict(zip((p.name for p in params), args)) | kwargs
        meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta")
                for k, v in bound.items() if isinstance(v, Tensor)}
    concrete = {p.name: p.default for p in params[1:]
                if p.default is not inspect.Parameter.empty and p.name not in meta}
    return meta, concrete


def _trace(module: nn.Module, seen: tuple | None) -> torch.fx.Graph:
    """Trace symbolically; where that fails and the probe showed this module's inputs, trace
    again with meta tensors of those shapes."""
    _, concrete = _split_args(module, None)
    try:
        return _Tracer().trace(module, concrete_args=concrete or None)
    except Exception:  # torch.fx raises TraceError, TypeError, AttributeError, ...
        if seen is None:
            raise
    meta, concrete = _split_args(module, seen)
    with warnings.catch_warnings():
        # MetaTracer warns for each leaf whose output meta it cannot infer; only the graph's
        # structure is read here, so that is harmless.
        warnings.simplefilter("ignore")
        return _MetaTracer().trace(module, meta_args=meta, concrete_args=concrete or None)


def _graphs(module: nn.Module, prefix: str, report: FoldReport, seen: dict[int, tuple]
            ) -> list[tuple[str, nn.Module, torch.fx.Graph]]:
    """Traced graphs covering `module`: its own, or its children's where it cannot be traced."""
    if next(module.children(), None) is None:  # nothing inside to fold
        return []
    try:
        return [(prefix, module, _trace(module, seen.get(id(module))))]
    except Exception as error:  # torch.fx raises TraceError, TypeError, AttributeError, ...
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        report.untraced.append((prefix or "<root>", f"{type(error).__name__}: {first_line}"))
    found = []
    for name, child in module.named_children():
        found += _graphs(child, f"{prefix}.{name}" if prefix else name, report, seen)
    return found


def _qualify(prefix: str, target: str) -> str:
    return f"{prefix}.{target}" if prefix else target


def _foldable_layer(layer: nn.Module) -> bool:
    return _is_leaf(layer) and not isinstance(layer, batchnorm_types())


def _layer_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _why_not(bn_name: str, bn: _BatchNorm, layer_name: str | None, layer: nn.Module | None,
             registrations: dict[int, int], calls: dict[int, int], input_ranks: dict[str, int]
             ) -> str | None:
    """None when (layer, bn) can fold, else the reason it cannot."""
    if takes_second_argument(bn) or not isinstance(bn, batchnorm_types(foldable=True)):
        return f"{type(bn).__name__} is not a plain batch norm in eval"
    if bn.running_mean is None or bn.running_var is None:
        return "track_running_stats=False: eval normalizes with batch statistics"
    if registrations[id(bn)] > 1 or calls[id(bn)] > 1:
        return "the batch norm is shared or called more than once"
    if layer is None:
        return "its input is not the output of a Conv, ConvTranspose or Linear layer (as traced)"
    if registrations[id(layer)] > 1 or calls[id(layer)] > 1:
        return f"{layer_name} is shared or called more than once"
    if _layer_channels(layer) != bn.num_features:
        return (f"{layer_name} has {_layer_channels(layer)} outputs, the batch norm "
                f"{bn.num_features}")
    if isinstance(layer, nn.Linear) and input_ranks.get(bn_name) != 2:
        return (f"{layer_name} is Linear and the batch norm's input was not seen to be 2-D; pass "
                f"example_input so fold can check that it normalizes the Linear's outputs")
    return None


@torch.no_grad()
def _fold_pair(layer: nn.Module, bn: _BatchNorm) -> None:
    """layer.weight <- a * weight per output channel, layer.bias <- a * bias + b."""
    weight = layer.weight
    mean = bn.running_mean.double()
    invstd = torch.rsqrt(bn.running_var.double() + bn.eps)
    a, b = scale_shift(mean, invstd, None if bn.weight is None else bn.weight.double(),
                       None if bn.bias is None else bn.bias.double())
    w = weight.double()
    if isinstance(layer, _TRANSPOSED):
        # weight is (in, out/groups, *k); output channel g*(out/groups) + j lives at [g-block, j].
        groups = layer.groups
        grouped = w.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        scale = a.reshape(groups, 1, w.shape[1], *([1] * (w.ndim - 2)))
        w = (grouped * scale).reshape(w.shape)
    else:
        # Conv weight is (out, in/groups, *k) and Linear weight (out, in): scale dim 0.
        w = w * a.reshape(-1, *([1] * (w.ndim - 1)))
    old_bias = torch.zeros_like(a) if layer.bias is None else layer.bias.double()
    weight.copy_(w.to(weight.dtype))
    new_bias = (old_bias * a + b).to(weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        layer.bias.copy_(new_bias)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def _observe(model: nn.Module, example_input) -> tuple[dict[str, int], dict[int, tuple]]:
    """One probe forward: the input rank of every batch norm (which dimension it normalizes) and
    every module's first (args, kwargs) (the shapes the meta tracer needs)."""
    ranks: dict[str, int] = {}
    seen: dict[int, tuple] = {}
    bn_names = {id(m): name for name, m in model.named_modules()
                if isinstance(m, batchnorm_types())}

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # a pre-hook's non-None return would replace the arguments
        seen.setdefault(id(module), (args, kwargs))
        if id(module) in bn_names and args and isinstance(args[0], Tensor):
            ranks.setdefault(bn_names[id(module)], args[0].ndim)

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()]
    try:
        run_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return ranks, seen


def _max_error(reference, candidate) -> tuple[float, float]:
    """(max |candidate - reference|, max |reference|) over every tensor in the outputs."""
    ref, got = output_tensors(reference), output_tensors(candidate)
    if len(ref) != len(got):
        raise RuntimeError(f"fold changed the model's output structure ({len(ref)} tensors before, "
                           f"{len(got)} after)")
    err = max(((g.double() - r.double()).abs().max().item() for r, g in zip(ref, got)
               if r.numel()), default=0.0)
    scale = max((r.double().abs().max().item() for r in ref if r.numel()), default=0.0)
    return err, scale


def fold(model: nn.Module, example_input=None, *, verify: bool = True, tolerance: float = 1e-4,
         inplace: bool = False) -> tuple[nn.Module, FoldReport]:
    """Fold every eval-mode batch norm into the Conv/ConvTranspose/Linear that feeds it.

    Args:
        model: an eval-mode model (folding uses the running statistics, which training mode does
            not).
        example_input: a probe batch: a tensor, a tuple of positional arguments, or a dict of
            keyword arguments. Needed by `verify` and to fold Linear -> BatchNorm1d pairs.
        verify: run `example_input` through the original and the folded model and raise if any
            output differs by more than `tolerance` x max(1, max |original output|).
        tolerance: relative to the output scale, see `verify`.
        inplace: fold `model` itself instead of a deep copy.

    Returns:
        (folded model, FoldReport). Folded batch norms are replaced by `nn.Identity` (or by their
        fused activation as a torch.nn module); everything else, including the model's class and
        output type, is unchanged.

    Raises:
        ValueError: the model is in training mode, or verify=True without example_input.
        RuntimeError: verify found the folded model's outputs off by more than the tolerance.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: expected an nn.Module, got {type(model).__name__}")
    training = [name or "<root>" for name, m in model.named_modules()
                if isinstance(m, batchnorm_types()) and m.training and not is_frozen(m)]
    if training:
        listed = ", ".join(training[:3]) + (", ..." if len(training) > 3 else "")
        raise ValueError(f"fold: the model has batch norms in training mode ({listed}); call "
                         f"model.eval() first: folding "
                         f"bakes in the running statistics, which training mode does not use")
    if verify and example_input is None:
        raise ValueError("fold: verify=True needs example_input (a probe batch); pass one, or "
                         "verify=False to fold unchecked")
    target = model if inplace else copy.deepcopy(model)
    reference = run_model(model, example_input) if verify else None
    input_ranks, seen = _observe(target, example_input) if example_input is not None else ({}, {})

    report = FoldReport()
    registrations: dict[int, int] = {}
    for _, m in target.named_modules(remove_duplicate=False):
        registrations[id(m)] = registrations.get(id(m), 0) + 1
    graphs = _graphs(target, "", report, seen)
    calls: dict[int, int] = {}
    for _, root, graph in graphs:
        for node in graph.nodes:
            if node.op == "call_module":
                m = root.get_submodule(node.target)
                calls[id(m)] = calls.get(id(m), 0) + 1

    traced_bns = set()
    pairs = []
    for prefix, root, graph in graphs:
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            bn = root.get_submodule(node.target)
            if not isinstance(bn, batchnorm_types()):
                continue
            bn_name = _qualify(prefix, node.target)
            traced_bns.add(id(bn))
            source = node.args[0] if node.args else None
            layer = layer_name = None
            if (isinstance(source, torch.fx.Node) and source.op == "call_module"
                    and len(node.args) == 1 and not node.kwargs
                    and _foldable_layer(root.get_submodule(source.target))):
                layer = root.get_submodule(source.target)
                layer_name = _qualify(prefix, source.target)
            if layer is not None and len(source.users) > 1:
                why = f"the output of {layer_name} also feeds something else"
            else:
                why = _why_not(bn_name, bn, layer_name, layer, registrations, calls, input_ranks)
            if why is None:
                pairs.append((bn_name, bn, layer_name, layer))
            elif (bn_name, why) not in report.skipped:
                report.skipped.append((bn_name, why))
    for name, m in target.named_modules():
        if isinstance(m, batchnorm_types()) and id(m) not in traced_bns:
            region = next((r for r, _ in reversed(report.untraced)
                           if r == "<root>" or name.startswith(r + ".")), "<root>")
            report.skipped.append((name, f"inside {region}, which torch.fx cannot trace"))

    for bn_name, bn, layer_name, layer in pairs:
        _fold_pair(layer, bn)
        # an act-fused layer (BatchNormAct, FrozenBatchNorm with act) leaves its activation
        _set_submodule(target, bn_name, activation_module(bn))
        report.folded.append((bn_name, layer_name))

    if verify:
        err, scale = _max_error(reference, run_model(target, example_input))
        report.max_error = err
        if err > tolerance * max(1.0, scale):
            raise RuntimeError(f"fold: the folded model's outputs differ from the original's by "
                               f"{err:.3e} (> {tolerance:.0e} x scale {max(1.0, scale):.3g}); "
                               f"report:\n{report}")
    return target, report
