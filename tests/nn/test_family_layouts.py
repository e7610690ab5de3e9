"""Every family layer on channels-last fp32 and bf16 input, against its contiguous fp32 result:
the layout is kept, fp32 agrees to 1e-5 and bf16 (fp32 accumulation) to its own precision."""

import pytest
import torch

import batchnorm
from tests.conftest import assert_close_scaled

LAYERS = {
    "act": lambda: (batchnorm.BatchNormAct2d(3, act="silu"), ()),
    "renorm": lambda: (batchnorm.BatchRenorm2d(3, rmax=1.5, dmax=0.5, rmax_ramp=None,
                                               dmax_ramp=None), ()),
    "ghost": lambda: (batchnorm.GhostBatchNorm2d(3, virtual_batch_size=4), ()),
    "frozen": lambda: (batchnorm.FrozenBatchNorm2d(3), ()),
    "masked": lambda: (batchnorm.MaskedBatchNorm2d(3), (torch.rand(6, 4, 5) > 0.3,)),
    "domain": lambda: (batchnorm.DomainBatchNorm2d(3, 2), (1,)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_channels_last_and_bf16_follow_fp32(name):
    torch.manual_seed(0)
    (layer, extra), x = LAYERS[name](), torch.randn(6, 3, 4, 5) * 2 + 1
    states = {k: v.clone() for k, v in layer.state_dict().items()}
    expected = layer(x.clone().requires_grad_(), *extra)

    layer.load_state_dict(states)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    y = layer(x_cl, *extra)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_scaled(y.detach(), expected.detach(), 1e-5, f"{name} channels_last")

    layer.load_state_dict(states)
    y16 = layer.to(torch.bfloat16)(x.bfloat16(), *extra)
    assert y16.dtype == torch.bfloat16
    assert_close_scaled(y16.detach(), expected.detach(), 2e-2, f"{name} bf16")
