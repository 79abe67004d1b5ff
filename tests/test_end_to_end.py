"""End to end through the stock console scripts, in subprocesses, as a user would run them.

phantom -> ``nnyseg plan_and_preprocess`` -> ``nnUNetv2_train`` of two folds of the tiny ELANRes-MSCA-UNet preset with
``nnysegTrainer`` -> ``nnUNetv2_train --val --npz`` -> ``nnUNetv2_find_best_configuration`` -> ``nnUNetv2_predict``
with both folds. The subprocesses get nnU-Net's three path variables and nothing nnyseg-specific: the trainer folder
must reach ``nnUNet_extTrainer`` through the installed start-up hook.

Takes a few minutes on 2 CPU cores (the ``micro`` phantom grid keeps every step small).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytestmark = pytest.mark.slow

DATASET_ID = 992
TRAINER, PLANS, CONFIG = "nnysegTrainer", "ELANResMSCAPlans", "3d_fullres_tiny"


def _script(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet", "NNYSEG"))}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(root / var)
        (root / var).mkdir()
    # CPU-sized process counts (nnU-Net's defaults are for GPU nodes); they change speed, not results.
    env.update(nnUNet_def_n_proc="2", nnUNet_n_proc_DA="2", PYTHONUNBUFFERED="1")

    def run(*cmd: str, timeout: int = 600) -> str:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", timeout=timeout)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        return result.stdout + result.stderr

    return root, env, run


@pytest.fixture(scope="module")
def trained(workspace):
    root, _env, run = workspace
    nnyseg = [sys.executable, "-m", "nnyseg.cli"]
    run(
        *nnyseg,
        "phantom",
        "-d",
        str(DATASET_ID),
        "--preset",
        "micro",
        "--num-training",
        "6",
        "--num-test",
        "2",
        "--direction",
        "oblique",
    )
    run(
        *nnyseg,
        "plan_and_preprocess",
        "-d",
        str(DATASET_ID),
        "-pl",
        "ELANResMSCAPlanner",
        "-c",
        "3d_fullres",
        "-npfp",
        "2",
        "-np",
        "2",
        "--verify_dataset_integrity",
    )
    for fold in ("0", "1"):
        run(_script("nnUNetv2_train"), str(DATASET_ID), CONFIG, fold, "-tr", TRAINER, "-p", PLANS, "-device", "cpu")
        run(
            _script("nnUNetv2_train"),
            str(DATASET_ID),
            CONFIG,
            fold,
            "-tr",
            TRAINER,
            "-p",
            PLANS,
            "-device",
            "cpu",
            "--val",
            "--npz",
        )
    return root


def _dataset_folder(root: Path, kind: str) -> Path:
    return next((root / kind).glob(f"Dataset{DATASET_ID}_*"))


def test_plans_written_by_nnyseg_planner(trained):
    plans = json.loads((_dataset_folder(trained, "nnUNet_preprocessed") / f"{PLANS}.json").read_text(encoding="utf-8"))
    tiny = plans["configurations"][CONFIG]
    assert plans["experiment_planner_used"] == "ELANResMSCAPlanner"
    assert tiny["architecture"]["network_class_name"] == "nnyseg.network_architecture.elanres_msca_unet.ELANResMSCAUNet"
    assert tiny["inherits_from"] == "3d_fullres"


def test_training_outputs_per_fold(trained):
    model = _dataset_folder(trained, "nnUNet_results") / f"{TRAINER}__{PLANS}__{CONFIG}"
    for fold in (0, 1):
        folder = model / f"fold_{fold}"
        assert (folder / "checkpoint_final.pth").is_file()
        summary = json.loads((folder / "validation" / "summary.json").read_text(encoding="utf-8"))
        assert set(summary["mean"]) == {"(1, 2)", "2"}  # region-based: liver incl. tumour, and tumour
        assert list((folder / "validation").glob("*.npz")), "--val --npz must write probabilities"
        log = next(folder.glob("training_log_*.txt")).read_text(encoding="utf-8")
        assert "nnyseg trainer settings" in log and "'num_epochs': 10" in log


def test_find_best_configuration_and_predict(trained, workspace):
    root, _env, run = workspace
    run(
        _script("nnUNetv2_find_best_configuration"),
        str(DATASET_ID),
        "-c",
        CONFIG,
        "-tr",
        TRAINER,
        "-p",
        PLANS,
        "-f",
        "0",
        "1",
        "-np",
        "2",
    )
    results = _dataset_folder(root, "nnUNet_results")
    instructions = (results / "inference_instructions.txt").read_text(encoding="utf-8")
    assert f"-tr {TRAINER}" in instructions and f"-p {PLANS}" in instructions

    raw = _dataset_folder(root, "nnUNet_raw")
    out = root / "predictions"
    run(
        _script("nnUNetv2_predict"),
        "-i",
        str(raw / "imagesTs"),
        "-o",
        str(out),
        "-d",
        str(DATASET_ID),
        "-c",
        CONFIG,
        "-tr",
        TRAINER,
        "-p",
        PLANS,
        "-f",
        "0",
        "1",
        "-device",
        "cpu",
        "-npp",
        "0",
        "-nps",
        "0",
        "--disable_tta",
    )
    images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    assert len(images) == 2
    for image_path in images:
        pred_path = out / image_path.name.replace("_0000.nii.gz", ".nii.gz")
        assert pred_path.is_file()
        image, pred = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(pred_path))
        assert pred.GetSize() == image.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), image.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(pred.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(pred.GetDirection(), image.GetDirection(), atol=1e-6)
        labels = set(np.unique(sitk.GetArrayFromImage(pred)).tolist())
        assert labels <= {0, 1, 2}
        assert 1 in labels, "a trained model should find some liver"
