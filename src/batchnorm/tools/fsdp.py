"""FSDP2 with a bf16/fp16 MixedPrecisionPolicy: batch norm's parameters and statistics in fp32.

`fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))` casts every
parameter to bf16 for the forward but no buffer, so a batch norm sees bf16 weight and bias beside
fp32 running statistics. torch.nn's batch norm then fails ("expected scalar type BFloat16 but
found Float", torchtitan#674); ours accepts the mix (statistics and the update are computed in
fp32 for bf16 input, see `rules`), but its weight and bias still live, and their gradients are
reduced, in bf16, which loses the per-channel scales' precision.

`shard_batchnorm_fp32(model)` shards each batch-norm layer as its own FSDP2 unit whose policy
keeps fp32 parameters and fp32 gradient reduction, and casts its parameters and buffers to fp32;
the layer takes the surrounding bf16 activations as they are (cast_forward_inputs=False) and
returns them in their dtype. Call it before `fully_shard` of the enclosing modules, which then
leave these units alone:

    shard_batchnorm_fp32(model, mesh=mesh)
    for block in model.blocks: fully_shard(block, mesh=mesh, mp_policy=bf16)
    fully_shard(model, mesh=mesh, mp_policy=bf16)

Tested on CPU with gloo ranks (FSDP2 runs there in torch 2.13); not run on CUDA/NCCL.
"""

from __future__ import annotations

import torch
from torch import nn

from batchnorm.tools._common import batchnorm_types, is_frozen

__all__ = ["shard_batchnorm_fp32"]


def shard_batchnorm_fp32(model: nn.Module, **fully_shard_kwargs) -> list[nn.Module]:
    """Shard every batch-norm layer of `model` as an fp32 FSDP2 unit; see the module docstring.

    Args:
        model: the model, before the enclosing modules are sharded.
        fully_shard_kwargs: passed to each `fully_shard` call (mesh, reshard_after_forward, ...);
            `mp_policy` is this helper's to set.

    Returns:
        The layers sharded (FrozenBatchNorm has no parameters to shard and is only cast).

    Raises:
        ValueError: `mp_policy` among the arguments.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if "mp_policy" in fully_shard_kwargs:
        raise ValueError("shard_batchnorm_fp32: mp_policy is set by this helper (fp32 parameters "
                         "and gradient reduction); pass the bf16 policy to the fully_shard calls "
                         "of the enclosing modules instead")
    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    sharded = []
    for m in model.modules():
        if not isinstance(m, batchnorm_types()):
            continue
        m.float()
        if is_frozen(m) or not any(True for _ in m.parameters(recurse=False)):
            continue
        fully_shard(m, mp_policy=policy, **fully_shard_kwargs)
        sharded.append(m)
    return sharded
