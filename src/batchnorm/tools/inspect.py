"""Diagnostics: the gap between batch and running statistics, and input percentiles over training.

For a batch-norm layer with batch statistics (mu_B, var_B) of its input and running ones
(mu_R, var_R), per channel c,

    mean_gap  = |mu_B - mu_R| / sqrt(var_R + eps)      (the shift, in running standard deviations)
    std_ratio = sqrt((var_B + eps) / (var_R + eps))    (1 when the scales agree)

and the records hold their averages over channels. Both are 0 and 1 when eval mode normalizes a
batch exactly as training mode would; large values explain a model that is good in training mode
and poor in eval (small or non-i.i.d. batches, a distribution shift: Wu & Johnson 2021, arXiv
2105.07576, s4). The percentiles (15, 50, 85) of chosen modules' inputs over training steps are
Ioffe & Szegedy's Fig. 1 (arXiv 1502.03167): stable with batch norm, drifting without.

Records are tidy: one dict per (step, layer, quantity) with keys step, layer, quantity, value, so
`pandas.DataFrame(records)` needs no reshaping.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from batchnorm.kernels.native import stats
from batchnorm.tools._common import (batch_inputs, batchnorm_types, is_domain, layer_values,
                                     limited, model_device, progress_bar, run_model, to_device,
                                     total_batches)

__all__ = ["track", "Tracker", "eval_gap", "plot"]

PERCENTILES = (15, 50, 85)


def _gap(bn: nn.Module, args: tuple, kwargs: dict) -> tuple[float, float] | None:
    """(mean_gap, std_ratio) of a call's input (a MaskedBatchNorm's valid positions) against bn's
    running statistics (a DomainBatchNorm's for the call's domain), float64; None when the call
    has no values to measure."""
    running_mean, running_var = bn.running_mean, bn.running_var
    if is_domain(bn):
        k = int(args[1] if len(args) > 1 else kwargs["domain"])
        running_mean, running_var = running_mean[k], running_var[k]
    values = layer_values(bn, args, kwargs)
    if values is None or values.numel() == 0:
        return None
    count, mean, m2 = stats(values.detach().double())
    var = m2 / count
    running_var = running_var.double() + bn.eps
    mean_gap = ((mean - running_mean.double()).abs() * torch.rsqrt(running_var)).mean()
    std_ratio = torch.sqrt((var + bn.eps) / running_var).mean()
    return mean_gap.item(), std_ratio.item()


class Tracker:
    """What `track` yields: `records` grows by one row per (step, layer, quantity) while the
    context is open; a step is one forward call of the tracked model."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.step = -1

    def plot(self, path: str | os.PathLike | None = None):
        """`plot(self.records, path)`."""
        return plot(self.records, path)


