"""Experiment planners: nnU-Net's fingerprint-based planning, then each model's configuration from the registry.

A planner here runs nnU-Net's default planning unchanged (target spacing, median shape, the PlainConvUNet patch and
batch size, normalisation, resampling, ``3d_lowres`` when nnU-Net creates it) and then, before the plans are saved,
turns every 3D configuration into its model's configuration with :func:`nnyseg.registry.adapt_configuration`: the
same rule, memory estimate and budget that a method trainer applies to nnU-Net's default plans. So
``nnyseg plan_and_preprocess -pl nnYNetPlanner`` followed by ``-p nnYNetPlans`` trains exactly what
``nnUNetv2_train -tr nnYNetTrainer`` derives from the stock ``nnUNetPlans``; the planners are for people who want a
plans file of their own (and for the paper's CT window, which changes preprocessing and so needs a planner).

Every plans file also gets ``3d_fullres_tiny``, the registry's CPU preset (the same configuration that the
``*_tiny`` trainers derive), for demos and tests only.

The preprocessed data are nnU-Net's own (``nnUNetPlans_<configuration>``) unless the planner changes spacing or
normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

import nnyseg
from nnyseg.registry import (
    FULL,
    PLANS_SETTINGS_KEY,
    TINY,
    ModelSpec,
    adapt_configuration,
    get_model,
)

TINY_CONFIGURATION = "3d_fullres_tiny"


def resolved_configuration(configurations: dict[str, Any], name: str) -> dict[str, Any]:
    """``configurations[name]`` with ``inherits_from`` resolved as nnU-Net's PlansManager does."""
    entry = dict(configurations[name])
    parent = entry.pop("inherits_from", None)
    if parent is None:
        return entry
    return {**resolved_configuration(configurations, parent), **entry}


class nnysegPlanner(ExperimentPlanner):
    """nnU-Net's ExperimentPlanner, then every 3D configuration turned into :attr:`model`'s (see module docstring).

    Subclasses set :attr:`model` (a registry key) and, where the model takes dataset-dependent settings,
    :meth:`arch_overrides`.
    """

    #: Registry key of the model these plans are for.
    model: ClassVar[str] = ""
    #: False when the planner changes the intensity normalisation, so 3d_fullres cannot share nnU-Net's data.
    shares_nnunet_preprocessing: ClassVar[bool] = True
    #: Extra lines for ``plans/`` and the plans' ``nnyseg`` block, on top of the model's own ``changes``.
    extra_changes: ClassVar[tuple[str, ...]] = ()

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
            plans_name or self.default_plans_name(),
            overwrite_target_spacing,
            suppress_transpose,
        )

    @classmethod
    def spec(cls) -> ModelSpec:
        return get_model(cls.model)

    @classmethod
    def default_plans_name(cls) -> str:
        return str(cls.spec().plans_name)

    @classmethod
    def changes(cls) -> tuple[str, ...]:
        spec = cls.spec()
        return (
            *(f"3d configurations: {c}" for c in spec.changes),
            "3d configurations: patch and batch size re-derived with the network's own memory estimate within the "
            "memory nnU-Net's default plan spends (docs/stock-flow.md); the same rule the trainers apply",
            "2d dropped (3D-only network)",
            f"adds {TINY_CONFIGURATION}: {spec.preset(TINY).description}",
            *cls.extra_changes,
        )

    def arch_overrides(self) -> dict[str, Any]:
        """``arch_kwargs`` entries that depend on the raw dataset (nnY-Net: clinical mode with a clinical table)."""
        from nnunetv2.paths import nnUNet_raw

        folder = Path(nnUNet_raw) / self.dataset_name if nnUNet_raw else None
        return self.spec().arch_kwargs_for_dataset(folder)

    def generate_data_identifier(self, configuration_name: str) -> str:
        # Spacing and normalisation are nnU-Net's, so the preprocessed data are nnU-Net's (as the ResEnc presets do).
        if self.overwrite_target_spacing is None:
            return "nnUNetPlans_" + configuration_name
        return super().generate_data_identifier(configuration_name)

    def save_plans(self, plans: dict) -> None:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from nnyseg.nnunet_integration import json_round_trip

        plans = json_round_trip(plans)
        self.plans = plans
        configurations = plans["configurations"]
        configurations.pop("2d", None)
        manager = PlansManager(plans)
        num_classes = manager.get_label_manager(self.dataset_json).num_segmentation_heads
        spec, overrides = self.spec(), self.arch_overrides()
        # nnU-Net's own reference at this planner's GPU target, as get_plans_for_configuration computes it.
        gb = self.UNet_vram_target_GB / self.UNet_reference_val_corresp_GB
        reference = self.UNet_reference_val_3d * gb * self.UNet_reference_val_corresp_bs_3d

        def adapt(name: str, preset: str) -> dict[str, Any]:
            return adapt_configuration(
                spec,
                resolved_configuration(configurations, name),
                input_channels=determine_num_input_channels(manager, name, self.dataset_json),
                num_classes=num_classes,
                num_training_cases=int(self.dataset_json["numTraining"]),
                preset=preset,
                max_dataset_covered=self.max_dataset_covered,
                planner_reference=reference,
                arch_overrides=overrides,
                source=f"{type(self).__name__}: dataset {self.dataset_name}, configuration '{name}'",
            )

        adapted = {name: adapt(name, FULL) for name in configurations}
        if "3d_fullres" in configurations:
            tiny = adapt("3d_fullres", TINY)
            tiny[PLANS_SETTINGS_KEY] = dict(spec.preset(TINY).trainer_settings)
            adapted[TINY_CONFIGURATION] = tiny
        configurations.update(adapted)
        plans["nnyseg"] = {
            "version": nnyseg.__version__,
            "planner": type(self).__name__,
            "model": spec.name,
            "changes_from_nnunet_defaults": list(self.changes()),
            "tiny_preset": f"'{TINY_CONFIGURATION}' is a reduced configuration for CPU demos and tests only",
        }
        super().save_plans(plans)


