"""Lightning: `Trainer(sync_batchnorm=True)` with our SyncBatchNorm, on any backend.

Lightning's `sync_batchnorm=True` converts to `torch.nn.SyncBatchNorm`, which DDP refuses on CPU
("SyncBatchNorm layers only work with GPU modules") and whose revert forgets the original
classes. This `LayerSync` plugin converts with `batchnorm.convert_sync_batchnorm` instead (gloo
and NCCL alike; BatchNormAct and BatchRenorm keep their behaviour) and reverts exactly:

    trainer = lightning.Trainer(strategy="ddp", accelerator="cpu", devices=2,
                                plugins=[BatchNormSync()])

Pass it instead of `sync_batchnorm=True` (Lightning refuses both together). Needs `lightning`
(or `pytorch_lightning`), the [scale] extra.
"""

from __future__ import annotations

from torch import nn

from batchnorm.nn.sync import convert_sync_batchnorm, revert_sync_batchnorm

try:
    from lightning.pytorch.plugins.layer_sync import LayerSync
except ImportError:  # the standalone package of Lightning < 2 and of users who pinned it
    from pytorch_lightning.plugins.layer_sync import LayerSync

__all__ = ["BatchNormSync"]


class BatchNormSync(LayerSync):
    """Sync every batch norm of the LightningModule over `process_group` while fitting.

    Args:
        process_group: the ranks whose batches are normalized together; None for all.
    """

    def __init__(self, process_group=None) -> None:
        self.process_group = process_group

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_sync_batchnorm(model, self.process_group)

    def revert(self, model: nn.Module) -> nn.Module:
        return revert_sync_batchnorm(model)
