"""Swap batch-norm layers between kinds: torch.nn's, ours, and the variants, in place.

Every kind keeps torch.nn's parameter and buffer names (weight, bias, running_mean, running_var,
num_batches_tracked), so a swap moves the very same Parameter and buffer objects into the new
layer: values, device, dtype, requires_grad and an optimizer's references all carry over, and the
training flag is copied. The registry is one flat dict of names; an unknown name raises ValueError
listing the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["convert", "Change", "TARGETS"]

# name -> the class for 1d, 2d and 3d input.
TARGETS: dict[str, tuple[type[_BatchNorm], type[_BatchNorm], type[_BatchNorm]]] = {
    "batchnorm": (BatchNorm1d, BatchNorm2d, BatchNorm3d),
    "torch": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
}

_SHARED_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class Change:
    """One swapped layer: its qualified name, the old and the new class."""

    name: str
    before: type
    after: type

    def __str__(self) -> str:
        return f"{self.name}: {_label(self.before)} -> {_label(self.after)}"


def _label(cls: type) -> str:
    """"torch.nn.BatchNorm2d" or "batchnorm.BatchNorm2d": the package tells same-named classes apart."""
    package = "torch.nn" if cls.__module__.startswith("torch.nn") else cls.__module__.split(".")[0]
    return f"{package}.{cls.__qualname__}"


def _rank(module: _BatchNorm, dim: int | None, name: str) -> int:
    for rank, cls in enumerate((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), start=1):
        if isinstance(module, cls):
            return rank
    if dim is None:
        raise ValueError(f"convert: {name} is a {type(module).__name__}, which accepts any input "
                         f"rank, so the target's 1d/2d/3d class is ambiguous; pass dim=1, 2 or 3 "
                         f"(the number of dimensions after (N, C), e.g. dim=2 for images)")
    if dim not in (1, 2, 3):
        raise ValueError(f"convert: dim must be 1, 2 or 3, got {dim!r}")
    return dim


def _swap(module: _BatchNorm, cls: type[_BatchNorm], kwargs: dict) -> _BatchNorm:
    new = cls(module.num_features, eps=module.eps, momentum=module.momentum,
              affine=module.affine, track_running_stats=module.track_running_stats, **kwargs)
    for key in _SHARED_STATE:
        value = getattr(module, key, None)
        if key in new._parameters:
            new._parameters[key] = value
        elif key in new._buffers:
            new._buffers[key] = value
    new.train(module.training)
    return new


def convert(model: nn.Module, to: str = "batchnorm", *, dim: int | None = None, **kwargs
            ) -> tuple[nn.Module, list[Change]]:
    """Replace every batch-norm layer in `model` by the kind named `to`, in place.

    Args:
        model: any module; a batch-norm layer itself is replaced and returned.
        to: a name in `TARGETS`: "batchnorm" (ours), "torch" (torch.nn's, e.g. before exporting),
            and the variants registered there.
        dim: for sources that accept any rank (SyncBatchNorm), which of the target's 1d/2d/3d
            classes to use.
        **kwargs: extra constructor arguments of the target kind (e.g. its activation).

    Returns:
        (model, changes): the model (a new object only when `model` itself was a batch norm) and a
        `Change` per swapped layer. Layers already of the target class are left alone.

    Raises:
        ValueError: an unknown `to`, or a rank-agnostic source without `dim`.
    """
    if to not in TARGETS:
        raise ValueError(f"convert: unknown target {to!r}; valid targets are "
                         f"{', '.join(map(repr, sorted(TARGETS)))}")
    changes: list[Change] = []
    swapped: dict[int, nn.Module] = {}  # a layer registered under two names stays one layer

    def replacement(module: nn.Module, name: str) -> nn.Module | None:
        if not isinstance(module, _BatchNorm):
            return None
        if id(module) not in swapped:
            cls = TARGETS[to][_rank(module, dim, name) - 1]
            if type(module) is cls:
                return None
            swapped[id(module)] = _swap(module, cls, kwargs)
            changes.append(Change(name or "<root>", type(module), cls))
        return swapped[id(module)]

    root = replacement(model, "")
    if root is not None:
        return root, changes
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            new = replacement(child, name)
            if new is not None:
                setattr(parent, child_name, new)
    return model, changes
