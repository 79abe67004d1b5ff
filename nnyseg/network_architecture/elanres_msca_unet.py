"""ELANRes-MSCA-UNet: a 3D U-Net with re-parameterisable ELANRes blocks and multi-scale convolutional attention.

The topology (stages, strides, kernels, widths) comes from nnU-Net plans, so the network drops into nnU-Net v2 via
``plans["configurations"][cfg]["architecture"]["network_class_name"] =
"nnyseg.network_architecture.elanres_msca_unet.ELANResMSCAUNet"``.

- Encoder stage s: an entry conv (for a downsampling stage a conv with kernel = stride, otherwise a k-sized stem conv),
  an ``ELANResBlock`` (or two plain conv-norm-act layers), and an ``MSCABlock`` for s >= ``msca_min_stage``.
- Decoder stage: transposed conv (kernel = stride = encoder stride) -> concat with the skip -> ``ELANResBlock(2C -> C)``
  -> 1x1x1 segmentation head. All heads are always built, so checkpoints load with deep supervision on or off.
- Outputs are raw logits. ``decoder.deep_supervision`` selects a list (highest resolution first, ``n_stages - 1``
  entries, as DNA's ``UNetDecoder``) or one full-resolution tensor.
- ``switch_to_deploy()`` makes every ``RepConv`` run as one fused convolution for inference. The state dict does not
  change, and weights loaded afterwards are re-fused automatically, so it may be called before or after loading
  (``ELANResMSCATrainer.build_network_architecture`` calls it for nnU-Net's predictor). ``switch_to_train()``
  undoes it.

Ablations of the paper (``use_elanres``, ``use_msca``): (False, False) plain U-Net, (False, True) MSCA-UNet,
(True, False) ELANRes-UNet, (True, True) ELANRes-MSCA-UNet. What the paper states, what nnyseg chose and every
switch: docs/elanres_msca.md.

Reference:
    Song Z., Wu W., Wu S., "Multi-Scale Convolutional Attention and Structural Re-Parameterized Residual-Based 3D U-Net
    for Liver and Liver Tumor Segmentation from CT", Sensors 25(6):1814, 2025. doi:10.3390/s25061814.
"""

from __future__ import annotations

import math
import pydoc
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from nnyseg.network_architecture.building_blocks.decoding import decode_with_deep_supervision
from nnyseg.network_architecture.building_blocks.elan import ELANResBlock
from nnyseg.network_architecture.building_blocks.msca import MSCA_MODES, MSCABlock
from nnyseg.network_architecture.building_blocks.reparam import (
    ConvNormAct,
    RepConv,
    fuse_reparam_modules,
    to_tuple,
    unfuse_reparam_modules,
)

__all__ = ["DS_MODES", "NORM_OPS", "ELANResDecoder", "ELANResEncoder", "ELANResMSCAUNet", "PlainConvBlock"]

NORM_OPS: dict[str, type[nn.Module]] = {"batch": nn.BatchNorm3d, "instance": nn.InstanceNorm3d}
DS_MODES = ("nnunet", "upsample")


def _resolve_conv_op(conv_op: type[nn.Module] | str) -> type[nn.Conv3d]:
    """Accepts ``nn.Conv3d`` or its dotted path (as stored in nnU-Net plans)."""
    resolved = pydoc.locate(conv_op) if isinstance(conv_op, str) else conv_op
    if not (isinstance(resolved, type) and issubclass(resolved, nn.Conv3d)):
        raise ValueError(f"ELANResMSCAUNet is 3D only; conv_op must be nn.Conv3d or its dotted path, got {conv_op!r}")
    return resolved


