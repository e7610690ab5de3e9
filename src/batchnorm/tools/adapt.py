"""AdaBN: adapt a trained model to a new input distribution by re-estimating its batch-norm
statistics on unlabeled target data (Li et al. 2016, "Revisiting Batch Normalization For Practical
Domain Adaptation", arXiv 1603.04779).

The weights stay as trained; each batch-norm layer's running mean and variance become the exact
population statistics of its input on the target batches (computed as `recalibrate` does: batch
norms in training mode, the rest in eval, Chan-merged in float64, across ranks). A shift that is
mostly per-channel scale and offset (another camera, sensor gain, lighting) is undone by the first
batch norm, and the later layers see the activations they were trained on. With DomainBatchNorm
layers (Chang et al. 2019, arXiv 1906.03950) one domain's statistics are re-estimated and the
others kept, so a model serves the source and the target domain side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from batchnorm.tools.recalibrate import recalibrate

__all__ = ["adapt"]


def adapt(model: nn.Module, target_batches: Iterable, num_batches: int | None = None, *,
          forward: Callable[[nn.Module, object], object] | None = None,
          progress: bool = True, domain: int | None = None) -> nn.Module:
    """Re-estimate every batch norm's running statistics on the target domain; no labels needed.

    Args:
        model: a trained model with batch norms; adapted in place.
        target_batches: batches from the target domain: tensors, (inputs, ...) tuples (labels, if
            any, are ignored) or dicts of keyword arguments.
        num_batches: use only the first `num_batches` batches; None uses them all.
        forward: `forward(model, batch)` for models that are not called as model(inputs).
        progress: show a progress bar (rich, when installed).
        domain: for models with DomainBatchNorm layers, the domain to adapt: every DomainBatchNorm
            runs as this domain during the passes (whatever the model passes it) and only this
            domain's statistics change, so the source domains keep theirs.

    Returns:
        `model`, with its running statistics replaced; parameters and training flags unchanged.
    """
    return recalibrate(model, target_batches, num_batches, forward=forward, progress=progress,
                       domain=domain)
