"""nnyseg.nnunet_integration: the start-up hook, planner lookup, method-trainer adaptation, predictor hook, version.

The adaptation tests plan synthetic fingerprints with nnU-Net's own ``ExperimentPlanner`` (no images are read:
the fingerprint is written as nnU-Net writes it), then build method trainers on the resulting plans.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

import nnyseg
import nnyseg.trainers
from nnyseg import nnunet_integration as integration
from nnyseg.planning.planners import PLANNERS, TINY_CONFIGURATION, nnYNetPlanner
from nnyseg.registry import PLANS_MODEL_KEY, get_model, list_models

from .conftest import write_image

#: Method trainer of each model, full preset, and its planner.
METHODS = {
    "nnynet": ("nnYNetTrainer", "nnYNetPlanner"),
    "dyntransnet": ("DynTransNetTrainer", "DynTransNetPlanner"),
    "elanres_msca": ("ELANResMSCATrainer", "ELANResMSCAPlanner"),
}
#: Two fingerprints, numpy axis order (z, y, x): isotropic 1 mm, and LiTS-like 5 x 0.8 x 0.8 mm.
FINGERPRINTS = {
    "isotropic": {"spacing": (1.0, 1.0, 1.0), "shape": (160, 192, 176)},
    "anisotropic": {"spacing": (5.0, 0.8, 0.8), "shape": (90, 512, 512)},
}


# ----------------------------------------------------------------------------------------------------------------
# Synthetic datasets: a fingerprint nnU-Net plans from, without images to read
# ----------------------------------------------------------------------------------------------------------------
def write_synthetic_dataset(
    root: Path, dataset_id: int, spacing: tuple, shape: tuple, *, n_cases: int = 20, clinical: bool = False
) -> str:
    """``dataset.json``, one 4^3 image per case (nnU-Net lists them) and a fingerprint of ``n_cases`` cases of
    ``shape`` at ``spacing`` (z, y, x), as nnU-Net's fingerprint extractor writes it. Returns the dataset name."""
    name = f"Dataset{dataset_id:03d}_Synthetic"
    raw = root / "nnUNet_raw" / name
    for i in range(n_cases):
        write_image(raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz", np.zeros((4, 4, 4), np.int16))
        write_image(raw / "labelsTr" / f"case_{i:03d}.nii.gz", np.zeros((4, 4, 4), np.uint8))
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": [1, 2], "tumor": 2},
        "regions_class_order": [1, 2],
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    if clinical:
        rows = {f"case_{i:03d}": {"age": 40 + i} for i in range(n_cases)}
        table = {"schema": [{"name": "age", "type": "numeric"}], "cases": rows}
        (raw / "clinical.json").write_text(json.dumps(table), encoding="utf-8")
    rng = np.random.default_rng(dataset_id)
    fingerprint = {
        "spacings": [list(spacing)] * n_cases,
        "shapes_after_crop": [
            [int(s + d) for s, d in zip(shape, rng.integers(-4, 5, 3), strict=True)] for _ in range(n_cases)
        ],
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": 100.0, "median": 100.0, "std": 30.0, "min": -100.0, "max": 300.0,
                  "percentile_99_5": 250.0, "percentile_00_5": -50.0}
        },
        "median_relative_size_after_cropping": 1.0,
    }  # fmt: skip
    pre = root / "nnUNet_preprocessed" / name
    pre.mkdir(parents=True, exist_ok=True)
    (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint), encoding="utf-8")
    return name


