import math

import pytest

from batchnorm.lab.claims import CLAIMS, batch_size, convergence, learning_rate
from batchnorm.lab.claims.common import (INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, mean_ci,
                                         verdict)


def test_mean_ci_is_the_student_t_interval():
    ci = mean_ci([1.0, 2.0, 3.0])
    # t(0.975, 2) = 4.302653 (tables); sd = 1
    half = 4.302653 / math.sqrt(3)
    assert ci["mean"] == 2.0
    assert ci["lo"] == pytest.approx(2 - half, abs=1e-6)
    assert ci["hi"] == pytest.approx(2 + half, abs=1e-6)
    assert mean_ci([0.5])["lo"] is None


@pytest.mark.parametrize("lo, hi, higher, want", [
    (2.5, 4.0, True, SUPPORTED), (0.5, 1.9, True, NOT_SUPPORTED), (1.0, 3.0, True, INCONCLUSIVE),
    (0.5, 1.9, False, SUPPORTED), (2.0, 3.0, False, NOT_SUPPORTED),
    (1.0, 3.0, False, INCONCLUSIVE), (None, None, True, INCONCLUSIVE),
])
def test_verdict(lo, hi, higher, want):
    assert verdict({"mean": 0, "lo": lo, "hi": hi}, 2.0, higher) == want


def _run(seed, **cfg_and_metrics):
    metrics = cfg_and_metrics.pop("metrics")
    return {"config": {"seed": seed, **cfg_and_metrics}, "metrics": metrics}


def test_convergence_speedup_from_curves():
    none = [[100, 0.2], [200, 0.4], [300, 0.5], [400, 0.5]]  # target = mean(0.4, .5, .5) = .4667
    fast = [[100, 0.3], [200, 0.6], [300, 0.7], [400, 0.7]]
    slow = [[100, 0.1], [200, 0.2], [300, 0.3], [400, 0.5]]
    pct = [[100, 0, 1, 2], [400, 0, 1, 2]]
    runs = [_run(s, norm=n, metrics={"curve": c, "percentiles": pct})
            for s, (cn, cb) in enumerate([(none, fast), (none, slow)])
            for n, c in (("none", cn), ("batch", cb))]
    ev = convergence.evaluate(runs, 10)
    # seed 0: none reaches .4667 at 300, BN at 200 -> 1.5x; seed 1: BN at 400 -> 0.75x
    assert ev["numbers"]["speedup (x)"]["mean"] == pytest.approx((1.5 + 0.75) / 2)


def test_learning_rate_largest_trainable_rate():
    def m(acc, diverged=False):
        return {"final_test": acc, "diverged": diverged, "curve": [[1, acc]]}

    runs = []
    for seed in range(2):
        for lr, none_acc, bn_acc in ((0.1, 0.5, 0.5), (1.0, 0.15, 0.6), (10.0, 0.1, 0.6)):
            runs.append(_run(seed, norm="none", lr=lr, metrics=m(none_acc, lr == 10.0)))
            runs.append(_run(seed, norm="batch", lr=lr, metrics=m(bn_acc)))
    ev = learning_rate.evaluate(runs, 10)
    # no norm trains up to 0.1 (0.15 < chance + 10 points), BN up to 10: two decades
    assert ev["estimate"]["mean"] == pytest.approx(2.0)
    assert ev["verdict"] == SUPPORTED


def test_claims_have_their_parts():
    assert list(CLAIMS) == ["convergence", "regularization", "learning-rate", "initialization",
                            "batch-size"]
    for claim in CLAIMS.values():
        for attr in ("TITLE", "PROMISE", "CRITERION", "REFERENCE", "SETUP", "THRESHOLD"):
            assert getattr(claim, attr) is not None
        assert claim.configs(quick=True) and claim.configs(quick=False)


def test_batch_size_protocol_scales_the_learning_rate():
    cfgs = batch_size.configs(quick=False)
    bn = {c["batch_size"]: c for c in cfgs if c["norm"] == "batch"}
    assert bn[2]["lr"] * 16 == bn[32]["lr"]
    # the same number of training examples at every batch size, up to one batch
    examples = bn[2]["steps"] * 2
    assert all(abs(c["steps"] * b - examples) < b for b, c in bn.items())
    ghosts = [c for c in cfgs if c["norm"] == "ghost"]
    assert {c["batch_size"] for c in ghosts} == {128}
    assert sorted(c["virtual_batch"] for c in ghosts) == batch_size.BATCHES
