"""Normalisation layers shared by the nnyseg networks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["InstanceNorm3dAnySize", "LayerNormNd"]


class LayerNormNd(nn.Module):
    """Layer normalisation over the channel axis of a channels-first N-d feature map.

    For an input of shape ``(B, C, *spatial)`` every voxel's C-vector is normalised to zero mean and unit (biased)
    variance, then scaled and shifted by per-channel affine parameters. This equals ``F.layer_norm`` applied to the
    channels-last permutation of the input, without the two permutes.

    Args:
        num_channels: Number of channels C (size of axis 1).
        eps: Added to the variance for numerical stability.
        affine: Whether to learn a per-channel weight (init 1) and bias (init 0).
    """

    def __init__(self, num_channels: int, *, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        self.num_channels = num_channels
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` of shape ``(B, C, *spatial)`` over C."""
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected input of shape (B, {self.num_channels}, ...), got {tuple(x.shape)}")
        var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            shape = (1, self.num_channels) + (1,) * (x.ndim - 2)
            x = x * self.weight.view(shape) + self.bias.view(shape)
        return x

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.weight is not None}"


class InstanceNorm3dAnySize(nn.InstanceNorm3d):
    """Affine ``nn.InstanceNorm3d`` that also accepts maps of a single voxel.

    At a 32^3 patch the /32 bottleneck of the Swin-type networks is 1x1x1, where PyTorch's InstanceNorm3d refuses to
    run in training mode. On one voxel the normalised value is 0, so the output is the norm's bias (and the weight
    gets a zero gradient), which is the limit of the general formula.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5 and x.shape[2:].numel() == 1:
            zero = x - x.mean(dim=(2, 3, 4), keepdim=True)  # exactly 0 (and 0 gradient), as in the general case
            if not self.affine:
                return zero
            shape = (1, -1, 1, 1, 1)
            return zero * self.weight.view(shape) + self.bias.view(shape)
        return super().forward(x)
