"""The model registry: one entry per network, read by the trainers, planners, demo, benchmarks, ``plans/`` and tests.

An entry (:class:`ModelSpec`) holds everything nnyseg knows about one network:

* the network class (its dotted path comes from the class object);
* its presets as data (:class:`Preset`): ``"full"`` (the paper's size, for GPUs) and ``"tiny"`` (a CPU-sized model
  for demos and tests only);
* its topology rule (:class:`ConvUNetTopology` or :class:`IsotropicTopology`): which patch sizes and strides it
  can take, and how to make a patch smaller;
* its memory estimate: the network's own ``compute_conv_feature_map_size``, the quantity nnU-Net's planner uses;
* its trainers, its planner and plans name, and its ablation switches (named ``arch_kwargs`` overrides).

:func:`adapt_configuration` is the one rule that turns any nnU-Net 3D configuration (nnU-Net's default plans, a ResEnc
preset, nnyseg's own plans) into a configuration of a model: the rule itself is written out in ``docs/stock-flow.md``.
Both the planners (``nnyseg plan_and_preprocess -pl ...``) and the trainers (``nnUNetv2_train -tr ...`` on any plans)
call it, so they agree by construction.

Adding a model means one entry in :data:`MODELS` plus its network file.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnyseg.network_architecture.dyntransnet import DynTransNet
from nnyseg.network_architecture.elanres_msca_unet import ELANResMSCAUNet
from nnyseg.network_architecture.swin_next import SwinNeXtUNet

__all__ = [
    "FULL",
    "MODELS",
    "TINY",
    "AdaptationError",
    "ConvUNetTopology",
    "IsotropicTopology",
    "ModelSpec",
    "Preset",
    "adapt_configuration",
    "class_path",
    "get_model",
    "list_models",
    "memory_budget",
    "model_for_network",
]

FULL, TINY = "full", "tiny"
#: Key of a plans configuration that records which model and preset nnyseg wrote there, and from what.
PLANS_MODEL_KEY = "nnyseg_model"
#: Key of a plans configuration under which per-configuration trainer overrides live (see nnyseg.trainers.base).
PLANS_SETTINGS_KEY = "nnyseg_trainer_settings"
#: nnU-Net's smallest batch (``ExperimentPlanner.UNet_min_batch_size``) and its default 5 % dataset cap.
MIN_BATCH_SIZE = 2
DEFAULT_MAX_DATASET_COVERED = 0.05
CONV3D = "torch.nn.modules.conv.Conv3d"
#: The ops nnU-Net's default planner writes for its 3D U-Nets (PlainConvUNet, ResidualEncoderUNet).
NNUNET_CONV_OPS: Mapping[str, Any] = MappingProxyType(
    {
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
)


class AdaptationError(ValueError):
    """A configuration cannot be turned into a model's configuration (2D, or no patch fits the memory budget)."""


def class_path(cls: type) -> str:
    """The dotted path nnU-Net's ``get_network_from_plans`` resolves with ``pydoc.locate``."""
    return f"{cls.__module__}.{cls.__qualname__}"


# ----------------------------------------------------------------------------------------------------------------
# Topology rules
# ----------------------------------------------------------------------------------------------------------------
class TopologyRule(Protocol):
    def fit(self, spacing: Sequence[float], patch_size: Sequence[int]) -> tuple[list[int], dict[str, Any]]:
        """A patch the network can take, close to ``patch_size``, and the topology keywords (``strides``, ...)."""

    def shrink(self, spacing: Sequence[float], patch_size: Sequence[int], axis: int) -> list[int] | None:
        """A smaller patch along ``axis`` (re-fitted by :meth:`fit` afterwards), or None if none is left."""


