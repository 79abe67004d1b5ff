"""Shared fixtures: tiny hand-made nnU-Net raw datasets and isolated nnU-Net folders."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "totalsegmentator_examples"


#: A training schedule of seconds for tests that run nnU-Net's real training loop: 1 epoch x 2 iterations.
QUICK_TRAINER_SETTINGS = {
    "num_epochs": 1,
    "num_iterations_per_epoch": 2,
    "num_val_iterations_per_epoch": 1,
    "save_every": 1,
}


def load_benchmark_script(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (the benchmarks folder is not a package) as module ``nnyseg_<name>``."""
    spec = importlib.util.spec_from_file_location(f"nnyseg_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def write_image(path: Path, array: np.ndarray, spacing=(1.5, 1.5, 3.0), origin=(0.0, 0.0, 0.0), direction=None):
    """Write a (z, y, x) array as NIfTI with the given (x, y, z) geometry."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def make_raw_dataset(
    root: Path, dataset_id: int = 990, n_cases: int = 3, shape=(8, 16, 16), ending: str = ".nii.gz"
) -> Path:
    """A small valid region-based liver/tumour raw dataset; returns its folder."""
    folder = root / f"Dataset{dataset_id:03d}_Handmade"
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        label = np.zeros(shape, np.uint8)
        label[2:6, 4:12, 4:12] = 1
        label[3:5, 6:9, 6:9] = 2
        image = (rng.normal(0, 10, shape) + 100 * (label > 0) - 40 * (label == 2)).astype(np.int16)
        write_image(folder / "imagesTr" / f"case_{i:03d}_0000{ending}", image)
        write_image(folder / "labelsTr" / f"case_{i:03d}{ending}", label)
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": [1, 2], "tumor": 2},
        "regions_class_order": [1, 2],
        "numTraining": n_cases,
        "file_ending": ending,
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2), encoding="utf-8")
    return folder


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """Point nnU-Net's three folders at fresh temporary folders for this test."""
    paths = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        paths[var] = tmp_path / var
        paths[var].mkdir()
        monkeypatch.setenv(var, str(paths[var]))
    return paths


def tree_digest(folder: Path) -> dict[str, bytes]:
    """File name -> bytes of every file under ``folder`` (to prove that nothing was modified)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def plan_micro_phantom(
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    dataset_id: int,
    planner_cls,
    *,
    name: str,
    num_training: int = 5,
    num_test: int = 0,
    quick_configuration: str | None = None,
) -> tuple[Path, Path, dict]:
    """Micro phantom -> nnU-Net fingerprint -> ``planner_cls`` plans -> preprocessed 3d_fullres, all in-process.

    Points nnU-Net's three folders into ``root`` through ``monkeypatch``. With ``quick_configuration`` the plans get a
    configuration of that name inheriting the tiny preset with a 1 epoch x 2 iterations schedule (for training tests).

    Returns:
        (raw dataset folder, preprocessed dataset folder, plans dict).
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset

    from nnyseg.data.phantom import write_nnunet_dataset
    from nnyseg.planning.planners import TINY_CONFIGURATION
    from nnyseg.trainers.base import PLANS_SETTINGS_KEY

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(root / var))
    raw = write_nnunet_dataset(
        root / "nnUNet_raw",
        dataset_id,
        name,
        num_training=num_training,
        num_test=num_test,
        preset="micro",
        progress=False,
    )
    extract_fingerprint_dataset(dataset_id, num_processes=1)
    planner = planner_cls(dataset_id)
    planner.plan_experiment()
    preprocess_dataset(dataset_id, planner.plans_identifier, ("3d_fullres",), (1,), show_progress_bar=False)
    preprocessed = root / "nnUNet_preprocessed" / raw.name
    plans_file = preprocessed / f"{planner.plans_identifier}.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    if quick_configuration is not None:
        plans["configurations"][quick_configuration] = {
            "inherits_from": TINY_CONFIGURATION,
            PLANS_SETTINGS_KEY: dict(QUICK_TRAINER_SETTINGS),
        }
        plans_file.write_text(json.dumps(plans, indent=1), encoding="utf-8")
    return raw, preprocessed, plans
