"""FrozenBatchNorm1d/2d/3d: batch norm reduced to its inference affine, and freeze/unfreeze.

    y = act(a * x + b),   a = weight / sqrt(running_var + eps),   b = bias - running_mean * a,

per channel, with weight, bias and the running statistics all buffers: nothing is trained and
nothing is updated, in train mode as in eval (the detection backbones' FrozenBatchNorm2d of
torchvision and detectron2, for fine-tuning with batches too small for batch statistics). The
fold into (a, b) is `kernels.native.scale_shift`, the one folding helper of the library.

The layers are plain Modules, not `_BatchNorm` subclasses: code that finds batch norms by type
(`swa_utils.update_bn` resets and re-estimates running statistics, weight-decay filters look
for the affine parameters) must not treat a frozen layer as trainable batch norm. Their
state_dict keys are BatchNorm's (`weight`, `bias`, `running_mean`, `running_var`,
`num_batches_tracked`), so checkpoints load both ways.

`freeze(model)` swaps every BatchNorm1d/2d/3d in a model (torch.nn's and ours, including
BatchNormAct, BatchRenorm and GhostBatchNorm, whose inference is batch norm on the running
statistics) for the frozen layer with the same values; `unfreeze(model)` swaps them back into
our BatchNorm (BatchNormAct where an activation is fused).

Args (all layers):
    num_features: C.
    eps: added to running_var, >= 0 (the forward checks it, as eval-mode batch norm does: a
        layer frozen from one with eps=0 works). Default 1e-5.
    act, negative_slope: a fused activation, as BatchNormAct. Default "identity".
    device, dtype: of the buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm import functional as F
from batchnorm.kernels import native
from batchnorm.nn.batchnorm import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d,
                                    BatchNormAct2d, BatchNormAct3d, carry_over,
                                    refuse_uninitialized, resolve_activation, unscriptable)


class FrozenBatchNormBase(torch.nn.Module):
    """The shared buffers and forward of FrozenBatchNorm1d/2d/3d; see the module docstring."""

    _input_ranks: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, *, act="identity",
                 negative_slope: float = 0.01, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, got "
                             f"{num_features!r}")
        self.num_features, self.eps = num_features, eps
        self.activation, self.negative_slope = resolve_activation(act, negative_slope,
                                                                  self.layer_name)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long,
                                                                 device=device))

    @property
    def layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel (a, b) of y = a*x + b (before the activation)."""
        return native.scale_shift(self.running_mean, torch.rsqrt(self.running_var + self.eps),
                                  self.weight, self.bias)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """torch.jit.script hook: a clear error (see `unscriptable`) instead of TorchScript's."""
        raise unscriptable(self.layer_name)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Tensor) and input.ndim not in self._input_ranks:
            ranks = " or ".join(f"{r}D" for r in self._input_ranks)
            raise ValueError(f"{self.layer_name}: expected {ranks} input (got {input.ndim}D input "
                             f"of shape {tuple(input.shape)})")
        # Eval-mode batch norm is exactly the folded affine; the kernels apply scale_shift.
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps, activation=self.activation,
                            negative_slope=self.negative_slope, layer_name=self.layer_name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torchvision's FrozenBatchNorm2d checkpoints have no num_batches_tracked; it is unused.
        state_dict.setdefault(prefix + "num_batches_tracked", self.num_batches_tracked.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, act={self.activation!r}"


class FrozenBatchNorm1d(FrozenBatchNormBase):
    """Frozen batch norm over (N, C) or (N, C, L) input; see the module docstring."""

    _input_ranks = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNormBase):
    """Frozen batch norm over (N, C, H, W) input; see the module docstring."""

    _input_ranks = (4,)


class FrozenBatchNorm3d(FrozenBatchNormBase):
    """Frozen batch norm over (N, C, D, H, W) input; see the module docstring."""

    _input_ranks = (5,)


