import datetime
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import batchnorm
from batchnorm.tools import convert, recalibrate

SIZES = (5, 17, 3, 11, 8)  # unequal batch sizes: the population weights each by its size


def tiny_cnn() -> nn.Module:
    """A tiny CNN trained for a few steps with momentum 0.1, so its running statistics are an EMA
    of statistics of earlier weights, not the population ones."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), batchnorm.BatchNorm2d(4, momentum=0.1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d(6, momentum=0.1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 8), batchnorm.BatchNorm1d(8, momentum=0.1), nn.ReLU(),
        nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(8):
        x = torch.randn(16, 1, 10, 10) * 2 + 1
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 3, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def batches(seed: int, sizes=SIZES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 10, 10, generator=g) * 3 - 1 for n in sizes]


def float64_population(model: nn.Module, data: list[torch.Tensor]) -> dict[str, tuple]:
    """The oracle: every batch-norm input over all batches, concatenated, in float64; mean and
    unbiased variance straight from torch (no merging, no running updates)."""
    reference = tiny_cnn().double()
    reference.load_state_dict(model.state_dict())
    reference.eval()
    inputs: dict[str, list] = {}
    bns = {n: m for n, m in reference.named_modules()
           if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)}
    for name, m in bns.items():
        m.train()
        m.register_forward_pre_hook(
            lambda _m, args, name=name: inputs.setdefault(name, []).append(
                args[0].transpose(0, 1).reshape(args[0].shape[1], -1)))
    with torch.no_grad():
        for x in data:
            reference(x.double())
    out = {}
    for name, parts in inputs.items():
        values = torch.cat(parts, dim=1)
        out[name] = (values.mean(dim=1), values.var(dim=1, unbiased=True))
    return out


def assert_population(model, expected, tol=1e-5):
    for name, (mean, var) in expected.items():
        m = model.get_submodule(name)
        for got, want in ((m.running_mean, mean), (m.running_var, var)):
            error = (got.double() - want).abs().max().item()
            assert error <= tol * max(1, want.abs().max().item()), name


def test_recalibrate_equals_float64_population_statistics():
    model = tiny_cnn()
    data = batches(1)
    expected = float64_population(model, data)
    # the EMA after training is far from the population statistics: the test has teeth
    ema_error = (model[4].running_var.double() - expected["4"][1]).abs().max().item()
    assert ema_error > 1e-2
    params = {k: v.clone() for k, v in model.named_parameters()}
    tracked = model[1].num_batches_tracked.clone()
    model.train()
    model[7].eval()  # a mixed state must come back as it was
    recalibrate(model, data, progress=False)
    assert_population(model, expected)
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in params.items())
    assert model.training and model[1].training and not model[7].training
    assert torch.equal(model[1].num_batches_tracked, tracked)


def test_batch_formats_and_num_batches():
    model = tiny_cnn()
    data = batches(2)
    expected = float64_population(model, data[:3])
    labelled = [(x, torch.zeros(len(x), dtype=torch.long)) for x in data]
    recalibrate(model, iter(labelled), num_batches=3, progress=False)
    assert_population(model, expected)
    recalibrate(model, [{"input": x} for x in data[:3]], progress=True)
    assert_population(model, expected)
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        recalibrate(model, data, num_batches=0)


def test_layer_that_sees_nothing_warns_and_stays():
    model = nn.Sequential(nn.BatchNorm1d(3))
    with pytest.warns(RuntimeWarning, match="saw no input"):
        recalibrate(model, [torch.empty(0, 3)], progress=False)
    assert torch.equal(model[0].running_var, torch.ones(3))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=60))
    try:
        model = tiny_cnn()
        # rank 1 has fewer and differently sized batches than rank 0
        recalibrate(model, batches(10 + rank, SIZES if rank == 0 else (2, 9)), progress=False)
        # a synced model normalizes with the global batch, so every rank runs as many batches
        synced, _ = convert(tiny_cnn(), to="sync")
        recalibrate(synced, batches(10 + rank, SIZES[:2] if rank == 0 else (2, 9)),
                    progress=False)
        # numpy arrays travel by value; tensors would go through shared memory that dies with us
        queue.put((rank, [{k: v.numpy().copy() for k, v in m.state_dict().items()}
                          for m in (model, synced)]))
    finally:
        torch.distributed.destroy_process_group()


def test_recalibrate_across_two_gloo_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    model = tiny_cnn()
    expected = float64_population(model, batches(10) + batches(11, (2, 9)))
    # SyncBatchNorm over two ranks' batches k is batch norm over their concatenation
    global_batches = [torch.cat(pair) for pair in zip(batches(10, SIZES[:2]), batches(11, (2, 9)))]
    expected_synced = float64_population(model, global_batches)
    for rank in range(2):
        plain, synced = ({k: torch.from_numpy(v) for k, v in r.items()} for r in results[rank])
        model.load_state_dict(plain)
        assert_population(model, expected)
        model.load_state_dict(synced)
        assert_population(model, expected_synced)


def test_a_non_finite_batch_is_left_out_with_a_warning_naming_layer_and_batch():
    model = tiny_cnn()
    data = batches(3)
    clean = [b for i, b in enumerate(data) if i != 2]
    data[2][1, 0, 4, 4] = float("nan")
    expected = float64_population(model, clean)
    with pytest.warns(RuntimeWarning, match=r"recalibrate: 1 \(BatchNorm2d\) got non-finite "
                                            r"values in batch 2; that batch is left out"):
        recalibrate(model, data, progress=False)
    for name, (mean, var) in expected.items():
        m = model.get_submodule(name)
        assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()
        assert (m.running_mean.double() - mean).abs().max() <= 1e-5 * max(1, mean.abs().max())
        assert (m.running_var.double() - var).abs().max() <= 1e-5 * max(1, var.abs().max())


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = batchnorm.MaskedBatchNorm1d(3)

    def forward(self, x, mask):
        return self.bn(x, mask=mask)


def _padded(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), 3, max(lengths), generator=g) * 2 + 1
    mask = torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]
    return x.masked_fill(~mask[:, None], 1e4), mask  # padding far off the data


@pytest.mark.parametrize("tool", ["recalibrate", "adapt"])
def test_masked_batch_norm_statistics_are_over_valid_positions_only(tool):
    data = [_padded(0, [7, 2, 5]), _padded(1, [3, 6])]
    valid = torch.cat([x.movedim(1, -1)[mask] for x, mask in data]).double()
    model = _Masked()
    getattr(batchnorm, tool)(model, [{"x": x, "mask": m} for x, m in data], progress=False)
    torch.testing.assert_close(model.bn.running_mean.double(), valid.mean(0))
    torch.testing.assert_close(model.bn.running_var.double(), valid.var(0))


def test_statistics_a_nan_batch_corrupted_in_torch_nn_are_repaired():
    """torch.nn stores a NaN batch's statistics; recalibrating replaces them with the population's
    (the update is the rules' momentum-1 step, which must not carry the old NaN through)."""
    model = tiny_cnn()
    model[4].train()(torch.full((2, 6, 3, 3), float("nan")))  # torch.nn's layer: NaN stored
    model[4].running_var[0] = float("inf")
    assert not torch.isfinite(model[4].running_mean).any()
    data = batches(4)
    expected = float64_population(model, data)
    recalibrate(model, data, progress=False)
    assert_population(model, expected)


def test_fp16_population_variance_beyond_65504_is_not_stored():
    """The rules' guard, applied by recalibrate: the unbiased variance overflows fp16, so the
    layer keeps its statistics and the warning names it."""
    model = nn.Sequential(batchnorm.BatchNorm1d(2)).half()
    model[0].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(32, 2) * 400).half() for _ in range(2)]
    with pytest.warns(RuntimeWarning, match=r"recalibrate: 0 \(BatchNorm1d\): the batch statistics "
                                            r"are not finite or overflow the running statistics' "
                                            r"dtype"):
        recalibrate(model, data, progress=False)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


def test_recalibrate_equals_torch_nn_on_the_concatenated_batch():
    """A second oracle: torch.nn's BatchNorm with momentum 1 over all batches at once (one
    training step) stores the population mean and unbiased variance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), batchnorm.BatchNorm1d(4))
    data = [torch.randn(n, 5) * 2 + 3 for n in (7, 2, 13)]
    reference = nn.BatchNorm1d(4, momentum=1.0)
    with torch.no_grad():
        reference(model[0](torch.cat(data)))
    tracked = model[1].num_batches_tracked.clone()
    recalibrate(model, data, progress=False)
    torch.testing.assert_close(model[1].running_mean, reference.running_mean)
    torch.testing.assert_close(model[1].running_var, reference.running_var)
    assert torch.equal(model[1].num_batches_tracked, tracked)
