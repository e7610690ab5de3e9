"""SyncBatchNorm over 2 and 3 gloo ranks against single-process torch.nn batch norm on the
concatenated batch.

Each multi-process test starts one world (process start costs seconds) that runs many cases and
saves its tensors; the assertions run here, in the parent, against oracles computed in float64 by
torch.nn on the concatenated batch. Ranks rendezvous on 127.0.0.1 at a free port with a process
group timeout, and `_launch` kills whatever is still alive when it returns.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as TF

import batchnorm
from batchnorm import functional as F
from batchnorm import reference

REPO = Path(__file__).resolve().parents[2]
PG_TIMEOUT_S = 30  # process-group timeout of the correctness worlds: a stuck collective fails
JOIN_TIMEOUT_S = 150  # a world that has not finished by then is killed and the test fails
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


# ---- launching a world ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, worker: str, out: str, timeout_s: float) -> None:
    """Child process: join the group, run `worker`, save its result or its traceback."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["SYNC_TEST_OUT"] = out  # for workers that exit without returning
    torch.set_num_threads(1)  # 2-3 ranks share 2 cores
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
        result = _worker(worker)(rank, world)
        torch.save(result, f"{out}/rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        Path(f"{out}/rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)


def _worker(worker: str):
    """`worker` names a function of this module, or "module:function" of another test module
    (tests of other layers run their worlds with this harness too)."""
    if ":" not in worker:
        return globals()[worker]
    module, function = worker.split(":")
    return getattr(importlib.import_module(module), function)


def _launch(world: int, worker: str, tmp_path: Path, timeout_s: float = PG_TIMEOUT_S,
            expect_exit: dict[int, int] | None = None, join_timeout_s: float = JOIN_TIMEOUT_S
            ) -> list[dict]:
    """Run `worker(rank, world)` (see `_worker`) on `world` spawned gloo ranks; returns each
    rank's result."""
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [context.Process(target=_entry, args=(r, world, port, worker, str(tmp_path), timeout_s))
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + join_timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} of {worker} still running after {join_timeout_s} s"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = {r: (tmp_path / f"rank{r}.err").read_text() for r in range(world)
              if (tmp_path / f"rank{r}.err").exists()}
    assert not errors, "\n".join(f"rank {r}:\n{e}" for r, e in errors.items())
    codes = {r: p.exitcode for r, p in enumerate(procs)}
    assert codes == {r: (expect_exit or {}).get(r, 0) for r in range(world)}, codes
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
            if (tmp_path / f"rank{r}.pt").exists() else None for r in range(world)]


# ---- cases: the same data on every rank and in the parent ----------------------------------

DIM_SHAPES = {"1d": (), "1d_len": (5,), "2d": (4, 3), "3d": (2, 3, 2)}
TORCH_BN = {"1d": torch.nn.BatchNorm1d, "1d_len": torch.nn.BatchNorm1d, "2d": torch.nn.BatchNorm2d,
            "3d": torch.nn.BatchNorm3d}


def _case(sizes, dim="2d", dtype=torch.float32, channels=3, channels_last=False, affine=True,
          track=True, momentum=0.1, act="identity", residual=False, offset=0.0, seed=0):
    return dict(sizes=sizes, dim=dim, dtype=dtype, channels=channels, channels_last=channels_last,
                affine=affine, track=track, momentum=momentum, act=act, residual=residual,
                offset=offset, seed=seed)


STEPS = 2  # two training steps, so the running statistics are checked after repeated updates


def _case_data(case) -> list[dict]:
    """STEPS global batches: x, dy, z (all ranks' samples, concatenated) and weight, bias."""
    g = torch.Generator().manual_seed(case["seed"])
    c, n = case["channels"], sum(case["sizes"])
    shape = (n, c) + DIM_SHAPES[case["dim"]]
    steps = []
    for _ in range(STEPS):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + case["offset"]
        steps.append(dict(x=x.to(case["dtype"]),
                          dy=torch.randn(shape, generator=g, dtype=torch.float64).to(case["dtype"]),
                          z=torch.randn(shape, generator=g, dtype=torch.float64).to(case["dtype"])))
    weight = 1 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    return steps, weight, bias


def _param_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_format(case):
    if not case["channels_last"]:
        return torch.contiguous_format
    return torch.channels_last if case["dim"] == "2d" else torch.channels_last_3d


class _SyncFunctional(torch.nn.Module):
    """The functional entry point with activation and residual: the path BatchNormAct takes."""

    def __init__(self, case, process_group=None):
        super().__init__()
        self.case, self.process_group = case, process_group
        self.bn = batchnorm.SyncBatchNorm(case["channels"], momentum=case["momentum"],
                                          affine=case["affine"], track_running_stats=case["track"],
                                          process_group=process_group,
                                          dtype=_param_dtype(case["dtype"]))

    def forward(self, x, z):
        bn = self.bn
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training,
                            bn.momentum, bn.eps, num_batches_tracked=bn.num_batches_tracked,
                            residual=z, activation=self.case["act"], sync=True,
                            process_group=self.process_group, warn_key=bn)


