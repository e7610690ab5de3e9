"""FSDP2 `fully_shard` with a bf16 MixedPrecisionPolicy on 2 gloo CPU ranks (torchtitan#674).

torch.nn's batch norm fails on bf16 parameters beside fp32 running statistics; ours accepts them;
`shard_batchnorm_fp32` keeps the batch norms' parameters, gradients and statistics in fp32 (for
torch.nn's layers too). The trained model is compared with one fp32 process on the concatenated
batch at bf16's tolerance (the convolutions compute in bf16), SyncBatchNorm making the batch
statistics those of the global batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import batchnorm
from batchnorm.tools import shard_batchnorm_fp32

STEPS = 3
SIZES = [4, 4]
BF16_TOL = 5e-2


def net(norm) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), norm(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), norm(4),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def _data():
    g = torch.Generator().manual_seed(7)
    n = sum(SIZES)
    return [(torch.randn(n, 2, 7, 7, generator=g), torch.randint(0, 3, (n,), generator=g))
            for _ in range(STEPS)]


def _train(norm, rank, world, helper: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = net(norm)
    seen = []  # (input dtype, weight dtype) each forward of the first batch norm
    model[1].register_forward_pre_hook(lambda m, a: seen.append((a[0].dtype, m.weight.dtype)))
    if helper:
        shard_batchnorm_fp32(model, mesh=mesh)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start, n, total = sum(SIZES[:rank]), SIZES[rank], sum(SIZES)
    try:
        for x, t in _data():
            opt.zero_grad()
            out = model(x[start:start + n]).float()
            # FSDP averages gradients: world/total makes it the mean loss over the global batch
            (TF.cross_entropy(out, t[start:start + n], reduction="sum") * world / total).backward()
            opt.step()
    except RuntimeError as error:
        return {"error": str(error)}
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in model.state_dict().items()}
    return {"state": state, "seen": seen[0], "grad_dtype": model[1].weight.grad.dtype}


def world_2(rank, world):
    return {
        "torch.nn": _train(torch.nn.BatchNorm2d, rank, world, helper=False),
        "ours": _train(batchnorm.SyncBatchNorm, rank, world, helper=False),
        "ours+helper": _train(batchnorm.SyncBatchNorm, rank, world, helper=True),
        "torch.nn+helper": _train(torch.nn.BatchNorm2d, rank, world, helper=True),
    }


def _single_process() -> dict:
    model = net(torch.nn.BatchNorm2d)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, t in _data():
        opt.zero_grad()
        TF.cross_entropy(model(x), t).backward()
        opt.step()
    return model.state_dict()


def test_fully_shard_bf16_policy_with_batch_norm(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.4")
    from tests.nn.test_sync import _launch
    ranks = _launch(2, "test_fsdp:world_2", tmp_path)
    want = _single_process()
    for rank, result in enumerate(ranks):
        # torch.nn's layer without the helper: the reported failure
        assert "expected scalar type BFloat16 but found Float" in result["torch.nn"]["error"]
        assert result["ours"]["seen"] == (torch.bfloat16, torch.bfloat16)
        assert result["ours+helper"]["seen"] == (torch.bfloat16, torch.float32)
        assert result["torch.nn+helper"]["seen"] == (torch.bfloat16, torch.float32)
        assert result["ours+helper"]["grad_dtype"] == torch.float32
        for run in ("ours", "ours+helper"):
            state = result[run]["state"]
            for key, expected in want.items():
                got = state[key]
                if "running" in key:
                    assert got.dtype == torch.float32, (run, key)
                scale = max(1.0, expected.abs().max().item())
                err = (got.double() - expected.double()).abs().max().item() / scale
                assert err <= BF16_TOL, (rank, run, key, err)
                assert torch.equal(got, ranks[0][run]["state"][key]), (rank, run, key)
        for key in ("1.weight", "1.bias", "1.running_mean", "1.running_var"):
            assert result["torch.nn+helper"]["state"][key].dtype == torch.float32
