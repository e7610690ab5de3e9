"""Fixtures of the peer harness: PyTorch's own BatchNorm checks run against our classes.

Every check runs twice, `impl="torch"` (the unpatched control: torch.nn's classes and functional)
and `impl="ours"`, so a check that fails only for "ours" is a difference of ours, and one that
fails for both is the harness's own mistake. torch's test helpers (`torch.testing._internal`)
import `expecttest`, which the dev extras install.
"""

import pytest
import torch

import batchnorm

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (dev extras)")

CLASSES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")


@pytest.fixture(params=["torch", "ours"])
def impl(request):
    return request.param


@pytest.fixture
def nn(impl, monkeypatch):
    """`torch.nn` as torch's test_nn.py sees it (it calls `nn.BatchNorm2d(...)` and
    `F.batch_norm(...)`): for "ours" the three classes and `torch.nn.functional.batch_norm` are
    batchnorm's; for "torch" nothing is patched."""
    if impl == "ours":
        for name in CLASSES:
            monkeypatch.setattr(torch.nn, name, getattr(batchnorm, name))
        monkeypatch.setattr(torch.nn.functional, "batch_norm", batchnorm.functional.batch_norm)
    expected = batchnorm if impl == "ours" else torch.nn
    assert all(getattr(torch.nn, name) is getattr(expected, name) for name in CLASSES)
    return torch.nn