@dataclass(frozen=True)
class ConvUNetTopology:
    """nnU-Net's conv U-Net rule (``get_pool_and_conv_props``, minimum edge 4): stages, strides and kernels from the
    spacing, every axis divisible by its total stride; shrinking subtracts one total stride, as nnU-Net's planner does.
    """

    min_edge: int = 4

    def fit(self, spacing: Sequence[float], patch_size: Sequence[int]) -> tuple[list[int], dict[str, Any]]:
        from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

        _, strides, kernels, patch, _ = get_pool_and_conv_props(
            [float(s) for s in spacing], [int(p) for p in patch_size], self.min_edge, 999999
        )
        strides = [[int(s) for s in stage] for stage in strides]
        kernels = [[int(k) for k in stage] for stage in kernels]
        return [int(p) for p in patch], {"n_stages": len(strides), "kernel_sizes": kernels, "strides": strides}

    def shrink(self, spacing: Sequence[float], patch_size: Sequence[int], axis: int) -> list[int] | None:
        _, topology = self.fit(spacing, patch_size)
        step = int(np.prod([s[axis] for s in topology["strides"]]))
        if patch_size[axis] - step < self.min_edge * max(1, step // 2):
            return None
        smaller = list(patch_size)
        smaller[axis] -= step
        return smaller


@dataclass(frozen=True)
class IsotropicTopology:
    """A fixed-stride encoder (Swin: stride-2 patch embedding and four 2x2x2 mergings): strides
    ``[[1,1,1]] + n_pool x [[2,2,2]]`` whatever the spacing, every axis rounded to a multiple of ``2**n_pool``;
    shrinking subtracts one multiple.
    """

    n_pool: int = 5

    @property
    def divisor(self) -> int:
        return 2**self.n_pool

    def fit(self, spacing: Sequence[float], patch_size: Sequence[int]) -> tuple[list[int], dict[str, Any]]:
        d = self.divisor
        patch = [max(d, int(p / d + 0.5) * d) for p in patch_size]
        return patch, {"strides": [[1, 1, 1]] + [[2, 2, 2]] * self.n_pool}

    def shrink(self, spacing: Sequence[float], patch_size: Sequence[int], axis: int) -> list[int] | None:
        if patch_size[axis] <= self.divisor:
            return None
        smaller = list(patch_size)
        smaller[axis] -= self.divisor
        return smaller


# ----------------------------------------------------------------------------------------------------------------
# Presets and model entries
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """One size of a model, as data.

    Attributes:
        arch_kwargs: Constructor keywords on top of the topology's.
        widths: ``(base, max)`` channels for conv U-Nets (doubling per stage, capped); None for fixed-width networks.
        per_stage: Keywords with one value per encoder stage: a number is repeated (``n_conv_per_stage: 2`` ->
            ``[2] * n_stages``), a sequence is cut to the number of stages.
        per_decoder_stage: The same, one value per decoder stage.
        max_patch_voxels: CPU presets: the patch is shrunk (the memory loop's step) until it has at most this many
            voxels, instead of the memory budget deciding.
        batch_size: CPU presets: a fixed batch size (instead of the memory budget deciding).
        trainer_settings: Trainer settings this preset implies (the short schedule of the CPU preset).
        description: One line for logs and ``plans/``.
    """

    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    widths: tuple[int, int] | None = None
    per_stage: Mapping[str, Any] = field(default_factory=dict)
    per_decoder_stage: Mapping[str, Any] = field(default_factory=dict)
    max_patch_voxels: int | None = None
    batch_size: int | None = None
    trainer_settings: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


#: The CPU preset's patch cap and schedule, shared by every model (a few minutes on 2 CPU cores).
TINY_PATCH_VOXELS = 32 * 64 * 64
TINY_SCHEDULE: Mapping[str, Any] = MappingProxyType(
    {"num_epochs": 10, "num_iterations_per_epoch": 20, "num_val_iterations_per_epoch": 4, "save_every": 5}
)


#: nnY-Net's CPU preset trains longer, at AdamW's lr 1e-3, on 32^3 patches: 200 iterations at 1e-4 find the liver
#: but no tumour; 1040 find 3 of the demo's 8 held-out lesions, 2080 find 3 or 4 (RESULTS.md, issue #13).
NNYNET_CPU_SCHEDULE: Mapping[str, Any] = MappingProxyType(
    {**TINY_SCHEDULE, "num_epochs": 26, "num_iterations_per_epoch": 80, "initial_lr": 1e-3}
)


def _per_stage(value: Any, n: int) -> list:
    return list(value)[:n] if isinstance(value, (list, tuple)) else [value] * n


def _tiny(description: str, **arch_kwargs: Any) -> dict[str, Any]:
    return {
        "arch_kwargs": arch_kwargs,
        "max_patch_voxels": TINY_PATCH_VOXELS,
        "batch_size": 2,
        "trainer_settings": TINY_SCHEDULE,
        "description": f"CPU demo/test preset, never for real data: {description}",
    }


@dataclass(frozen=True)
class SpeedSetting:
    """A named change of ``arch_kwargs`` that buys speed, per preset; not a default until a fixed-budget comparison
    shows it costs no accuracy (``benchmarks/fixed_budget.py``, issue #12).

    Attributes:
        description: One line for benchmark rows and docs.
        overrides: Preset name -> ``arch_kwargs`` overrides; a preset without an entry has no such setting.
    """

    description: str
    overrides: Mapping[str, Mapping[str, Any]]

    def overrides_for(self, preset: str) -> dict[str, Any]:
        if preset not in self.overrides:
            raise KeyError(f"speed setting {self.description!r} has no overrides for preset {preset!r}")
        return dict(self.overrides[preset])


@dataclass(frozen=True)
class ModelSpec:
    """Everything nnyseg knows about one network; see the module docstring."""

    name: str
    title: str
    network_class: type[nn.Module]
    topology: ConvUNetTopology | IsotropicTopology
    presets: Mapping[str, Preset]
    trainers: tuple[str, ...] = ()
    planner: str | None = None
    plans_name: str | None = None
    kw_requires_import: tuple[str, ...] = ()
    ablations: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Named settings that buy speed (issue #12); the presets stay the papers' configuration.
    speed_settings: Mapping[str, SpeedSetting] = field(default_factory=dict)
    docs: str = ""
    changes: tuple[str, ...] = ()
    #: ``arch_kwargs`` that follow from the raw dataset folder (nnY-Net: clinical mode when it has a clinical table).
    dataset_arch_kwargs: Callable[[Path | None], dict[str, Any]] | None = None

    def arch_kwargs_for_dataset(self, raw_dataset_folder: Path | None) -> dict[str, Any]:
        """The entries of :attr:`dataset_arch_kwargs` for a raw dataset folder (None: not available)."""
        return dict(self.dataset_arch_kwargs(raw_dataset_folder)) if self.dataset_arch_kwargs else {}

    @property
    def network_class_name(self) -> str:
        return class_path(self.network_class)

    def preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise KeyError(f"model {self.name!r} has no preset {name!r}; presets: {sorted(self.presets)}")
        return self.presets[name]

    def architecture(
        self,
        spacing: Sequence[float],
        patch_size: Sequence[int],
        preset: str = FULL,
        overrides: Mapping[str, Any] | None = None,
    ) -> tuple[list[int], dict[str, Any]]:
        """The plans' ``architecture`` block for a patch (fitted to the topology rule) and that patch.

        Args:
            spacing: Target spacing of the configuration (numpy axis order).
            patch_size: The patch to start from.
            preset: A key of :attr:`presets`.
            overrides: ``arch_kwargs`` entries to replace (an ablation switch, the clinical schema).
        """
        p = self.preset(preset)
        patch, kwargs = self.topology.fit(spacing, patch_size)
        n = len(kwargs["strides"])
        if p.widths is not None:
            base, maximum = p.widths
            kwargs["features_per_stage"] = [min(maximum, base * 2**i) for i in range(n)]
        kwargs.update({k: _per_stage(v, n) for k, v in p.per_stage.items()})
        kwargs.update({k: _per_stage(v, n - 1) for k, v in p.per_decoder_stage.items()})
        kwargs.update(deepcopy(dict(p.arch_kwargs)))
        kwargs.update(deepcopy(dict(overrides or {})))
        return patch, {
            "network_class_name": self.network_class_name,
            "arch_kwargs": kwargs,
            "_kw_requires_import": list(self.kw_requires_import),
        }

    def build(
        self,
        patch_size: Sequence[int],
        *,
        spacing: Sequence[float] | None = None,
        preset: str = FULL,
        input_channels: int = 1,
        num_classes: int = 2,
        deep_supervision: bool = True,
        overrides: Mapping[str, Any] | None = None,
    ) -> tuple[nn.Module, list[int], dict[str, Any]]:
        """Build the network for a patch exactly as nnU-Net builds it from plans: ``(network, patch, architecture)``."""
        spacing = [1.0] * len(patch_size) if spacing is None else spacing
        patch, architecture = self.architecture(spacing, patch_size, preset, overrides)
        return build_from_architecture(architecture, input_channels, num_classes, deep_supervision), patch, architecture


def build_from_architecture(
    architecture: Mapping[str, Any],
    input_channels: int,
    num_classes: int,
    deep_supervision: bool = True,
    *,
    allow_init: bool = True,
) -> nn.Module:
    """nnU-Net's ``get_network_from_plans`` for a plans ``architecture`` block."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(
        architecture["network_class_name"],
        deepcopy(dict(architecture["arch_kwargs"])),
        list(architecture["_kw_requires_import"]),
        input_channels,
        num_classes,
        allow_init=allow_init,
        deep_supervision=deep_supervision,
    )


def estimate_memory(
    architecture: Mapping[str, Any], patch_size: Sequence[int], input_channels: int, num_classes: int
) -> float:
    """A network's feature-map count for one sample at ``patch_size``: what nnU-Net's planner compares with its
    reference (``ExperimentPlanner.static_estimate_VRAM_usage``)."""
    key = json.dumps(architecture, sort_keys=True)
    network = _network_for_estimates(key, int(input_channels), int(num_classes))
    return float(network.compute_conv_feature_map_size(tuple(int(p) for p in patch_size)))


@functools.lru_cache(maxsize=2)
def _network_for_estimates(architecture_json: str, input_channels: int, num_classes: int) -> nn.Module:
    # The estimate depends on the patch, the network only on its keywords: a shrinking loop builds each network once.
    import torch

    threads = torch.get_num_threads()
    try:
        return build_from_architecture(json.loads(architecture_json), input_channels, num_classes, allow_init=False)
    finally:
        torch.set_num_threads(threads)


def clinical_mode(raw_dataset_folder: Path | None) -> dict[str, Any]:
    """nnY-Net's cross-attention from the dataset: ``clinical`` with the table's schema when the raw dataset has a
    clinical table beside ``dataset.json`` (nnyseg.data.clinical), otherwise the preset's (``latent``)."""
    from nnyseg.data.clinical import find_clinical_table, load_clinical_table

    if raw_dataset_folder is None or find_clinical_table(raw_dataset_folder) is None:
        return {}
    return {"cross_attention": "clinical", "clinical_schema": load_clinical_table(raw_dataset_folder).schema}


_CONV_KW_IMPORTS = ("conv_op", "norm_op", "dropout_op", "nonlin")
#: nnU-Net's ResEnc encoder blocks per stage (``ResEncUNetPlanner.UNet_blocks_per_stage_encoder``).
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)


def _nnunet_conv_presets(
    description: str, per_stage: Mapping[str, Any], per_decoder_stage: Mapping[str, Any]
) -> dict[str, Preset]:
    """Full and CPU presets of one of nnU-Net's own conv U-Nets (widths 32..320 and 8..64, nnU-Net's conv ops)."""
    common = {"per_stage": per_stage, "per_decoder_stage": per_decoder_stage}
    return {
        FULL: Preset(
            arch_kwargs={"conv_op": CONV3D, **NNUNET_CONV_OPS}, widths=(32, 320), description=description, **common
        ),
        TINY: Preset(**_tiny("widths 8..64", conv_op=CONV3D, **NNUNET_CONV_OPS), widths=(8, 64), **common),
    }


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="nnynet",
            title="nnY-Net (Swin-NeXt with cross-attention to clinical features)",
            network_class=SwinNeXtUNet,
            topology=IsotropicTopology(),
            presets={
                FULL: Preset(
                    arch_kwargs={
                        "feature_size": 48,
                        "depths": [2, 2, 2, 2],
                        "num_heads": [3, 6, 12, 24],
                        "window_size": 7,
                        "decoder_blocks": 2,
                        "decoder_expansion": [4, 4, 4, 3, 2],
                        "cross_attention": "latent",
                        "ca_heads": 12,
                        "ca_film_levels": "all",
                    },
                    description="Swin encoder F=48, depths 2-2-2-2, heads 3-6-12-24, window 7; MedNeXt decoder",
                ),
                TINY: Preset(
                    **{
                        **_tiny(
                            "F=12, depths 1-1-1-1, window 4, one decoder block per level; patch at most 32^3, "
                            "26 epochs x 80 iterations at lr 1e-3, the schedule that finds the demo phantom's tumours",
                            feature_size=12,
                            depths=[1, 1, 1, 1],
                            num_heads=[1, 2, 4, 8],
                            window_size=4,
                            decoder_blocks=1,
                            decoder_expansion=[2, 2, 2, 2, 2],
                            cross_attention="latent",
                            ca_heads=2,
                            ca_film_levels="all",
                        ),
                        "trainer_settings": NNYNET_CPU_SCHEDULE,
                        "max_patch_voxels": 32**3,
                    }
                ),
            },
            trainers=("nnYNetTrainer", "nnYNetTrainer_tiny"),
            planner="nnYNetPlanner",
            plans_name="nnYNetPlans",
            ablations={
                "ca_off": {"cross_attention": "off"},
                "film_bottleneck": {"ca_film_levels": "bottleneck"},
            },
            speed_settings={
                "light_full_res": SpeedSetting(
                    "no MedNeXt block after the last up-sampling (full resolution), the up-sampling block kept",
                    {FULL: {"decoder_blocks": [2, 2, 2, 2, 0]}, TINY: {"decoder_blocks": [1, 1, 1, 1, 0]}},
                ),
                "window_4": SpeedSetting("Swin window 4 instead of 7", {FULL: {"window_size": 4}}),
            },
            docs="docs/nnynet.md",
            dataset_arch_kwargs=clinical_mode,
            changes=(
                "network SwinNeXtUNet; cross-attention 'clinical' when the raw dataset has a clinical table, else "
                "'latent'; FiLM of the bottleneck and every decoder level",
                "isotropic 2x2x2 pooling (strides [[1,1,1]] + 5 x [[2,2,2]]), every patch axis a multiple of 32",
            ),
        ),
        ModelSpec(
            name="dyntransnet",
            title="DynTransNet (dynamic multi-head self-attention, Feature Mix and Residual Modules)",
            network_class=DynTransNet,
            topology=IsotropicTopology(),
            presets={
                FULL: Preset(
                    arch_kwargs={
                        "encoder": "swin",
                        "dmsa_bias": "key",
                        "rel_pos_bias": True,
                        "fusion": "fmm",
                        "residual_module": True,
                        "feature_size": 48,
                        "depths": [2, 2, 2, 2],
                        "num_heads": [3, 6, 12, 24],
                        "window_size": 7,
                    },
                    description="Swin encoder F=48 with the D-MSA key bias, window 7; FM-M + RM decoder",
                ),
                TINY: Preset(
                    **_tiny(
                        "F=12, depths 1-1-1-1, heads 1-2-4-8, window 4",
                        encoder="swin",
                        dmsa_bias="key",
                        rel_pos_bias=True,
                        fusion="fmm",
                        residual_module=True,
                        feature_size=12,
                        depths=[1, 1, 1, 1],
                        num_heads=[1, 2, 4, 8],
                        window_size=4,
                    )
                ),
            },
            trainers=(
                "DynTransNetTrainer",
                "DynTransNetTrainer_nnUNet",
                "DynTransNetTrainer_tiny",
                "DynTransNetTrainer_nnUNet_tiny",
            ),
            planner="DynTransNetPlanner",
            plans_name="DynTransNetPlans",
            ablations={
                "no_dmsa": {"dmsa_bias": "none"},
                "concat": {"fusion": "concat"},
                "weighted_sum": {"fusion": "weighted_sum"},
                "no_rm": {"residual_module": False},
            },
            speed_settings={"window_4": SpeedSetting("Swin window 4 instead of 7", {FULL: {"window_size": 4}})},
            docs="docs/dyntransnet.md",
            changes=(
                "network DynTransNet, option A (Swin encoder with the D-MSA key-saliency bias; decoder: transposed "
                "conv -> FM-M -> RM per stage)",
                "isotropic 2x2x2 pooling (strides [[1,1,1]] + 5 x [[2,2,2]]), every patch axis a multiple of 32",
            ),
        ),
        ModelSpec(
            name="elanres_msca",
            title="ELANRes-MSCA-UNet (re-parameterisable ELAN residual blocks, multi-scale conv attention)",
            network_class=ELANResMSCAUNet,
            topology=ConvUNetTopology(),
            presets={
                FULL: Preset(
                    arch_kwargs={
                        "conv_op": CONV3D,
                        "use_elanres": True,
                        "use_msca": True,
                        "msca_mode": "slice2d",
                        "repconv_depth": 2,
                        "norm": "batch",
                    },
                    widths=(32, 320),
                    description="nnU-Net's planned stages, strides and kernels; widths 32..320",
                ),
                TINY: Preset(
                    **_tiny(
                        "widths 8..64",
                        conv_op=CONV3D,
                        use_elanres=True,
                        use_msca=True,
                        msca_mode="slice2d",
                        repconv_depth=2,
                        norm="batch",
                    ),
                    widths=(8, 64),
                ),
            },
            trainers=(
                "ELANResMSCATrainer",
                "ELANResMSCATrainer_nnUNet",
                "ELANResMSCATrainer_tiny",
                "ELANResMSCATrainer_nnUNet_tiny",
            ),
            planner="ELANResMSCAPlanner",
            plans_name="ELANResMSCAPlans",
            kw_requires_import=("conv_op",),
            ablations={
                "no_elanres": {"use_elanres": False},
                "no_msca": {"use_msca": False},
                "msca_strip3d": {"msca_mode": "strip3d"},
            },
            docs="docs/elanres_msca.md",
            changes=(
                "network ELANResMSCAUNet (ELANRes blocks with RepConv, MSCA, BatchNorm) on nnU-Net's planned "
                "stages/strides/kernels, widths 32..320",
            ),
        ),
        ModelSpec(
            name="plainconvunet",
            title="nnU-Net's PlainConvUNet (the baseline)",
            network_class=PlainConvUNet,
            topology=ConvUNetTopology(),
            presets=_nnunet_conv_presets(
                "nnU-Net's default 3D U-Net", {"n_conv_per_stage": 2}, {"n_conv_per_stage_decoder": 2}
            ),
            kw_requires_import=_CONV_KW_IMPORTS,
        ),
        ModelSpec(
            name="resencunet_m",
            title="nnU-Net's ResidualEncoderUNet, ResEnc M topology",
            network_class=ResidualEncoderUNet,
            topology=ConvUNetTopology(),
            presets=_nnunet_conv_presets(
                "nnU-Net's ResEnc M preset network",
                {"n_blocks_per_stage": RESENC_BLOCKS},
                {"n_conv_per_stage_decoder": 1},
            ),
            kw_requires_import=_CONV_KW_IMPORTS,
        ),
    )
}