@contextlib.contextmanager
def track(model: nn.Module, inputs_of: Iterable[str] = (), *, every: int = 1
          ) -> Iterator[Tracker]:
    """Record, on every `every`-th forward of `model`, each batch-norm layer's mean_gap and
    std_ratio (see the module docstring; running statistics as they were before the step's update)
    and the 15/50/85th percentiles of the inputs of the modules named in `inputs_of` (e.g. the
    sigmoid after a layer, for Ioffe's Fig. 1). Batch-norm layers in eval mode are recorded too.

    Args:
        model: the model whose forward calls count as steps.
        inputs_of: qualified module names (as in `model.named_modules()`) whose inputs to track.
        every: record every n-th step only (1 = every step).

    Yields:
        a `Tracker`; its `records` stay readable after the context closes, and the hooks are gone.

    Raises:
        ValueError: an unknown name in `inputs_of`, or every < 1.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"track: every must be a positive int, got {every!r}")
    modules = dict(model.named_modules())
    inputs_of = list(inputs_of)
    unknown = [n for n in inputs_of if n not in modules]
    if unknown:
        raise ValueError(f"track: no module named {', '.join(map(repr, unknown))} in the model; "
                         f"names are as in model.named_modules(), e.g. "
                         f"{', '.join(repr(n) for n in list(modules)[1:4])}")
    tracker = Tracker()

    def on_step(_module, _args):
        tracker.step += 1

    def on_bn(name, module, args, kwargs):
        if tracker.step % every or module.running_mean is None:
            return
        gap = _gap(module, args, kwargs)
        if gap is None:
            return
        mean_gap, std_ratio = gap
        tracker.records.append({"step": tracker.step, "layer": name, "quantity": "mean_gap",
                                "value": mean_gap})
        tracker.records.append({"step": tracker.step, "layer": name, "quantity": "std_ratio",
                                "value": std_ratio})

    def on_input(name, _module, args):
        if tracker.step % every or args[0].numel() == 0:
            return
        q = torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64)
        values = torch.quantile(args[0].detach().double().flatten(), q)
        for p, v in zip(PERCENTILES, values.tolist()):
            tracker.records.append({"step": tracker.step, "layer": name, "quantity": f"p{p}",
                                    "value": v})

    # pre-hooks, so the running statistics are read before this step's update; each returns None
    # (a non-None return would replace the module's arguments).
    handles = [model.register_forward_pre_hook(on_step)]
    handles += [m.register_forward_pre_hook(
                    lambda mod, args, kwargs, name=name: on_bn(name, mod, args, kwargs),
                    with_kwargs=True)
                for name, m in modules.items() if isinstance(m, batchnorm_types())]
    handles += [modules[name].register_forward_pre_hook(
                    lambda mod, args, name=name: on_input(name, mod, args)) for name in inputs_of]
    try:
        yield tracker
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def eval_gap(model: nn.Module, batches: Iterable, num_batches: int | None = None, *,
             forward: Callable[[nn.Module, object], object] | None = None,
             progress: bool = False) -> list[dict]:
    """Per batch-norm layer, how far each batch's statistics are from the running ones.

    Runs `batches` through the model in eval mode (nothing is updated) and averages each layer's
    mean_gap and std_ratio (module docstring) over the batches.

    Args:
        model: a model with batch norms; its training flags are restored afterwards.
        batches, num_batches, forward, progress: as in `recalibrate`.

    Returns:
        one dict per layer with running statistics: layer, mean_gap, std_ratio, batches; sorted
        by mean_gap, largest first.
    """
    modes = {m: m.training for m in model.modules()}
    device = model_device(model)
    model.eval()
    try:
        with track(model) as tracker:
            it = limited(batches, num_batches, "eval_gap")
            for batch in progress_bar(it, total_batches(batches, num_batches), "eval_gap",
                                      progress):
                if forward is None:
                    run_model(model, to_device(batch_inputs(batch), device))
                else:
                    forward(model, batch)
    finally:
        for m, mode in modes.items():
            m.training = mode
    sums: dict[str, dict] = {}
    for r in tracker.records:
        row = sums.setdefault(r["layer"], {"layer": r["layer"], "mean_gap": 0.0, "std_ratio": 0.0,
                                           "batches": 0})
        row[r["quantity"]] += r["value"]
        row["batches"] += r["quantity"] == "mean_gap"
    rows = [dict(row, mean_gap=row["mean_gap"] / row["batches"],
                 std_ratio=row["std_ratio"] / row["batches"]) for row in sums.values()]
    return sorted(rows, key=lambda row: -row["mean_gap"])


def plot(records: list[dict], path: str | os.PathLike | None = None):
    """One panel per quantity (mean_gap, std_ratio, p15/p50/p85), one line per layer, over steps.

    Args:
        records: tidy records from `track` (or any list of step/layer/quantity/value dicts).
        path: where to save the figure (PNG, SVG, PDF by extension), written atomically; None
            only returns it.

    Returns:
        the matplotlib Figure.

    Raises:
        ImportError: matplotlib is not installed (extra `tools`).
        ValueError: no records.
    """
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot needs matplotlib: pip install 'batchnorm[tools]'") from error
    if not records:
        raise ValueError("plot: no records to draw (did the model run inside track()?)")
    panels = {"gap": ("mean_gap",), "scale": ("std_ratio",),
              "percentiles": tuple(f"p{p}" for p in PERCENTILES)}
    present = {k: qs for k, qs in panels.items() if any(r["quantity"] in qs for r in records)}
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.5), squeeze=False)
    for ax, (title, quantities) in zip(axes[0], present.items()):
        for q in quantities:
            for layer in dict.fromkeys(r["layer"] for r in records if r["quantity"] == q):
                pts = [(r["step"], r["value"]) for r in records
                       if r["quantity"] == q and r["layer"] == layer]
                style = {"p15": ":", "p85": ":"}.get(q, "-")
                label = f"{layer} {q}" if title == "percentiles" else layer
                ax.plot(*zip(*pts), style, label=label)
        ax.set_title(" / ".join(quantities))
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        suffix = os.path.splitext(path)[1]
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix)
        os.close(fd)
        try:
            fig.savefig(tmp)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return fig
