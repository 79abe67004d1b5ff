"""Multi-scale convolutional attention (MSCA) and the SegNeXt block around it, in 3D.

``MSCAttention`` computes ``Conv_1(a + a_7 + a_11 + a_21) * u`` with a depthwise 5-kernel ``a = DW_5(u)`` and depthwise
strip convolutions ``a_k`` of length k applied to ``a``. Two 3D readings are offered:

- ``mode="slice2d"`` (default): in-plane 2D kernels on every slice, i.e. 3D convs with kernels ``(1, 5, 5)``,
  ``(1, 1, k)`` and ``(1, k, 1)``. This is the ELANRes-MSCA-UNet paper's "3D-to-2D transformation"; the first spatial
  axis is nnU-Net's through-plane axis for axial CT. Through-plane context comes from the surrounding 3D convs.
- ``mode="strip3d"``: a depthwise ``5x5x5`` and, per k, strips along all three axes ``(1,1,k) -> (1,k,1) -> (k,1,1)``.

See docs/elanres_msca.md, "MSCA block", for which of these the paper states.

``MSCABlock`` is SegNeXt's ``Block``: ``y = x + ls1 * DropPath(SA(N1(x)))`` with
``SA(u) = P2(MSCA(GELU(P1(u)))) + u``, then ``z = y + ls2 * DropPath(MLP(N2(y)))`` with a depthwise conv inside the MLP.

References:
    Guo M.-H. et al., "SegNeXt: Rethinking Convolutional Attention Design for Semantic Segmentation", NeurIPS 2022
    (``mmseg/models/backbones/mscan.py``).
    Song Z., Wu W., Wu S., "Multi-Scale Convolutional Attention and Structural Re-Parameterized Residual-Based 3D U-Net
    for Liver and Liver Tumor Segmentation from CT", Sensors 25(6):1814, 2025.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.layers import DropPath
from torch import nn

from nnyseg.network_architecture.building_blocks.layout import channels_last_on_cpu
from nnyseg.network_architecture.building_blocks.reparam import to_tuple

__all__ = ["MSCA_MODES", "MSCABlock", "MSCAttention"]

MSCA_MODES = ("slice2d", "strip3d")


def _depthwise(channels: int, kernel_size: Sequence[int]) -> nn.Conv3d:
    """Depthwise 3D convolution with "same" padding and a bias (as in SegNeXt)."""
    return nn.Conv3d(
        channels, channels, tuple(kernel_size), padding=tuple(k // 2 for k in kernel_size), groups=channels
    )


class MSCAttention(nn.Module):
    """Multi-scale convolutional attention: a gating map from depthwise multi-scale convs, multiplied with the input.

    Args:
        channels: Input and output channels.
        mode: ``"slice2d"`` (per-slice in-plane kernels) or ``"strip3d"`` (kernels along all three axes).
        square_kernel: Size of the first depthwise kernel (5 in SegNeXt).
        strip_kernels: Lengths of the strip convolutions (7, 11, 21 in SegNeXt); each must be odd.

    Raises:
        ValueError: For an unknown mode or even kernel lengths.
    """

    def __init__(
        self,
        channels: int,
        *,
        mode: str = "slice2d",
        square_kernel: int = 5,
        strip_kernels: Sequence[int] = (7, 11, 21),
    ) -> None:
        super().__init__()
        if mode not in MSCA_MODES:
            raise ValueError(f"mode must be one of {MSCA_MODES}, got {mode!r}")
        if any(k % 2 == 0 for k in (square_kernel, *strip_kernels)):
            raise ValueError(f"MSCA kernels must be odd, got {square_kernel} and {tuple(strip_kernels)}")
        self.mode = mode
        if mode == "slice2d":
            self.conv0 = _depthwise(channels, (1, square_kernel, square_kernel))
            strip_shapes = [((1, 1, k), (1, k, 1)) for k in strip_kernels]
        else:
            self.conv0 = _depthwise(channels, (square_kernel,) * 3)
            strip_shapes = [((1, 1, k), (1, k, 1), (k, 1, 1)) for k in strip_kernels]
        self.strips = nn.ModuleList(
            nn.Sequential(*(_depthwise(channels, shape) for shape in shapes)) for shapes in strip_shapes
        )
        self.mix = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.conv0(x)
        summed = attn
        for strip in self.strips:
            summed = summed + strip(attn)
        return self.mix(summed) * x

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements, one map per convolution (``input_size`` excludes batch and channels)."""
        n_convs = 2 + sum(len(strip) for strip in self.strips)
        return n_convs * self.mix.out_channels * math.prod(input_size)


