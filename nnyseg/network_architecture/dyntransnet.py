"""DynTransNet: a Swin (or ViT) encoder with dynamic-bias attention and an FM-M + RM decoder, for nnU-Net v2.

Zheng S, Sagar ASMS, Chen Y, Yu Z, Ying S, Zeng Y. "DynTransNet: Dynamic Transformer Network with multi-scale
attention for liver cancer segmentation", Front. Oncol. 15:1569083 (2025), doi:10.3389/fonc.2025.1569083. The paper
leaves widths, depths, patch size and the shape of its dynamic bias open; docs/dyntransnet.md separates what the
paper states from what nnyseg chose, and lists every switch.

Option A, ``encoder="swin"`` (default): a SwinUNETR-style hierarchy (stride-2 patch embedding, four stages of
(shifted-)window attention, patch merging) whose attention adds the D-MSA bias
(:mod:`~nnyseg.network_architecture.building_blocks.dmsa`) to the relative-position bias. Skips
``E0 = RM(conv3-IN-LReLU(x))`` @/1, ``E1..E3 = RM(h0..h2)``, ``E4 = h3`` @/16 and the bottleneck ``B = RM(h4)`` @/32;
five decoder stages (/16, /8, /4, /2, /1), each ``ConvTranspose3d(k=2, s=2) -> fusion(D, E_l) -> RM``, with channels
8F, 4F, 2F, F, F and a 1x1x1 head per stage. Plans: ``strides = [[1,1,1]] + 5 x [[2,2,2]]``, every patch axis a
multiple of 32.

Option B, ``encoder="vit"``: the literal Algorithm 1 / UNETR reading. A ViT with patch p (16), a learnable positional
embedding and global D-MSA; skips from layers ``z_{L/4}, z_{L/2}, z_{3L/4}`` (z3, z6, z9 for L = 12) are reshaped and
up-sampled with transposed-convolution stacks to /2, /4, /8, ``z_L`` is the bottleneck at /p and the input gives E0
at /1 (as in MONAI's UNETR). The same decoder follows, with log2(p) stages (4 for p = 16), so the plans carry
``strides = [[1,1,1]] + log2(p) x [[2,2,2]]`` and the input must have exactly ``vit_img_size``.

Ablation switches. Each row of the paper's Tables 2 and 3 is one setting of three constructor arguments (all other
arguments at their defaults); :data:`PAPER_ABLATIONS` holds the same table:

================================================  ===========  ================  ===============
paper row                                          dmsa_bias    fusion            residual_module
================================================  ===========  ================  ===============
Table 3 baseline                                   "none"       "concat"          False
Table 3 +D-MSA                                     "key"        "concat"          False
Table 3 +FM-M                                      "none"       "fmm"             False
Table 3 +RM                                        "none"       "concat"          True
Table 3 +D-MSA +FM-M                               "key"        "fmm"             False
Table 3 +D-MSA +RM                                 "key"        "concat"          True
Table 3 +FM-M +RM                                  "none"       "fmm"             True
Table 3 full = Table 2 "FM-M (proposed)"           "key"        "fmm"             True
Table 2 "simple concatenation"                     "key"        "concat"          True
Table 2 "weighted sum"                             "key"        "weighted_sum"    True
================================================  ===========  ================  ===============

``residual_module=False`` replaces every RM by the identity; the stem convolution of E0 (which changes the channel
count) stays. ``dmsa_bias="dense"`` selects the literal N x N reading of the bias instead of the key-saliency one.
The paper's baseline is not described; "Swin encoder without D-MSA, concatenation fusion, no RM" is nnyseg's
reading (docs/dyntransnet.md, "The paper's ablation rows as settings", also lists the paper's reported Dice per row).

nnU-Net builds the network from the plans with
``network_class_name = "nnyseg.network_architecture.dyntransnet.DynTransNet"``; its planner is
:class:`nnyseg.planning.planners.DynTransNetPlanner`. The network returns logits (no sigmoid or softmax).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnyseg.network_architecture.building_blocks.checks import check_network_input
from nnyseg.network_architecture.building_blocks.decoding import decode_with_deep_supervision
from nnyseg.network_architecture.building_blocks.dmsa import (
    DMSA_MODES,
    DenseSynthesizerBias,
    KeySaliencyBias,
    make_dmsa_bias_factory,
)
from nnyseg.network_architecture.building_blocks.fusion import (
    FUSION_MODES,
    ResidualModule,
    WeightedSumFusion,
    make_fusion,
)
from nnyseg.network_architecture.building_blocks.init import init_transformer_unet_weights
from nnyseg.network_architecture.building_blocks.norms import InstanceNorm3dAnySize
from nnyseg.network_architecture.building_blocks.swin import (
    FIXED_STRIDES,
    PatchEmbed3d,
    SwinBlock3d,
    SwinUNETREncoder,
    extra_bias_elements,
)

__all__ = [
    "ENCODERS",
    "FIXED_STRIDES",
    "PAPER_ABLATIONS",
    "DynTransDecoder",
    "DynTransNet",
    "DynTransViTEncoder",
    "vit_strides",
]

#: Every spatial axis of a Swin-encoder input must be divisible by this (2 ** 5).
SWIN_SIZE_DIVISOR = 32
#: Number of Swin stages (fixed by FIXED_STRIDES).
SWIN_STAGES = 4
#: Accepted values of ``encoder``.
ENCODERS: tuple[str, ...] = ("swin", "vit")

#: The paper's ablation rows (Tables 2 and 3) as constructor arguments; see the module docstring.
PAPER_ABLATIONS: dict[str, dict[str, Any]] = {
    "baseline": {"dmsa_bias": "none", "fusion": "concat", "residual_module": False},
    "dmsa": {"dmsa_bias": "key", "fusion": "concat", "residual_module": False},
    "fmm": {"dmsa_bias": "none", "fusion": "fmm", "residual_module": False},
    "rm": {"dmsa_bias": "none", "fusion": "concat", "residual_module": True},
    "dmsa_fmm": {"dmsa_bias": "key", "fusion": "fmm", "residual_module": False},
    "dmsa_rm": {"dmsa_bias": "key", "fusion": "concat", "residual_module": True},
    "fmm_rm": {"dmsa_bias": "none", "fusion": "fmm", "residual_module": True},
    "full": {"dmsa_bias": "key", "fusion": "fmm", "residual_module": True},
    "fusion_concat": {"dmsa_bias": "key", "fusion": "concat", "residual_module": True},
    "fusion_weighted_sum": {"dmsa_bias": "key", "fusion": "weighted_sum", "residual_module": True},
}


def vit_strides(patch_size: int) -> list[list[int]]:
    """nnU-Net strides of the ViT option: ``[[1,1,1]] + log2(patch_size) x [[2,2,2]]``."""
    return [[1, 1, 1]] + [[2, 2, 2] for _ in range(_log2(patch_size, "vit_patch_size"))]


def _log2(value: int, name: str) -> int:
    value = int(value)
    if value < 2 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 2, got {value}")
    return value.bit_length() - 1


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    out = (int(value),) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != 3 or any(v < 1 for v in out):
        raise ValueError(f"{name} must be a positive int or 3 positive ints, got {value!r}")
    return out  # type: ignore[return-value]


def _voxels(size: Sequence[int]) -> int:
    return math.prod(int(s) for s in size)


def _maybe_checkpoint(fn: Callable[..., torch.Tensor], *args: torch.Tensor, enabled: bool) -> torch.Tensor:
    if enabled and torch.is_grad_enabled() and not isinstance(fn, nn.Identity):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _residual(channels: int, enabled: bool) -> nn.Module:
    """An RM, or the identity for the "RM off" ablation."""
    return ResidualModule(channels) if enabled else nn.Identity()


def _feature_map_size(module: nn.Module, size: Sequence[int]) -> int:
    """``module.compute_conv_feature_map_size(size)``; 0 for the identity."""
    return 0 if isinstance(module, nn.Identity) else module.compute_conv_feature_map_size(size)


class _ConvNormAct(nn.Module):
    """``Conv3d(k=3, no bias) -> InstanceNorm(affine) -> LeakyReLU(0.01)``: the stem that gives E0 its channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = InstanceNorm3dAnySize(out_channels, affine=True)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        return 3 * self.out_channels * _voxels(input_size)