class _Wrapped(torch.nn.Module):
    """A synced layer under test, called like `_SyncFunctional` (it takes no residual)."""

    def __init__(self, layer):
        super().__init__()
        self.bn = layer

    def forward(self, x, z):
        return self.bn(x)


class _CollectiveCounter:
    """Counts the collectives the library issues, to show when it communicates."""

    def __init__(self):
        self.calls = {"all_gather": 0, "all_reduce": 0}
        self._real = {name: getattr(dist, name) for name in self.calls}
        for name in self.calls:
            setattr(dist, name, self._counting(name))

    def _counting(self, name):
        def call(*args, **kwargs):
            self.calls[name] += 1
            return self._real[name](*args, **kwargs)
        return call

    def take(self):
        calls, self.calls = dict(self.calls), {name: 0 for name in self.calls}
        return calls


def _run_case(case, rank, process_group=None, counter=None, layer=None):
    """One rank's part of a case: STEPS training steps, then an eval forward. `layer` (a module
    taking x, with the batch-norm state as its own) replaces the functional path."""
    steps, weight, bias = _case_data(case)
    start = sum(case["sizes"][:rank])
    n = case["sizes"][rank]
    layer = _SyncFunctional(case, process_group) if layer is None else _Wrapped(layer)
    bn = layer.bn
    if case["affine"]:
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    out = {"steps": []}
    for step in steps:
        x = step["x"][start:start + n].to(memory_format=_memory_format(case)).requires_grad_()
        z = step["z"][start:start + n].clone().requires_grad_() if case["residual"] else None
        y = layer(x, z)
        (y * step["dy"][start:start + n]).sum().backward()
        grads = {"x": x.grad, "z": z.grad if z is not None else None}
        if case["affine"]:
            grads.update(weight=bn.weight.grad.clone(), bias=bn.bias.grad.clone())
            bn.weight.grad = bn.bias.grad = None
        layout = _memory_format(case)
        out["steps"].append(dict(y=y.detach(), grads=grads,
                                 y_format=y.is_contiguous(memory_format=layout),
                                 dx_format=x.grad.is_contiguous(memory_format=layout)))
    if counter is not None:
        out["train_collectives"] = counter.take()
    layer.eval()
    with torch.no_grad():
        out["eval_y"] = layer(steps[0]["x"][start:start + n], None)
    if counter is not None:
        out["eval_collectives"] = counter.take()
    out["buffers"] = {k: v.clone() for k, v in layer.bn.named_buffers()}
    return out


def _oracle(case) -> dict:
    """torch.nn batch norm in float64 on the concatenated batch, act(bn(x) + z) per step."""
    steps, weight, bias = _case_data(case)
    bn = TORCH_BN[case["dim"]](case["channels"], momentum=case["momentum"], affine=case["affine"],
                               track_running_stats=case["track"], dtype=torch.float64)
    if case["affine"]:
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    acts = {"identity": lambda t: t, "relu": torch.relu, "silu": TF.silu,
            "gelu_tanh": lambda t: TF.gelu(t, approximate="tanh")}
    out = {"steps": []}
    for step in steps:
        x = step["x"].double().requires_grad_()
        z = step["z"].double().requires_grad_()
        pre = bn(x) + z if case["residual"] else bn(x)
        pre.retain_grad()
        y = acts[case["act"]](pre)
        (y * step["dy"].double()).sum().backward()
        grads = {"x": x.grad, "z": z.grad if case["residual"] else None}
        if case["affine"]:
            grads.update(weight=bn.weight.grad.clone(), bias=bn.bias.grad.clone())
            bn.weight.grad = bn.bias.grad = None
        # weight and bias grads are sums over the batch: their rounding error scales with the
        # sum of the absolute terms, sum|g * x_hat| and sum|g|, not with the (cancelling) result
        dims = [0] + list(range(2, x.ndim))
        x_hat = (x - x.mean(dims, keepdim=True)) / torch.sqrt(
            x.var(dims, unbiased=False, keepdim=True) + bn.eps)
        scales = dict(weight=(pre.grad.abs() * x_hat.abs()).sum(dims).max().item(),
                      bias=pre.grad.abs().sum(dims).max().item())
        out["steps"].append(dict(y=y.detach(), grads=grads, scales=scales))
    bn.eval()
    with torch.no_grad():
        out["eval_y"] = acts[case["act"]](bn(steps[0]["x"].double()))
    out["buffers"] = {k: v.clone() for k, v in bn.named_buffers()}
    return out


def _rel_err(got: torch.Tensor, want: torch.Tensor, scale: float | None = None) -> float:
    """max |got - want| relative to `scale`, by default that of `want` (at least 1)."""
    if want.numel() == 0:
        return 0.0
    if scale is None:
        scale = want.double().abs().max().clamp_min(1).item()
    return ((got.double() - want.double()).abs().max() / max(scale, 1.0)).item()


