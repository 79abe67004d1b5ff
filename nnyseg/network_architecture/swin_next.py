"""nnY-Net: a Swin-NeXt U-Net with bottleneck cross-attention, as an nnU-Net v2 network class.

Liu H, Tao Z, Dong W, Sun Q. "nnY-Net: Swin-NeXt with Cross-Attention for 3D Medical Images Segmentation",
arXiv:2501.01406 (2025). Only the abstract of the paper is readable, so most of what follows is nnyseg's choice;
docs/nnynet.md separates what the paper states from what nnyseg chose, and lists every switch:

* encoder: the SwinUNETR encoder (Hatamizadeh et al. 2022): stride-2 patch embedding and four Swin stages with patch
  merging, hidden states F@/2 ... 16F@/32, plus residual conv blocks on the skip paths and on the bottleneck;
* "Y" branch: cross-attention from clinical-field tokens and latent tokens to the bottleneck voxels, applied as
  zero-initialised FiLM modulations of the bottleneck and, with ``ca_film_levels="all"`` (the default), of every
  decoder level's output;
* decoder: MedNeXt blocks (Roy et al. 2023) with transposed-depthwise up-sampling and additive skips, one 1x1x1
  segmentation head per level (deep supervision at 1, 1/2, 1/4, 1/8, 1/16).

nnU-Net builds it from the plans with ``network_class_name = "nnyseg.network_architecture.swin_next.SwinNeXtUNet"``;
the plans must use ``strides = [[1, 1, 1]] + 5 * [[2, 2, 2]]`` and a patch size divisible by 32 on every axis.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnyseg.network_architecture.building_blocks.checks import check_network_input
from nnyseg.network_architecture.building_blocks.cross_attention import (
    CROSS_ATTENTION_MODES,
    BottleneckCrossAttention,
    ZeroInitLinear,
    apply_film,
)
from nnyseg.network_architecture.building_blocks.decoding import decode_with_deep_supervision
from nnyseg.network_architecture.building_blocks.init import init_transformer_unet_weights
from nnyseg.network_architecture.building_blocks.mednext import ConvResBlock, MedNeXtBlock, MedNeXtUpBlock
from nnyseg.network_architecture.building_blocks.swin import FIXED_STRIDES, SwinUNETREncoder

__all__ = ["MedNeXtDecoder", "SwinNeXtUNet"]

#: Every spatial axis of the input must be divisible by this (2 ** 5).
SIZE_DIVISOR = 32
#: Where the cross-attention branch's FiLM output goes (``ca_film_levels``).
FILM_LEVELS = ("all", "bottleneck")

ClinicalInput = tuple[torch.Tensor, torch.Tensor | None]


def _maybe_checkpoint(module: nn.Module, x: torch.Tensor, enabled: bool) -> torch.Tensor:
    if enabled and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


def _per_level(value: int | Sequence[int], n: int, name: str) -> list[int]:
    values = [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name} needs {n} values (one per decoder level, deepest first), got {value!r}")
    return values


class _DecoderStage(nn.Module):
    """One decoder level: ``MedNeXtUpBlock`` -> add skip -> ``n`` ``MedNeXtBlock``s."""

    def __init__(self, in_channels: int, out_channels: int, *, exp_r: int, n_blocks: int, kernel_size: int) -> None:
        super().__init__()
        self.up = MedNeXtUpBlock(in_channels, out_channels, exp_r=exp_r, kernel_size=kernel_size)
        self.blocks = nn.ModuleList(
            MedNeXtBlock(out_channels, out_channels, exp_r=exp_r, kernel_size=kernel_size) for _ in range(n_blocks)
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor, skip: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        x = _maybe_checkpoint(self.up, x, use_checkpoint) + skip
        for block in self.blocks:
            x = _maybe_checkpoint(block, x, use_checkpoint)
        return x

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        out_size = [2 * int(s) for s in input_size]
        total = self.up.compute_conv_feature_map_size(input_size) + self.out_channels * math.prod(out_size)
        return total + sum(block.compute_conv_feature_map_size(out_size) for block in self.blocks)


class MedNeXtDecoder(nn.Module):
    """MedNeXt decoder with additive skips, built from an encoder's ``output_channels`` and ``strides``.

    Level ``s`` (deepest first) up-samples from ``output_channels[-(s+1)]`` to ``output_channels[-(s+2)]`` channels,
    adds the matching skip and applies ``n_blocks[s]`` MedNeXt blocks. Every level has a 1x1x1 segmentation head; all
    heads are always built so checkpoints load with or without deep supervision.

    ``forward`` returns, with ``deep_supervision`` True, the list of logits of all levels highest resolution first,
    otherwise the logits of the highest-resolution level only. No softmax.

    Args:
        encoder: Object exposing ``output_channels`` and ``strides`` (stride 2 on every axis between levels).
        num_classes: Output channels of the heads.
        deep_supervision: Initial deep-supervision switch (nnU-Net toggles ``decoder.deep_supervision``).
        expansion: MedNeXt expansion ratio per level, deepest first (int or one per level).
        n_blocks: MedNeXt blocks per level after the up-sampling block (int or one per level).
        kernel_size: Depthwise kernel size.
        use_checkpoint: Gradient checkpointing for every MedNeXt block.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        deep_supervision: bool,
        *,
        expansion: int | Sequence[int] = (4, 4, 4, 3, 2),
        n_blocks: int | Sequence[int] = 2,
        kernel_size: int = 3,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        channels = list(encoder.output_channels)
        strides = [list(s) for s in encoder.strides]
        n_levels = len(channels) - 1
        if any(s != [2, 2, 2] for s in strides[1:]):
            raise ValueError(f"MedNeXtDecoder needs stride 2 on every axis between levels, got {strides}")
        expansion = _per_level(expansion, n_levels, "decoder_expansion")
        n_blocks = _per_level(n_blocks, n_levels, "decoder_blocks")
        if any(b < 0 for b in n_blocks):
            raise ValueError(f"decoder_blocks must be >= 0, got {n_blocks}")
        self.deep_supervision = deep_supervision
        self.use_checkpoint = use_checkpoint
        self.num_classes = num_classes
        self.stages = nn.ModuleList()
        self.seg_layers = nn.ModuleList()
        for s in range(n_levels):
            c_in, c_out = channels[-(s + 1)], channels[-(s + 2)]
            self.stages.append(
                _DecoderStage(c_in, c_out, exp_r=expansion[s], n_blocks=n_blocks[s], kernel_size=kernel_size)
            )
            self.seg_layers.append(nn.Conv3d(c_out, num_classes, 1))

    def forward(
        self,
        skips: Sequence[torch.Tensor],
        modulate: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Decodes ``skips`` (highest resolution first, the bottleneck last).

        Args:
            skips: Encoder outputs.
            modulate: Optional ``modulate(s, x)`` applied to the output of level ``s`` (deepest first) before its head
                and the next level see it (nnY-Net's FiLM conditioning).
        """
        if len(skips) != len(self.stages) + 1:
            raise ValueError(f"expected {len(self.stages) + 1} skip maps, got {len(skips)}")

        def run_stage(s: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
            x = self.stages[s](x, skip, self.use_checkpoint)
            return x if modulate is None else modulate(s, x)

        return decode_with_deep_supervision(skips, self.seg_layers, self.deep_supervision, run_stage)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Element count for one sample; ``input_size`` is the network's input (patch) size."""
        n_levels = len(self.stages)
        total = 0
        for s, stage in enumerate(self.stages):
            in_size = [math.ceil(int(i) / 2 ** (n_levels - s)) for i in input_size]
            total += stage.compute_conv_feature_map_size(in_size)
            if self.deep_supervision or s == n_levels - 1:
                total += self.num_classes * math.prod(2 * i for i in in_size)
        return total


class SwinNeXtUNet(nn.Module):
    """nnY-Net: Swin encoder, bottleneck cross-attention ("Y" branch) and MedNeXt decoder.

    Args:
        input_channels: Image channels.
        num_classes: Output channels (logits, no softmax).
        deep_supervision: If True ``forward`` returns 5 logit maps ``[/1, /2, /4, /8, /16]``; toggled later through
            ``self.decoder.deep_supervision``.
        strides: Must equal ``[[1, 1, 1]] + 5 * [[2, 2, 2]]``; accepted because nnU-Net reads ``arch_kwargs["strides"]``
            to compute the deep-supervision scales.
        feature_size: Feature size F (channels at /1 and /2).
        depths: Swin blocks in each of the four stages.
        num_heads: Attention heads per Swin stage; ``num_heads[i]`` must divide ``F * 2**i``.
        window_size: Swin window size.
        mlp_ratio: MLP ratio of the Swin blocks.
        drop_path_rate: Largest stochastic-depth rate of the Swin blocks.
        decoder_expansion: MedNeXt expansion ratio per decoder level, from /16 to /1.
        decoder_blocks: MedNeXt blocks after each up-sampling block (int or one per level).
        decoder_kernel: Depthwise kernel size in the decoder.
        cross_attention: ``"off"``, ``"latent"`` or ``"clinical"`` (see :class:`BottleneckCrossAttention`).
        clinical_schema: Clinical field descriptions, required for ``"clinical"``.
        n_latent_tokens: Learned latent query tokens.
        ca_heads: Cross-attention heads; must divide 16F.
        ca_film_levels: Where the branch's output goes: ``"all"`` (default) the bottleneck and the output of every
            decoder level, each through its own zero-initialised FiLM layer; ``"bottleneck"`` the bottleneck only.
            Why the default: docs/nnynet.md, "Where the Y branch acts".
        ca_token_std: Initial scale of the clinical tokens. Why the default: docs/nnynet.md, "Why the Y branch was
            fragile".
        ca_field_dropout: Training-time probability of hiding a clinical field (its missing token is used instead).
        use_checkpoint: Gradient checkpointing for every Swin, conv and MedNeXt block.
    """

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        deep_supervision: bool = False,
        *,
        strides: Sequence[Sequence[int]] = FIXED_STRIDES,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        decoder_expansion: int | Sequence[int] = (4, 4, 4, 3, 2),
        decoder_blocks: int | Sequence[int] = 2,
        decoder_kernel: int = 3,
        cross_attention: str = "latent",
        clinical_schema: Sequence[Mapping[str, Any]] | None = None,
        n_latent_tokens: int = 4,
        ca_heads: int = 12,
        ca_film_levels: str = "all",
        ca_token_std: float = 0.3,
        ca_field_dropout: float = 0.15,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        try:
            given = [[int(v) for v in s] for s in strides]
        except TypeError as err:
            raise ValueError(f"strides must be a list of per-axis stride lists, got {strides!r}") from err
        if given != [list(s) for s in FIXED_STRIDES]:
            raise ValueError(
                "SwinNeXtUNet has a fixed topology (stride-2 patch embedding + four stride-2 patch mergings), so "
                f"strides (nnU-Net's pool_op_kernel_sizes) must be [[1, 1, 1]] + 5 x [[2, 2, 2]]; got {given}"
            )
        if input_channels < 1 or num_classes < 1 or feature_size < 1:
            raise ValueError(
                f"input_channels, num_classes and feature_size must be positive, got "
                f"{input_channels}, {num_classes}, {feature_size}"
            )
        depths, num_heads = list(depths), list(num_heads)
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"depths and num_heads need 4 entries each, got {depths} and {num_heads}")
        for i, heads in enumerate(num_heads):
            if heads < 1 or (feature_size * 2**i) % heads:
                raise ValueError(
                    f"num_heads[{i}] = {heads} must divide the width of Swin stage {i}, feature_size * 2**{i} = "
                    f"{feature_size * 2**i} (feature_size={feature_size}, num_heads={num_heads})"
                )
        if cross_attention not in CROSS_ATTENTION_MODES:
            raise ValueError(f"cross_attention must be one of {CROSS_ATTENTION_MODES}, got {cross_attention!r}")
        if ca_film_levels not in FILM_LEVELS:
            raise ValueError(f"ca_film_levels must be one of {FILM_LEVELS}, got {ca_film_levels!r}")

        self.input_channels = input_channels
        self.num_classes = num_classes
        self.strides = [list(s) for s in FIXED_STRIDES]
        # The shared Swin encoder; nnY-Net's skip and bottleneck blocks are residual conv blocks.
        self.encoder = SwinUNETREncoder(
            input_channels,
            input_block=ConvResBlock,
            skip_block=lambda c: ConvResBlock(c, c),
            bottleneck_block=lambda c: ConvResBlock(c, c),
            feature_size=feature_size,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            use_checkpoint=use_checkpoint,
        )
        self.cross_attention = BottleneckCrossAttention(
            self.encoder.output_channels[-1],
            mode=cross_attention,
            clinical_schema=clinical_schema,
            n_latent=n_latent_tokens,
            num_heads=ca_heads,
            token_std=ca_token_std,
            field_dropout=ca_field_dropout,
            # decoder level s (deepest first) outputs the channels of encoder level -(s + 2)
            level_channels=self.encoder.output_channels[-2::-1] if ca_film_levels == "all" else (),
        )
        self.decoder = MedNeXtDecoder(
            self.encoder,
            num_classes,
            deep_supervision,
            expansion=decoder_expansion,
            n_blocks=decoder_blocks,
            kernel_size=decoder_kernel,
            use_checkpoint=use_checkpoint,
        )
        self._condition: ClinicalInput | None = None
        self._warned_missing_clinical = False

    # ------------------------------------------------------------------ input checks
    @staticmethod
    def check_patch_size(patch_size: Sequence[int]) -> None:
        """Raises ``ValueError`` unless ``patch_size`` has 3 axes, each a positive multiple of 32.

        The message names the nearest valid sizes per axis.
        """
        size = [int(s) for s in patch_size]
        if len(size) != 3:
            raise ValueError(f"SwinNeXtUNet needs a 3D patch size (D, H, W), got {tuple(size)}")
        bad = [s for s in size if s < SIZE_DIVISOR or s % SIZE_DIVISOR]
        if bad:
            hints = []
            for s in size:
                lower = (s // SIZE_DIVISOR) * SIZE_DIVISOR
                upper = -(-s // SIZE_DIVISOR) * SIZE_DIVISOR
                options = sorted({v for v in (lower, upper) if v >= SIZE_DIVISOR}) or [SIZE_DIVISOR]
                hints.append(str(s) if s in options else f"{s} -> {' or '.join(map(str, options))}")
            raise ValueError(
                f"SwinNeXtUNet needs every spatial axis divisible by {SIZE_DIVISOR} (patch embedding /2 and four "
                f"patch mergings), got spatial size {tuple(size)}; nearest valid sizes per axis: {', '.join(hints)}"
            )

    def _check_input(self, x: torch.Tensor) -> None:
        check_network_input("SwinNeXtUNet", x, self.input_channels, self.check_patch_size)

    # ------------------------------------------------------------------ clinical condition
    @staticmethod
    def _as_clinical(clinical: Any) -> ClinicalInput | None:
        if clinical is None:
            return None
        if isinstance(clinical, torch.Tensor):
            return clinical, None
        if isinstance(clinical, (tuple, list)) and len(clinical) == 2 and isinstance(clinical[0], torch.Tensor):
            return clinical[0], clinical[1]
        raise ValueError("clinical input must be None, a values tensor (B, M) or a (values, missing_mask) tuple")

    def set_condition(self, clinical: ClinicalInput | torch.Tensor | None) -> None:
        """Stores a clinical condition used by every later ``forward`` call that gets none.

        nnU-Net's predictor only calls ``network(x)``; a predictor subclass sets the case's clinical row once before
        the sliding window. A single row ``(1, M)`` is broadcast to any batch size. ``None`` clears the condition.

        Args:
            clinical: ``(values, missing_mask)`` with shapes ``(B, M)``, a values tensor alone, or ``None``.

        Raises:
            ValueError: If the input is not of that form or (in ``"clinical"`` mode) M is not the schema's field count.
        """
        parsed = self._as_clinical(clinical)
        if parsed is None:
            self._condition = None
            return
        values, missing = parsed
        tokenizer = getattr(self.cross_attention, "tokenizer", None)
        if tokenizer is not None and (values.ndim != 2 or values.shape[1] != tokenizer.num_fields):
            raise ValueError(
                f"clinical values must have shape (B, {tokenizer.num_fields}) for the fields {tokenizer.field_names}, "
                f"got {tuple(values.shape)}"
            )
        if missing is not None and missing.shape != values.shape:
            raise ValueError(f"missing mask shape {tuple(missing.shape)} != values shape {tuple(values.shape)}")
        self._condition = (values.detach(), None if missing is None else missing.detach())

    def clear_condition(self) -> None:
        """Removes the stored condition."""
        self._condition = None

    @property
    def condition(self) -> ClinicalInput | None:
        """The stored clinical condition (``None`` if unset)."""
        return self._condition

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, clinical: ClinicalInput | torch.Tensor | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Segments ``x``.

        Args:
            x: Input ``(B, C_in, D, H, W)``, each spatial axis divisible by 32.
            clinical: Optional ``(values, missing_mask)``; falls back to the condition stored with
                :meth:`set_condition`. Only used in ``"clinical"`` mode; without any, every field counts as missing
                (with one warning per instance).

        Returns:
            Logits at full resolution, or with deep supervision the list ``[/1, /2, /4, /8, /16]``.
        """
        self._check_input(x)
        condition = self._as_clinical(clinical)
        if condition is None:
            condition = self._condition
        if self.cross_attention.mode == "clinical" and condition is None and not self._warned_missing_clinical:
            warnings.warn(
                "SwinNeXtUNet in 'clinical' cross-attention mode got no clinical input (neither a forward argument "
                "nor set_condition); all clinical fields are treated as missing.",
                stacklevel=2,
            )
            self._warned_missing_clinical = True
        skips = self.encoder(x)
        if self.cross_attention.mode == "off":
            return self.decoder(skips)
        summary = self.cross_attention.summarise(skips[-1], condition)
        skips[-1] = apply_film(skips[-1], self.cross_attention.film, summary)
        if not len(self.cross_attention.level_films):
            return self.decoder(skips)

        def modulate(level: int, level_output: torch.Tensor) -> torch.Tensor:
            return self.cross_attention.modulate_level(level, level_output, summary)

        return self.decoder(skips, modulate)

    # ------------------------------------------------------------------ nnU-Net hooks
    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Memory-proportional estimate for one sample and patch ``input_size`` (no batch or channel axes).

        Counts feature-map elements of the layer outputs of every block and, for window attention, the attention
        matrices (padded tokens x window tokens x heads). Non-decreasing in every axis of ``input_size``. Sizes that
        are not multiples of 32 are not rejected here (spatial sizes are rounded up stage by stage).
        """
        size = [int(s) for s in input_size]
        if len(size) != 3:
            raise ValueError(f"give the 3D patch size without batch/channel axes, got {tuple(input_size)}")
        total = self.encoder.compute_conv_feature_map_size(size)
        total += self.cross_attention.compute_conv_feature_map_size([math.ceil(s / 32) for s in size])
        total += self.decoder.compute_conv_feature_map_size(size)
        if self.cross_attention.mode != "off":  # each FiLM'd decoder level output is one more map of its size
            for s, film in enumerate(self.cross_attention.level_films):
                level_size = [math.ceil(i / 2 ** (len(self.cross_attention.level_films) - 1 - s)) for i in size]
                total += film.out_features // 2 * math.prod(level_size)
        return int(total)

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """Weight initialisation, applied by nnU-Net as ``network.apply(network.initialize)``.

        Linear: trunc-normal(0.02), zero bias; convolutions: He (kaiming normal, a=0.01), zero bias; norms: weight 1,
        bias 0. Zero-initialised layers (the FiLM output) are reset to zero, so applying this never breaks the
        identity-at-initialisation of the cross-attention branch.
        """
        if isinstance(module, ZeroInitLinear):
            module.reset_parameters()
        else:
            init_transformer_unet_weights(module)
