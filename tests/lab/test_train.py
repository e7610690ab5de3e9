import pytest

from batchnorm.lab import data, train
from conftest import separable


@pytest.fixture(scope="module")
def small():
    x, y = separable(400)
    return data._finish("small", x[:300, None], y[:300], x[300:, None], y[300:], "small")


def test_unknown_key_is_rejected_with_the_valid_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]; expected keys "
                                         r"from \['activation'"):
        train.make_config({"learning_rate": 0.1})


def test_bad_value_names_the_key():
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        train.make_config({"batch_size": 0})


def test_deterministic_given_the_seed(small):
    cfg = train.make_config({"norm": "batch", "steps": 30, "evals": 3, "batch_size": 32})
    a, b = train.train(cfg, small), train.train(cfg, small)
    assert a == b
    c = train.train({**cfg, "seed": 1}, small)
    assert c["loss"] != a["loss"]


def test_learns_the_separable_task(small):
    cfg = train.make_config({"norm": "batch", "steps": 60, "evals": 2, "batch_size": 32,
                             "lr": 0.5})
    assert train.train(cfg, small)["final_test"] > 0.9


def test_divergence_is_detected(small):
    cfg = train.make_config({"steps": 50, "evals": 5, "lr": 1e6, "init_std": 5.0})
    r = train.train(cfg, small)
    assert r["diverged"] and r["steps_done"] < 50


def test_sigmoid_percentiles_and_inference_modes(small):
    cfg = train.make_config({"norm": "batch", "activation": "sigmoid", "steps": 20, "evals": 2,
                             "batch_size": 32, "track_sigmoid": True, "inference": True})
    r = train.train(cfg, small)
    assert [p[0] for p in r["percentiles"]] == [10, 20]
    assert all(p[1] <= p[2] <= p[3] for p in r["percentiles"])
    inf = r["inference"]
    assert inf["running"] == r["final_test"]
    assert inf["batch"]["1"] is None  # one value per channel: no batch statistics
    assert all(0 <= inf["batch"][k] <= 1 for k in ("2", "8", "all"))