RMAX, DMAX = 3.0, 5.0


def _renorm_oracle(case) -> dict:
    """reference.batch_renorm_train in float64 on the concatenated batch, with the running
    statistics carried between steps by reference.update_running_stats (rmax 3, dmax 5)."""
    steps, weight, bias = _case_data(case)
    c, eps = case["channels"], 1e-5
    running_mean, running_var, tracked = torch.zeros(c, dtype=torch.float64), torch.ones(
        c, dtype=torch.float64), 0
    out = {"steps": []}
    for step in steps:
        x = step["x"].double().requires_grad_()
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        y, mean, var = reference.batch_renorm_train(x, w, b, running_mean, running_var, eps,
                                                    RMAX, DMAX)
        dy = step["dy"].double()
        y.backward(dy)
        dims = [0] + list(range(2, x.ndim))
        renormed = (y.detach() - b.detach().view(1, -1, 1, 1)) / w.detach().view(1, -1, 1, 1)
        scales = dict(weight=(dy.abs() * renormed.abs()).sum(dims).max().item(),
                      bias=dy.abs().sum(dims).max().item())
        out["steps"].append(dict(y=y.detach(), grads=dict(x=x.grad, weight=w.grad, bias=b.grad),
                                 scales=scales))
        running_mean, running_var, tracked = reference.update_running_stats(
            running_mean, running_var, tracked, mean.detach(), var.detach(), x.numel() // c,
            case["momentum"])
    out["eval_y"] = reference.normalize(steps[0]["x"], running_mean, running_var, weight, bias, eps)
    out["buffers"] = dict(running_mean=running_mean, running_var=running_var,
                          num_batches_tracked=torch.tensor(tracked))
    return out


def _check_case(case, ranks: list[dict], errors: list[str], want: dict | None = None) -> float:
    """Compare the ranks' results with the oracle (by default torch.nn batch norm); append
    failures; return the max error."""
    want = want if want is not None else _oracle(case)
    tol, worst = TOL[case["dtype"]], 0.0
    label = (f"{case['dim']} {str(case['dtype'])[6:]} sizes={case['sizes']} act={case['act']} "
             f"cl={case['channels_last']} affine={case['affine']} track={case['track']} "
             f"momentum={case['momentum']}")

    def compare(what, got, expected, tolerance=tol, scale=None):
        nonlocal worst
        err = _rel_err(got, expected, scale)
        worst = max(worst, err)
        if not err <= tolerance:
            errors.append(f"{label}: {what} off by {err:.3g} > {tolerance:g}")

    for i, expected in enumerate(want["steps"]):
        got = [r["steps"][i] for r in ranks]
        compare(f"step {i} output", torch.cat([g["y"] for g in got]), expected["y"])
        compare(f"step {i} input grad", torch.cat([g["grads"]["x"] for g in got]),
                expected["grads"]["x"])
        if case["residual"]:
            compare(f"step {i} residual grad", torch.cat([g["grads"]["z"] for g in got]),
                    expected["grads"]["z"])
        for p in ("weight", "bias") if case["affine"] else ():
            # each rank holds its own contribution; DDP sums (averages) them like any gradient
            compare(f"step {i} {p} grad", sum(g["grads"][p] for g in got), expected["grads"][p],
                    scale=expected["scales"][p])
        if case["channels_last"] and not all(g["y_format"] and g["dx_format"] for g in got):
            errors.append(f"{label}: step {i} output or input grad lost channels-last")
    if case["track"]:
        compare("eval output", torch.cat([r["eval_y"] for r in ranks]), want["eval_y"])
    else:
        # eval without running statistics normalizes with each rank's own batch: no
        # communication in eval, so ranks evaluating different data never wait on each other
        steps, _, _ = _case_data(case)
        for rank, r in enumerate(ranks):
            start, n = sum(case["sizes"][:rank]), case["sizes"][rank]
            if n > 1:
                local = TORCH_BN[case["dim"]](case["channels"], affine=False,
                                              track_running_stats=False, dtype=torch.float64)
                compare(f"rank {rank} eval output", r["eval_y"],
                        local(steps[0]["x"][start:start + n].double()))
    for name, expected in want["buffers"].items():
        # running statistics are fp32 (fp64 for fp64 input) whatever the input dtype
        compare(f"{name}", ranks[0]["buffers"][name], expected, TOL[_param_dtype(case["dtype"])])
        if any(not torch.equal(r["buffers"][name], ranks[0]["buffers"][name]) for r in ranks):
            errors.append(f"{label}: {name} differs between ranks")
    return worst


# ---- DDP training ----------------------------------------------------------------------------

DDP_STEPS = 3


