"""examples/renorm_mnist1d.py keeps running: a few steps of each model (the full comparison, 3
seeds x 6000 steps, is the example's own job; its numbers are in examples/results/). Marked slow:
building MNIST-1D and the steps cost ~25 s of CPU, too much for the default suite's budget."""

import importlib.util
import pathlib

import pytest

pytest.importorskip("mnist1d")
pytestmark = pytest.mark.slow
SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "examples" / "renorm_mnist1d.py"


def test_example_trains_both_models_for_a_few_steps():
    spec = importlib.util.spec_from_file_location("renorm_mnist1d", SCRIPT)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data = example.load_data()
    assert data[0].shape == (4000, 1, 40) and data[2].shape == (1000, 1, 40)
    for norm in ("bn", "renorm"):
        assert 0.0 <= example.run(norm, seed=0, steps=20, data=data) <= 1.0
