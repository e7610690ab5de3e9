"""Swap batch-norm layers between kinds: torch.nn's, ours, and the variants, in place.

Every trainable kind keeps torch.nn's parameter and buffer names (weight, bias, running_mean,
running_var, num_batches_tracked), so a swap moves the very same Parameter and buffer objects into
the new layer: values, device, dtype, requires_grad and an optimizer's references all carry over;
the training flag and the forward, pre-forward and backward hooks are the old layer's (the same
hook dicts, so handles already held still remove them). FrozenBatchNorm holds its values as
buffers, so converting to or from it copies them (through the family's `freeze`/`unfreeze`), on
the same device and in the same dtype.

An uninitialized lazy layer (torch.nn.LazyBatchNorm2d before its first forward) has no
num_features and no tensors yet: converting it raises ValueError saying to run the model once
first, after which it is a plain torch.nn.BatchNorm2d and converts as one.

Activations: converting to "act" fuses the activation module that is the batch norm's only
consumer (found with torch.fx, as fold finds its pairs) into the new BatchNormAct layer and puts an
nn.Identity in its place, when it computes one of the fused functions (`fused_activation`: nn.ReLU,
nn.SiLU and subclasses, Hugging Face's SiLUActivation, LeakyReLU, GELU(tanh)); any other
activation (ReLU6, Hardswish, ...) stays where it is, and the layer's Change says why in its
`note`. A fused activation converted to a kind without one becomes nn.Sequential(layer,
activation), which keeps the function (its state_dict keys gain ".0.").

A layer registered under several names (`m.a = m.b = bn`) is converted once, and the new layer
is put at every name; `changes` lists it once, under its first name.

`to="sync"` applies `batchnorm.convert_sync_batchnorm` (the sync layer's rules, kept in one place)
and lists what it changed; a SyncBatchNorm it made remembers the class it replaced, so converting
it back needs no `dim`.

Masked and domain batch norm take a second argument that no other kind accepts; they are left
as they are. The registry is one flat dict of names; an unknown name raises ValueError listing the
valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm.nn as family
from batchnorm.nn.batchnorm import carry_over, fused_activation, refuse_uninitialized
from batchnorm.tools._common import activation_module, is_frozen, takes_second_argument
from batchnorm.tools.fold import FoldReport, _graphs, _observe

__all__ = ["convert", "Change", "TARGETS"]

# name -> the class for 1d, 2d and 3d input.
TARGETS: dict[str, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    "batchnorm": (family.BatchNorm1d, family.BatchNorm2d, family.BatchNorm3d),
    "torch": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "act": (family.BatchNormAct1d, family.BatchNormAct2d, family.BatchNormAct3d),
    "renorm": (family.BatchRenorm1d, family.BatchRenorm2d, family.BatchRenorm3d),
    "ghost": (family.GhostBatchNorm1d, family.GhostBatchNorm2d, family.GhostBatchNorm3d),
    "frozen": (family.FrozenBatchNorm1d, family.FrozenBatchNorm2d, family.FrozenBatchNorm3d),
    # one class for every rank; convert delegates to family.convert_sync_batchnorm (see there)
    "sync": (family.SyncBatchNorm, family.SyncBatchNorm, family.SyncBatchNorm),
}

_SHARED_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_RANKED = ((nn.BatchNorm1d, family.FrozenBatchNorm1d), (nn.BatchNorm2d, family.FrozenBatchNorm2d),
           (nn.BatchNorm3d, family.FrozenBatchNorm3d))


@dataclass(frozen=True)
class Change:
    """One swapped layer: its qualified name, the old and the new class, and a note (e.g. why the
    activation after it was not fused)."""

    name: str
    before: type
    after: type
    note: str = ""

    def __str__(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"{self.name}: {_label(self.before)} -> {_label(self.after)}{note}"


def _label(cls: type) -> str:
    """"torch.nn.BatchNorm2d" or "batchnorm.BatchNorm2d": the package tells the names apart."""
    package = "torch.nn" if cls.__module__.startswith("torch.nn") else cls.__module__.split(".")[0]
    return f"{package}.{cls.__qualname__}"


def _is_source(module: nn.Module) -> bool:
    is_batchnorm = isinstance(module, _BatchNorm) or is_frozen(module)
    return is_batchnorm and not takes_second_argument(module)


def _rank(module: nn.Module, dim: int | None, name: str) -> int:
    # a SyncBatchNorm made by convert_sync_batchnorm remembers the class it replaced
    origin = getattr(module, "_reverts_to", type(module))
    for rank, classes in enumerate(_RANKED, start=1):
        if issubclass(origin, classes):
            return rank
    if dim is None:
        raise ValueError(f"convert: {name} is a {type(module).__name__}, which accepts any input "
                         f"rank, so the target's 1d/2d/3d class is ambiguous; pass dim=1, 2 or 3 "
                         f"(the number of dimensions after (N, C), e.g. dim=2 for images)")
    if dim not in (1, 2, 3):
        raise ValueError(f"convert: dim must be 1, 2 or 3, got {dim!r}")
    return dim


def _fused(module: nn.Module) -> bool:
    """Whether the layer applies an activation (fused, or held unfused as BatchNormAct's `act`)."""
    return (getattr(module, "activation", "identity") != "identity"
            or getattr(module, "act", None) is not None)


def _swap(module: nn.Module, cls: type, kwargs: dict) -> nn.Module:
    """A `cls` layer in `module`'s place; the same Parameter and buffer objects where both are
    trainable kinds."""
    if cls in TARGETS["frozen"]:
        if not isinstance(module, tuple(TARGETS["torch"])):  # freeze() takes BatchNorm1d/2d/3d
            module = _swap(module, TARGETS["batchnorm"][TARGETS["frozen"].index(cls)], {})
        return family.freeze(module)
    if is_frozen(module):
        module = family.unfreeze(module)  # trainable again: new Parameters with its values
    args = {"eps": module.eps, "momentum": module.momentum, "affine": module.affine,
            "track_running_stats": module.track_running_stats}
    if issubclass(cls, family.BatchNormActBase):  # its default act is relu, not identity
        unfused = getattr(module, "act", None)
        act = unfused if unfused is not None else getattr(module, "activation", "identity")
        args |= {"act": act,
                 "negative_slope": getattr(module, "negative_slope", 0.01)}
    new = cls(module.num_features, **(args | kwargs))
    for key in _SHARED_STATE:
        value = getattr(module, key, None)
        if key in new._parameters:
            new._parameters[key] = value
        elif key in new._buffers:
            new._buffers[key] = value
    new.train(module.training)
    # A layer with the sync option on (BatchNormAct(sync=True), ...) stays synced in a kind that
    # has the option; SyncBatchNorm itself converts to the plain kind, as revert_sync_batchnorm.
    if (getattr(module, "sync", False) and type(module) is not family.SyncBatchNorm
            and getattr(new, "syncable", False)):
        new.sync, new.process_group = True, module.process_group
    if _fused(module) and not _fused(new) and not issubclass(cls, family.BatchNormActBase):
        return carry_over(module, nn.Sequential(new, activation_module(module)))
    return carry_over(module, new)


def _is_activation(module: nn.Module) -> bool:
    package = type(module).__module__
    return (package == "torch.nn.modules.activation"
            or package.startswith("transformers.activations"))


def _activation_consumers(model: nn.Module, example_input
                          ) -> tuple[dict[int, str], dict[int, str]]:
    """id(batch norm) -> the name of the activation module that alone consumes its output, and
    id(batch norm) -> why the activation after it is not fused (it has no fused kernel)."""
    seen = _observe(model, example_input)[1] if example_input is not None else {}
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    found, unfused = {}, {}
    for prefix, root, graph in _graphs(model, "", FoldReport(), seen):
        calls = [n for n in graph.nodes if n.op == "call_module"]
        called = {}
        for n in calls:
            called[n.target] = called.get(n.target, 0) + 1
        for node in calls:
            bn = root.get_submodule(node.target)
            if not _is_source(bn) or len(node.users) != 1:
                continue
            (user,) = node.users
            if user.op != "call_module" or len(user.args) != 1 or user.kwargs:
                continue
            act = root.get_submodule(user.target)
            name = f"{prefix}.{user.target}" if prefix else user.target
            if fused_activation(act) is None:  # only activations with a fused kernel
                if _is_activation(act):
                    unfused[id(bn)] = (f"{name} ({type(act).__name__}) not fused: no fused kernel "
                                       f"for it; it stays a separate module after the layer")
                continue
            if counts[id(act)] == 1 and called[user.target] == 1 and counts[id(bn)] == 1:
                found[id(bn)] = name
    return found, unfused


def _to_sync(model: nn.Module, process_group=None) -> tuple[nn.Module, list[Change]]:
    """convert_sync_batchnorm (the sync layer's own rules: plain layers become SyncBatchNorm, our
    other layers switch their sync option on, ghost/masked/domain stay local with a warning), and
    the list of what changed."""
    before = {name: (type(m), getattr(m, "sync", False))
              for name, m in model.named_modules() if _is_source(m)}
    model = family.convert_sync_batchnorm(model, process_group)
    changes = [Change(name or "<root>", before[name][0], type(m))
               for name, m in model.named_modules()
               if name in before and (type(m), getattr(m, "sync", False)) != before[name]]
    return model, changes


def convert(model: nn.Module, to: str = "batchnorm", *, dim: int | None = None,
            example_input=None, **kwargs) -> tuple[nn.Module, list[Change]]:
    """Replace every batch-norm layer in `model` by the kind named `to`, in place.

    Args:
        model: any module; a batch-norm layer itself is replaced and returned.
        to: a name in `TARGETS`: "batchnorm" (ours), "torch" (torch.nn's, e.g. before exporting),
            "act" (BatchNormAct, fusing the activation that follows), "renorm" (BatchRenorm),
            "ghost" (GhostBatchNorm), "frozen" (FrozenBatchNorm), "sync" (statistics over all
            ranks: `batchnorm.convert_sync_batchnorm`'s rules, which keep BatchNormAct and
            BatchRenorm as they are with their sync option on; takes `process_group=`).
        dim: for sources that accept any rank (SyncBatchNorm), which of the target's 1d/2d/3d
            classes to use.
        example_input: for to="act", a probe batch that lets torch.fx trace modules with
            shape-dependent code (as in `fold`).
        **kwargs: constructor arguments of the target kind (e.g. virtual_batch_size, rmax).

    Returns:
        (model, changes): the model (a new object only when `model` itself was a batch norm) and a
        `Change` per swapped layer. Layers already of the target class are left alone.

    Raises:
        ValueError: an unknown `to`, a rank-agnostic source without `dim`, an uninitialized
            lazy layer, or (to="frozen") a layer without running statistics.
    """
    if to not in TARGETS:
        raise ValueError(f"convert: unknown target {to!r}; valid targets are "
                         f"{', '.join(map(repr, sorted(TARGETS)))}")
    if to == "sync":
        return _to_sync(model, **kwargs)
    activations, unfused = _activation_consumers(model, example_input) if to == "act" else ({}, {})
    layers = {id(m): m for m in model.modules()}
    activations = {k: v for k, v in activations.items() if not _fused(layers[k])}
    fused_away = set(activations.values())
    changes: list[Change] = []
    swapped: dict[int, nn.Module] = {}  # a layer registered under two names stays one layer

    def replacement(module: nn.Module, name: str) -> nn.Module | None:
        if not _is_source(module):
            return None
        refuse_uninitialized(module, "convert", name)
        if id(module) not in swapped:
            cls = TARGETS[to][_rank(module, dim, name) - 1]
            extra = dict(kwargs)
            if id(module) in activations:
                extra.setdefault("act", model.get_submodule(activations[id(module)]))
            elif type(module) is cls:
                return None
            swapped[id(module)] = _swap(module, cls, extra)
            changes.append(Change(name or "<root>", type(module), cls,
                                  unfused.get(id(module), "")))
        return swapped[id(module)]

    root = replacement(model, "")
    if root is not None:
        return root, changes
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        # _modules, not named_children(), which skips a child already seen under another name
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            new = nn.Identity() if name in fused_away else replacement(child, name)
            if new is not None:
                setattr(parent, child_name, new)
    return model, changes
