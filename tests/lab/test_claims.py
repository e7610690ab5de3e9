import math

import pytest

from batchnorm.lab.claims import (CLAIMS, batch_size, convergence, ics, inference,
                                  initialization, learning_rate, smoothness)
from batchnorm.lab.claims.common import (INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, all_of,
                                         mean_ci, share_difference, verdict, wilson)


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


def _linear(slope, cap=1.0):
    return [[step, min(cap, slope * step)] for step in range(5, 1001, 5)]  # 200 evaluations


def test_convergence_steps_to_target_interpolates_between_evaluations():
    # a straight line: the centred average leaves it unchanged inside, so 0.5 is reached at the
    # evaluation at 500, and 0.4987 between those at 495 and 500, at 498.7
    curve = _linear(0.001)
    assert convergence.steps_to(curve, 0.5) == pytest.approx(500.0)
    assert convergence.steps_to(curve, 0.4987) == pytest.approx(498.7)
    assert convergence.steps_to(curve, 2.0) == float("inf")
    assert list(convergence.smooth([0, 3, 6, 0], 3)) == [1.5, 3.0, 3.0, 3.0]


def test_convergence_speedup_is_the_geometric_mean_over_seeds():
    pct = [[5, 0, 1, 2], [1000, 0, 1, 2]]
    runs = []
    for seed, bn_slope in enumerate((0.0012, 0.0024)):
        runs.append(_run(seed, norm="none", metrics={"curve": _linear(0.0006), "percentiles": pct}))
        runs.append(_run(seed, norm="batch", metrics={"curve": _linear(bn_slope),
                                                      "percentiles": pct}))
    ev = convergence.evaluate(runs, 10)
    # target: no norm's mean over its last 20 evaluations (steps 905..1000, mean 952.5) = 0.5715;
    # no norm reaches it at 952.5, BN at 476.25 (2x) and 238.125 (4x): log10 speedups .301, .602
    ci = ev["numbers"]["log10(speedup)"]
    assert ci["mean"] == pytest.approx((math.log10(2) + math.log10(4)) / 2)
    assert ev["numbers"]["speedup (x), geometric mean"]["mean"] == pytest.approx(math.sqrt(8))
    assert ev["numbers"]["steps to no-norm final accuracy, BN"]["mean"] == pytest.approx(
        (476.25 + 238.125) / 2)