# (torch.nn batch norm class, frozen class, unfrozen class, unfrozen class with an activation)
_KINDS = ((torch.nn.BatchNorm1d, FrozenBatchNorm1d, BatchNorm1d, BatchNormAct1d),
          (torch.nn.BatchNorm2d, FrozenBatchNorm2d, BatchNorm2d, BatchNormAct2d),
          (torch.nn.BatchNorm3d, FrozenBatchNorm3d, BatchNorm3d, BatchNormAct3d))


def _frozen_copy(bn: torch.nn.modules.batchnorm._BatchNorm, frozen_cls, path: str):
    """The frozen layer; nn.Sequential(frozen, act) for a BatchNormAct whose activation has no
    fused kernel (kept as its `act` submodule), as convert does for a layer losing its fusion."""
    if bn.running_mean is None:
        raise ValueError(f"freeze: {path or 'the module'} ({type(bn).__name__}) has no running "
                         f"statistics (track_running_stats=False), so there is nothing to freeze")
    frozen = frozen_cls(bn.num_features, bn.eps, act=getattr(bn, "activation", "identity"),
                        negative_slope=getattr(bn, "negative_slope", 0.01),
                        device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    with torch.no_grad():
        if bn.weight is not None:
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
        frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
    frozen.train(bn.training)
    return carry_over(bn, frozen if getattr(bn, "act", None) is None
                      else torch.nn.Sequential(frozen, bn.act))


def _unfrozen_copy(frozen: FrozenBatchNormBase, plain_cls, act_cls):
    kwargs = ({} if frozen.activation == "identity" else
              {"act": frozen.activation, "negative_slope": frozen.negative_slope})
    bn = (act_cls if kwargs else plain_cls)(frozen.num_features, frozen.eps, **kwargs,
                                            device=frozen.running_mean.device,
                                            dtype=frozen.running_mean.dtype)
    bn.load_state_dict(frozen.state_dict())
    return carry_over(frozen, bn)  # weight and bias are new Parameters: trainable again


def _swap(module: torch.nn.Module, convert, path: str = "", done: dict | None = None
          ) -> torch.nn.Module:
    """`module` with `convert` applied to it or else to its descendants, in place. A module
    registered under several names is converted once and the one result put at every name
    (`done`: id -> result; it also keeps the originals alive, so their ids stay unique)."""
    done = {} if done is None else done
    if id(module) in done:
        return done[id(module)][1]
    replaced = convert(module, path)
    done[id(module)] = (module, module if replaced is None else replaced)
    if replaced is not None:
        return replaced
    # _modules, not named_children(), which skips a child already seen under another name
    for name, child in list(module._modules.items()):
        if child is not None:
            setattr(module, name, _swap(child, convert, f"{path}.{name}" if path else name, done))
    return module


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm1d/2d/3d in `module` (in place) with a FrozenBatchNorm1d/2d/3d
    holding the same values; returns `module`, or the frozen layer if `module` is a batch norm.
    Layers that are not torch.nn.BatchNorm1d/2d/3d instances (Masked/DomainBatchNorm,
    SyncBatchNorm) are left as they are. The frozen layer keeps the training flag, the hooks,
    the device and the statistics' dtype of the one it replaces.

    Raises:
        ValueError: a batch norm without running statistics; an uninitialized lazy batch norm
            (run the model once first, which initializes it).
    """
    def convert(m, path):
        refuse_uninitialized(m, "freeze", path)
        for bn_cls, frozen_cls, _, _ in _KINDS:
            if isinstance(m, bn_cls):
                return _frozen_copy(m, frozen_cls, path)
        return None
    return _swap(module, convert)


def unfreeze(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every FrozenBatchNorm1d/2d/3d in `module` (in place) with our BatchNorm1d/2d/3d
    (BatchNormAct1d/2d/3d if it fuses an activation) holding the same values, weight and bias
    trainable again; returns `module`, or the new layer if `module` is a frozen batch norm.
    momentum is the default 0.1 (a frozen layer has none to keep)."""
    def convert(m, path):
        for _, frozen_cls, plain_cls, act_cls in _KINDS:
            if type(m) is frozen_cls:
                return _unfrozen_copy(m, plain_cls, act_cls)
        return None
    return _swap(module, convert)
