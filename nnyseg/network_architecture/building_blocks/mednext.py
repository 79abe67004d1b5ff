"""ConvNeXt-style 3D blocks (MedNeXt) and a residual conv block for the skip paths.

Block structure after Roy et al., "MedNeXt: Transformer-driven Scaling of ConvNets for Medical Image Segmentation"
(MICCAI 2023): depthwise k^3 convolution -> per-channel GroupNorm -> 1x1x1 expansion -> GELU -> 1x1x1 projection,
with a residual connection. :class:`ConvResBlock` is the two-convolution residual block used on the skip paths of
SwinUNETR-type networks (conv -> InstanceNorm -> LeakyReLU -> conv -> InstanceNorm, add, LeakyReLU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnyseg.network_architecture.building_blocks.layout import channels_last_on_cpu
from nnyseg.network_architecture.building_blocks.norms import InstanceNorm3dAnySize

__all__ = ["ConvResBlock", "MedNeXtBlock", "MedNeXtUpBlock"]


def _instance_norm(channels: int) -> nn.InstanceNorm3d:
    return InstanceNorm3dAnySize(channels, affine=True)


def _voxels(input_size: Sequence[int]) -> int:
    return math.prod(int(s) for s in input_size)


class MedNeXtBlock(nn.Module):
    """MedNeXt block: ``DWConv(k) -> GroupNorm(C) -> Conv1x1(C -> r*C) -> GELU -> Conv1x1(r*C -> C_out)`` + residual.

    The residual is the identity if ``in_channels == out_channels`` and a 1x1x1 convolution otherwise.

    Args:
        in_channels: Input channels C.
        out_channels: Output channels.
        exp_r: Expansion ratio r of the inverted bottleneck.
        kernel_size: Kernel size k of the depthwise convolution (odd).
        do_res: Whether to add the residual.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, exp_r: int = 4, kernel_size: int = 3, do_res: bool = True
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if exp_r < 1:
            raise ValueError(f"exp_r must be >= 1, got {exp_r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.exp_r = exp_r
        self.dw_conv = nn.Conv3d(in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels)
        self.norm = nn.GroupNorm(num_groups=in_channels, num_channels=in_channels)
        self.expand = nn.Conv3d(in_channels, exp_r * in_channels, 1)
        self.act = nn.GELU()
        self.project = nn.Conv3d(exp_r * in_channels, out_channels, 1)
        self.do_res = do_res
        self.res_conv = nn.Conv3d(in_channels, out_channels, 1) if do_res and in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``(B, C_in, D, H, W)`` to ``(B, C_out, D, H, W)``."""
        x = channels_last_on_cpu(x)
        out = self.project(self.act(self.expand(self.norm(self.dw_conv(x)))))
        if self.do_res:
            out = out + (x if self.res_conv is None else self.res_conv(x))
        return out

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Elements of the layer outputs for one sample (depthwise, norm, expansion twice, projection, residual)."""
        n = _voxels(input_size)
        total = n * (2 * self.in_channels + 2 * self.exp_r * self.in_channels + self.out_channels)
        if self.res_conv is not None:
            total += n * self.out_channels
        return total


class MedNeXtUpBlock(nn.Module):
    """MedNeXt up-sampling block: exactly doubles every spatial axis.

    The depthwise convolution is a ``ConvTranspose3d(k, stride=2, padding=k//2, groups=C)``, which yields ``2n - 1``
    voxels per axis; one voxel of zero padding at the start of each axis makes it ``2n``. The residual is a
    ``ConvTranspose3d(C_in -> C_out, kernel 1, stride 2)``, padded the same way.

    Args:
        in_channels: Input channels C.
        out_channels: Output channels.
        exp_r: Expansion ratio.
        kernel_size: Kernel size of the transposed depthwise convolution (odd).
        do_res: Whether to add the transposed 1x1x1 residual.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, exp_r: int = 4, kernel_size: int = 3, do_res: bool = True
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if exp_r < 1:
            raise ValueError(f"exp_r must be >= 1, got {exp_r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.exp_r = exp_r
        self.dw_conv = nn.ConvTranspose3d(
            in_channels, in_channels, kernel_size, stride=2, padding=kernel_size // 2, groups=in_channels
        )
        self.norm = nn.GroupNorm(num_groups=in_channels, num_channels=in_channels)
        self.expand = nn.Conv3d(in_channels, exp_r * in_channels, 1)
        self.act = nn.GELU()
        self.project = nn.Conv3d(exp_r * in_channels, out_channels, 1)
        self.res_conv = nn.ConvTranspose3d(in_channels, out_channels, 1, stride=2) if do_res else None

    @staticmethod
    def _pad_front(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (1, 0, 1, 0, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``(B, C_in, D, H, W)`` to ``(B, C_out, 2D, 2H, 2W)``."""
        x = channels_last_on_cpu(x)
        out = channels_last_on_cpu(self._pad_front(self.dw_conv(x)))
        out = self.project(self.act(self.expand(self.norm(out))))
        if self.res_conv is not None:
            out = out + self._pad_front(self.res_conv(x))
        return out

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Elements of the layer outputs for one sample, at the output resolution ``2 * input_size``."""
        n = _voxels(2 * int(s) for s in input_size)
        total = n * (2 * self.in_channels + 2 * self.exp_r * self.in_channels + self.out_channels)
        if self.res_conv is not None:
            total += n * self.out_channels
        return total


class ConvResBlock(nn.Module):
    """Residual block ``conv -> IN -> LReLU -> conv -> IN`` (+ projection) ``-> add -> LReLU`` at stride 1.

    If the channel count changes, the residual is a 1x1x1 convolution followed by InstanceNorm. Convolutions have no
    bias (each is followed by an affine InstanceNorm).

    The InstanceNorm also accepts a single-voxel map (the /32 bottleneck of a 32^3 patch), where ``nn.InstanceNorm3d``
    raises in training mode; the normalised value of a single voxel is 0, so the output there is the norm's bias.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size of the two convolutions (odd).
        negative_slope: Slope of the LeakyReLUs.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, kernel_size: int = 3, negative_slope: float = 0.01
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        pad = kernel_size // 2
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size, padding=pad, bias=False)
        self.norm1 = _instance_norm(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size, padding=pad, bias=False)
        self.norm2 = _instance_norm(out_channels)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)
        if in_channels != out_channels:
            self.res_conv = nn.Conv3d(in_channels, out_channels, 1, bias=False)
            self.res_norm = _instance_norm(out_channels)
        else:
            self.res_conv = None
            self.res_norm = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``(B, C_in, D, H, W)`` to ``(B, C_out, D, H, W)``."""
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        residual = x if self.res_conv is None else self.res_norm(self.res_conv(x))
        return self.act(out + residual)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Elements of the layer outputs for one sample (two conv/norm pairs, projection pair, sum)."""
        n = _voxels(input_size)
        return n * self.out_channels * (5 if self.res_conv is None else 7)