@pytest.fixture(scope="module", params=list(FINGERPRINTS))
def planned(request, tmp_path_factory):
    """One synthetic dataset per fingerprint, planned by nnU-Net's default planner and by every nnyseg planner."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"integration_{kind}")
    mp = pytest.MonkeyPatch()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir()
        mp.setenv(var, str(root / var))
    dataset_id = 970 + list(FINGERPRINTS).index(kind)
    name = write_synthetic_dataset(root, dataset_id, **FINGERPRINTS[kind])
    ExperimentPlanner(dataset_id).plan_experiment()
    for planner in ("nnYNetPlanner", "DynTransNetPlanner", "ELANResMSCAPlanner"):
        PLANNERS[planner](dataset_id).plan_experiment()
    yield kind, root, name
    mp.undo()


def load_plans(root: Path, name: str, plans: str) -> dict:
    return json.loads((root / "nnUNet_preprocessed" / name / f"{plans}.json").read_text(encoding="utf-8"))


def make_trainer(root: Path, name: str, trainer: str, plans: dict, configuration: str = "3d_fullres"):
    dataset_json = json.loads((root / "nnUNet_raw" / name / "dataset.json").read_text(encoding="utf-8"))
    cls = getattr(nnyseg.trainers, trainer)
    return cls({**deepcopy(plans), "continue_training": False}, configuration, 0, dataset_json, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------------
# Any plans -> the method's configuration
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", list(METHODS))
def test_planner_configuration_equals_what_the_trainer_derives_from_nnunets_default_plans(planned, model):
    _, root, name = planned
    trainer_name, planner_name = METHODS[model]
    planner_plans = load_plans(root, name, PLANNERS[planner_name].default_plans_name())
    configurations = planner_plans["configurations"]
    default = load_plans(root, name, "nnUNetPlans")
    assert set(configurations) == set(default["configurations"]) - {"2d"} | {TINY_CONFIGURATION}
    for configuration in set(default["configurations"]) - {"2d"}:  # 3d_fullres, and 3d_lowres where planned
        trainer = make_trainer(root, name, trainer_name, default, configuration)
        derived = trainer.plans_manager.plans["configurations"][configuration]
        ours = PlansManager(planner_plans).get_configuration(configuration).configuration
        assert derived == {k: v for k, v in ours.items() if k != "inherits_from"}, configuration
        assert derived["architecture"]["network_class_name"] == get_model(model).network_class_name
        # the preprocessed data, spacing and normalisation are nnU-Net's
        given = PlansManager(default).get_configuration(configuration).configuration
        for key in ("data_identifier", "spacing", "normalization_schemes", "median_image_size_in_voxels"):
            assert derived[key] == given[key], key


def test_fingerprints_exercise_the_memory_budget_and_anisotropy(planned):
    kind, root, name = planned
    default = load_plans(root, name, "nnUNetPlans")["configurations"]["3d_fullres"]
    ours = load_plans(root, name, "nnYNetPlans")["configurations"]["3d_fullres"]
    record = ours[PLANS_MODEL_KEY]["adapted_from"]
    assert record["patch_size"] == default["patch_size"] and record["memory_budget"] > 0
    # nnY-Net's estimate per voxel is larger than PlainConvUNet's: within the same budget its patch is smaller
    assert np.prod(ours["patch_size"]) * ours["batch_size"] < np.prod(default["patch_size"]) * default["batch_size"]
    assert all(p % 32 == 0 for p in ours["patch_size"])
    elanres = load_plans(root, name, "ELANResMSCAPlans")["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    if kind == "anisotropic":
        assert elanres["strides"][1] == [1, 2, 2]  # in-plane pooling first on thick slices, as nnU-Net plans it
        assert elanres["kernel_sizes"][0] == [1, 3, 3]


def test_derived_configuration_is_what_nnunet_saves_and_predicts_with(planned):
    _, root, name = planned
    default = load_plans(root, name, "nnUNetPlans")
    trainer = make_trainer(root, name, "nnYNetTrainer_tiny", default)
    saved = json.loads(json.dumps(trainer.plans_manager.plans))  # what on_train_start writes as plans.json
    configuration = PlansManager(saved).get_configuration("3d_fullres")
    assert configuration.network_arch_class_name.endswith("SwinNeXtUNet")
    assert configuration.configuration[PLANS_MODEL_KEY]["preset"] == "tiny"
    assert trainer.resolved_settings["num_epochs"] == get_model("nnynet").preset("tiny").trainer_settings["num_epochs"]
    # nnU-Net's predictor: trainer_class.build_network_architecture(plans_manager, configuration_manager, ...)
    network = nnyseg.trainers.nnYNetTrainer_tiny.build_network_architecture(
        PlansManager(saved), configuration, 1, 2, enable_deep_supervision=False
    )
    assert type(network).__name__ == "SwinNeXtUNet" and network.encoder.output_channels[0] == 12
    # plans used as they are: a second trainer on the saved plans changes nothing
    again = make_trainer(root, name, "nnYNetTrainer_tiny", saved)
    assert again.plans_manager.plans["configurations"]["3d_fullres"] == saved["configurations"]["3d_fullres"]
    # a results folder whose plans name another network is refused with one message
    with pytest.raises(ValueError, match=r"nnYNetTrainer trains SwinNeXtUNet, but plans 'nnUNetPlans' name .*Plain"):
        nnyseg.trainers.nnYNetTrainer.build_network_architecture(
            PlansManager(default), PlansManager(default).get_configuration("3d_fullres"), 1, 2
        )


def test_plans_naming_the_network_are_used_as_they_are(planned):
    _, root, name = planned
    plans = load_plans(root, name, "nnYNetPlans")
    plans["configurations"]["3d_fullres"]["patch_size"] = [64, 64, 64]  # a user's choice
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["cross_attention"] = "off"
    trainer = make_trainer(root, name, "nnYNetTrainer", plans)
    assert trainer.configuration_manager.patch_size == [64, 64, 64]
    assert trainer.configuration_manager.network_arch_init_kwargs["cross_attention"] == "off"
    # the CPU variant derives its preset from a full-size configuration
    tiny = make_trainer(root, name, "nnYNetTrainer_tiny", plans)
    assert tiny.configuration_manager.network_arch_init_kwargs["feature_size"] == 12
    assert np.prod(tiny.configuration_manager.patch_size) <= 32 * 64 * 64


def test_resenc_plans_give_their_memory_target_and_batch_cap(planned, tmp_path):
    _, root, name = planned
    default = load_plans(root, name, "nnUNetPlans")
    resenc = deepcopy(default)
    resenc["experiment_planner_used"] = "nnUNetPlannerResEncL"  # 24 GB preset: same patch, three times the budget
    base = make_trainer(root, name, "DynTransNetTrainer", default).configuration_manager
    large = make_trainer(root, name, "DynTransNetTrainer", resenc).configuration_manager
    budget = large.configuration[PLANS_MODEL_KEY]["adapted_from"]["memory_budget"]
    assert budget >= base.configuration[PLANS_MODEL_KEY]["adapted_from"]["memory_budget"]
    assert np.prod(large.patch_size) * large.batch_size >= np.prod(base.patch_size) * base.batch_size


def test_planner_batch_rules_match_nnunets_planners(planned):
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners as r

    _, _, name = planned
    for planner_name, (reference, ref_bs, covered) in integration.PLANNER_BATCH_RULES.items():
        cls = ExperimentPlanner if planner_name == "ExperimentPlanner" else getattr(r, planner_name)
        planner = cls(name)
        scale = planner.UNet_vram_target_GB / planner.UNet_reference_val_corresp_GB
        assert planner.UNet_reference_val_3d * scale == reference, planner_name
        assert planner.UNet_reference_val_corresp_bs_3d == ref_bs and planner.max_dataset_covered == covered


# ----------------------------------------------------------------------------------------------------------------
# Bad combinations
# ----------------------------------------------------------------------------------------------------------------
def test_a_2d_configuration_stops_with_one_message(planned):
    _, root, name = planned
    default = load_plans(root, name, "nnUNetPlans")
    with pytest.raises(
        SystemExit, match=r"nnYNetTrainer: plans 'nnUNetPlans', configuration '2d'.*3D network.*3d_fullres"
    ):
        make_trainer(root, name, "nnYNetTrainer", default, "2d")


def test_a_patch_that_cannot_fit_the_budget_stops_with_one_message(planned):
    _, root, name = planned
    plans = load_plans(root, name, "nnUNetPlans")
    plans["experiment_planner_used"] = "SomeoneElsesPlanner"  # unknown: the budget is what PlainConvUNet spends
    cfg = plans["configurations"]["3d_fullres"]
    cfg["patch_size"], cfg["batch_size"] = [8, 8, 8], 2
    with pytest.raises(SystemExit, match=r"does not fit the memory budget.*smallest patch \[32, 32, 32\].*larger GPU"):
        make_trainer(root, name, "nnYNetTrainer", plans)


# ----------------------------------------------------------------------------------------------------------------
# Cascade, lowres, clinical
# ----------------------------------------------------------------------------------------------------------------
def test_cascade_configuration_takes_the_previous_stage_channels(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    name = write_synthetic_dataset(tmp_path, 975, spacing=(1.0, 1.0, 1.0), shape=(400, 400, 400), n_cases=8)
    ExperimentPlanner(975).plan_experiment()
    plans = load_plans(tmp_path, name, "nnUNetPlans")
    assert {"3d_lowres", "3d_cascade_fullres"} <= set(plans["configurations"])
    for trainer_name in ("ELANResMSCATrainer_tiny", "nnYNetTrainer_tiny"):
        lowres = make_trainer(tmp_path, name, trainer_name, plans, "3d_lowres").configuration_manager
        assert lowres.spacing == plans["configurations"]["3d_lowres"]["spacing"]
        trainer = make_trainer(tmp_path, name, trainer_name, plans, "3d_cascade_fullres")
        cm = trainer.configuration_manager
        assert cm.previous_stage_name == "3d_lowres" and cm.data_identifier == "nnUNetPlans_3d_fullres"
        network = type(trainer).build_network_architecture(trainer.plans_manager, cm, 3, 2)  # CT + 2 one-hot labels
        first_conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d))
        assert first_conv.in_channels == 3


def test_clinical_table_beside_dataset_json_makes_nnynet_clinical(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    name = write_synthetic_dataset(tmp_path, 976, spacing=(2.0, 2.0, 2.0), shape=(60, 80, 80), clinical=True)
    ExperimentPlanner(976).plan_experiment()
    nnYNetPlanner(976).plan_experiment()
    default = load_plans(tmp_path, name, "nnUNetPlans")
    kwargs = make_trainer(tmp_path, name, "nnYNetTrainer", default).configuration_manager.network_arch_init_kwargs
    assert kwargs["cross_attention"] == "clinical"
    assert kwargs["clinical_schema"] == [{"name": "age", "type": "numeric"}]
    planned_kwargs = load_plans(tmp_path, name, "nnYNetPlans")["configurations"]["3d_fullres"]["architecture"]
    assert planned_kwargs["arch_kwargs"]["clinical_schema"] == kwargs["clinical_schema"]
    # without the table: latent mode
    (tmp_path / "nnUNet_raw" / name / "clinical.json").unlink()
    kwargs = make_trainer(tmp_path, name, "nnYNetTrainer", default).configuration_manager.network_arch_init_kwargs
    assert kwargs["cross_attention"] == "latent" and "clinical_schema" not in kwargs


# ----------------------------------------------------------------------------------------------------------------
# Registry <-> trainers
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", list_models(methods_only=True))
def test_every_registered_trainer_trains_its_model(model):
    spec = get_model(model)
    for name in spec.trainers:
        cls = getattr(nnyseg.trainers, name)
        assert cls.model == model
        assert cls.preset == ("tiny" if name.endswith("_tiny") else "full")
    methods = {n for n in nnyseg.trainers.__all__ if getattr(getattr(nnyseg.trainers, n), "model", "")}
    assert methods == {t for m in list_models(methods_only=True) for t in get_model(m).trainers}


# ----------------------------------------------------------------------------------------------------------------
# Version, start-up hook, planner lookup, predictor hook
# ----------------------------------------------------------------------------------------------------------------
def test_nnunet_version_check():
    assert integration.check_nnunet_version("2.8.1") == "2.8.1"
    with pytest.raises(RuntimeError, match=r"nnunetv2 2\.9\.0 is installed.*>=2\.8\.1,<2\.9\.0.*NNYSEG_ALLOW"):
        integration.check_nnunet_version("2.9.0", environ={})
    with pytest.warns(UserWarning, match="2.7.0"):
        integration.check_nnunet_version("2.7.0", environ={integration.ALLOW_UNTESTED_ENV: "1"})
    installed = integration.check_nnunet_version()
    assert installed.startswith("2.8")


LOOKUP = """
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
import nnyseg.trainers
for name in nnyseg.trainers.__all__:
    found = recursive_find_trainer_class_by_name(name)
    assert found is getattr(nnyseg.trainers, name), (name, found)
    print("FOUND", name, found.__module__)