def _per_stage(values: Sequence[int | Sequence[int]], n_stages: int, name: str) -> list[list[int]]:
    """Converts plans lists (lists or tuples, ints broadcast to 3 axes) to ``n_stages`` lists of 3 ints."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != n_stages:
        raise ValueError(f"{name} must have one entry per stage (n_stages={n_stages}), got {values!r}")
    return [list(to_tuple(v, 3, f"{name}[{s}]")) for s, v in enumerate(values)]


class PlainConvBlock(nn.Module):
    """Two k-sized conv-norm-act layers: the stage block of the plain U-Net ablation.

    Args:
        in_channels: Input channels.
        out_channels: Output channels of both layers.
        kernel_size: Kernel of both layers.
        conv_op: Convolution class.
        norm_op: Norm class.
        norm_op_kwargs: Keyword arguments of ``norm_op``.
        nonlin: Nonlinearity class.
        nonlin_kwargs: Keyword arguments of ``nonlin``.
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
    ) -> None:
        super().__init__()
        ops = dict(
            conv_op=conv_op, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs
        )
        self.convs = nn.Sequential(
            ConvNormAct(in_channels, out_channels, kernel_size, **ops),
            ConvNormAct(out_channels, out_channels, kernel_size, **ops),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements, one map per convolution."""
        return sum(conv.compute_conv_feature_map_size(input_size) for conv in self.convs)


def _stage_block(
    in_channels: int, out_channels: int, kernel_size: Sequence[int], *, use_elanres: bool, repconv_depth: int, **ops
) -> nn.Module:
    """Builds a stage's main block: ``ELANResBlock`` or, for the plain ablation, ``PlainConvBlock``."""
    if use_elanres:
        return ELANResBlock(in_channels, out_channels, kernel_size, repconv_depth=repconv_depth, **ops)
    return PlainConvBlock(in_channels, out_channels, kernel_size, **ops)


class ELANResEncoder(nn.Module):
    """Encoder with DNA's encoder contract (the decoder reads its topology and ops from it).

    Stage s is ``nn.Sequential(entry, block[, msca])``: ``entry`` is a conv with kernel = stride when the stage
    downsamples, else a stem conv with the stage kernel; ``block`` is an ``ELANResBlock`` or ``PlainConvBlock``;
    ``msca`` an ``MSCABlock`` for s >= ``msca_min_stage`` when ``use_msca``.

    Args:
        input_channels: Image channels.
        n_stages: Resolution stages (at least 2).
        features_per_stage: Channels per stage (each at least 2).
        conv_op: ``nn.Conv3d``.
        kernel_sizes: Per-stage kernels (odd entries), e.g. ``[[1, 3, 3], [3, 3, 3], ...]``.
        strides: Per-stage strides; the first is normally ``[1, 1, 1]``.
        use_elanres: ELANRes blocks if True, plain double conv blocks if False.
        use_msca: Whether to add MSCA blocks.
        msca_mode: ``"slice2d"`` or ``"strip3d"``.
        msca_min_stage: First stage with an MSCA block.
        repconv_depth: RepConv chain length in the ELANRes blocks.
        drop_path_rate: Stochastic depth of the deepest MSCA block; shallower ones get linearly less.
        norm_op: Norm class.
        norm_op_kwargs: Keyword arguments of ``norm_op``.
        nonlin: Nonlinearity class.
        nonlin_kwargs: Keyword arguments of ``nonlin``.
        return_skips: Whether ``forward`` returns every stage output (True) or only the bottleneck.

    Raises:
        ValueError: For inconsistent plans lists or invalid options.
    """

    def __init__(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: Sequence[int],
        conv_op: type[nn.Module] | str,
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        *,
        use_elanres: bool = True,
        use_msca: bool = True,
        msca_mode: str = "slice2d",
        msca_min_stage: int = 1,
        repconv_depth: int = 2,
        drop_path_rate: float = 0.0,
        norm_op: type[nn.Module] = nn.BatchNorm3d,
        norm_op_kwargs: dict | None = None,
        nonlin: type[nn.Module] = nn.LeakyReLU,
        nonlin_kwargs: dict | None = None,
        return_skips: bool = True,
    ) -> None:
        super().__init__()
        conv_op = _resolve_conv_op(conv_op)
        if n_stages < 2:
            raise ValueError(f"n_stages must be >= 2, got {n_stages}")
        if input_channels < 1:
            raise ValueError(f"input_channels must be >= 1, got {input_channels}")
        if isinstance(features_per_stage, int):
            features_per_stage = [features_per_stage] * n_stages
        if len(features_per_stage) != n_stages or any(int(f) < 2 for f in features_per_stage):
            raise ValueError(f"features_per_stage needs {n_stages} entries >= 2, got {features_per_stage!r}")
        kernel_sizes = _per_stage(kernel_sizes, n_stages, "kernel_sizes")
        strides = _per_stage(strides, n_stages, "strides")
        if any(k % 2 == 0 for ks in kernel_sizes for k in ks):
            raise ValueError(f"kernel sizes must be odd, got {kernel_sizes}")
        if msca_mode not in MSCA_MODES:
            raise ValueError(f"msca_mode must be one of {MSCA_MODES}, got {msca_mode!r}")
        if msca_min_stage < 0:
            raise ValueError(f"msca_min_stage must be >= 0, got {msca_min_stage}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")

        # DNA encoder contract.
        self.output_channels = [int(f) for f in features_per_stage]
        self.strides = strides
        self.kernel_sizes = kernel_sizes
        self.conv_op = conv_op
        self.conv_bias = False
        self.norm_op = norm_op
        self.norm_op_kwargs = dict(norm_op_kwargs or {})
        self.nonlin = nonlin
        self.nonlin_kwargs = dict(nonlin_kwargs or {})
        self.dropout_op = None
        self.dropout_op_kwargs = None
        self.return_skips = return_skips

        ops = dict(
            conv_op=conv_op,
            norm_op=norm_op,
            norm_op_kwargs=self.norm_op_kwargs,
            nonlin=nonlin,
            nonlin_kwargs=self.nonlin_kwargs,
        )
        msca_stages = [s for s in range(n_stages) if use_msca and s >= msca_min_stage]
        drop_rates = {s: drop_path_rate * (i + 1) / len(msca_stages) for i, s in enumerate(msca_stages)}

        stages = []
        in_channels = input_channels
        for s, (channels, kernel, stride) in enumerate(zip(self.output_channels, kernel_sizes, strides, strict=True)):
            downsamples = any(st > 1 for st in stride)
            layers = OrderedDict()
            entry_kernel = stride if downsamples else kernel
            layers["entry"] = ConvNormAct(in_channels, channels, entry_kernel, stride=stride, **ops)
            layers["block"] = _stage_block(
                channels, channels, kernel, use_elanres=use_elanres, repconv_depth=repconv_depth, **ops
            )
            if s in drop_rates:
                layers["msca"] = MSCABlock(
                    channels,
                    mode=msca_mode,
                    mlp_kernel_size=kernel,
                    drop_path=drop_rates[s],
                    norm_op=norm_op,
                    norm_op_kwargs=self.norm_op_kwargs,
                )
            stages.append(nn.Sequential(layers))
            in_channels = channels
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips if self.return_skips else x

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements of all encoder convolutions for a spatial ``input_size``."""
        total = 0
        size = list(input_size)
        for stage, stride in zip(self.stages, self.strides, strict=True):
            total += stage.entry.compute_conv_feature_map_size(size)
            size = [i // st for i, st in zip(size, stride, strict=True)]
            total += stage.block.compute_conv_feature_map_size(size)
            if hasattr(stage, "msca"):
                total += stage.msca.compute_conv_feature_map_size(size)
        return total


class ELANResDecoder(nn.Module):
    """U-Net decoder built from an ``ELANResEncoder`` (or any encoder with DNA's contract attributes).

    Decoder stages run from the bottleneck upwards: transposed conv -> concat with the skip -> block -> 1x1x1 head.
    The encoder is read, not stored, so no module is registered under two names.

    Args:
        encoder: The encoder; ``output_channels``, ``strides``, ``kernel_sizes`` and the ops are read from it.
        num_classes: Output channels of the segmentation heads.
        deep_supervision: Initial value of ``self.deep_supervision``.
        use_elanres: ELANRes blocks if True, plain double conv blocks if False.
        repconv_depth: RepConv chain length in the ELANRes blocks.
        ds_mode: ``"nnunet"`` (deep-supervision logits at their own scale) or ``"upsample"`` (every logit map
            trilinearly up-sampled to full resolution, as in the paper).

    Attributes:
        deep_supervision: If True ``forward`` returns a list of logits, highest resolution first; else one tensor.
    """

    def __init__(
        self,
        encoder: ELANResEncoder,
        num_classes: int,
        deep_supervision: bool = False,
        *,
        use_elanres: bool = True,
        repconv_depth: int = 2,
        ds_mode: str = "nnunet",
    ) -> None:
        super().__init__()
        if ds_mode not in DS_MODES:
            raise ValueError(f"ds_mode must be one of {DS_MODES}, got {ds_mode!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.deep_supervision = deep_supervision
        self.ds_mode = ds_mode
        self.num_classes = num_classes
        self.encoder_strides = [list(s) for s in encoder.strides]
        self.encoder_output_channels = list(encoder.output_channels)

        conv_op = _resolve_conv_op(encoder.conv_op)
        ops = dict(
            conv_op=conv_op,
            norm_op=encoder.norm_op,
            norm_op_kwargs=encoder.norm_op_kwargs,
            nonlin=encoder.nonlin,
            nonlin_kwargs=encoder.nonlin_kwargs,
        )
        transpconvs, stages, seg_layers = [], [], []
        n_stages_encoder = len(encoder.output_channels)
        for s in range(1, n_stages_encoder):
            below = encoder.output_channels[-s]
            skip = encoder.output_channels[-(s + 1)]
            stride = encoder.strides[-s]
            # No norm follows the up-sampling directly (the concat does), so the transposed conv keeps a bias.
            transpconvs.append(nn.ConvTranspose3d(below, skip, stride, stride, bias=True))
            stages.append(
                _stage_block(
                    2 * skip,
                    skip,
                    encoder.kernel_sizes[-(s + 1)],
                    use_elanres=use_elanres,
                    repconv_depth=repconv_depth,
                    **ops,
                )
            )
            # Always built, so checkpoints load whether deep supervision is on or off.
            seg_layers.append(conv_op(skip, num_classes, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transpconvs)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Decodes the encoder outputs (bottleneck last) into logits."""
        outputs = decode_with_deep_supervision(
            skips,
            self.seg_layers,
            self.deep_supervision,
            lambda s, x, skip: self.stages[s](torch.cat((self.transpconvs[s](x), skip), dim=1)),
        )
        if not self.deep_supervision:
            return outputs
        if self.ds_mode == "upsample":
            full = outputs[0].shape[2:]
            outputs = [outputs[0]] + [
                F.interpolate(o, size=full, mode="trilinear", align_corners=False) for o in outputs[1:]
            ]
        return outputs

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements of all decoder convolutions; ``input_size`` is the encoder's input size."""
        sizes = []
        size = list(input_size)
        for stride in self.encoder_strides:
            size = [i // st for i, st in zip(size, stride, strict=True)]
            sizes.append(size)
        total = 0
        last = len(self.stages) - 1
        for s, stage in enumerate(self.stages):
            skip_size = sizes[-(s + 2)]
            total += self.encoder_output_channels[-(s + 2)] * math.prod(skip_size)  # transposed conv
            total += stage.compute_conv_feature_map_size(skip_size)
            if self.deep_supervision or s == last:
                total += self.num_classes * math.prod(skip_size)
                if self.deep_supervision and self.ds_mode == "upsample" and s != last:
                    total += self.num_classes * math.prod(sizes[0])
        return total


class ELANResMSCAUNet(AbstractDynamicNetworkArchitectures):
    """ELANRes-MSCA-UNet for nnU-Net v2 (3D).

    Built by nnU-Net as ``cls(input_channels=..., num_classes=..., deep_supervision=..., **arch_kwargs)``; the plans
    lists may be lists or tuples and ``conv_op`` the class or ``"torch.nn.modules.conv.Conv3d"``.

    Args:
        input_channels: Image channels.
        n_stages: Resolution stages; the network has ``n_stages - 1`` decoder stages and heads.
        features_per_stage: Channels per stage, e.g. ``[32, 64, 128, 256, 320, 320]``.
        conv_op: ``nn.Conv3d`` or its dotted path.
        kernel_sizes: Per-stage kernels from the plans (odd entries).
        strides: Per-stage strides from the plans (``pool_op_kernel_sizes``).
        num_classes: Output channels (raw logits, no softmax or sigmoid).
        deep_supervision: Initial value of ``decoder.deep_supervision``.
        use_elanres: ELANRes blocks (True) or plain double conv blocks (False).
        use_msca: Whether the encoder has MSCA blocks.
        msca_mode: ``"slice2d"`` (per-slice in-plane kernels; default) or ``"strip3d"``.
        msca_min_stage: First encoder stage with an MSCA block (1 skips the full-resolution stage).
        repconv_depth: RepConv chain length in every ELANRes block.
        drop_path_rate: Stochastic depth of the deepest MSCA block, linearly less for shallower ones.
        norm: ``"batch"`` (RepConvs fold completely) or ``"instance"`` (one InstanceNorm after each RepConv sum,
            kept at inference).
        nonlin_negative_slope: Slope of the LeakyReLU.
        ds_mode: ``"nnunet"`` (multi-scale logits) or ``"upsample"`` (all logits at full resolution).

    Raises:
        ValueError: For inconsistent plans or unknown options.
    """

    def __init__(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: Sequence[int],
        conv_op: type[nn.Module] | str,
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        num_classes: int,
        deep_supervision: bool = False,
        *,
        use_elanres: bool = True,
        use_msca: bool = True,
        msca_mode: str = "slice2d",
        msca_min_stage: int = 1,
        repconv_depth: int = 2,
        drop_path_rate: float = 0.0,
        norm: str = "batch",
        nonlin_negative_slope: float = 0.01,
        ds_mode: str = "nnunet",
    ) -> None:
        super().__init__()
        if norm not in NORM_OPS:
            raise ValueError(f"norm must be one of {tuple(NORM_OPS)}, got {norm!r}")
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.encoder = ELANResEncoder(
            input_channels,
            n_stages,
            features_per_stage,
            conv_op,
            kernel_sizes,
            strides,
            use_elanres=use_elanres,
            use_msca=use_msca,
            msca_mode=msca_mode,
            msca_min_stage=msca_min_stage,
            repconv_depth=repconv_depth,
            drop_path_rate=drop_path_rate,
            norm_op=NORM_OPS[norm],
            norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU,
            nonlin_kwargs={"negative_slope": nonlin_negative_slope, "inplace": True},
            return_skips=True,
        )
        self.decoder = ELANResDecoder(
            self.encoder,
            num_classes,
            deep_supervision,
            use_elanres=use_elanres,
            repconv_depth=repconv_depth,
            ds_mode=ds_mode,
        )
        # Keys nnU-Net uses to transfer pretrained encoder weights.
        self.key_to_encoder = "encoder.stages"
        self.key_to_stem = "encoder.stages.0.entry"
        self.keys_to_in_proj = ("encoder.stages.0.entry.conv",)

    @staticmethod
    def check_patch_size(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> tuple[int, ...]:
        """Checks that every spatial axis is divisible by the product of the strides along it.

        Args:
            patch_size: Spatial size (no batch or channel axis).
            strides: Per-stage strides, as in the plans.

        Returns:
            The required divisor of each axis.

        Raises:
            ValueError: Naming the size, the divisors and the nearest valid sizes of the offending axes.
        """
        patch_size = tuple(int(p) for p in patch_size)
        dims = len(patch_size)
        strides = [to_tuple(s, dims, "strides entry") for s in strides]
        divisors = tuple(math.prod(s[axis] for s in strides) for axis in range(dims))
        problems = []
        for axis, (size, div) in enumerate(zip(patch_size, divisors, strict=True)):
            if size % div == 0 and size > 0:
                continue
            lower, upper = (size // div) * div, (size // div + 1) * div
            nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            problems.append(f"axis {axis}: size {size} -> nearest valid {nearest}")
        if problems:
            raise ValueError(
                f"spatial size {patch_size} must be divisible by the stride products {divisors} "
                f"(per-axis product of the strides); " + "; ".join(problems)
            )
        return divisors

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Returns logits: a list (highest resolution first) if ``decoder.deep_supervision`` else one tensor."""
        if x.ndim != 5:
            raise ValueError(f"expected a 5D input (batch, channels, x, y, z), got shape {tuple(x.shape)}")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"expected {self.input_channels} input channels, got shape {tuple(x.shape)}")
        self.check_patch_size(x.shape[2:], self.encoder.strides)
        return self.decoder(self.encoder(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements of all convolutions (DNA's unit), used by nnU-Net's planner to estimate VRAM.

        Args:
            input_size: Spatial patch size (three ints, no batch or channel axis).
        """
        if len(input_size) != 3:
            raise ValueError(f"give the spatial size only (x, y, z), got {tuple(input_size)}")
        return self.encoder.compute_conv_feature_map_size(input_size) + self.decoder.compute_conv_feature_map_size(
            input_size
        )

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He init (``kaiming_normal_``, a = 1e-2) for convolutions, zero biases, unit affine norms, except each
        ELANRes block's aggregation norm, which starts at 0 (``ELANResBlock.reset_residual_branch``; ``apply``
        visits a block after its children)."""
        if isinstance(module, ELANResBlock):
            module.reset_residual_branch()
        elif isinstance(module, _ConvNd):
            nn.init.kaiming_normal_(module.weight, a=1e-2)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (_BatchNorm, _InstanceNorm, nn.GroupNorm)) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def deployed(self) -> bool:
        """True when every ``RepConv`` runs fused (also for networks without RepConvs)."""
        return all(m.deployed for m in self.modules() if isinstance(m, RepConv))

    def switch_to_deploy(self) -> int:
        """Makes every ``RepConv`` run as a single fused convolution, for inference in eval mode; idempotent.

        The state dict (keys and values) does not change. Weights loaded later with ``load_state_dict`` are re-fused
        automatically, so this may be called before loading, as nnU-Net's predictor builds the network first and then
        loads one fold after another into it. A deployed network raises in training mode; see :meth:`switch_to_train`.

        Returns:
            How many ``RepConv`` modules this call fused (0 when already deployed).
        """
        return fuse_reparam_modules(self)

    def switch_to_train(self) -> int:
        """Undoes :meth:`switch_to_deploy`: every ``RepConv`` runs (and trains) its branches again; idempotent.

        Returns:
            How many ``RepConv`` modules this call switched back.
        """
        return unfuse_reparam_modules(self)
