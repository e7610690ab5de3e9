import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import eval_gap, plot, track


def expected_gap(x: torch.Tensor, running_mean, running_var, eps=1e-5):
    """float64, from the definitions: (mean_gap, std_ratio) averaged over channels."""
    rows = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean, var = rows.mean(1), rows.var(1, unbiased=False)
    rv = running_var.double() + eps
    return (((mean - running_mean.double()).abs() / rv.sqrt()).mean().item(),
            ((var + eps) / rv).sqrt().mean().item())


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), batchnorm.BatchNorm1d(3), nn.Sigmoid(), nn.Linear(3, 2),
                         nn.BatchNorm1d(2))


def test_track_records_gap_before_each_update_and_percentiles():
    net = model()
    xs = [torch.randn(16, 4) * 2 + 1 for _ in range(3)]
    snapshots, inputs = [], []
    net[1].register_forward_pre_hook(lambda m, a: snapshots.append(
        (a[0].detach().clone(), m.running_mean.clone(), m.running_var.clone())) and None)
    net[2].register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()) and None)
    with track(net, inputs_of=["2"]) as tracker:
        for x in xs:
            net(x)
    net(xs[0])  # after the context: hooks are gone
    records = tracker.records
    assert {r["step"] for r in records} == {0, 1, 2}
    for step, (x, rm, rv) in enumerate(snapshots[:3]):
        mean_gap, std_ratio = expected_gap(x, rm, rv)
        at_step = [r for r in records if r["step"] == step]
        got = {r["quantity"]: r["value"] for r in at_step if r["layer"] == "1"}
        assert got["mean_gap"] == pytest.approx(mean_gap, rel=1e-9)
        assert got["std_ratio"] == pytest.approx(std_ratio, rel=1e-9)
        pct = {r["quantity"]: r["value"] for r in at_step if r["layer"] == "2"}
        np.testing.assert_allclose([pct["p15"], pct["p50"], pct["p85"]],
                                   np.percentile(inputs[step].double().numpy(), [15, 50, 85]),
                                   rtol=1e-12)
    assert len(records) == 3 * (2 + 2 + 3)


def test_track_every_and_errors():
    net = model()
    with track(net, every=2) as tracker:
        for _ in range(5):
            net(torch.randn(8, 4))
    assert sorted({r["step"] for r in tracker.records}) == [0, 2, 4]
    with pytest.raises(ValueError, match="no module named 'nope'"):
        with track(net, inputs_of=["nope"]):
            pass
    with pytest.raises(ValueError, match="every must be a positive int"):
        with track(net, every=0):
            pass


def test_eval_gap_matches_definition_and_changes_nothing():
    net = model()
    net.train()
    batches = [torch.randn(n, 4) + 3 for n in (10, 20)]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rows = eval_gap(net, batches)
    assert net.training and all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    by_layer = {r["layer"]: r for r in rows}
    # layer "1" sees Linear(4, 3) of the batch; the running stats are still the initial 0 / 1
    with torch.no_grad():
        gaps = [expected_gap(net[0](x), net[1].running_mean, net[1].running_var) for x in batches]
    assert by_layer["1"]["mean_gap"] == pytest.approx(np.mean([g[0] for g in gaps]), rel=1e-9)
    assert by_layer["1"]["std_ratio"] == pytest.approx(np.mean([g[1] for g in gaps]), rel=1e-9)
    assert by_layer["1"]["batches"] == 2
    assert rows[0]["mean_gap"] >= rows[1]["mean_gap"]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    net = model()
    with track(net, inputs_of=["2"]) as tracker:
        for _ in range(4):
            net(torch.randn(8, 4))
    path = tmp_path / "track.png"
    fig = tracker.plot(path)
    assert len(fig.axes) == 3
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(ValueError, match="no records"):
        plot([])


def test_track_and_eval_gap_measure_masked_batch_norm_on_valid_positions():
    bn = batchnorm.MaskedBatchNorm1d(2)
    x = torch.randn(3, 2, 6)
    mask = torch.arange(6) < torch.tensor([6, 1, 4])[:, None]
    x = x.masked_fill(~mask[:, None], 1e4)
    valid = x.movedim(1, -1)[mask].double()
    expected = (valid.mean(0).abs() / (1 + bn.eps) ** 0.5).mean().item()
    rows = eval_gap(bn, [{"input": x, "mask": mask}])
    assert rows[0]["mean_gap"] == pytest.approx(expected, rel=1e-9)
    with track(bn) as tracker:
        bn(x, mask)
    gap = next(r["value"] for r in tracker.records if r["quantity"] == "mean_gap")
    assert gap == pytest.approx(expected, rel=1e-9)
