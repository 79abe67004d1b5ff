"""ELANRes block: YOLOv7's ELAN aggregation with re-parameterisable convolutions and a residual connection.

For an input with C_in channels, output C_out and width c = C_out // 2:

- ``a = CNA_1(x)``, ``b = CNA_1(x)`` (1x1 conv-norm-act, C_in -> c each);
- ``r_1 = RepConv(b)``, ``r_i = RepConv(r_{i-1})`` for i = 2..depth (k-sized, c -> c; depth 2 by default, 4 as in
  YOLOv7's four-conv ELAN);
- ``y = CNA_1(cat[a, b, r_1, ..., r_depth])`` ((2 + depth) c -> C_out);
- ``out = y + shortcut(x)``, the shortcut being the identity if C_in == C_out, else a 1x1 conv + norm.

The norm of ``y`` starts with weight 0 (``zero_init_residual``), so a fresh block is its shortcut: without it every
block's output variance roughly doubles in eval mode while BatchNorm still holds its initial running statistics,
and a briefly trained network's logits overflow nnU-Net's float16 prediction buffer (docs/elanres_msca.md).

References:
    Wang C.-Y. et al., "YOLOv7", CVPR 2023 (ELAN, ``cfg/training/yolov7.yaml``).
    Song Z., Wu W., Wu S., Sensors 25(6):1814, 2025 (ELANResBlock).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnyseg.network_architecture.building_blocks.reparam import ConvNormAct, RepConv, conv_dim, to_tuple

__all__ = ["ELANResBlock"]


class ELANResBlock(nn.Module):
    """ELAN aggregation of a RepConv chain with a residual connection.

    Args:
        in_channels: Input channels.
        out_channels: Output channels (at least 2).
        kernel_size: Kernel of the chained convolutions (an int or one odd entry per axis, e.g. ``(1, 3, 3)``).
        conv_op: Convolution class; it fixes the spatial dimension.
        norm_op: Norm class. BatchNorm lets the RepConvs fold completely at deploy time.
        norm_op_kwargs: Keyword arguments of ``norm_op``.
        nonlin: Nonlinearity class.
        nonlin_kwargs: Keyword arguments of ``nonlin``.
        repconv: If True the chain uses ``RepConv``; if False plain k-sized conv-norm-act.
        repconv_depth: Length of the chain (1 or more; 2 by default, 4 for YOLOv7's ELAN).
        hidden_channels: Width c of the branches; ``None`` gives ``out_channels // 2``.
        zero_init_residual: Start the aggregation's norm weight at 0, so the block starts as its shortcut
            (Goyal et al. 2017); re-applied by :meth:`reset_residual_branch`.

    Raises:
        ValueError: For non-positive channel counts or depth.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        *,
        conv_op: type[_ConvNd] = nn.Conv3d,
        norm_op: type[nn.Module] | None = nn.BatchNorm3d,
        norm_op_kwargs: dict | None = None,
        nonlin: type[nn.Module] | None = nn.LeakyReLU,
        nonlin_kwargs: dict | None = None,
        repconv: bool = True,
        repconv_depth: int = 2,
        hidden_channels: int | None = None,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 2:
            raise ValueError(f"need in_channels >= 1 and out_channels >= 2, got {in_channels} and {out_channels}")
        if repconv_depth < 1:
            raise ValueError(f"repconv_depth must be >= 1, got {repconv_depth}")
        width = out_channels // 2 if hidden_channels is None else hidden_channels
        if width < 1:
            raise ValueError(f"hidden_channels must be >= 1, got {width}")
        kernel_size = to_tuple(kernel_size, conv_dim(conv_op), "kernel_size")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hidden_channels = width

        ops = dict(
            conv_op=conv_op, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs
        )
        self.branch_a = ConvNormAct(in_channels, width, 1, **ops)
        self.branch_b = ConvNormAct(in_channels, width, 1, **ops)
        if repconv:
            chain = [RepConv(width, width, kernel_size, **ops) for _ in range(repconv_depth)]
        else:
            chain = [ConvNormAct(width, width, kernel_size, **ops) for _ in range(repconv_depth)]
        self.chain = nn.ModuleList(chain)
        self.fuse = ConvNormAct((2 + repconv_depth) * width, out_channels, 1, **ops)
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            shortcut_ops = dict(ops, nonlin=None)
            self.shortcut = ConvNormAct(in_channels, out_channels, 1, **shortcut_ops)
        self.zero_init_residual = zero_init_residual
        self.reset_residual_branch()

    def reset_residual_branch(self) -> None:
        """Zeroes the aggregation's norm weight when ``zero_init_residual`` (for network-wide re-initialisation)."""
        norm = self.fuse.norm
        if self.zero_init_residual and norm is not None and getattr(norm, "weight", None) is not None:
            nn.init.zeros_(norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.branch_a(x), self.branch_b(x)]
        for conv in self.chain:
            features.append(conv(features[-1]))
        return self.fuse(torch.cat(features, dim=1)) + self.shortcut(x)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements, one map per convolution (train-time RepConv branches each count)."""
        total = self.branch_a.compute_conv_feature_map_size(input_size)
        total += self.branch_b.compute_conv_feature_map_size(input_size)
        total += sum(conv.compute_conv_feature_map_size(input_size) for conv in self.chain)
        total += self.fuse.compute_conv_feature_map_size(input_size)
        if isinstance(self.shortcut, ConvNormAct):
            total += self.shortcut.compute_conv_feature_map_size(input_size)
        return total