def list_models(*, methods_only: bool = False) -> list[str]:
    """Registry keys, methods first; ``methods_only`` leaves out nnU-Net's own baselines (models without trainers)."""
    return [name for name, spec in MODELS.items() if spec.trainers or not methods_only]


def get_model(name: str) -> ModelSpec:
    """The registry entry ``name``.

    Raises:
        KeyError: With the known names.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; models are {list_models()}")
    return MODELS[name]


def model_for_network(network_class_name: str) -> ModelSpec | None:
    """The entry whose network the plans' ``network_class_name`` names (dotted path or bare class name)."""
    bare = network_class_name.rsplit(".", 1)[-1]
    for spec in MODELS.values():
        if network_class_name == spec.network_class_name or bare == spec.network_class.__name__:
            return spec
    return None


# ----------------------------------------------------------------------------------------------------------------
# The adaptation rule (docs/stock-flow.md)
# ----------------------------------------------------------------------------------------------------------------
def memory_budget(
    configuration: Mapping[str, Any],
    input_channels: int,
    num_classes: int,
    planner_reference: float | None = None,
) -> float:
    """The memory (feature-map voxels per batch) a model may use in place of a configuration's own network.

    Plans do not record the GPU target they were planned for. What they show is what the planner spent: the given
    network's estimate at its patch times its batch. That is the budget, unless the patch covers the whole median
    image: then memory did not limit the planner, and the budget is ``planner_reference`` (nnU-Net's reference for
    the planner that wrote the plans, times its reference batch) when that is larger.
    """
    estimate = estimate_memory(configuration["architecture"], configuration["patch_size"], input_channels, num_classes)
    spent = estimate * int(configuration["batch_size"])
    median = configuration["median_image_size_in_voxels"]
    covers_image = all(int(p) >= float(m) for p, m in zip(configuration["patch_size"], median, strict=True))
    if covers_image and planner_reference is not None:
        return max(spent, float(planner_reference))
    return spent