def test_wilson_matches_newcombes_table():
    # Newcombe 1998 (Statistics in Medicine 17:857), Table I, method 3 (score, no continuity
    # correction): 81/263, 15/148, 0/20, 1/29
    for k, n, lo, hi in ((81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                         (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)):
        ci = wilson(k, n)
        assert (round(ci["lo"], 4), round(ci["hi"], 4)) == (lo, hi)
        assert ci["mean"] == k / n
    assert wilson(5, 5)["hi"] == 1.0 and wilson(5, 5)["lo"] < 1.0  # never outside [0, 1]
    with pytest.raises(ValueError, match="expected 0 <= successes <= trials, got successes=6, "
                                         "trials=5"):
        wilson(6, 5)


def test_share_difference_is_newcombes_method_10():
    # Newcombe 1998 (Statistics in Medicine 17:873), Table II, method 10: 56/70 - 48/80,
    # 9/10 - 3/10, 5/56 - 0/29
    for a, b, lo, hi in (((56, 70), (48, 80), 0.0524, 0.3339), ((9, 10), (3, 10), 0.1705, 0.8090),
                         ((5, 56), (0, 29), -0.0381, 0.1926)):
        ci = share_difference(wilson(*a), wilson(*b))
        assert (round(ci["lo"], 4), round(ci["hi"], 4)) == (lo, hi)


def test_initialization_shares_use_wilson_over_every_run():
    def m(acc):
        return {"final_test": acc, "diverged": False}

    runs = []
    for seed in range(2):
        for std in (0.01, 1.0):
            runs.append(_run(seed, norm="none", lr=0.1, init_std=std,
                             metrics=m(0.5 if std == 1.0 and seed == 0 else 0.1)))
            runs.append(_run(seed, norm="batch", lr=0.1, init_std=std, metrics=m(0.5)))
    ev = initialization.evaluate(runs, 10)
    n = ev["numbers"]
    assert n["no norm: settings that train (share)"] == wilson(1, 4)
    assert n["BN: settings that train (share)"] == wilson(4, 4)
    assert ev["estimate"] == share_difference(wilson(4, 4), wilson(1, 4))
    # every seed trains at std 1 with BN: Wilson's interval ends at 1, not beyond
    assert n["BN, lr 0.1, std 1: seeds that train (share)"]["hi"] == 1.0


@pytest.mark.parametrize("verdicts, want", [
    ([SUPPORTED, SUPPORTED], SUPPORTED), ([SUPPORTED, NOT_SUPPORTED], NOT_SUPPORTED),
    ([INCONCLUSIVE, NOT_SUPPORTED], NOT_SUPPORTED), ([SUPPORTED, INCONCLUSIVE], INCONCLUSIVE),
])
def test_a_hypothesis_holds_only_if_all_its_predictions_do(verdicts, want):
    assert all_of(verdicts) == want


def _mechanism_runs(acc, ics_rel, loss_range, grad_change):
    """Two seeds of each variant with the given per-variant values, one probe."""
    runs = []
    for seed in range(2):
        for norm in ("none", "batch", "noisy_batch"):
            jitter = 1 + 0.01 * seed
            probe = {"step": 1, "ics": [{"layer": 2, "l2": 1.0, "relative": ics_rel[norm] * jitter,
                                         "cosine": 0.9}],
                     "landscape": {"loss_range": loss_range[norm] * jitter,
                                   "grad_change_range": grad_change[norm] * jitter,
                                   "beta": 1.0}}
            runs.append(_run(seed, norm=norm, metrics={
                "final_test": acc[norm] + 0.001 * seed, "final_train": acc[norm],
                "probes": [probe]}))
    return runs


def test_ics_claim_fails_when_noisy_bn_trains_as_well_as_bn():
    # Santurkar's finding: noisy BN within a point of BN, BN's ICS 10x higher than no norm's
    runs = _mechanism_runs({"none": 0.4, "batch": 0.6, "noisy_batch": 0.595},
                           {"none": 0.1, "batch": 1.0, "noisy_batch": 2.0},
                           {"none": 1, "batch": 1, "noisy_batch": 1},
                           {"none": 1, "batch": 1, "noisy_batch": 1})
    ev = ics.evaluate(runs, 10)
    noise, measured = ev["predictions"]
    assert noise["estimate"]["mean"] == pytest.approx(0.005)
    assert noise["verdict"] == NOT_SUPPORTED
    # log10(ICS BN / no norm): seeds 1.0/0.1 and 1.01/0.101, both exactly 10x
    assert measured["estimate"]["mean"] == pytest.approx(1.0)
    assert measured["verdict"] == NOT_SUPPORTED
    assert ev["verdict"] == NOT_SUPPORTED


def test_smoothness_claim_holds_when_bn_shrinks_both_ranges():
    runs = _mechanism_runs({"none": 0.4, "batch": 0.6, "noisy_batch": 0.6},
                           {"none": 1, "batch": 1, "noisy_batch": 1},
                           {"none": 5.0, "batch": 0.5, "noisy_batch": 1.0},
                           {"none": 8.0, "batch": 1.0, "noisy_batch": 1.0})
    ev = smoothness.evaluate(runs, 10)
    loss, grad = ev["predictions"]
    assert loss["estimate"]["mean"] == pytest.approx(1.0)  # 10x smaller loss range
    assert grad["estimate"]["mean"] == pytest.approx(math.log10(8))
    assert ev["verdict"] == SUPPORTED
    runs = _mechanism_runs({"none": 0.4, "batch": 0.6, "noisy_batch": 0.6},
                           {"none": 1, "batch": 1, "noisy_batch": 1},
                           {"none": 5.0, "batch": 0.5, "noisy_batch": 1.0},
                           {"none": 1.0, "batch": 1.0, "noisy_batch": 1.0})
    assert smoothness.evaluate(runs, 10)["verdict"] == NOT_SUPPORTED  # gradient: ratio 1


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
                            "batch-size", "inference", "ics", "smoothness"]
    for claim in CLAIMS.values():
        for attr in ("TITLE", "PROMISE", "CRITERION", "REFERENCE", "SETUP"):
            assert getattr(claim, attr)
        # a criterion is fixed in the code: one threshold, or one per prediction
        assert hasattr(claim, "THRESHOLD") != hasattr(claim, "PREDICTIONS")
        assert claim.configs(quick=True) and claim.configs(quick=False)


def test_batch_size_protocol_is_wu_and_he():
    cfgs = [c for c in batch_size.configs(quick=False) if c.get("workers") == 8]
    bn = {c["batch_size"] // 8: c for c in cfgs if c["norm"] == "batch"}
    assert sorted(bn) == batch_size.BATCHES
    # the learning rate linear in the optimizer batch (8 workers x B): 0.05 at 32 examples
    assert all(c["lr"] == pytest.approx(0.05 * c["batch_size"] / 32) for c in cfgs)
    # the same number of training examples at every batch size, up to one batch
    assert all(abs(c["steps"] * c["batch_size"] - batch_size.EXAMPLES) < c["batch_size"]
               for c in cfgs)
    # the sanity MLP rides along as the converged reference, and the inference claim reads
    # exactly the BN runs
    assert batch_size.configs(False)[-1]["norm"] == "none"
    assert inference.configs(False) == list(bn.values())


def test_batch_size_baseline_needs_bn_within_3_points_of_the_mlp():
    runs = [_run(s, norm="none", workers=1, dropout=0.0, batch_size=128,
                 metrics={"final_test": 0.66}) for s in range(2)]
    for b in (4, 32):
        for norm in batch_size.NORMS:
            for s in range(2):
                acc = {4: 0.50, 32: 0.64}[b] + 0.01 * s
                runs.append(_run(s, norm=norm, workers=8, batch_size=8 * b, dropout=0.0,
                                 metrics={"final_test": acc}))
    ev = batch_size.evaluate(runs, 10)
    assert ev["baseline"]["shortfall"] == pytest.approx(0.66 - 0.645)
    assert ev["baseline"]["converged"]
    assert ev["estimate"]["mean"] == pytest.approx(0.14)  # 64 - 50 points
    assert ev["verdict"] == NOT_SUPPORTED
