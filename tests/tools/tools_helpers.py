"""Helpers of the tools tests: small third-party architectures built from their configs (random
weights, no download) and batch norms with non-trivial statistics. (Not named conftest: tests/
has a conftest.py too, and `import conftest` would find whichever came first.)"""

import torch
from torch.nn.modules.batchnorm import _BatchNorm


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every batch norm random affine parameters and running statistics, so a fold or
    convert that ignored any of them would show in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g) * 0.5 + 1)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return model


def count_bn(model: torch.nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def _resnet():
    from transformers import ResNetConfig, ResNetForImageClassification
    return ResNetForImageClassification(ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="bottleneck",
        downsample_in_first_stage=True, num_labels=5))


def _mobilenet_v2():
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
    # tf_padding stays at its default (True): shape-dependent padding the plain fx trace rejects.
    return MobileNetV2ForImageClassification(MobileNetV2Config(
        depth_multiplier=0.25, image_size=32, num_labels=5))


def _efficientnet():
    from transformers import EfficientNetConfig, EfficientNetForImageClassification
    config = EfficientNetConfig(width_coefficient=0.1, depth_coefficient=0.1, image_size=32,
                                num_labels=5)
    # top_bn is built with hidden_dim features and fed round_filters(config, 1280) channels:
    # the two agree only when hidden_dim is set to match the width coefficient.
    from transformers.models.efficientnet.modeling_efficientnet import round_filters
    config.hidden_dim = round_filters(config, 1280)
    return EfficientNetForImageClassification(config)


ARCHITECTURES = {"resnet": _resnet, "mobilenet_v2": _mobilenet_v2, "efficientnet": _efficientnet}
