"""Fixtures of the tools tests."""

import pytest
import torch

from tools_helpers import ARCHITECTURES, randomize_bn


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread in the tools tests: the machine has 2 cores shared with other jobs and
    pytest runs 2 workers; with more threads the tiny convolutions here spin-wait and run up to
    10x slower. Restored afterwards, so other tests in the worker keep their setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(ARCHITECTURES))
def hf_model(request):
    """(name, a small transformers image classifier with randomized batch norms, probe input)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = randomize_bn(ARCHITECTURES[request.param]())
    return request.param, model, torch.randn(2, 3, 32, 32)