"""


def _clean_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet", "NNYSEG"))}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(tmp_path / var)
    return env


def test_fresh_process_finds_every_trainer(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", LOOKUP], env=_clean_env(tmp_path), capture_output=True, text=True, encoding="utf-8"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in nnyseg.trainers.__all__:
        assert f"FOUND {name} nnyseg.trainers" in result.stdout


def test_switching_the_hook_off_makes_lookup_fail(tmp_path):
    env = _clean_env(tmp_path) | {integration.NO_HOOK_ENV: "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOOKUP], env=env, capture_output=True, text=True, encoding="utf-8", timeout=300
    )
    assert result.returncode != 0
    assert "Could not find requested nnunet trainer" in result.stderr


@pytest.mark.parametrize(
    ("before", "expected"),
    [
        ({}, [str(nnyseg.TRAINER_DIR)]),
        ({"nnUNet_extTrainer": "/other"}, ["/other", str(nnyseg.TRAINER_DIR)]),
        ({"nnUNet_extTrainer": str(nnyseg.TRAINER_DIR)}, [str(nnyseg.TRAINER_DIR)]),
    ],
)
def test_register_appends_once_and_keeps_user_folders(before, expected):
    env = dict(before)
    integration.register_trainer_folder(env)
    integration.register_trainer_folder(env)
    assert env["nnUNet_extTrainer"].split(os.pathsep) == expected


def test_register_respects_opt_out():
    env = {integration.NO_HOOK_ENV: "1"}
    assert integration.register_trainer_folder(env) is False
    assert "nnUNet_extTrainer" not in env


def test_start_up_hook_stays_light(tmp_path):
    # The .pth hook runs in every interpreter of the environment: it must not import torch or nnunetv2.
    code = "import sys, os; print('torch' in sys.modules, 'nnunetv2' in sys.modules, os.environ['nnUNet_extTrainer'])"
    result = subprocess.run([sys.executable, "-c", code], env=_clean_env(tmp_path), capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False", str(nnyseg.TRAINER_DIR)], result.stderr


def test_trainer_folder_holds_only_the_shim():
    # nnU-Net imports every module in the folder as a top-level module: anything else there would leak.
    modules = sorted(p.name for p in nnyseg.TRAINER_DIR.iterdir() if p.suffix == ".py")
    assert modules == ["nnyseg_trainers.py"]


def test_planner_lookup_is_scoped():
    from nnunetv2.experiment_planning import plan_and_preprocess_api as api

    original = api.recursive_find_python_class
    with integration.nnyseg_planners_visible(PLANNERS):
        assert api.recursive_find_python_class("x", "nnYNetPlanner", "y") is nnYNetPlanner
        assert api.recursive_find_python_class is not original
    assert api.recursive_find_python_class is original
    assert integration.nnunet_planner_class("nnUNetPlannerResEncM").__name__ == "nnUNetPlannerResEncM"
    assert integration.nnunet_planner_class("nnYNetPlanner") is None


def test_predictor_hook_is_scoped():
    from nnunetv2.inference import predict_from_raw_data as nnunet_predict

    original = nnunet_predict.nnUNetPredictor
    predictor = integration.clinical_predictor_class()
    assert issubclass(predictor, original) and predictor.__name__ == "ClinicalPredictor"
    with integration.predictor_replaced(predictor):
        assert nnunet_predict.nnUNetPredictor is predictor
    assert nnunet_predict.nnUNetPredictor is original


def test_conditioning_dataset_calls_back_before_loading():
    seen = []

    class Dataset:
        def load_case(self, identifier):
            return f"loaded {identifier}"

    conditioned = integration.conditioning_dataset_class(Dataset, seen.append)
    assert conditioned().load_case("case_7") == "loaded case_7" and seen == ["case_7"]
    assert conditioned.__name__ == "DatasetWithClinicalCondition"
