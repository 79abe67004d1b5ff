"""Experiment planners: nnU-Net's fingerprint-based planning, adapted to each nnyseg architecture.

Every planner here is an ``ExperimentPlanner`` subclass and runs nnU-Net's own planning first: target spacing,
median shape, the PlainConvUNet patch size and batch size, normalisation and resampling all come from the dataset
fingerprint exactly as in ``nnUNetv2_plan_and_preprocess``. Each 3D configuration is then adapted in
:meth:`nnysegPlannerBase.adapt_configuration`:

1. :meth:`~nnysegPlannerBase.topology` turns the patch into one the architecture can take (for example every axis a
   multiple of 32 with isotropic 2x2x2 pooling for a Swin encoder) and writes the architecture block (dotted class
   path and keyword arguments) into the plans;
2. while the architecture's own memory estimate (``compute_conv_feature_map_size``, as nnU-Net uses for its U-Nets)
   exceeds nnU-Net's reference for the GPU memory target, the axis that is largest relative to the median image
   shape is reduced (:meth:`~nnysegPlannerBase.reduce_axis`), as nnU-Net's own loop does;
3. the batch size is recomputed from the remaining headroom with nnU-Net's rules (at least 2, at most 5 % of the
   dataset's voxels per batch).

Every plans file also gets ``3d_fullres_tiny``, the tiny CPU preset: the same preprocessed data, narrow widths, a
small patch and a short trainer schedule (``nnyseg_trainer_settings``). It exists to run the demo and the tests on a
laptop CPU in minutes and is never meant for real data.

The 3d_fullres data are preprocessed exactly as nnU-Net's default plans (same spacing and normalisation), so they
share nnU-Net's ``nnUNetPlans_3d_fullres`` folder unless ``-overwrite_target_spacing`` is given.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any, ClassVar

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

import nnyseg
from nnyseg.trainers.base import PLANS_SETTINGS_KEY

TINY_CONFIGURATION = "3d_fullres_tiny"
CONV3D = "torch.nn.modules.conv.Conv3d"
#: The ops nnU-Net's default planner writes for its 3D U-Nets (PlainConvUNet, ResidualEncoderUNet).
NNUNET_CONV_OPS: dict[str, Any] = {
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}


def conv_unet_topology(spacing: list[float], patch_size: list[int]) -> tuple[list[int], list[list[int]], list]:
    """nnU-Net's pooling/kernel rule for a conv U-Net: returns (patch size made divisible, kernels, strides)."""
    _, strides, kernels, patch, _ = get_pool_and_conv_props(spacing, patch_size, 4, 999999)
    return [int(p) for p in patch], [list(map(int, k)) for k in kernels], [list(map(int, s)) for s in strides]


def features_per_stage(n_stages: int, base: int, maximum: int) -> list[int]:
    """Width doubling per stage from ``base``, capped at ``maximum`` (nnU-Net's rule)."""
    return [min(maximum, base * 2**i) for i in range(n_stages)]


