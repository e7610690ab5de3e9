"""Lightning's DDP strategy on 2 gloo CPU ranks with the BatchNormSync plugin.

The ranks are started by the test harness (Lightning sees LOCAL_RANK and an initialized process
group, as under torchrun); each fits a LightningModule for 3 steps on its slice of the batch.
During fit the batch norms are our SyncBatchNorm; afterwards they are torch.nn's again, with the
parameters and running statistics of one process trained on the concatenated batch.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as TF

STEPS = 3
SIZES = [5, 3]


def _data():
    g = torch.Generator().manual_seed(2)
    n = sum(SIZES)
    return [(torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
            for _ in range(STEPS)]


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def world_2(rank, world):
    import lightning

    from batchnorm.tools.lightning import BatchNormSync

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    start, n, total = sum(SIZES[:rank]), SIZES[rank], sum(SIZES)

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()
            self.seen = set()

        def training_step(self, batch, index):
            self.seen |= {type(m).__name__ for m in self.net.modules()
                          if "Norm" in type(m).__name__}
            x, t = batch
            # DDP averages gradients: world/total makes it the mean loss over the global batch
            return TF.cross_entropy(self.net(x), t, reduction="sum") * world / total

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    mine = [(x[start:start + n], t[start:start + n]) for x, t in _data()]
    module = Module()
    trainer = lightning.Trainer(
        strategy="ddp", accelerator="cpu", devices=world, plugins=[BatchNormSync()],
        max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(mine, batch_size=None))
    return {"seen": module.seen, "after": type(module.net[1]).__name__,
            "state": {k: v.detach().clone() for k, v in module.net.state_dict().items()}}


@pytest.mark.slow  # Lightning's import and setup on each rank: ~100 s on 2 busy cores
def test_lightning_ddp_with_batchnorm_sync_plugin(tmp_path):
    pytest.importorskip("lightning", reason="Lightning is the optional [scale] extra")
    from tests.nn.test_sync import _launch
    ranks = _launch(2, "test_lightning:world_2", tmp_path)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, t in _data():
        opt.zero_grad()
        TF.cross_entropy(model(x), t).backward()
        opt.step()
    for result in ranks:
        assert result["seen"] == {"SyncBatchNorm"}
        assert result["after"] == "BatchNorm2d"
        for key, expected in model.state_dict().items():
            got = result["state"][key]
            scale = max(1.0, expected.abs().max().item())
            err = (got.double() - expected.double()).abs().max().item() / scale
            assert err <= 1e-5, (key, err)