def adapt_configuration(
    spec: ModelSpec,
    configuration: Mapping[str, Any],
    *,
    input_channels: int,
    num_classes: int,
    num_training_cases: int,
    preset: str = FULL,
    max_dataset_covered: float = DEFAULT_MAX_DATASET_COVERED,
    planner_reference: float | None = None,
    arch_overrides: Mapping[str, Any] | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Turn a resolved nnU-Net 3D configuration into ``spec``'s configuration (see docs/stock-flow.md).

    Spacing, normalisation, resampling and the preprocessed data are kept. The patch starts from the configuration's
    patch, is fitted to the topology rule and, while the model's memory estimate at the minimum batch exceeds the
    budget (:func:`memory_budget`), reduced along the axis largest relative to the median
    image shape (nnU-Net's planner loop). The batch then fills the budget, between 2 and nnU-Net's dataset cap
    (``max_dataset_covered`` of the median image times the number of training cases). CPU presets cap the patch by
    voxels instead (the same shrinking step until the patch has at most ``max_patch_voxels``) and fix the batch.

    Args:
        spec: The model.
        configuration: A resolved configuration dict (``ConfigurationManager.configuration``).
        input_channels: Network input channels (image channels, plus one-hot previous-stage labels in a cascade).
        num_classes: Network outputs (labels or regions).
        num_training_cases: ``numTraining`` of the dataset (for the batch cap).
        preset: Key of ``spec.presets``.
        max_dataset_covered: Fraction of the dataset one batch may cover (nnU-Net: 0.05; ResEnc presets: 1).
        planner_reference: The planner's memory reference (see :func:`memory_budget`), or None if unknown.
        arch_overrides: ``arch_kwargs`` entries to set (e.g. nnY-Net's clinical mode and schema).
        source: Plans and configuration, for error messages.

    Returns:
        A new configuration dict with ``patch_size``, ``batch_size``, ``architecture`` and the ``nnyseg_model``
        record replaced; everything else as given.

    Raises:
        AdaptationError: For a 2D configuration, or when no patch fits the budget.
    """
    where = source or "configuration"
    spacing = [float(s) for s in configuration["spacing"]]
    if len(spacing) != 3:
        raise AdaptationError(
            f"{where}: {spec.title} is a 3D network, but this is a 2D configuration; train a 3D configuration "
            "(3d_fullres, 3d_lowres or 3d_cascade_fullres) instead"
        )
    p = spec.preset(preset)
    median = [float(m) for m in configuration["median_image_size_in_voxels"]]
    given_patch = [int(x) for x in configuration["patch_size"]]
    if p.max_patch_voxels is not None:
        patch, architecture = spec.architecture(spacing, given_patch, preset, arch_overrides)
        while math.prod(patch) > p.max_patch_voxels:
            smaller = _shrink(spec, spacing, patch, median)
            if smaller is None:
                break
            patch, architecture = spec.architecture(spacing, smaller, preset, arch_overrides)
        batch_size = int(p.batch_size or MIN_BATCH_SIZE)
        budget = None
    else:
        budget = memory_budget(configuration, input_channels, num_classes, planner_reference)
        patch, architecture = spec.architecture(spacing, given_patch, preset, arch_overrides)
        estimate = estimate_memory(architecture, patch, input_channels, num_classes)
        while estimate * MIN_BATCH_SIZE > budget:
            smaller = _shrink(spec, spacing, patch, median)
            if smaller is None:
                raise AdaptationError(
                    f"{where}: {spec.title} does not fit the memory budget of this configuration even at its "
                    f"smallest patch {patch} with batch {MIN_BATCH_SIZE} (estimate {estimate:.3g} x "
                    f"{MIN_BATCH_SIZE} > budget {budget:.3g}, the given network's estimate at its patch "
                    f"{given_patch} and batch {configuration['batch_size']}); plan with a larger GPU memory target "
                    "(for example -pl nnUNetPlannerResEncL, or nnUNetv2_plan_and_preprocess -gpu_memory_target)"
                )
            patch, architecture = spec.architecture(spacing, smaller, preset, arch_overrides)
            estimate = estimate_memory(architecture, patch, input_channels, num_classes)
        batch_size = round(budget / estimate)
        n_voxels = math.prod(median) * num_training_cases
        batch_cap = round(n_voxels * max_dataset_covered / math.prod(patch))
        batch_size = int(max(min(batch_size, batch_cap), MIN_BATCH_SIZE))
    adapted = deepcopy(dict(configuration))
    adapted.pop("inherits_from", None)
    adapted["patch_size"] = patch
    adapted["batch_size"] = batch_size
    adapted["architecture"] = architecture
    adapted[PLANS_MODEL_KEY] = {
        "model": spec.name,
        "preset": preset,
        "adapted_from": {
            "network_class_name": configuration["architecture"]["network_class_name"],
            "patch_size": given_patch,
            "batch_size": int(configuration["batch_size"]),
            "memory_budget": budget,
        },
    }
    return adapted


def _shrink(spec: ModelSpec, spacing: list[float], patch: list[int], median: list[float]) -> list[int] | None:
    """One step of nnU-Net's planner loop: reduce the axis largest relative to the median image shape (the next one
    if that axis cannot shrink); None when no axis can."""
    order = np.argsort([x / m for x, m in zip(patch, median, strict=True)])[::-1]
    return next((s for s in (spec.topology.shrink(spacing, patch, int(a)) for a in order) if s is not None), None)


def configuration_is_model(spec: ModelSpec, configuration: Mapping[str, Any], preset: str = FULL) -> bool:
    """Whether a configuration already holds ``spec``'s network in ``preset`` (then it is used as it is).

    Any configuration that names the network counts as the full preset; a CPU preset must be recorded as such.
    """
    architecture = configuration.get("architecture") or {}
    if model_for_network(str(architecture.get("network_class_name", ""))) is not spec:
        return False
    recorded = (configuration.get(PLANS_MODEL_KEY) or {}).get("preset", FULL)
    return preset == FULL or recorded == preset


def describe_change(adapted: Mapping[str, Any]) -> str:
    """One line saying what :func:`adapt_configuration` changed, for the training log."""
    record = adapted[PLANS_MODEL_KEY]
    before = record["adapted_from"]
    network = adapted["architecture"]["network_class_name"].rsplit(".", 1)[-1]
    budget = before["memory_budget"]
    return (
        f"network {before['network_class_name'].rsplit('.', 1)[-1]} -> {network} ({record['model']}, preset "
        f"{record['preset']!r}); patch {before['patch_size']} -> {list(adapted['patch_size'])}; batch "
        f"{before['batch_size']} -> {adapted['batch_size']}"
        + (f" (memory budget {budget:.3g} feature-map voxels)" if budget is not None else " (fixed by the preset)")
    )