class nnysegPlannerBase(ExperimentPlanner):
    """nnU-Net's ExperimentPlanner plus an architecture-adaptation step and the tiny CPU preset.

    Subclasses set the class attributes and override :meth:`topology` (and :meth:`reduce_axis` where the
    architecture's divisibility differs from nnU-Net's conv U-Net).
    """

    #: Plans name written when ``-overwrite_plans_name`` is not given.
    default_plans_name: ClassVar[str] = "nnysegBaselinePlans"
    #: Dotted path of the network class nnU-Net builds from these plans.
    network_class_name: ClassVar[str] = ""
    #: Whether the architecture also has a 2D form; 3D-only architectures drop nnU-Net's ``2d`` configuration.
    supports_2d: ClassVar[bool] = False
    #: Whether the 3D configurations are re-planned for the architecture (False keeps nnU-Net's PlainConvUNet plan).
    adapts_3d: ClassVar[bool] = True
    #: The tiny preset's voxel budget for its patch (32 x 64 x 64).
    tiny_max_patch_voxels: ClassVar[int] = 32 * 64 * 64
    tiny_batch_size: ClassVar[int] = 2
    #: Short schedule of the tiny preset: a few minutes on 2 CPU cores.
    tiny_trainer_settings: ClassVar[dict[str, Any]] = {
        "num_epochs": 10,
        "num_iterations_per_epoch": 20,
        "num_val_iterations_per_epoch": 4,
        "save_every": 5,
    }
    #: What this preset changes relative to nnU-Net's default plans, for ``plans/`` and the plans' ``nnyseg`` block.
    changes: ClassVar[tuple[str, ...]] = ()
    #: False when the planner changes the intensity normalisation, so 3d_fullres cannot share nnU-Net's data.
    shares_nnunet_preprocessing: ClassVar[bool] = True
    #: nnU-Net's 3D widths (``UNet_base_num_features``, ``UNet_max_features_3d``), as class constants so that
    #: :meth:`topology` needs no dataset (benchmarks and tests build networks from it directly).
    base_features: ClassVar[int] = 32
    max_features: ClassVar[int] = 320

    def __init__(
        self,
        dataset_name_or_id: str | int,
        gpu_memory_target_in_gb: float = 8,
        preprocessor_name: str = "DefaultPreprocessor",
        plans_name: str | None = None,
        overwrite_target_spacing: list[float] | tuple[float, ...] | None = None,
        suppress_transpose: bool = False,
    ):
        super().__init__(
            dataset_name_or_id,
            gpu_memory_target_in_gb,
            preprocessor_name,
            plans_name or self.default_plans_name,
            overwrite_target_spacing,
            suppress_transpose,
        )

    # ----------------------------------------------------------------------------------------------------------
    # Architecture hooks
    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def topology(cls, spacing: list[float], patch_size: list[int], *, tiny: bool = False) -> tuple[list[int], dict]:
        """Return a patch size the architecture can take, close to ``patch_size``, and its architecture block.

        The block is the plans' ``architecture`` entry: ``network_class_name``, ``arch_kwargs`` (which must hold
        ``strides``, read back by nnU-Net for deep supervision) and ``_kw_requires_import``.
        """
        raise NotImplementedError(f"{cls.__name__} does not define topology()")

    def reduce_axis(self, spacing: list[float], patch_size: list[int], axis: int) -> list[int] | None:
        """Return a smaller patch along ``axis`` (before :meth:`topology` re-validates it), or None if impossible."""
        _, _, strides = conv_unet_topology(spacing, patch_size)
        step = int(np.prod([s[axis] for s in strides]))
        if patch_size[axis] - step < 4 * max(1, step // 2):
            return None
        smaller = list(patch_size)
        smaller[axis] -= step
        return smaller

    # ----------------------------------------------------------------------------------------------------------
    # nnU-Net hooks
    # ----------------------------------------------------------------------------------------------------------
    def generate_data_identifier(self, configuration_name: str) -> str:
        # 3d_fullres preprocessing depends only on nnU-Net's spacing and normalisation, which we do not change, so
        # the data are shared with nnU-Net's default plans (as the ResEnc presets do). Other configurations (3d_lowres)
        # depend on the patch size and get their own folder.
        if configuration_name in ("2d", "3d_fullres") and self.overwrite_target_spacing is None:
            return "nnUNetPlans_" + configuration_name
        return super().generate_data_identifier(configuration_name)

    def get_plans_for_configuration(
        self,
        spacing: np.ndarray | tuple[float, ...] | list[float],
        median_shape: np.ndarray | tuple[int, ...],
        data_identifier: str,
        approximate_n_voxels_dataset: float,
        _cache: dict,
    ) -> dict:
        plan = super().get_plans_for_configuration(
            spacing, median_shape, data_identifier, approximate_n_voxels_dataset, _cache
        )
        if len(spacing) != 3 or not self.adapts_3d:
            return plan
        return self.adapt_configuration(plan, median_shape, approximate_n_voxels_dataset)

    def save_plans(self, plans: dict) -> None:
        configurations = plans["configurations"]
        if not self.supports_2d:
            configurations.pop("2d", None)
        if "3d_fullres" in configurations:
            configurations[TINY_CONFIGURATION] = self.tiny_configuration(configurations["3d_fullres"])
        plans["nnyseg"] = {
            "version": nnyseg.__version__,
            "planner": type(self).__name__,
            "changes_from_nnunet_defaults": list(self.changes),
            "tiny_preset": f"'{TINY_CONFIGURATION}' is a reduced configuration for CPU demos and tests only",
        }
        super().save_plans(plans)

    # ----------------------------------------------------------------------------------------------------------
    # Adaptation
    # ----------------------------------------------------------------------------------------------------------
    def estimate_memory(self, patch_size: list[int], architecture: dict) -> float:
        """The architecture's own feature-map estimate, as nnU-Net's planner computes it for its U-Nets."""
        return self.static_estimate_VRAM_usage(
            tuple(patch_size),
            len(self.dataset_json["channel_names"]),
            len(self.dataset_json["labels"]),
            architecture["network_class_name"],
            architecture["arch_kwargs"],
            tuple(architecture["_kw_requires_import"]),
        )

    def adapt_configuration(self, plan: dict, median_shape, approximate_n_voxels_dataset: float) -> dict:
        """Re-plan one 3D configuration for this architecture (see the module docstring)."""
        spacing = [float(s) for s in plan["spacing"]]
        median = [float(m) for m in median_shape]
        patch, architecture = self.topology(spacing, list(plan["patch_size"]))
        reference = self.UNet_reference_val_3d * (self.UNet_vram_target_GB / self.UNet_reference_val_corresp_GB)
        ref_bs = self.UNet_reference_val_corresp_bs_3d
        estimate = self.estimate_memory(patch, architecture)
        while estimate / ref_bs * 2 > reference:
            order = np.argsort([p / m for p, m in zip(patch, median, strict=False)])[::-1]
            for axis in order:
                smaller = self.reduce_axis(spacing, patch, int(axis))
                if smaller is not None:
                    break
            else:
                break  # nothing left to reduce: keep the smallest valid patch
            patch, architecture = self.topology(spacing, smaller)
            estimate = self.estimate_memory(patch, architecture)
        batch_size = round(reference / estimate * ref_bs)
        batch_cap = round(approximate_n_voxels_dataset * self.max_dataset_covered / np.prod(patch, dtype=np.float64))
        plan = dict(plan)
        plan["patch_size"] = patch
        plan["batch_size"] = int(max(min(batch_size, batch_cap), self.UNet_min_batch_size))
        plan["architecture"] = architecture
        return plan

    def tiny_configuration(self, fullres: dict) -> dict:
        """The tiny CPU preset: inherits 3d_fullres's data and preprocessing; small patch, narrow net, short run."""
        spacing = [float(s) for s in fullres["spacing"]]
        patch = [int(p) for p in fullres["patch_size"]]
        while np.prod(patch) > self.tiny_max_patch_voxels:
            axis = int(np.argmax(patch))
            patch[axis] = max(8, patch[axis] // 2)
        patch, architecture = self.topology(spacing, patch, tiny=True)
        return {
            "inherits_from": "3d_fullres",
            "patch_size": patch,
            "batch_size": self.tiny_batch_size,
            "architecture": architecture,
            PLANS_SETTINGS_KEY: deepcopy(self.tiny_trainer_settings),
        }


class nnysegBaselinePlanner(nnysegPlannerBase):
    """nnU-Net's default PlainConvUNet plans, unchanged, plus the tiny CPU preset of the same network.

    This is the baseline every nnyseg architecture is compared with; train it with ``-tr nnysegTrainer``.
    """

    default_plans_name = "nnysegBaselinePlans"
    network_class_name: ClassVar[str] = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    supports_2d = True
    adapts_3d = False
    changes = (
        "2d, 3d_fullres, 3d_lowres: identical to nnU-Net's default ExperimentPlanner (PlainConvUNet)",
        f"adds {TINY_CONFIGURATION}: PlainConvUNet with widths 8..64, patch <= 32x64x64 voxels, batch 2, "
        "10 epochs x 20 iterations",
    )

    @classmethod
    def topology(cls, spacing: list[float], patch_size: list[int], *, tiny: bool = False) -> tuple[list[int], dict]:
        patch, kernels, strides = conv_unet_topology(spacing, patch_size)
        n = len(strides)
        base, maximum = (8, 64) if tiny else (cls.base_features, cls.max_features)
        return patch, {
            "network_class_name": cls.network_class_name,
            "arch_kwargs": {
                "n_stages": n,
                "features_per_stage": features_per_stage(n, base, maximum),
                "conv_op": CONV3D,
                "kernel_sizes": kernels,
                "strides": strides,
                "n_conv_per_stage": [2] * n,
                "n_conv_per_stage_decoder": [2] * (n - 1),
                **deepcopy(NNUNET_CONV_OPS),
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        }


class ELANResMSCAPlanner(nnysegPlannerBase):
    """ELANRes-MSCA-UNet on nnU-Net's planned topology (architectures.md section 4.4).

    Stages, strides and kernels come from nnU-Net's conv U-Net rule for the fingerprint's spacing; widths are the
    spec's 32 ... 320. The network's own feature-map count (RepConv branches, ELAN concatenations, MSCA) drives the
    patch and batch size against nnU-Net's memory reference.
    """

    default_plans_name = "ELANResMSCAPlans"
    network_class_name: ClassVar[str] = "nnyseg.network_architecture.elanres_msca_unet.ELANResMSCAUNet"
    changes = (
        "3d_fullres: network ELANResMSCAUNet (ELANRes blocks with RepConv, MSCA from stage 1, BatchNorm) on nnU-Net's "
        "planned stages/strides/kernels, widths 32..320",
        "3d_fullres: patch and batch size re-derived with ELANResMSCAUNet's own memory estimate (smaller than "
        "PlainConvUNet's: its training-time branches hold about 3.5x the feature maps)",
        "2d dropped (3D-only network); 3d_lowres re-planned the same way when nnU-Net creates it",
        f"adds {TINY_CONFIGURATION}: widths 8..64, patch <= 32x64x64 voxels, batch 2, 10 epochs x 20 iterations",
    )

    @classmethod
    def topology(cls, spacing: list[float], patch_size: list[int], *, tiny: bool = False) -> tuple[list[int], dict]:
        patch, kernels, strides = conv_unet_topology(spacing, patch_size)
        n = len(strides)
        base, maximum = (8, 64) if tiny else (cls.base_features, cls.max_features)
        return patch, {
            "network_class_name": cls.network_class_name,
            "arch_kwargs": {
                "n_stages": n,
                "features_per_stage": features_per_stage(n, base, maximum),
                "conv_op": CONV3D,
                "kernel_sizes": kernels,
                "strides": strides,
                "use_elanres": True,
                "use_msca": True,
                "msca_mode": "slice2d",
                "repconv_depth": 2,
                "norm": "batch",
            },
            "_kw_requires_import": ["conv_op"],
        }


#: The ELANRes-MSCA paper's CT intensity window in HU (architectures.md section 4.4 [P]): clip, then divide by 200.
PAPER_CT_WINDOW_HU = (-200.0, 200.0)


class ELANResMSCAPaperPlanner(ELANResMSCAPlanner):
    """ELANRes-MSCA-UNet with the paper's CT intensities: clip to [-200, 200] HU, then divide by 200.

    nnU-Net looks normalisation classes up by the names in the plans' ``normalization_schemes``, and only inside
    ``nnunetv2.preprocessing.normalization``; a class of our own would have to be copied into the installed nnU-Net.
    nnU-Net's own ``CTNormalization`` already computes ``(clip(x, percentile_00_5, percentile_99_5) - mean) / std``
    with the four numbers read from the plans' ``foreground_intensity_properties_per_channel``, when preprocessing
    the training data and again at prediction (from the model folder's ``plans.json``). This planner writes
    -200, 200, 0 and 200 there for every channel, so nnU-Net's unmodified class computes exactly
    ``clip(x, -200, 200) / 200``, the same way in training and inference, and the choice is visible in the plans.
    Every channel must therefore be CT in HU (``channel_names`` "CT").

    The preprocessed data differ from nnU-Net's, so they get their own folder (``ELANResMSCAPaperPlans_3d_fullres``).
    The paper's body-mask crop belongs to dataset conversion (``nnyseg body-crop``): nnU-Net's ``crop_to_nonzero``
    keeps the whole CT, whose air is about -1024 HU, not 0. The paper's spacing (z = 1.0 mm, in-plane twice the
    median) is nnU-Net's own switch: ``-overwrite_target_spacing 1.0 S S`` (numpy order z, y, x).
    """

    default_plans_name = "ELANResMSCAPaperPlans"
    shares_nnunet_preprocessing = False
    changes = (
        *ELANResMSCAPlanner.changes,
        "all configurations: intensities clip(HU, -200, 200) / 200 through nnU-Net's CTNormalization, with "
        "foreground_intensity_properties_per_channel set to percentile_00_5 = -200, percentile_99_5 = 200, mean = 0, "
        "std = 200 for every channel (all channels must be CT)",
        "3d_fullres: own preprocessed data (ELANResMSCAPaperPlans_3d_fullres), not shared with nnUNetPlans",
    )

    def generate_data_identifier(self, configuration_name: str) -> str:
        # The base class shares nnU-Net's 3d_fullres data, whose normalisation differs: use nnU-Net's own rule.
        return ExperimentPlanner.generate_data_identifier(self, configuration_name)

    def determine_normalization_scheme_and_whether_mask_is_used_for_norm(self) -> tuple[list[str], list[bool]]:
        channels = self.dataset_json["channel_names"]
        not_ct = {k: v for k, v in channels.items() if v.casefold() != "ct"}
        if not_ct:
            raise ValueError(
                f"{self.dataset_name}: {type(self).__name__} windows CT in HU, but dataset.json names channels "
                f"{not_ct} (channel_names must be 'CT')"
            )
        return ["CTNormalization"] * len(channels), [False] * len(channels)

    def save_plans(self, plans: dict) -> None:
        low, high = PAPER_CT_WINDOW_HU
        plans["foreground_intensity_properties_per_channel"] = {
            str(c): {"mean": 0.0, "std": high, "percentile_00_5": low, "percentile_99_5": high}
            for c in range(len(self.dataset_json["channel_names"]))
        }
        super().save_plans(plans)


class nnYNetPlanner(nnysegPlannerBase):
    """nnY-Net (Swin-NeXt + bottleneck cross-attention; architectures.md sections 1 and 2.3).

    The Swin encoder has a fixed topology: a stride-2 patch embedding and four 2x2x2 patch mergings, so the plans
    carry ``strides = [[1,1,1]] + 5 x [[2,2,2]]`` (deep supervision at 1 ... 1/16) and every patch axis must be a
    multiple of 32. nnU-Net's patch is rounded to multiples of 32, then shrunk by 32 along the axis largest relative
    to the median shape while the network's memory estimate exceeds the reference.
    """

    default_plans_name = "nnYNetPlans"
    network_class_name: ClassVar[str] = "nnyseg.network_architecture.swin_next.SwinNeXtUNet"
    divisor: ClassVar[int] = 32
    changes = (
        "3d_fullres: network SwinNeXtUNet (Swin encoder F=48, depths 2-2-2-2, heads 3-6-12-24, window 7; MedNeXt "
        "decoder; bottleneck cross-attention in 'latent' mode, FiLM of the bottleneck and every decoder level)",
        "3d_fullres: isotropic 2x2x2 pooling (strides [[1,1,1]] + 5 x [[2,2,2]]) and every patch axis a multiple "
        "of 32, whatever the spacing; patch and batch size re-derived with the network's own memory estimate",
        "2d dropped (3D-only network); 3d_lowres re-planned the same way when nnU-Net creates it",
        f"adds {TINY_CONFIGURATION}: F=12, depths 1-1-1-1, window 4, one decoder block per level, patch <= 32x64x64 "
        "voxels (multiples of 32), batch 2, 10 epochs x 20 iterations",
    )

    @classmethod
    def topology(cls, spacing: list[float], patch_size: list[int], *, tiny: bool = False) -> tuple[list[int], dict]:
        d = cls.divisor
        patch = [max(d, int(p / d + 0.5) * d) for p in patch_size]
        kwargs: dict[str, Any] = {
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
            "cross_attention": "latent",
            "ca_film_levels": "all",
        }
        if tiny:
            kwargs.update(
                feature_size=12,
                depths=[1, 1, 1, 1],
                num_heads=[1, 2, 4, 8],
                window_size=4,
                decoder_blocks=1,
                decoder_expansion=[2, 2, 2, 2, 2],
                ca_heads=2,
            )
        else:
            kwargs.update(
                feature_size=48,
                depths=[2, 2, 2, 2],
                num_heads=[3, 6, 12, 24],
                window_size=7,
                decoder_blocks=2,
                decoder_expansion=[4, 4, 4, 3, 2],
                ca_heads=12,
            )
        return patch, {"network_class_name": cls.network_class_name, "arch_kwargs": kwargs, "_kw_requires_import": []}

    def reduce_axis(self, spacing: list[float], patch_size: list[int], axis: int) -> list[int] | None:
        if patch_size[axis] <= self.divisor:
            return None
        smaller = list(patch_size)
        smaller[axis] -= self.divisor
        return smaller


class DynTransNetPlanner(nnYNetPlanner):
    """DynTransNet (Swin encoder with D-MSA, FM-M + RM decoder; architectures.md sections 1 and 3.4, option A).

    The Swin encoder has the same fixed topology as nnY-Net's (stride-2 patch embedding and four 2x2x2 patch
    mergings), so the patch rule is inherited unchanged: ``strides = [[1,1,1]] + 5 x [[2,2,2]]`` and every patch axis
    a multiple of 32, shrunk by 32 along the axis largest relative to the median shape while the network's memory
    estimate exceeds the reference.
    """

    default_plans_name = "DynTransNetPlans"
    network_class_name: ClassVar[str] = "nnyseg.network_architecture.dyntransnet.DynTransNet"
    changes = (
        "3d_fullres: network DynTransNet, option A (Swin encoder F=48, depths 2-2-2-2, heads 3-6-12-24, window 7, "
        "with the D-MSA key-saliency bias added to the relative-position bias; decoder: transposed conv -> FM-M -> "
        "RM per stage, five deep-supervision heads)",
        "3d_fullres: isotropic 2x2x2 pooling (strides [[1,1,1]] + 5 x [[2,2,2]]) and every patch axis a multiple "
        "of 32, whatever the spacing; patch and batch size re-derived with the network's own memory estimate",
        "2d dropped (3D-only network); 3d_lowres re-planned the same way when nnU-Net creates it",
        f"adds {TINY_CONFIGURATION}: F=12, depths 1-1-1-1, heads 1-2-4-8, window 4, patch <= 32x64x64 voxels "
        "(multiples of 32), batch 2, 10 epochs x 20 iterations",
    )

    @classmethod
    def topology(cls, spacing: list[float], patch_size: list[int], *, tiny: bool = False) -> tuple[list[int], dict]:
        patch, _ = super().topology(spacing, patch_size, tiny=tiny)  # nnY-Net's rule: axes rounded to multiples of 32
        kwargs: dict[str, Any] = {
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
            "encoder": "swin",
            "dmsa_bias": "key",
            "rel_pos_bias": True,
            "fusion": "fmm",
            "residual_module": True,
        }
        if tiny:
            kwargs.update(feature_size=12, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], window_size=4)
        else:
            kwargs.update(feature_size=48, depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24], window_size=7)
        return patch, {"network_class_name": cls.network_class_name, "arch_kwargs": kwargs, "_kw_requires_import": []}


#: Planner name -> class, for ``nnyseg plan_and_preprocess -pl NAME``. Explicit, filled in one place.
PLANNERS: dict[str, type[nnysegPlannerBase]] = {
    cls.__name__: cls
    for cls in (nnysegBaselinePlanner, ELANResMSCAPlanner, ELANResMSCAPaperPlanner, nnYNetPlanner, DynTransNetPlanner)
}


def build_network_for_patch(
    planner: type[nnysegPlannerBase],
    patch_size: list[int] | tuple[int, ...],
    *,
    spacing: list[float] | tuple[float, ...] | None = None,
    tiny: bool = False,
    input_channels: int = 1,
    num_classes: int = 2,
    deep_supervision: bool = True,
    arch_kwargs: dict | None = None,
):
    """Build ``planner``'s network for a patch exactly as nnU-Net would from plans, without a dataset.

    Used by the benchmarks and tests. Returns ``(network, patch_size, architecture)``; the patch may be adjusted to
    one the architecture can take (``topology``). ``arch_kwargs`` overrides entries of the plans' ``arch_kwargs``
    (an ablation switch, as a plans configuration would).
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    spacing = [1.0] * len(patch_size) if spacing is None else [float(s) for s in spacing]
    patch, architecture = planner.topology(spacing, list(patch_size), tiny=tiny)
    architecture["arch_kwargs"] = {**architecture["arch_kwargs"], **(arch_kwargs or {})}
    network = get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        input_channels,
        num_classes,
        allow_init=True,
        deep_supervision=deep_supervision,
    )
    return network, patch, architecture