class MSCABlock(nn.Module):
    """SegNeXt block: norm -> spatial attention with MSCA (+ shortcut) and norm -> MLP, each with layer scale.

    Args:
        channels: Input and output channels.
        mode: MSCA mode, ``"slice2d"`` or ``"strip3d"``.
        mlp_ratio: Hidden width of the MLP relative to ``channels``.
        mlp_kernel_size: Kernel of the depthwise conv inside the MLP (an int or three ints, each odd); pass the
            stage's plans kernel to respect anisotropy.
        drop_path: Stochastic-depth probability of both residual branches.
        layer_scale_init: Initial value of the per-channel layer scales.
        norm_op: Norm class (BatchNorm3d as in SegNeXt, or e.g. InstanceNorm3d).
        norm_op_kwargs: Keyword arguments of ``norm_op``.
    """

    def __init__(
        self,
        channels: int,
        *,
        mode: str = "slice2d",
        mlp_ratio: float = 4.0,
        mlp_kernel_size: int | Sequence[int] = 3,
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-2,
        norm_op: type[nn.Module] = nn.BatchNorm3d,
        norm_op_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        mlp_kernel_size = to_tuple(mlp_kernel_size, 3, "mlp_kernel_size")
        if any(k % 2 == 0 for k in mlp_kernel_size):
            raise ValueError(f"mlp_kernel_size must be odd, got {mlp_kernel_size}")
        hidden = max(1, round(channels * mlp_ratio))
        norm_op_kwargs = norm_op_kwargs or {}
        self.channels = channels
        self.hidden_channels = hidden

        self.norm1 = norm_op(channels, **norm_op_kwargs)
        self.proj1 = nn.Conv3d(channels, channels, 1)
        self.act1 = nn.GELU()
        self.msca = MSCAttention(channels, mode=mode)
        self.proj2 = nn.Conv3d(channels, channels, 1)
        self.layer_scale1 = nn.Parameter(torch.full((channels,), float(layer_scale_init)))

        self.norm2 = norm_op(channels, **norm_op_kwargs)
        self.fc1 = nn.Conv3d(channels, hidden, 1)
        self.dwconv = _depthwise(hidden, mlp_kernel_size)
        self.act2 = nn.GELU()
        self.fc2 = nn.Conv3d(hidden, channels, 1)
        self.layer_scale2 = nn.Parameter(torch.full((channels,), float(layer_scale_init)))

        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def spatial_attention(self, u: torch.Tensor) -> torch.Tensor:
        """``P2(MSCA(GELU(P1(u)))) + u``."""
        return self.proj2(self.msca(self.act1(self.proj1(u)))) + u

    def mlp(self, u: torch.Tensor) -> torch.Tensor:
        """``fc2(GELU(DW(fc1(u))))``."""
        return self.fc2(self.act2(self.dwconv(self.fc1(u))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = channels_last_on_cpu(x)
        scale_shape = (1, -1) + (1,) * (x.ndim - 2)
        x = x + self.drop_path(self.layer_scale1.view(scale_shape) * self.spatial_attention(self.norm1(x)))
        x = x + self.drop_path(self.layer_scale2.view(scale_shape) * self.mlp(self.norm2(x)))
        return x.contiguous()  # back to NCDHW: the full convolutions of the ELAN blocks around are faster in it

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements, one map per convolution (``input_size`` excludes batch and channels)."""
        voxels = math.prod(input_size)
        return (
            self.msca.compute_conv_feature_map_size(input_size)
            + 3 * self.channels * voxels  # proj1, proj2, fc2
            + 2 * self.hidden_channels * voxels  # fc1, dwconv
        )