class nnYNetPlanner(nnysegPlanner):
    """nnY-Net plans: SwinNeXtUNet, in clinical mode when the raw dataset has a clinical table (docs/nnynet.md)."""

    model = "nnynet"


class DynTransNetPlanner(nnysegPlanner):
    """DynTransNet plans, option A: Swin encoder with D-MSA, FM-M + RM decoder (docs/dyntransnet.md)."""

    model = "dyntransnet"


class ELANResMSCAPlanner(nnysegPlanner):
    """ELANRes-MSCA-UNet plans on nnU-Net's planned stages, strides and kernels (docs/elanres_msca.md)."""

    model = "elanres_msca"


#: The ELANRes-MSCA paper's CT intensity window in HU: clip, then divide by 200.
PAPER_CT_WINDOW_HU = (-200.0, 200.0)


class ELANResMSCAPaperPlanner(ELANResMSCAPlanner):
    """ELANRes-MSCA-UNet with the paper's CT intensities: clip to [-200, 200] HU, then divide by 200.

    nnU-Net's own ``CTNormalization`` computes ``(clip(x, percentile_00_5, percentile_99_5) - mean) / std`` with the
    four numbers read from the plans' ``foreground_intensity_properties_per_channel``, when preprocessing the
    training data and again at prediction (from the model folder's ``plans.json``). This planner writes -200, 200, 0
    and 200 there for every channel, so nnU-Net's unmodified class computes exactly ``clip(x, -200, 200) / 200``.
    Every channel must therefore be CT in HU (``channel_names`` "CT"). The preprocessed data differ from nnU-Net's, so
    they get their own folder (``ELANResMSCAPaperPlans_3d_fullres``). See docs/elanres_msca.md for the body crop and
    the paper's spacing.
    """

    shares_nnunet_preprocessing = False
    extra_changes = (
        "all configurations: intensities clip(HU, -200, 200) / 200 through nnU-Net's CTNormalization, with "
        "foreground_intensity_properties_per_channel set to percentile_00_5 = -200, percentile_99_5 = 200, mean = 0, "
        "std = 200 for every channel (all channels must be CT)",
        "3d_fullres: own preprocessed data (ELANResMSCAPaperPlans_3d_fullres), not shared with nnUNetPlans",
    )

    @classmethod
    def default_plans_name(cls) -> str:
        return "ELANResMSCAPaperPlans"

    def generate_data_identifier(self, configuration_name: str) -> str:
        # The normalisation differs from nnU-Net's: nnU-Net's own rule gives this plans file its own data.
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


#: Planner name -> class, for ``nnyseg plan_and_preprocess -pl NAME``. Explicit, filled in one place.
PLANNERS: dict[str, type[nnysegPlanner]] = {
    cls.__name__: cls for cls in (ELANResMSCAPlanner, ELANResMSCAPaperPlanner, nnYNetPlanner, DynTransNetPlanner)
}
