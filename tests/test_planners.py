"""Planners: nnU-Net's fingerprint planning, then each model's configuration from the registry; the CPU preset; the
generated ``plans/`` pages. (That a planner's configuration equals what a trainer derives from nnU-Net's default plans
is tested in test_nnunet_integration.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnyseg.data.phantom import write_nnunet_dataset
from nnyseg.planning import plan_and_preprocess as pp
from nnyseg.planning.describe import describe
from nnyseg.planning.planners import PLANNERS, TINY_CONFIGURATION, ELANResMSCAPlanner, nnYNetPlanner
from nnyseg.registry import TINY, get_model, list_models
from nnyseg.trainers.base import PLANS_SETTINGS_KEY, resolve_settings

REPO = Path(__file__).resolve().parents[1]
DATASET_ID = 993


@pytest.fixture(scope="module")
def fingerprinted(tmp_path_factory):
    """A micro phantom with nnU-Net's fingerprint, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("planning")
    mp = pytest.MonkeyPatch()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir()
        mp.setenv(var, str(root / var))
    write_nnunet_dataset(
        root / "nnUNet_raw", DATASET_ID, "PlanPhantom", num_training=5, num_test=0, preset="micro", progress=False
    )
    extract_fingerprint_dataset(DATASET_ID, num_processes=1)
    yield root
    mp.undo()


def _plan(planner_cls, **kwargs) -> dict:
    planner = planner_cls(DATASET_ID, **kwargs)
    planner.plan_experiment()
    return planner.plans


@pytest.mark.parametrize("planner_cls", [ELANResMSCAPlanner, nnYNetPlanner])
def test_architecture_plans_keep_nnunets_preprocessing(fingerprinted, planner_cls):
    default = ExperimentPlanner(DATASET_ID)
    default.plan_experiment()
    ref = default.plans["configurations"]["3d_fullres"]
    plans = _plan(planner_cls)
    cfg = plans["configurations"]["3d_fullres"]
    for key in ("spacing", "normalization_schemes", "resampling_fn_data", "median_image_size_in_voxels"):
        assert cfg[key] == ref[key], key
    assert cfg["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert "2d" not in plans["configurations"]
    assert cfg["architecture"]["network_class_name"] == planner_cls.spec().network_class_name
    assert cfg["batch_size"] >= 2
    assert plans["nnyseg"]["planner"] == planner_cls.__name__
    strides = np.prod(np.array(cfg["architecture"]["arch_kwargs"]["strides"]), axis=0)
    assert all(p % s == 0 for p, s in zip(cfg["patch_size"], strides, strict=True))


def test_nnynet_patch_is_multiple_of_32_with_isotropic_pooling(fingerprinted):
    cfg = _plan(nnYNetPlanner)["configurations"]["3d_fullres"]
    assert all(p % 32 == 0 for p in cfg["patch_size"])
    assert cfg["architecture"]["arch_kwargs"]["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5


def test_smaller_memory_target_shrinks_the_patch(fingerprinted):
    # The budget is nnU-Net's reference for the planner's GPU target: a tiny target forces a smaller patch.
    big = _plan(ELANResMSCAPlanner)["configurations"]["3d_fullres"]["patch_size"]
    small = _plan(ELANResMSCAPlanner, gpu_memory_target_in_gb=0.05)["configurations"]["3d_fullres"]["patch_size"]
    assert np.prod(small) < np.prod(big)


@pytest.mark.parametrize("planner_cls", list(PLANNERS.values()))
def test_tiny_preset_builds_and_runs_through_nnunets_plans_handling(fingerprinted, planner_cls):
    plans = _plan(planner_cls)
    tiny = plans["configurations"][TINY_CONFIGURATION]
    assert np.prod(tiny["patch_size"]) <= planner_cls.spec().preset(TINY).max_patch_voxels
    resolve_settings(
        {
            "num_epochs": 1000,
            "num_iterations_per_epoch": 250,
            "num_val_iterations_per_epoch": 50,
            "save_every": 50,
            "optimizer": "sgd",
            "lr_schedule": "poly",
            "initial_lr": 0.01,
        },
        tiny[PLANS_SETTINGS_KEY],
    )
    cm = PlansManager(plans).get_configuration(TINY_CONFIGURATION)
    # the tiny preset reads the 3d_fullres data: nnU-Net's own, unless the planner changes the preprocessing
    data = "nnUNetPlans_3d_fullres" if planner_cls.shares_nnunet_preprocessing else f"{plans['plans_name']}_3d_fullres"
    assert cm.data_identifier == data and cm.spacing == plans["configurations"]["3d_fullres"]["spacing"]
    net = get_network_from_plans(
        cm.network_arch_class_name,
        cm.network_arch_init_kwargs,
        cm.network_arch_init_kwargs_req_import,
        1,
        2,
        deep_supervision=True,
    )
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *cm.patch_size))
    assert out[0].shape == (1, 2, *cm.patch_size)
    assert sum(p.numel() for p in net.parameters()) < 5e6  # "tiny" means it trains on a CPU


def test_anisotropic_topologies():
    patch, arch = get_model("elanres_msca").architecture([3.0, 0.75, 0.75], [48, 192, 192])
    strides = arch["arch_kwargs"]["strides"]
    assert strides[1] == [1, 2, 2]  # in-plane pooling first on thick slices, as nnU-Net plans it
    assert arch["arch_kwargs"]["kernel_sizes"][0] == [1, 3, 3]
    patch, arch = get_model("nnynet").architecture([3.0, 0.75, 0.75], [50, 190, 170])
    assert patch == [64, 192, 160]


def test_unknown_planner_is_a_clear_error(fingerprinted):
    with pytest.raises(ValueError, match=r"unknown planner 'NoSuchPlanner'.*nnYNetPlanner"):
        pp.main(["-d", str(DATASET_ID), "-pl", "NoSuchPlanner", "--no_pp"])


def test_model_build_adjusts_to_constraints():
    net, patch, _ = get_model("nnynet").build([40, 64, 70], preset=TINY)
    assert patch == [32, 64, 64]
    with pytest.raises(ValueError, match="32"):
        net(torch.zeros(1, 1, 40, 64, 64))


@pytest.mark.parametrize("model", list_models(methods_only=True))
def test_plans_docs_are_up_to_date(model):
    path = REPO / "plans" / f"{model}.md"
    assert path.is_file(), f"run `python -m nnyseg.planning.describe` to write {path}"
    assert path.read_text(encoding="utf-8") == describe(get_model(model)), (
        f"{path} is stale: run `python -m nnyseg.planning.describe`"
    )


def test_plans_index_is_up_to_date():
    from nnyseg.planning.describe import index

    assert (REPO / "plans" / "README.md").read_text(encoding="utf-8") == index()


def test_written_plans_file_is_plain_nnunet_json(fingerprinted):
    _plan(nnYNetPlanner)
    path = next((fingerprinted / "nnUNet_preprocessed").glob("Dataset*")) / "nnYNetPlans.json"
    plans = json.loads(path.read_text(encoding="utf-8"))
    assert set(PlansManager(plans).available_configurations) == {"3d_fullres", TINY_CONFIGURATION}
