"""Santurkar's probes, noisy BN and simulated workers, each against an independent computation."""

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab import models, probes, train


def _model(norm="batch", seed=0):
    torch.manual_seed(seed)
    cfg = train._options(train.make_config({"norm": norm, "depth": 3, "width": 12, "seed": seed}))
    return models.build(cfg, (1, 10), 4).double()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 1, 10, generator=g, dtype=torch.float64), torch.randint(4, (16,),
                                                                                    generator=g)


def _loss_grad(model, x, y, name):
    """The loss and one weight's gradient the plain way: the module's own state, autograd."""
    model.train()
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return float(loss.detach()), dict(model.named_parameters())[name].grad.clone()


def test_layers_group_each_norm_with_the_linear_above_it():
    groups = probes.layers(_model())
    assert groups == [["1.weight", "1.bias", "2.weight", "2.bias"],
                      ["4.weight", "4.bias", "5.weight", "5.bias"],
                      ["7.weight", "7.bias", "8.weight", "8.bias"], ["10.weight", "10.bias"]]


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_ics_is_definition_2_1(norm):
    model, (x, y) = _model(norm), _batch()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    after = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
             for k, v in before.items()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    got = probes.ics(model, before, after, x, y)
    # buffers untouched: the probe does not move running statistics
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())
    groups = probes.layers(model)
    assert [r["layer"] for r in got] == [2, 3, 4]
    for r, i in zip(got, range(1, 4)):
        weight = groups[i][0]
        # G: the gradient at theta_t; G': layers below i moved to theta_{t+1}, computed on a
        # copy of the module with those parameters loaded, through ordinary autograd
        _, G = _loss_grad(copy.deepcopy(model), x, y, weight)
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for k, p in moved.named_parameters():
                if any(k in grp for grp in groups[:i]):
                    p.copy_(after[k])
        _, G2 = _loss_grad(moved, x, y, weight)
        assert r["l2"] == pytest.approx(float((G - G2).norm()), rel=1e-9)
        assert r["relative"] == pytest.approx(float((G - G2).norm() / G.norm()), rel=1e-9)
        assert r["cosine"] == pytest.approx(float(nn.functional.cosine_similarity(
            G.flatten(), G2.flatten(), dim=0)), rel=1e-9)
        assert r["l2"] > 0  # the lower layers moved, so the gradient changed


def test_landscape_along_the_gradient():
    model, (x, y) = _model("batch"), _batch()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    lr, mults = 0.1, [0.5, 2.0]
    got = probes.landscape(model, params, x, y, lr, mults)
    names = list(params)
    ref = copy.deepcopy(model).train()
    ref.zero_grad()
    loss0 = nn.functional.cross_entropy(ref(x), y)
    loss0.backward()
    g = {k: p.grad.clone() for k, p in ref.named_parameters()}
    flat = torch.cat([g[k].flatten() for k in names])
    losses, changes, betas = [float(loss0)], [0.0], []
    for m in mults:
        step = copy.deepcopy(model).train()
        with torch.no_grad():
            for k, p in step.named_parameters():
                p.sub_(m * lr * g[k])
        step.zero_grad()
        loss = nn.functional.cross_entropy(step(x), y)
        loss.backward()
        change = float((torch.cat([p.grad.flatten() for _, p in step.named_parameters()])
                        - flat).norm())
        losses.append(float(loss))
        changes.append(change)
        betas.append(change / (m * lr * float(flat.norm())))
    assert got["loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-9)
    assert got["grad_change_range"] == pytest.approx(max(changes), rel=1e-9)
    assert got["beta"] == pytest.approx(max(betas), rel=1e-9)


def test_step_noise_draws_per_step_and_is_its_expectation_in_eval():
    noise = models.StepNoise(6, mean=1.0, scale=2.0, seed=0)
    x = torch.randn(5, 6)
    noise.train()
    outs = []
    for _ in range(50):
        noise.resample()
        assert (noise.shift.abs() <= 1.0).all() and ((noise.gain >= 1) & (noise.gain <= 2)).all()
        y = noise(x)
        assert torch.equal(y, noise(x))  # fixed within a step
        assert torch.allclose(y, x * noise.gain + noise.shift)
        outs.append(y)
    assert not torch.equal(outs[0], outs[1])  # redrawn every step
    noise.eval()
    assert torch.allclose(noise(x), x * 1.5)
    with pytest.raises(ValueError, match="expected mean >= 0 and scale >= 1, got mean=1.0, "
                                         "scale=0.5"):
        models.StepNoise(6, mean=1.0, scale=0.5, seed=0)


def test_workers_normalize_their_slices_and_keep_worker_0s_statistics():
    torch.manual_seed(0)
    x = torch.randn(32, 5, dtype=torch.float64) * 3 + 1
    workers = models.WorkerBatchNorm1d(5, 8).double()
    ghost = batchnorm.GhostBatchNorm1d(5, virtual_batch_size=4).double()
    rank0 = batchnorm.BatchNorm1d(5).double()
    for m in (workers, ghost, rank0):
        with torch.no_grad():
            m.weight.copy_(torch.arange(1.0, 6.0))
            m.bias.copy_(torch.linspace(-1, 1, 5))
    xw, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    yw, yg = workers(xw), ghost(xg)
    # each worker's 4 examples normalized on their own is ghost BN over virtual batches of 4
    torch.testing.assert_close(yw, yg, rtol=0, atol=1e-12)
    (yw ** 3).sum().backward()
    (yg ** 3).sum().backward()
    torch.testing.assert_close(xw.grad, xg.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(workers.weight.grad, ghost.weight.grad, rtol=1e-10, atol=1e-10)
    rank0(x[:4])  # DDP keeps rank 0's buffers
    torch.testing.assert_close(workers.running_mean, rank0.running_mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(workers.running_var, rank0.running_var, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match=r"WorkerBatchNorm1d\(5\): a batch of 30 examples does "
                                         r"not split into 8 workers' equal slices"):
        workers(x[:30])


def test_worker_renorm_is_renorm_on_each_slice():
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=torch.float64)
    workers = models.WorkerBatchRenorm1d(3, 4, rmax=2.0, dmax=1.0, rmax_ramp=None,
                                         dmax_ramp=None).double()
    with torch.no_grad():
        workers.running_mean.fill_(0.5)
        workers.running_var.fill_(2.0)
    y = workers(x)
    for k in range(4):
        one = batchnorm.BatchRenorm1d(3, rmax=2.0, dmax=1.0, rmax_ramp=None,
                                      dmax_ramp=None).double()
        with torch.no_grad():
            one.running_mean.fill_(0.5)
            one.running_var.fill_(2.0)
        torch.testing.assert_close(y[4 * k:4 * k + 4], one(x[4 * k:4 * k + 4]), rtol=0,
                                   atol=1e-12)
        if k == 0:
            torch.testing.assert_close(workers.running_mean, one.running_mean, rtol=0, atol=0)
