import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import adapt


def shift(x: torch.Tensor) -> torch.Tensor:
    """The target domain: another sensor gain and offset."""
    return x * 2.5 + 1.5


def test_adabn_recovers_accuracy_on_shifted_mnist1d():
    data = pytest.importorskip("mnist1d.data")
    # make_dataset builds MNIST-1D locally (get_dataset would download it)
    d = data.make_dataset(data.get_dataset_args())
    x, y = torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"])
    x_test, y_test = torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 40)), nn.Conv1d(1, 16, 5, padding=2), batchnorm.BatchNorm1d(16),
        nn.ReLU(), nn.Conv1d(16, 16, 3, stride=2, padding=1), batchnorm.BatchNorm1d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 20, 64), batchnorm.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(8):
        for idx in torch.randperm(len(x)).split(100):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()

    def accuracy(inputs):
        with torch.no_grad():
            return (model(inputs).argmax(1) == y_test).float().mean().item()

    clean, shifted = accuracy(x_test), accuracy(shift(x_test))
    # unlabeled target batches: the shifted training inputs, labels dropped
    adapt(model, [shift(b) for b in x.split(200)], progress=False)
    adapted = accuracy(shift(x_test))
    print(f"MNIST-1D accuracy: clean {clean:.3f}, shifted {shifted:.3f}, after adapt {adapted:.3f}")
    assert clean > 0.85 and clean - shifted > 0.3
    assert adapted - shifted >= 0.8 * (clean - shifted)
    assert not model.training
