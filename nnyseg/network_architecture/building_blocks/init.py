"""Weight initialisation shared by the transformer-based networks (applied as ``network.apply(initialize)``)."""

from __future__ import annotations

from timm.layers import trunc_normal_
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

from nnyseg.network_architecture.building_blocks.norms import LayerNormNd


def init_transformer_unet_weights(module: nn.Module) -> None:
    """The Swin/ConvNeXt convention: Linear trunc-normal(0.02) with zero bias; convolutions and transposed
    convolutions He (kaiming normal, a = 0.01, nnU-Net's) with zero bias; norms weight 1, bias 0.

    Modules with a dedicated initialisation (zero-initialised outputs, dynamic biases) are handled by each network
    before it falls back to this rule.
    """
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, _InstanceNorm, LayerNormNd)):
        if getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
