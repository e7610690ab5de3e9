"""Stand-ins for library parts the lab needs that have not landed in `batchnorm` yet.

Each mirrors the expected public API (DESIGN.md) so that swapping in `batchnorm.<name>` is a
one-line change in `train.py`, after which this module is deleted. Built from torch's public API.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def recalibrate(model: nn.Module, batches) -> nn.Module:
    """Precise BN (Wu & Johnson 2021, arXiv 2105.07576): running statistics replaced by their
    average over `batches` (a cumulative average, `momentum=None`), the model left in eval mode."""
    torch.optim.swa_utils.update_bn(batches, model)
    return model.eval()
