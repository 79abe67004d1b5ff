"""Normalisation layers shared by the nnyseg networks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LayerNormNd"]


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