class DynTransViTEncoder(nn.Module):
    """Option B: UNETR-style ViT encoder with global D-MSA (the literal Algorithm 1 reading).

    Patch embedding ``Conv3d(k = s = p)`` (the paper's ``E = X' W_e + b_e``), a learnable 1D positional embedding,
    ``depth`` pre-LN transformer blocks with global D-MSA (a :class:`SwinBlock3d` whose single window is the whole
    token grid, without relative-position bias) and a final LayerNorm. With ``k = log2(p)`` levels, ``forward``
    returns ``k + 1`` maps, highest resolution first:

    * ``E0 = RM(conv3-IN-LReLU(x))``, F@/1;
    * ``E_i`` for ``i = 1 .. k-1``: the output of layer ``depth * i // k`` (z3, z6, z9 for depth 12, p = 16), reshaped
      and up-sampled to /2^i by ``ConvTranspose3d(dim -> C_i)`` followed by ``k - i - 1`` times
      ``[ConvTranspose3d(C_i -> C_i), RM(C_i)]`` (MONAI's ``UnetrPrUpBlock``), ``C_i = F * 2**i``;
    * the bottleneck: the normalised last layer ``z_L`` reshaped, ``dim`` channels @/p (as in UNETR; no RM, which at
      768 channels would add 32 M parameters).

    Encoder contract: ``output_channels = [F, 2F, ..., F * 2**(k-1), dim]``, ``strides = [[1,1,1]] + k x [[2,2,2]]``.

    Args:
        input_channels: Channels of the input image.
        img_size: The one input size the encoder accepts (each axis a multiple of ``patch_size``).
        patch_size: ViT patch size p (a power of two).
        feature_size: Feature size F of the skip maps.
        dim: Token channels.
        depth: Transformer layers (at least ``log2(p)``).
        num_heads: Attention heads; must divide ``dim``.
        mlp_ratio: MLP width relative to ``dim``.
        dmsa_bias: ``"key"``, ``"dense"`` (N = number of patches) or ``"none"``.
        residual_module: Whether to use the RMs (False: identities).
        drop_path_rate: Largest stochastic-depth rate (linear over the layers).
        use_checkpoint: Gradient checkpointing for every transformer block and RM.
    """

    def __init__(
        self,
        input_channels: int,
        *,
        img_size: Sequence[int],
        patch_size: int = 16,
        feature_size: int = 48,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        dmsa_bias: str = "key",
        residual_module: bool = True,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        levels = _log2(patch_size, "vit_patch_size")
        self.img_size = _triple(img_size, "vit_img_size")
        if any(s % patch_size for s in self.img_size):
            raise ValueError(f"vit_img_size {self.img_size} must be a multiple of vit_patch_size {patch_size}")
        if depth < levels:
            raise ValueError(f"vit_depth must be >= log2(vit_patch_size) = {levels} (one layer per skip), got {depth}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"vit_heads ({num_heads}) must be positive and divide vit_dim ({dim})")
        self.patch_size = patch_size
        self.dim = dim
        self.grid = tuple(s // patch_size for s in self.img_size)
        self.num_tokens = math.prod(self.grid)
        self.use_checkpoint = use_checkpoint
        self.patch_embed = PatchEmbed3d(input_channels, dim, patch_size=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        trunc_normal_(self.pos_embed, std=0.02)
        factory = make_dmsa_bias_factory(dmsa_bias, window_tokens=self.num_tokens)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            SwinBlock3d(
                dim,
                num_heads,
                window_size=self.grid,
                shift_size=0,
                mlp_ratio=mlp_ratio,
                drop_path=rates[i],
                rel_pos_bias=False,
                extra_bias=None if factory is None else factory(dim, num_heads),
                use_checkpoint=use_checkpoint,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        #: 1-based transformer layer feeding skip level i = 1 .. k-1 (z3, z6, z9 for depth 12 and k = 4).
        self.skip_layers = [depth * i // levels for i in range(1, levels)]
        self.stem = _ConvNormAct(input_channels, feature_size)
        self.stem_block = _residual(feature_size, residual_module)
        self.skip_ups = nn.ModuleList()
        for i in range(1, levels):
            c = feature_size * 2**i
            ops: list[nn.Module] = [nn.ConvTranspose3d(dim, c, kernel_size=2, stride=2)]
            for _ in range(levels - i - 1):
                ops.append(nn.ConvTranspose3d(c, c, kernel_size=2, stride=2))
                if residual_module:
                    ops.append(ResidualModule(c))
            self.skip_ups.append(nn.Sequential(*ops))
        self.output_channels = [feature_size * 2**i for i in range(levels)] + [dim]
        self.strides = vit_strides(patch_size)
        self.conv_op = nn.Conv3d

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Maps ``(B, C_in, *img_size)`` to ``[E0, E1, ..., E_{k-1}, z_L]`` (see the class docstring)."""
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"the ViT encoder was built for inputs of size {self.img_size}, got {tuple(x.shape)}")
        tokens = self.patch_embed(x).permute(0, 2, 3, 4, 1)  # (B, g0, g1, g2, dim), channels-last
        tokens = tokens + self.pos_embed.view(1, *self.grid, self.dim)
        hidden: dict[int, torch.Tensor] = {}
        for layer, block in enumerate(self.blocks, start=1):
            tokens = block(tokens)
            if layer in self.skip_layers:
                hidden[layer] = tokens
        ckpt = self.use_checkpoint
        skips = [_maybe_checkpoint(self.stem_block, self.stem(x), enabled=ckpt)]
        for layer, up in zip(self.skip_layers, self.skip_ups, strict=True):
            skips.append(_maybe_checkpoint(up, hidden[layer].permute(0, 4, 1, 2, 3).contiguous(), enabled=ckpt))
        skips.append(self.norm(tokens).permute(0, 4, 1, 2, 3).contiguous())
        return skips

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Memory-proportional element count for one sample (attention matrices and D-MSA biases included)."""
        size = [int(s) for s in input_size]
        grid = [math.ceil(s / self.patch_size) for s in size]
        tokens = _voxels(grid)
        total = self.patch_embed.compute_conv_feature_map_size(size) + 2 * tokens * self.dim  # + pos, final norm
        for block in self.blocks:
            total += block.compute_conv_feature_map_size(grid) + extra_bias_elements(block, grid)
        total += self.stem.compute_conv_feature_map_size(size) + _feature_map_size(self.stem_block, size)
        for up in self.skip_ups:
            level_grid = grid
            for op in up:
                if isinstance(op, nn.ConvTranspose3d):
                    level_grid = [2 * s for s in level_grid]
                    total += op.out_channels * _voxels(level_grid)
                else:
                    total += op.compute_conv_feature_map_size(level_grid)
        return total


class _DecoderStage(nn.Module):
    """``ConvTranspose3d(k = s = stride)`` -> fusion with the skip -> RM (or identity)."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: Sequence[int], *, fusion: str, residual_module: bool
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = [int(s) for s in stride]
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=self.stride, stride=self.stride)
        self.fuse = make_fusion(fusion, out_channels, out_channels, out_channels)
        self.refine = _residual(out_channels, residual_module)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.refine(self.fuse(self.up(x), skip))

    def compute_conv_feature_map_size(self, output_size: Sequence[int]) -> int:
        up = self.out_channels * _voxels(output_size)
        return up + self.fuse.compute_conv_feature_map_size(output_size) + _feature_map_size(self.refine, output_size)


class DynTransDecoder(nn.Module):
    """FM-M + RM decoder, built from an encoder's ``output_channels`` and ``strides``.

    Stage ``s`` (deepest first) up-samples ``output_channels[-(s+1)]`` to ``output_channels[-(s+2)]`` channels with a
    transposed convolution (kernel = stride = the encoder's stride), fuses the result D with the skip E of that level
    (``fusion``) and refines it with an RM. Every stage has a 1x1x1 segmentation head; all heads are always built so
    that checkpoints load with and without deep supervision.

    ``forward`` returns, with ``deep_supervision`` True, the logits of all stages highest resolution first, otherwise
    only the full-resolution logits. No softmax or sigmoid.

    Args:
        encoder: Object exposing ``output_channels`` and ``strides``.
        num_classes: Output channels of the heads.
        deep_supervision: Initial deep-supervision switch (nnU-Net toggles ``decoder.deep_supervision``).
        fusion: ``"fmm"``, ``"concat"`` or ``"weighted_sum"``.
        residual_module: Whether each stage ends in an RM (False: identity).
        use_checkpoint: Gradient checkpointing per stage.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        deep_supervision: bool,
        *,
        fusion: str = "fmm",
        residual_module: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {fusion!r}")
        channels = [int(c) for c in encoder.output_channels]
        strides = [[int(v) for v in s] for s in encoder.strides]
        if len(strides) != len(channels):
            raise ValueError(f"encoder has {len(channels)} output maps but {len(strides)} strides")
        self.deep_supervision = deep_supervision
        self.use_checkpoint = use_checkpoint
        self.num_classes = num_classes
        self.strides = strides
        self.stages = nn.ModuleList()
        self.seg_layers = nn.ModuleList()
        n_stages = len(channels) - 1
        for s in range(n_stages):
            c_in, c_out = channels[-(s + 1)], channels[-(s + 2)]
            self.stages.append(
                _DecoderStage(c_in, c_out, strides[-(s + 1)], fusion=fusion, residual_module=residual_module)
            )
            self.seg_layers.append(nn.Conv3d(c_out, num_classes, 1))

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Decodes ``skips`` (highest resolution first, the bottleneck last)."""
        if len(skips) != len(self.stages) + 1:
            raise ValueError(f"expected {len(self.stages) + 1} skip maps, got {len(skips)}")
        return decode_with_deep_supervision(
            skips,
            self.seg_layers,
            self.deep_supervision,
            lambda s, x, skip: _maybe_checkpoint(self.stages[s], x, skip, enabled=self.use_checkpoint),
        )

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Element count for one sample; ``input_size`` is the network's input (patch) size."""
        sizes = []
        cumulative = [1, 1, 1]
        for stride in self.strides:
            cumulative = [c * s for c, s in zip(cumulative, stride, strict=True)]
            sizes.append([math.ceil(int(i) / c) for i, c in zip(input_size, cumulative, strict=True)])
        total = 0
        last = len(self.stages) - 1
        for s, stage in enumerate(self.stages):
            out_size = sizes[-(s + 2)]
            total += stage.compute_conv_feature_map_size(out_size)
            if self.deep_supervision or s == last:
                total += self.num_classes * _voxels(out_size)
        return total


class _PatchSizeCheck:
    """Descriptor of :meth:`DynTransNet.check_patch_size`.

    On the class it is the plain static function (defaults: the Swin encoder). Looked up on an instance it is the
    same function with the instance's encoder configuration filled in as keywords, so ``network.check_patch_size(
    patch, strides)`` (how nnyseg's trainer checks the plans) also applies the ViT image size and the constraint of
    the dense D-MSA bias.
    """

    def __init__(self, func: Callable[..., None]) -> None:
        self.__func__ = func
        functools.update_wrapper(self, func)

    def __get__(self, instance: Any, owner: type | None = None) -> Callable[..., None]:
        if instance is None:
            return self.__func__
        return functools.partial(self.__func__, **instance.patch_size_constraints)


def _nearest_hint(size: Sequence[int], divisor: int, minimum: int) -> str:
    hints = []
    for s in size:
        lower = (s // divisor) * divisor
        upper = -(-s // divisor) * divisor
        options = sorted({v for v in (lower, upper) if v >= minimum}) or [-(-minimum // divisor) * divisor]
        hints.append(str(s) if s in options else f"{s} -> {' or '.join(map(str, options))}")
    return ", ".join(hints)


class DynTransNet(nn.Module):
    """DynTransNet for nnU-Net v2 (see the module docstring for the architecture and the ablation switches).

    Args:
        input_channels: Image channels.
        num_classes: Output channels (logits; nnU-Net applies the softmax or sigmoid).
        deep_supervision: If True ``forward`` returns one logit map per decoder stage, highest resolution first
            (``[/1, /2, /4, /8, /16]`` for the Swin encoder); toggled later through ``self.decoder.deep_supervision``.
        strides: The encoder's fixed topology, accepted because nnU-Net reads ``arch_kwargs["strides"]`` for the
            deep-supervision scales: ``[[1,1,1]] + 5 x [[2,2,2]]`` for ``"swin"``, ``[[1,1,1]] + log2(p) x [[2,2,2]]``
            for ``"vit"``. ``None`` (default) means exactly that; anything else raises ``ValueError``.
        encoder: ``"swin"`` (option A, default) or ``"vit"`` (option B).
        feature_size: Feature size F (skip and decoder channels F, F, 2F, 4F, 8F; Swin embedding width).
        depths: Swin blocks in each of the four stages.
        num_heads: Attention heads per Swin stage; ``num_heads[i]`` must divide ``F * 2**i``.
        window_size: Swin attention window.
        dmsa_bias: D-MSA bias ``"key"`` (default), ``"dense"`` or ``"none"``. ``"dense"`` needs full windows: with the
            Swin encoder every patch axis must be at least ``16 * window_size``.
        rel_pos_bias: Keep Swin's relative-position bias (the D-MSA bias is added to it). Unused by ``"vit"``, which
            has a learnable absolute positional embedding.
        fusion: Skip fusion ``"fmm"`` (FM-M, default), ``"concat"`` or ``"weighted_sum"``.
        residual_module: Use the RMs; False replaces every RM by the identity.
        drop_path_rate: Largest stochastic-depth rate of the transformer blocks.
        use_checkpoint: Gradient checkpointing for transformer blocks, RMs and decoder stages.
        vit_patch_size: ViT patch size p (a power of two).
        vit_depth: ViT layers.
        vit_heads: ViT attention heads.
        vit_dim: ViT token channels.
        vit_img_size: The one input size the ViT accepts; required for ``"vit"`` (it sizes the positional embedding).
    """

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        deep_supervision: bool = False,
        *,
        strides: Sequence[Sequence[int]] | None = None,
        encoder: str = "swin",
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        dmsa_bias: str = "key",
        rel_pos_bias: bool = True,
        fusion: str = "fmm",
        residual_module: bool = True,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        vit_patch_size: int = 16,
        vit_depth: int = 12,
        vit_heads: int = 12,
        vit_dim: int = 768,
        vit_img_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        if dmsa_bias not in DMSA_MODES:
            raise ValueError(f"dmsa_bias must be one of {DMSA_MODES}, got {dmsa_bias!r}")
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {fusion!r}")
        if input_channels < 1 or num_classes < 1 or feature_size < 1:
            raise ValueError(
                f"input_channels, num_classes and feature_size must be positive, got "
                f"{input_channels}, {num_classes}, {feature_size}"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        expected = [list(s) for s in FIXED_STRIDES] if encoder == "swin" else vit_strides(vit_patch_size)
        if strides is not None:
            try:
                given = [[int(v) for v in s] for s in strides]
            except TypeError as err:
                raise ValueError(f"strides must be a list of per-axis stride lists, got {strides!r}") from err
            if given != expected:
                raise ValueError(
                    f"DynTransNet with encoder={encoder!r} has a fixed topology, so strides (nnU-Net's "
                    f"pool_op_kernel_sizes) must be {expected}; got {given}"
                )
        if encoder == "swin":
            depths, num_heads = [int(d) for d in depths], [int(h) for h in num_heads]
            if len(depths) != SWIN_STAGES or len(num_heads) != SWIN_STAGES:
                raise ValueError(f"depths and num_heads need {SWIN_STAGES} entries each, got {depths} and {num_heads}")
            for i, heads in enumerate(num_heads):
                if heads < 1 or (feature_size * 2**i) % heads:
                    raise ValueError(
                        f"num_heads[{i}] = {heads} must divide the width of Swin stage {i}, feature_size * 2**{i} = "
                        f"{feature_size * 2**i} (feature_size={feature_size}, num_heads={num_heads})"
                    )
            if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
                raise ValueError(f"window_size must be a positive int (a cubic window), got {window_size!r}")
        elif vit_img_size is None:
            raise ValueError(
                "encoder='vit' needs vit_img_size (the patch size of the plans): it sizes the positional embedding and "
                "the token count of the attention"
            )

        self.input_channels = input_channels
        self.num_classes = num_classes
        self.encoder_type = encoder
        self.dmsa_bias = dmsa_bias
        self.strides = expected
        if encoder == "swin":
            # Option A: the shared Swin encoder with D-MSA as its extra attention bias and the Residual Modules as
            # its skip and bottleneck blocks (E0 = RM(stem(x))).
            window = int(window_size)
            self.encoder: nn.Module = SwinUNETREncoder(
                input_channels,
                input_block=lambda c_in, c_out: nn.Sequential(
                    _ConvNormAct(c_in, c_out), _residual(c_out, residual_module)
                ),
                skip_block=lambda c: _residual(c, residual_module),
                bottleneck_block=lambda c: _residual(c, residual_module),
                feature_size=feature_size,
                depths=depths,
                num_heads=num_heads,
                window_size=window,
                drop_path_rate=drop_path_rate,
                rel_pos_bias=rel_pos_bias,
                extra_bias_factory=make_dmsa_bias_factory(dmsa_bias, window_tokens=window**3),
                use_checkpoint=use_checkpoint,
            )
            self.patch_size_constraints: dict[str, Any] = {
                "encoder": "swin",
                "dense_window": int(window_size) if dmsa_bias == "dense" else None,
            }
        else:
            self.encoder = DynTransViTEncoder(
                input_channels,
                img_size=vit_img_size,
                patch_size=vit_patch_size,
                feature_size=feature_size,
                dim=vit_dim,
                depth=vit_depth,
                num_heads=vit_heads,
                dmsa_bias=dmsa_bias,
                residual_module=residual_module,
                drop_path_rate=drop_path_rate,
                use_checkpoint=use_checkpoint,
            )
            self.patch_size_constraints = {
                "encoder": "vit",
                "vit_patch_size": vit_patch_size,
                "vit_img_size": self.encoder.img_size,
            }
        self.decoder = DynTransDecoder(
            self.encoder,
            num_classes,
            deep_supervision,
            fusion=fusion,
            residual_module=residual_module,
            use_checkpoint=use_checkpoint,
        )

    # ------------------------------------------------------------------ input checks
    @_PatchSizeCheck
    def check_patch_size(
        patch_size: Sequence[int],
        strides: Sequence[Sequence[int]] | None = None,
        *,
        encoder: str = "swin",
        dense_window: int | None = None,
        vit_patch_size: int = 16,
        vit_img_size: Sequence[int] | None = None,
    ) -> None:
        """Raises ``ValueError`` unless the network can take a 3D patch (spatial) size.

        Called on the class it is a static check with the keyword defaults, i.e. the Swin encoder: every axis a
        positive multiple of 32. Called on an instance the instance's configuration is filled in: for
        ``encoder="vit"`` every axis must be a multiple of ``vit_patch_size`` and the size must equal
        ``vit_img_size``; for the Swin encoder with ``dmsa_bias="dense"`` every axis must also be at least
        ``16 * window`` (no window may shrink). The message names the nearest valid sizes.

        Args:
            patch_size: Spatial size ``(D, H, W)``.
            strides: Optional plans strides (``pool_op_kernel_sizes``); if given they must be the encoder's fixed ones.
            encoder: ``"swin"`` or ``"vit"``.
            dense_window: Window size of a Swin encoder with the dense D-MSA bias, else ``None``.
            vit_patch_size: Patch size of the ViT encoder.
            vit_img_size: Input size of the ViT encoder; ``None`` checks divisibility only.
        """
        size = [int(s) for s in patch_size]
        if len(size) != 3:
            raise ValueError(f"DynTransNet needs a 3D patch size (D, H, W), got {tuple(size)}")
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        expected = [list(s) for s in FIXED_STRIDES] if encoder == "swin" else vit_strides(vit_patch_size)
        if strides is not None and [[int(v) for v in s] for s in strides] != expected:
            raise ValueError(
                f"DynTransNet (encoder={encoder!r}) needs strides {expected}, got {[list(s) for s in strides]}"
            )
        divisor = SWIN_SIZE_DIVISOR if encoder == "swin" else int(vit_patch_size)
        if any(s < divisor or s % divisor for s in size):
            what = "patch embedding /2 and four patch mergings" if encoder == "swin" else "the ViT patch size"
            raise ValueError(
                f"DynTransNet (encoder={encoder!r}) needs every spatial axis divisible by {divisor} ({what}), got "
                f"spatial size {tuple(size)}; nearest valid sizes per axis: {_nearest_hint(size, divisor, divisor)}"
            )
        if encoder == "vit" and vit_img_size is not None and tuple(size) != tuple(int(s) for s in vit_img_size):
            raise ValueError(
                f"DynTransNet (encoder='vit') was built for inputs of exactly vit_img_size "
                f"{tuple(int(s) for s in vit_img_size)} (positional embedding and token count are fixed), got spatial "
                f"size {tuple(size)}"
            )
        if encoder == "swin" and dense_window is not None:
            minimum = 2**SWIN_STAGES * int(dense_window)
            if any(s < minimum for s in size):
                raise ValueError(
                    f"DynTransNet with dmsa_bias='dense' and window {dense_window} needs full {dense_window}^3-token "
                    f"windows in every Swin stage, i.e. every axis >= {2**SWIN_STAGES} x {dense_window} = {minimum}, "
                    f"got spatial size {tuple(size)}; nearest valid sizes per axis: "
                    f"{_nearest_hint([max(s, minimum) for s in size], divisor, minimum)} (or use dmsa_bias='key')"
                )

    def _check_input(self, x: torch.Tensor) -> None:
        check_network_input("DynTransNet", x, self.input_channels, self.check_patch_size)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segments ``x`` of shape ``(B, C_in, D, H, W)``.

        Returns:
            Logits at full resolution or, with deep supervision, the list of logits of every decoder stage, highest
            resolution first.
        """
        self._check_input(x)
        return self.decoder(self.encoder(x))

    # ------------------------------------------------------------------ nnU-Net hooks
    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Memory-proportional estimate for one sample and patch ``input_size`` (no batch or channel axes).

        Counts the feature-map elements of every layer output and the attention matrices (tokens x window tokens x
        heads) and D-MSA biases. Non-decreasing in every axis of ``input_size``; sizes the network cannot take are not
        rejected here (spatial sizes are rounded up stage by stage).
        """
        size = [int(s) for s in input_size]
        if len(size) != 3:
            raise ValueError(f"give the 3D patch size without batch/channel axes, got {tuple(input_size)}")
        return int(self.encoder.compute_conv_feature_map_size(size) + self.decoder.compute_conv_feature_map_size(size))

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """Weight initialisation, applied by nnU-Net as ``network.apply(network.initialize)``.

        D-MSA biases: ``W_d ~ N(0, 0.02^2)``, ``b_d = 0`` (never zero: with a ReLU that would block every gradient);
        Linear: trunc-normal(0.02), zero bias; convolutions and transposed convolutions: He (kaiming normal,
        a = 0.01), zero bias; norms: weight 1, bias 0; weighted-sum fusion: equal weights. The relative-position
        bias tables and the ViT positional embedding keep their trunc-normal(0.02) initialisation.
        """
        if isinstance(module, (KeySaliencyBias, DenseSynthesizerBias)):
            module.reset_parameters()
        elif isinstance(module, WeightedSumFusion):
            nn.init.zeros_(module.logits)
        else:
            init_transformer_unet_weights(module)