def _cnn(dtype) -> torch.nn.Module:
    """A small CNN with torch.nn batch-norm layers (convert_sync_batchnorm swaps them)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3), batchnorm.BatchNorm2d(4, momentum=None), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 6),
        torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).to(dtype)


def _ddp_data(sizes, dtype):
    g = torch.Generator().manual_seed(1)
    n = sum(sizes)
    return [(torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64).to(dtype),
             torch.randint(0, 3, (n,), generator=g)) for _ in range(DDP_STEPS)]


def _ddp_train(rank, world, sizes, dtype) -> dict:
    model = batchnorm.convert_sync_batchnorm(_cnn(dtype))
    assert sum(isinstance(m, batchnorm.SyncBatchNorm) for m in model.modules()) == 3
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    start, n, total = sum(sizes[:rank]), sizes[rank], sum(sizes)
    for x, t in _ddp_data(sizes, dtype):
        opt.zero_grad()
        out = ddp(x[start:start + n])
        # DDP averages gradients over ranks, so scaling each rank's summed loss by world/total
        # makes the step that of the mean loss over the concatenated batch
        loss = TF.cross_entropy(out, t[start:start + n], reduction="sum") * world / total
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_oracle(sizes, dtype) -> dict:
    model = _cnn(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, t in _ddp_data(sizes, dtype):
        opt.zero_grad()
        TF.cross_entropy(model(x), t).backward()
        opt.step()
    return model.state_dict()


def _check_ddp(label, sizes, dtype, states, errors) -> float:
    want, worst = _ddp_oracle(sizes, dtype), 0.0
    for key, expected in want.items():
        err = _rel_err(states[0][key], expected)
        worst = max(worst, err)
        if not err <= TOL[dtype]:
            errors.append(f"{label}: {key} after {DDP_STEPS} DDP steps off by {err:.3g}")
        if any(not torch.equal(s[key], states[0][key]) for s in states):
            errors.append(f"{label}: {key} differs between ranks after DDP training")
    return worst


# ---- world of 2 ranks: per-rank batches [5, 3] ---------------------------------------------

CASES_2 = [
    _case([5, 3], "2d", torch.float32, seed=1),
    _case([5, 3], "2d", torch.float64, seed=2),
    _case([5, 3], "1d", torch.float32, channels=7, seed=3),
    _case([5, 3], "1d_len", torch.float64, momentum=None, seed=4),
    _case([5, 3], "3d", torch.float64, seed=5),
    _case([5, 3], "2d", torch.float32, channels_last=True, seed=6),
    _case([5, 3], "3d", torch.float64, channels_last=True, seed=7),
    _case([5, 3], "2d", torch.float16, seed=8),
    _case([5, 3], "2d", torch.bfloat16, seed=9),
    _case([5, 3], "2d", torch.float32, affine=False, track=False, seed=10),
    # a mean 100x the std: the merge must not cancel (a sum-of-squares all-reduce would)
    _case([5, 3], "2d", torch.float32, offset=200.0, seed=11),
    _case([5, 3], "2d", torch.float64, act="silu", residual=True, seed=12),
    _case([5, 3], "1d_len", torch.float32, act="relu", residual=True, seed=13),
]


class _Doubled(batchnorm.BatchNorm2d):
    """A user subclass with behaviour of its own, which conversion must keep."""

    def forward(self, input):
        return 2 * super().forward(input)


def _world_2(rank, world):
    counter = _CollectiveCounter()
    result = {"cases": [_run_case(case, rank, counter=counter) for case in CASES_2[:1]]}
    result["cases"] += [_run_case(case, rank) for case in CASES_2[1:]]

    # eval mode does not communicate: only rank 0 runs it (rank 1 would make it hang otherwise)
    counter.take()
    layer = batchnorm.SyncBatchNorm(3).eval()
    if rank == 0:
        layer(torch.randn(4, 3, 2))
    result["eval_only_rank0"] = counter.take()

    # the global M decides: [1, 1] values per channel work although each rank has only one
    x = torch.tensor([[1.0], [3.0]])[rank:rank + 1]
    result["one_value_per_rank"] = batchnorm.SyncBatchNorm(1)(x).detach()

    # torch.compile: the traced sync path (functional collectives), same numbers as eager
    case = CASES_2[0]
    steps, _, _ = _case_data(case)
    start, n = sum(case["sizes"][:rank]), case["sizes"][rank]
    compiled = torch.compile(batchnorm.SyncBatchNorm(3), backend="eager")
    x = steps[0]["x"][start:start + n].clone().requires_grad_()
    y = compiled(x)
    (y * steps[0]["dy"][start:start + n]).sum().backward()
    result["compiled"] = dict(y=y.detach(), dx=x.grad)

    # a subclass of ours keeps its class and behaviour through conversion
    doubled = batchnorm.convert_sync_batchnorm(_Doubled(3))
    result["doubled"] = dict(type=type(doubled).__name__, sync=doubled.sync,
                             y=doubled(steps[0]["x"][start:start + n]).detach())

    result["ddp_fp64"] = _ddp_train(rank, world, [5, 3], torch.float64)
    result["ddp_fp32"] = _ddp_train(rank, world, [5, 3], torch.float32)
    return result


def test_two_ranks_match_single_process_batch_norm(tmp_path):
    started = time.monotonic()
    ranks = _launch(2, "_world_2", tmp_path)
    elapsed = time.monotonic() - started
    errors: list[str] = []
    worst = {}
    for i, case in enumerate(CASES_2):
        key = str(case["dtype"])[6:]
        worst[key] = max(worst.get(key, 0.0),
                         _check_case(case, [r["cases"][i] for r in ranks], errors))
    # one all-gather in the forward and one all-reduce in the backward per layer call, and on the
    # layer's first call one all-gather checking that the ranks agree on channels and dtype
    assert ranks[0]["cases"][0]["train_collectives"] == {"all_gather": STEPS + 1,
                                                          "all_reduce": STEPS}
    assert ranks[0]["cases"][0]["eval_collectives"] == {"all_gather": 0, "all_reduce": 0}
    assert ranks[0]["eval_only_rank0"] == {"all_gather": 0, "all_reduce": 0}

    expected = torch.nn.BatchNorm1d(1)(torch.tensor([[1.0], [3.0]])).detach()
    assert torch.allclose(torch.cat([r["one_value_per_rank"] for r in ranks]), expected, atol=1e-6)

    steps, _, _ = _case_data(CASES_2[0])
    unit = TORCH_BN["2d"](3, dtype=torch.float64)
    x = steps[0]["x"].double().requires_grad_()
    y = unit(x)
    (y * steps[0]["dy"].double()).sum().backward()
    assert _rel_err(torch.cat([r["compiled"]["y"] for r in ranks]), y) < 1e-5
    assert _rel_err(torch.cat([r["compiled"]["dx"] for r in ranks]), x.grad) < 1e-5

    assert all(r["doubled"]["type"] == "_Doubled" and r["doubled"]["sync"] for r in ranks)
    doubled = 2 * TORCH_BN["2d"](3, dtype=torch.float64)(steps[0]["x"].double())
    assert _rel_err(torch.cat([r["doubled"]["y"] for r in ranks]), doubled) < 1e-5

    ddp64 = _check_ddp("[5, 3] fp64", [5, 3], torch.float64, [r["ddp_fp64"] for r in ranks], errors)
    ddp32 = _check_ddp("[5, 3] fp32", [5, 3], torch.float32, [r["ddp_fp32"] for r in ranks], errors)
    print(f"\n2 ranks in {elapsed:.1f} s; max rel err {({k: f'{v:.1e}' for k, v in worst.items()})}"
          f"; DDP fp64 {ddp64:.1e}, fp32 {ddp32:.1e}")
    assert not errors, "\n".join(errors)


# ---- world of 3 ranks: an empty rank, one sample per rank, a subgroup ----------------------

CASES_3 = [
    _case([4, 0, 7], "2d", torch.float64, seed=21),
    _case([4, 0, 7], "1d", torch.float32, channels=5, momentum=None, seed=22),
    _case([4, 0, 7], "3d", torch.float32, channels_last=True, seed=23),
    _case([4, 0, 7], "2d", torch.bfloat16, act="gelu_tanh", residual=True, seed=24),
    _case([1, 1, 1], "1d", torch.float64, seed=25),
    _case([1, 1, 1], "2d", torch.float32, seed=26),
    _case([0, 6, 0], "1d_len", torch.float64, act="relu", seed=27),
]
SUBGROUP = [0, 2]
SUBGROUP_CASE = _case([4, 7], "2d", torch.float64, seed=28)
ACT_CASE = _case([4, 0, 7], "2d", torch.float64, act="silu", seed=29)
RENORM_CASE = _case([4, 0, 7], "2d", torch.float64, seed=30)


def _world_3(rank, world):
    result = {"cases": [_run_case(case, rank) for case in CASES_3]}

    # one value per channel over all ranks: every rank raises, none is left waiting
    layer = batchnorm.SyncBatchNorm(2)
    try:
        layer(torch.randn(1 if rank == 0 else 0, 2))
        result["m1_error"] = None
    except ValueError as error:
        result["m1_error"] = str(error)
    result["m1_buffers"] = {k: v.clone() for k, v in layer.named_buffers()}
    try:
        batchnorm.BatchRenorm1d(2, sync=True)(torch.randn(1 if rank == 2 else 0, 2))
        result["m1_renorm_error"] = None
    except ValueError as error:
        result["m1_renorm_error"] = str(error)

    # a globally empty batch: empty output, statistics untouched, no error
    empty = layer(torch.randn(0, 2, requires_grad=True))
    empty.sum().backward()
    result["empty"] = dict(shape=tuple(empty.shape), buffers={k: v.clone() for k, v in
                                                              layer.named_buffers()})

    # a subgroup: ranks 0 and 2 normalize together; rank 1 is not in it
    group = dist.new_group(SUBGROUP)
    if rank in SUBGROUP:
        result["subgroup"] = _run_case(SUBGROUP_CASE, SUBGROUP.index(rank), process_group=group)
    else:
        try:
            batchnorm.SyncBatchNorm(3, process_group=group)(torch.randn(2, 3))
            result["non_member_error"] = None
        except ValueError as error:
            result["non_member_error"] = str(error)

    # the family: BatchNormAct keeps its activation through conversion; BatchRenorm's r and d
    # come from the global statistics
    act = batchnorm.convert_sync_batchnorm(batchnorm.BatchNormAct2d(3, act="silu",
                                                                    dtype=torch.float64))
    result["act_layer"] = dict(type=type(act).__name__, activation=act.activation, sync=act.sync)
    result["act"] = _run_case(ACT_CASE, rank, layer=act)
    renorm = batchnorm.BatchRenorm2d(3, momentum=RENORM_CASE["momentum"], rmax=RMAX, dmax=DMAX,
                                     rmax_ramp=None, dmax_ramp=None, sync=True,
                                     dtype=torch.float64)
    result["renorm"] = _run_case(RENORM_CASE, rank, layer=renorm)

    result["ddp"] = _ddp_train(rank, world, [4, 0, 7], torch.float32)
    return result


def test_three_ranks_with_empty_and_single_sample_ranks(tmp_path):
    started = time.monotonic()
    ranks = _launch(3, "_world_3", tmp_path)
    elapsed = time.monotonic() - started
    errors: list[str] = []
    worst = {}
    for i, case in enumerate(CASES_3):
        key = f"{case['sizes']} {str(case['dtype'])[6:]}"
        worst[key] = max(worst.get(key, 0.0),
                         _check_case(case, [r["cases"][i] for r in ranks], errors))
    worst["subgroup"] = _check_case(SUBGROUP_CASE, [ranks[r]["subgroup"] for r in SUBGROUP],
                                    errors)

    for r in ranks:
        assert r["m1_error"] is not None and re.search(
            r"SyncBatchNorm\(2\): training needs more than one value per channel \(got input of "
            r"shape \([01], 2\) on this rank, 1 value per channel over all 3 ranks\); use eval "
            r"mode, BatchRenorm, or GroupNorm", r["m1_error"]), r["m1_error"]
        assert r["m1_renorm_error"] is not None and re.search(
            r"BatchRenorm1d\(2\): training needs more than one value per channel \(got input "
            r"of shape \([01], 2\) on this rank, 1 value per channel over all 3 ranks\); use "
            r"eval mode or GroupNorm", r["m1_renorm_error"]), r["m1_renorm_error"]
        assert r["empty"]["shape"] == (0, 2)
        for buffers in (r["m1_buffers"], r["empty"]["buffers"]):
            assert torch.equal(buffers["running_mean"], torch.zeros(2))
            assert torch.equal(buffers["running_var"], torch.ones(2))
            assert buffers["num_batches_tracked"].item() == 0
    assert "not a member of process_group" in ranks[1]["non_member_error"]

    assert all(r["act_layer"] == dict(type="BatchNormAct2d", activation="silu", sync=True)
               for r in ranks)
    worst["BatchNormAct2d"] = _check_case(ACT_CASE, [r["act"] for r in ranks], errors)
    worst["BatchRenorm2d"] = _check_case(RENORM_CASE, [r["renorm"] for r in ranks], errors,
                                         _renorm_oracle(RENORM_CASE))

    worst["ddp"] = _check_ddp("[4, 0, 7] fp32", [4, 0, 7], torch.float32,
                              [r["ddp"] for r in ranks], errors)
    print(f"\n3 ranks in {elapsed:.1f} s; max rel err "
          f"{({k: f'{v:.1e}' for k, v in worst.items()})}")
    assert not errors, "\n".join(errors)


# ---- failures: a stuck rank and a dead rank ------------------------------------------------

STUCK_TIMEOUT_S = 3
DEAD_TIMEOUT_S = 10


def _world_failing(rank, world):
    """Rank 1 first stalls past a short group timeout, then dies between forward and backward."""
    result = {}
    stuck_group = dist.new_group(timeout=timedelta(seconds=STUCK_TIMEOUT_S))
    layer = batchnorm.SyncBatchNorm(3, process_group=stuck_group)
    if rank == 0:
        started = time.monotonic()
        try:
            layer(torch.randn(4, 3))
        except RuntimeError as error:
            result["stuck"] = dict(error=str(error), seconds=time.monotonic() - started)
    else:
        time.sleep(STUCK_TIMEOUT_S + 2)
    dist.barrier()

    dead_group = dist.new_group(timeout=timedelta(seconds=DEAD_TIMEOUT_S))
    model = torch.nn.Sequential(batchnorm.SyncBatchNorm(3, process_group=dead_group),
                                torch.nn.Linear(3, 3),
                                batchnorm.SyncBatchNorm(3, process_group=dead_group))
    y = model(torch.randn(4, 3))
    if rank == 1:
        os._exit(17)  # dies mid-step: after the forward, before the backward's all-reduce
    started = time.monotonic()
    try:
        y.sum().backward()
    except RuntimeError as error:
        result["dead"] = dict(error=str(error), seconds=time.monotonic() - started)
    torch.save(result, f"{os.environ['SYNC_TEST_OUT']}/rank{rank}.pt")
    os._exit(0)  # the group is broken: tearing it down could wait on the dead rank


def test_dead_or_stuck_rank_fails_with_clear_error_within_timeout(tmp_path):
    ranks = _launch(2, "_world_failing", tmp_path, timeout_s=PG_TIMEOUT_S,
                    expect_exit={1: 17})
    stuck, dead = ranks[0]["stuck"], ranks[0]["dead"]
    print(f"\nstuck rank: error after {stuck['seconds']:.2f} s (timeout {STUCK_TIMEOUT_S} s); "
          f"dead rank: error after {dead['seconds']:.2f} s (timeout {DEAD_TIMEOUT_S} s)")
    assert re.search(r"SyncBatchNorm\(3\): the all-gather of the .* across the 2 "
                     r"ranks of the process group failed on rank 0: another rank has died, timed "
                     r"out, or did not run this layer", stuck["error"]), stuck["error"]
    assert stuck["seconds"] < STUCK_TIMEOUT_S + 5
    assert re.search(r"SyncBatchNorm\(3\): the all-reduce of the gradient sums across the 2 ranks "
                     r"of the process group failed on rank 0: another rank has died",
                     dead["error"]), dead["error"]
    assert dead["seconds"] < DEAD_TIMEOUT_S + 5


# ---- single process: no communication, conversion ------------------------------------------

def test_world_of_one_and_no_process_group_do_not_communicate(tmp_path, monkeypatch):
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    want = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    for _ in range(2):
        want(x).sum().backward()
    expected_grad, x.grad = x.grad, None

    def refuse(*args, **kwargs):
        raise AssertionError("a world of one must not communicate")
    monkeypatch.setattr(dist, "all_gather", refuse)
    monkeypatch.setattr(dist, "all_reduce", refuse)

    layer = batchnorm.SyncBatchNorm(3, dtype=torch.float64)
    layer(x).sum().backward()  # torch.distributed not initialized: plain batch norm
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        layer(x).sum().backward()
    finally:
        dist.destroy_process_group()
    assert _rel_err(x.grad, expected_grad) < 1e-10
    for name, buffer in want.named_buffers():
        assert _rel_err(layer.get_buffer(name), buffer) < 1e-10, name


def test_compiles_fullgraph_when_not_distributed_and_in_eval():
    # the synced path compiles with functional collectives (2 ranks: above and in
    # test_sync_compile.py); without a process group, and in eval mode, it is plain batch norm
    layer, plain = batchnorm.SyncBatchNorm(3), batchnorm.BatchNorm1d(3)
    x = torch.randn(6, 3, 5)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x), plain(x), atol=1e-6)
    layer.eval(), plain.eval()
    assert torch.allclose(compiled(x), plain(x), atol=1e-6)


def _mixed_model():
    torch.manual_seed(0)
    inner = torch.nn.Sequential(batchnorm.BatchNorm1d(4, momentum=None), torch.nn.ReLU())
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4, eps=1e-3, bias=False),
        torch.nn.BatchNorm2d(4, affine=False), batchnorm.BatchNorm2d(4, momentum=0.3),
        torch.nn.Flatten(2), inner, torch.nn.BatchNorm1d(4, track_running_stats=False),
        batchnorm.BatchNormAct1d(4, act="leaky_relu", negative_slope=0.2)
    ).to(torch.float64)


def test_convert_and_revert_keep_weights_buffers_mode_and_values():
    model = _mixed_model()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    model(x)  # running statistics away from their initial values
    model[3].eval()
    before = model(x).detach()
    originals = [type(m) for m in model.modules()]
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}

    converted = batchnorm.convert_sync_batchnorm(model)
    synced = [converted[1], converted[2], converted[3], converted[5][0], converted[6]]
    assert all(type(m) is batchnorm.SyncBatchNorm and m.sync for m in synced)
    assert [m.training for m in synced] == [True, True, False, True, True]
    assert converted[1].bias is None and converted[1].eps == 1e-3
    assert converted[5][0].momentum is None
    act = converted[7]  # ours with behaviour of its own: same class, sync switched on in place
    assert type(act) is batchnorm.BatchNormAct1d and act is model[7] and act.sync
    assert (act.activation, act.negative_slope) == ("leaky_relu", 0.2)
    # the same tensor objects: weights, buffers, dtype and device carry over, and an optimizer
    # built before the conversion still updates the model
    for key, value in converted.state_dict(keep_vars=True).items():
        assert value is tensors[key], key
    # a world of one computes plain batch norm (our kernels, so to rounding)
    assert _rel_err(converted(x), before) < 1e-10

    reverted = batchnorm.revert_sync_batchnorm(converted)
    assert [type(m) for m in reverted.modules()][1:] == originals[1:]
    for key, value in reverted.state_dict(keep_vars=True).items():
        assert value is tensors[key], key
    assert [m.training for m in reverted.modules()] == [m.training for m in model.modules()]
    assert torch.equal(reverted(x), before)  # the original classes again: exactly
    assert not reverted[7].sync and reverted[7].activation == "leaky_relu"

    top = batchnorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(3))
    assert type(top) is batchnorm.SyncBatchNorm
    assert type(batchnorm.revert_sync_batchnorm(top)) is torch.nn.BatchNorm2d
    assert batchnorm.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(2)).sync
    # torch's SyncBatchNorm and one of ours built directly: the input rank is unknown, so they
    # revert to a batch norm that accepts any rank
    for layer in (torch.nn.SyncBatchNorm(3), batchnorm.SyncBatchNorm(3)):
        plain = batchnorm.revert_sync_batchnorm(batchnorm.convert_sync_batchnorm(layer))
        assert type(plain).__name__ == "_BatchNormXd" and not plain.sync
        assert plain.weight is layer.weight and plain.running_var is layer.running_var
        plain(torch.randn(4, 3, 2, 2, 2))


def test_state_dicts_load_both_ways_with_torch_sync_batch_norm():
    ours, theirs = batchnorm.SyncBatchNorm(5), torch.nn.SyncBatchNorm(5)
    with torch.no_grad():
        for t in (theirs.weight, theirs.bias, theirs.running_mean):
            t.uniform_()
    ours.load_state_dict(theirs.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                 theirs.state_dict().values()))
    theirs.load_state_dict(batchnorm.BatchNorm2d(5).state_dict())
    # not a torch.nn.SyncBatchNorm, which DDP refuses on CPU
    assert not isinstance(ours, torch.nn.SyncBatchNorm)


def test_convert_leaves_foreign_subclasses_alone_with_a_warning():
    class ForeignAct(torch.nn.BatchNorm2d):
        def forward(self, input):
            return torch.relu(super().forward(input))

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), ForeignAct(2),
                                torch.nn.Sequential(batchnorm.GhostBatchNorm2d(2)))
    with pytest.warns(RuntimeWarning, match=r"left 1 \(.*ForeignAct\), 2.0 \(GhostBatchNorm2d\) "
                                            r"with local statistics"):
        converted = batchnorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is ForeignAct and not converted[2][0].sync


def test_sync_argument_errors():
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): process_group is only used with "
                                         r"sync=True"):
        batchnorm.BatchNorm2d(3, process_group=object())
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(3\): expected input of shape \(N, C, "
                                         r"\*spatial\) with at least 2 dimensions \(got 1D"):
        batchnorm.SyncBatchNorm(3)(torch.randn(3))
    assert batchnorm.BatchNorm2d(3, sync=True).sync
    with pytest.raises(ValueError, match=r"MaskedBatchNorm2d\(3\): has no sync option"):
        batchnorm.MaskedBatchNorm2d(3, sync=True)


# ---- the example (the code in docs/sync.md runs in tests/test_docs.py) ---------------

def _kill_tree(pid: int) -> None:
    """Kill `pid` and its descendants: torchrun starts each worker in a session of its own, so
    killing torchrun's process group would leave the workers running."""
    def descendants(p):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
            children = [int(c) for t in tasks
                        for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except OSError:
            return []
        return children + [d for c in children for d in descendants(c)]
    for p in [pid] + descendants(pid):
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass


def test_ddp_example_runs_under_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "examples" / "ddp_syncbn.py"), "--steps", "20"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.communicate()
    assert proc.returncode == 0, output
    match = re.search(r"loss (\d+\.\d+) -> (\d+\.\d+); running statistics identical on 2 ranks",
                      output)
    assert match, output
    assert float(match.group(2)) < float(match.group(1))


def _world_mismatched_channels(rank, world):
    """Rank r holds a SyncBatchNorm of 3 + r channels: a model built differently per rank."""
    layer = batchnorm.SyncBatchNorm(3 + rank)
    x = torch.randn(4, 3 + rank, 2)
    try:
        layer(x)
    except Exception as error:  # noqa: BLE001 - the message is the result
        return {"type": type(error).__name__, "message": str(error),
                "running_mean": layer.running_mean.clone()}
    return {"type": None, "message": "", "running_mean": layer.running_mean.clone()}


def test_ranks_with_mismatched_channel_counts(tmp_path):
    ranks = _launch(2, "_world_mismatched_channels", tmp_path, timeout_s=10)
    for rank, result in enumerate(ranks):
        assert result["type"] == "ValueError", result
        assert re.search(rf"SyncBatchNorm\({3 + rank}\).*rank 0 has 3.*rank 1 has 4 channels",
                         result["message"]), result["message"]
        assert torch.equal(result["running_mean"], torch.zeros(3 + rank))
