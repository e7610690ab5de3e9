import pytest
import torch

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
    assert all(0 <= inf["batch"][k] <= 1 for k in ("2", "8", "32", "all"))
    assert inf["train_batch"] == "32"
    assert inf["batch1_agreement"] == 1.0  # eval mode: one example at a time as in one batch
    assert set(inf["eval_gap"]) == {"mean_gap", "std_ratio"}


def test_workers_train_and_test_per_slice(small):
    cfg = train.make_config({"norm": "batch", "workers": 4, "steps": 20, "evals": 1,
                             "batch_size": 32, "inference": True})
    inf = train.train(cfg, small)["inference"]
    # slices of 8 at a test batch of 32; a test batch of 8 leaves slices of 2, of 2 slices of 1
    assert inf["batch"]["32"] is not None and inf["batch"]["8"] is not None
    assert inf["batch"]["2"] is None
    with pytest.raises(ValueError, match="batch_size must be a multiple of workers, got "
                                         "batch_size=30 and workers=4"):
        train.make_config({"workers": 4, "batch_size": 30})


def test_cosine_schedule_ends_at_zero(small):
    cfg = train.make_config({"schedule": "cosine", "steps": 10})
    lam = train._schedule(cfg)
    assert [lam(0), lam(5), lam(10)] == pytest.approx([1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="schedule must be 'constant' or 'cosine', got 'step'"):
        train.make_config({"schedule": "step"})


def test_noisy_bn_runs_are_deterministic_and_probed(small):
    cfg = train.make_config({"norm": "noisy_batch", "steps": 12, "evals": 2, "batch_size": 32,
                             "probe_every": 5})
    a, b = train.train(cfg, small), train.train(cfg, small)
    assert a == b
    assert [p["step"] for p in a["probes"]] == [1, 5, 10]
    assert [x["layer"] for x in a["probes"][0]["ics"]] == [2, 3, 4]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"device 'cuda' asked for, but torch sees no CUDA device "
                                         r"here .*torch.cuda.is_available\(\) is False"):
        train.device_of({"device": "cuda"})


def test_unknown_device_names_the_choices():
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda\\[:N\\]', got 'tpu'"):
        train.device_of({"device": "tpu"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda(small):
    cfg = train.make_config({"norm": "batch", "steps": 30, "evals": 1, "batch_size": 32,
                             "lr": 0.5, "device": "cuda", "inference": True})
    assert train.train(cfg, small)["final_test"] > 0.9
