"""Running statistics across 2 gloo ranks: checked, broadcast, averaged; precise BN agrees.

Each rank trains the same model on its own batches without sync, so the ranks' running statistics
differ; the parent compares what the tools make of them with oracles computed from both ranks'
states and from one process seeing every rank's batches.
"""

from __future__ import annotations

import pytest
import torch

import batchnorm
from batchnorm.tools import check_consistency, rank_differences, recalibrate, sync_running_stats

STEPS = [3, 3]  # batches per rank


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), batchnorm.BatchNorm2d(3), torch.nn.ReLU(),
        torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(3, momentum=None), torch.nn.Flatten(2),
        batchnorm.BatchNorm1d(3, momentum=None)).double()


def batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return [torch.randn(4 + rank, 2, 6, 6, generator=g, dtype=torch.float64) * (1 + rank) + rank
            for _ in range(STEPS[rank])]


def _state(m) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def world_2(rank, world):
    result = {}
    m = model().train()
    with torch.no_grad():
        for x in batches(rank):
            m(x)
    result["local"] = _state(m)
    result["differences"] = rank_differences(m)
    try:
        check_consistency(m)
    except RuntimeError as error:
        result["error"] = str(error)
    result["average"] = _state(sync_running_stats(m, "average"))
    check_consistency(m)  # equal bit for bit on every rank afterwards
    m.load_state_dict(result["local"])
    result["broadcast"] = _state(sync_running_stats(m, "broadcast", src=1))
    # precise BN across ranks: every rank gets the statistics of all ranks' batches
    m.load_state_dict(result["local"])
    recalibrate(m, batches(rank), progress=False)
    check_consistency(m)
    result["recalibrated"] = _state(m)
    return result


def test_check_broadcast_average_and_precise_bn_across_two_ranks(tmp_path):
    from tests.nn.test_sync import _launch
    ranks = _launch(2, "test_consistency:world_2", tmp_path)
    local = [r["local"] for r in ranks]
    stats = [k for k in local[0] if "running" in k or "num_batches" in k]

    # check: the differences every rank reports are those between the two states
    for r in ranks:
        for key in stats:
            want = (local[1][key].double() - local[0][key].double()).abs().max().item()
            assert r["differences"][key] == pytest.approx(want, abs=1e-12), key
        assert "1.running_mean (ranks [1] differ from rank 0" in r["error"]
        assert "sync_running_stats(model, 'average')" in r["error"]

    n = [float(s["4.num_batches_tracked"]) for s in local]
    for r in ranks:
        avg = r["average"]
        # EMA layer: the plain average; cumulative layers: weighted by the batches counted
        for layer, weights in (("1", [1.0, 1.0]), ("4", n), ("6", n)):
            for b in ("running_mean", "running_var"):
                want = sum(w * s[f"{layer}.{b}"] for w, s in zip(weights, local)) / sum(weights)
                assert (avg[f"{layer}.{b}"] - want).abs().max() <= 1e-12, (layer, b)
            # a count, never averaged
            key = f"{layer}.num_batches_tracked"
            assert torch.equal(avg[key], r["local"][key])
        for key in stats:
            assert torch.equal(r["broadcast"][key], local[1][key]), key

    # momentum=None: the average is what one process holds after every rank's batches
    one = model().train()
    with torch.no_grad():
        for rank in range(2):
            for x in batches(rank):
                one(x)
    for b in ("running_mean", "running_var"):
        assert (ranks[0]["average"][f"4.{b}"] - one.state_dict()[f"4.{b}"]).abs().max() <= 1e-12

    # precise BN: the population statistics of every rank's batches, on each rank
    want = model()
    want.load_state_dict(local[0])
    recalibrate(want, batches(0) + batches(1), progress=False)
    for r in ranks:
        for key in stats:
            if "running" in key:
                err = (r["recalibrated"][key] - want.state_dict()[key]).abs().max().item()
                assert err <= 1e-10, (key, err)


def test_single_process_is_consistent_and_bad_arguments_raise():
    m = model()
    assert set(rank_differences(m).values()) == {0.0}
    check_consistency(m)
    assert sync_running_stats(m, "broadcast") is m
    with pytest.raises(ValueError, match="how must be 'broadcast' or 'average', got 'mean'"):
        sync_running_stats(m, "mean")
