"""Skip-fusion and refinement modules of DynTransNet's decoder.

Zheng S et al., "DynTransNet: Dynamic Transformer Network with multi-scale attention for liver cancer segmentation",
Front. Oncol. 15:1569083 (2025), sections 3.2.1 and 3.2.2:

* :class:`FeatureMixModule` (FM-M, Algorithm 2): an attention gate on the skip features, then concatenation with the
  decoder features and a 1x1x1 fusion convolution.
* :class:`ConcatFusion` and :class:`WeightedSumFusion`: the two alternatives of the paper's fusion ablation
  (Table 2, "simple concatenation" and "weighted sum").
* :class:`ResidualModule` (RM, Algorithm 3): two conv-IN-LeakyReLU blocks and an identity residual.

All modules take channels-first maps ``(B, C, D, H, W)``. In every fusion module ``d`` is the up-sampled decoder map
and ``e`` the encoder (skip) map of the same spatial size. Where nnyseg fills gaps of the paper (gate width, the
ablation modules' form): docs/dyntransnet.md, "Decoder: fusion and RM".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from nnyseg.network_architecture.building_blocks.norms import InstanceNorm3dAnySize

__all__ = [
    "FUSION_MODES",
    "ConcatFusion",
    "FeatureMixModule",
    "ResidualModule",
    "WeightedSumFusion",
    "make_fusion",
]

#: Accepted values of ``fusion``.
FUSION_MODES: tuple[str, ...] = ("fmm", "concat", "weighted_sum")


def _voxels(input_size: Sequence[int]) -> int:
    return math.prod(int(s) for s in input_size)


def _check_pair(d: torch.Tensor, e: torch.Tensor, c_d: int, c_e: int, name: str) -> None:
    if d.ndim != 5 or e.ndim != 5 or d.shape[1] != c_d or e.shape[1] != c_e or d.shape[2:] != e.shape[2:]:
        raise ValueError(
            f"{name} expects a decoder map (B, {c_d}, D, H, W) and an encoder map (B, {c_e}, D, H, W) of the same "
            f"size, got {tuple(d.shape)} and {tuple(e.shape)}"
        )


def _check_channels(**channels: int) -> None:
    for name, value in channels.items():
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")


class FeatureMixModule(nn.Module):
    """FM-M, exactly as Algorithm 2 of the paper.

    ``g = W_g d``, ``x = W_x e`` (1x1x1 convolutions with bias to ``inter_channels``);
    ``psi = sigmoid(W_psi ReLU(g + x))`` (one channel); ``e' = psi * e``; ``F = W_f concat(d, e')`` (1x1x1 with bias).
    No normalisation layers, as in the equations (MONAI's ``AttentionBlock`` has BatchNorms and a 3x3 merge).

    The gate can be inspected: :meth:`gate` computes it, and with ``record_gate = True`` every forward stores the
    last one (detached) in ``last_gate``.

    Args:
        decoder_channels: Channels C_d of the up-sampled decoder map.
        encoder_channels: Channels C_e of the skip map.
        out_channels: Output channels C; defaults to ``decoder_channels``.
        inter_channels: Width F_int of the gate; defaults to ``max(1, out_channels // 2)`` (MONAI's ``f_int``).
    """

    def __init__(
        self,
        decoder_channels: int,
        encoder_channels: int,
        out_channels: int | None = None,
        *,
        inter_channels: int | None = None,
    ) -> None:
        super().__init__()
        out_channels = decoder_channels if out_channels is None else out_channels
        inter_channels = max(1, out_channels // 2) if inter_channels is None else inter_channels
        _check_channels(
            decoder_channels=decoder_channels,
            encoder_channels=encoder_channels,
            out_channels=out_channels,
            inter_channels=inter_channels,
        )
        self.decoder_channels = decoder_channels
        self.encoder_channels = encoder_channels
        self.out_channels = out_channels
        self.inter_channels = inter_channels
        self.w_g = nn.Conv3d(decoder_channels, inter_channels, 1)
        self.w_x = nn.Conv3d(encoder_channels, inter_channels, 1)
        self.w_psi = nn.Conv3d(inter_channels, 1, 1)
        self.w_f = nn.Conv3d(decoder_channels + encoder_channels, out_channels, 1)
        self.record_gate = False
        self.last_gate: torch.Tensor | None = None

    def gate(self, d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The attention map ``psi = sigmoid(W_psi ReLU(W_g d + W_x e))`` of shape ``(B, 1, D, H, W)``, in [0, 1]."""
        _check_pair(d, e, self.decoder_channels, self.encoder_channels, type(self).__name__)
        return torch.sigmoid(self.w_psi(torch.relu(self.w_g(d) + self.w_x(e))))

    def forward(self, d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Fuses ``d`` (B, C_d, ...) and ``e`` (B, C_e, ...) into ``(B, C, ...)``."""
        psi = self.gate(d, e)
        if self.record_gate:
            self.last_gate = psi.detach()
        return self.w_f(torch.cat((d, psi * e), dim=1))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Elements of the layer outputs for one sample (g, x, sum, ReLU, gate logit and gate, e', concat, out)."""
        per_voxel = 4 * self.inter_channels + 2 + self.encoder_channels
        per_voxel += self.decoder_channels + self.encoder_channels + self.out_channels
        return _voxels(input_size) * per_voxel


class ConcatFusion(nn.Module):
    """Fusion by concatenation: ``F = W_f concat(d, e)`` with a 1x1x1 convolution (with bias).

    This is FM-M without its gate (the paper's "simple concatenation" row of Table 2).

    Args:
        decoder_channels: Channels C_d of the up-sampled decoder map.
        encoder_channels: Channels C_e of the skip map.
        out_channels: Output channels C; defaults to ``decoder_channels``.
    """

    def __init__(self, decoder_channels: int, encoder_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = decoder_channels if out_channels is None else out_channels
        _check_channels(decoder_channels=decoder_channels, encoder_channels=encoder_channels, out_channels=out_channels)
        self.decoder_channels = decoder_channels
        self.encoder_channels = encoder_channels
        self.out_channels = out_channels
        self.w_f = nn.Conv3d(decoder_channels + encoder_channels, out_channels, 1)

    def forward(self, d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Fuses ``d`` (B, C_d, ...) and ``e`` (B, C_e, ...) into ``(B, C, ...)``."""
        _check_pair(d, e, self.decoder_channels, self.encoder_channels, type(self).__name__)
        return self.w_f(torch.cat((d, e), dim=1))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Elements of the concatenation and the output for one sample."""
        return _voxels(input_size) * (self.decoder_channels + self.encoder_channels + self.out_channels)


class WeightedSumFusion(nn.Module):
    """Fusion by a learned convex combination: ``F = a_d d + a_e e`` with ``(a_d, a_e) = softmax(l_d, l_e)``.

    Our reading of the paper's "weighted sum" row of Table 2 (the paper gives no formula): two learned scalar logits,
    initialised to 0 so the module starts as the mean of both inputs; the softmax keeps the weights positive and
    summing to 1, so the scale of the output stays that of its inputs. A 1x1x1 convolution (with bias) maps an input
    to ``out_channels`` only where its channel count differs (in DynTransNet all three counts are equal, so the
    module has just the two logits). The decoder's residual module does the spatial mixing afterwards.

    Args:
        decoder_channels: Channels C_d of the up-sampled decoder map.
        encoder_channels: Channels C_e of the skip map.
        out_channels: Output channels C; defaults to ``decoder_channels``.
    """

    def __init__(self, decoder_channels: int, encoder_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = decoder_channels if out_channels is None else out_channels
        _check_channels(decoder_channels=decoder_channels, encoder_channels=encoder_channels, out_channels=out_channels)
        self.decoder_channels = decoder_channels
        self.encoder_channels = encoder_channels
        self.out_channels = out_channels
        self.logits = nn.Parameter(torch.zeros(2))
        self.proj_d = nn.Conv3d(decoder_channels, out_channels, 1) if decoder_channels != out_channels else None
        self.proj_e = nn.Conv3d(encoder_channels, out_channels, 1) if encoder_channels != out_channels else None

    @property
    def weights(self) -> torch.Tensor:
        """The two fusion weights ``(a_d, a_e)``, positive and summing to 1."""
        return torch.softmax(self.logits, dim=0)

    def forward(self, d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Fuses ``d`` (B, C_d, ...) and ``e`` (B, C_e, ...) into ``(B, C, ...)``."""
        _check_pair(d, e, self.decoder_channels, self.encoder_channels, type(self).__name__)
        if self.proj_d is not None:
            d = self.proj_d(d)
        if self.proj_e is not None:
            e = self.proj_e(e)
        a = self.weights.to(d.dtype)
        return a[0] * d + a[1] * e

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Elements of the projections (if any), the two weighted maps and the sum for one sample."""
        projected = sum(p.out_channels for p in (self.proj_d, self.proj_e) if p is not None)
        return _voxels(input_size) * (projected + 3 * self.out_channels)


class ResidualModule(nn.Module):
    """RM, exactly as Algorithm 3 of the paper: ``F = X + LReLU(IN(Conv3(LReLU(IN(Conv3(X) + b1))) + b2))``.

    Both convolutions are 3x3x3 with bias, the instance norms are affine, the LeakyReLU slope is 0.01 (the paper does
    not give it; 0.01 is nnU-Net's and MONAI's default). The activation comes before the addition and there is none
    after it. Input and output channels are equal. A map with a single voxel (the /32 bottleneck of a 32^3 patch) is
    accepted: its instance-normalised value is 0.

    With both convolutions zeroed (weights and biases) the module is exactly the identity: the instance norm of a
    zero map is 0 (its affine bias starts at 0) and ``LReLU(0) = 0``.

    Args:
        channels: Channels C of input and output.
        negative_slope: Slope of the LeakyReLUs.
    """

    def __init__(self, channels: int, *, negative_slope: float = 0.01) -> None:
        super().__init__()
        _check_channels(channels=channels)
        self.channels = channels
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm1 = InstanceNorm3dAnySize(channels, affine=True)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2 = InstanceNorm3dAnySize(channels, affine=True)
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``(B, C, D, H, W)`` to the same shape."""
        if x.ndim != 5 or x.shape[1] != self.channels:
            raise ValueError(f"ResidualModule expects (B, {self.channels}, D, H, W), got {tuple(x.shape)}")
        y = self.act(self.norm1(self.conv1(x)))
        y = self.act(self.norm2(self.conv2(y)))
        return x + y

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Elements of the layer outputs for one sample (2 x (conv, norm, activation) and the sum)."""
        return _voxels(input_size) * self.channels * 7


def make_fusion(mode: str, decoder_channels: int, encoder_channels: int, out_channels: int) -> nn.Module:
    """Builds the fusion module for ``fusion`` = ``"fmm"``, ``"concat"`` or ``"weighted_sum"``.

    Raises:
        ValueError: For an unknown mode.
    """
    if mode == "fmm":
        return FeatureMixModule(decoder_channels, encoder_channels, out_channels)
    if mode == "concat":
        return ConcatFusion(decoder_channels, encoder_channels, out_channels)
    if mode == "weighted_sum":
        return WeightedSumFusion(decoder_channels, encoder_channels, out_channels)
    raise ValueError(f"fusion must be one of {FUSION_MODES}, got {mode!r}")
