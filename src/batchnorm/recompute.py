"""Activation checkpointing: which pass of a `torch.utils.checkpoint` region is running.

`torch.utils.checkpoint` (reentrant and not, and everything built on it: `checkpoint_sequential`,
transformers' gradient checkpointing) runs a region's forward once without keeping activations,
then again inside the backward to recompute them. torch.nn's batch norm updates its running
statistics in both passes (pytorch#96136). Ours update them only in the first: `functional` asks
`phase()` before every update, and batch renorm, whose output depends on the running statistics,
replays in the recomputation the running statistics and limits of the first pass (`record`,
`replay`), so both passes normalize alike.

The pass is read from torch's own checkpoint code, not guessed: the recomputation runs inside
`CheckpointFunction.backward` (use_reentrant=True) or the saved-tensor unpack hook of
`_checkpoint_hook` (use_reentrant=False), found on the call stack; the first pass inside
`CheckpointFunction.forward`, or under `_checkpoint_hook`'s pack hook, the innermost saved-tensor
hook (which also covers checkpoint_wrapper and the composable `checkpoint(module)`). The stack is
walked only when a checkpoint can be running: a non-reentrant region installs saved-tensor hooks,
a reentrant one runs its first pass under no_grad and its recomputation inside the autograd engine
(a graph task id). A plain training forward with grad enabled pays four C calls (~1.5 us).

Under torch.compile nothing is walked (phase None): compiled activation checkpointing recomputes
inside the graph, where our update is a functionalized buffer mutation; not tested.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import Tensor

__all__ = ["phase", "record", "replay", "FORWARD", "RECOMPUTE"]

FORWARD, RECOMPUTE = "forward", "recompute"


def _checkpoint_codes() -> dict:
    """Code object -> (pass, how to find the region object in that frame). Written against torch
    2.13's checkpoint.py; a piece another version lacks is left out rather than failing every
    training forward (that path then counts as torch.nn does)."""
    from torch.utils import checkpoint as ckpt

    def nested(fn, name):
        return next((c for c in fn.__code__.co_consts if getattr(c, "co_name", None) == name),
                    None)

    codes = {
        ckpt.CheckpointFunction.forward.__code__: (FORWARD, lambda f: f.f_locals["ctx"]),
        ckpt.CheckpointFunction.backward.__code__: (RECOMPUTE, lambda f: f.f_locals["ctx"]),
        nested(ckpt._checkpoint_hook.__init__, "unpack_hook"): (RECOMPUTE,
                                                                lambda f: f.f_locals.get("frame")),
    }
    return {code: entry for code, entry in codes.items() if code is not None}


def _pack_code():
    from torch.utils import checkpoint as ckpt

    return next((c for c in ckpt._checkpoint_hook.__init__.__code__.co_consts
                 if getattr(c, "co_name", None) == "pack_hook"), None)


def _non_reentrant_region():
    """The _CheckpointFrame of the non-reentrant region whose first pass is running, or None:
    its pack hook is the innermost saved-tensor hook (checkpoint(use_reentrant=False),
    checkpoint_wrapper and the composable `checkpoint(module)` all install it), and holds the
    frame in its closure."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    pack = hooks[0] if hooks is not None else None
    if getattr(pack, "__code__", None) is not _PACK_CODE or _PACK_CODE is None:
        return None
    return pack.__closure__[pack.__code__.co_freevars.index("frame")].cell_contents


_CODES: dict | None = None
_PACK_CODE = None


def phase() -> tuple[str, object] | None:
    """(FORWARD or RECOMPUTE, region) inside a checkpointed region, None elsewhere.

    `region` is an object that lives as long as the outermost checkpointed region's autograd
    graph (its checkpoint's autograd node or frame; an inner region's may die first, e.g. a
    reentrant one nested in another runs under no_grad and keeps no graph). A recomputation
    anywhere up the stack wins over a first pass nearer the caller: a checkpoint nested in a
    recomputed region is itself being recomputed.
    """
    global _CODES, _PACK_CODE
    if torch.compiler.is_compiling():
        return None
    if (torch._C._autograd._top_saved_tensors_default_hooks(False) is None
            and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1):
        return None
    if _CODES is None:
        _CODES, _PACK_CODE = _checkpoint_codes(), _pack_code()
    found = None
    frame = sys._getframe(1)
    while frame is not None:
        entry = _CODES.get(frame.f_code)
        if entry is not None:
            kind, region = entry[0], entry[1](frame)
            if kind == RECOMPUTE:
                return RECOMPUTE, region
            if region is not None:
                found = (FORWARD, region)  # the outermost one wins
        frame = frame.f_back
    if found is None:
        region = _non_reentrant_region()
        found = (FORWARD, region) if region is not None else None
    return found


# region -> [[running_mean buffer, batch mean, saved values, times replayed]]: the records die
# with the region's graph.
_records: "weakref.WeakKeyDictionary[object, list]" = weakref.WeakKeyDictionary()


def record(region: object, owner: Tensor, batch_mean: Tensor, saved: tuple) -> None:
    """Keep `saved` (what the first pass normalized with) for the recomputations of the call whose
    running mean is `owner` and whose batch mean is `batch_mean`."""
    _records.setdefault(region, []).append([owner, batch_mean, saved, 0])


def replay(owner: Tensor, batch_mean: Tensor, name: str) -> tuple:
    """The values `record` kept for this call: found by its running-mean buffer and its batch
    mean, which the recomputation reproduces bit for bit from the same input, so calls are matched
    whatever order the regions are recomputed in (reverse, pipeline schedules, shared layers).
    Records stay until their graph dies: nested checkpoints recompute an inner region twice (in
    the outer recomputation, then in its own). Among equal matches (the same layer fed the same
    batch twice) the least replayed, first recorded one is taken, which keeps the first pass's
    order."""
    matches = [entry for entries in list(_records.values()) for entry in entries
               if entry[0] is owner and entry[1].shape == batch_mean.shape
               and torch.equal(entry[1], batch_mean)]
    if matches:
        entry = min(matches, key=lambda e: e[3])
        entry[3] += 1
        return entry[2]
    raise RuntimeError(
        f"{name}: recomputing a checkpointed forward, but no first pass of this layer with the "
        f"same batch statistics was recorded (the recomputation saw different input, or the "
        f"first pass ran outside torch.utils.checkpoint); batch renorm needs the running "
        f"statistics of the first pass. Make the checkpointed function deterministic, or keep "
        f"this layer outside the checkpointed region")
