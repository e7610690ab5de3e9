"""Fixtures of the tools tests."""

import pytest
import torch

from tools_helpers import ARCHITECTURES, randomize_bn

# One intra-op thread per test process: the machine has 2 cores shared with other jobs and pytest
# runs 2 workers; with more threads the tiny convolutions here spin-wait and run 10x slower.
torch.set_num_threads(1)


@pytest.fixture(params=sorted(ARCHITECTURES))
def hf_model(request):
    """(name, a small transformers image classifier with randomized batch norms, probe input)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = randomize_bn(ARCHITECTURES[request.param]())
    return request.param, model, torch.randn(2, 3, 32, 32)
