"""End to end through the stock console scripts, in subprocesses, as a user would run them.

phantom -> stock ``nnUNetv2_plan_and_preprocess`` (nnU-Net's default plans) -> for each method, its CPU-sized trainer
through ``nnUNetv2_train`` for folds 0 and 1 -> ``nnUNetv2_find_best_configuration`` -> ``nnUNetv2_predict`` of the
two-fold ensemble; then ``--val --npz``, ``nnUNetv2_ensemble`` of two methods, and the model zip export / install /
predict round trip. Then the same for one method on nnU-Net's ResEnc M plans, and nnyseg's own ``-p nnYNetPlans``.

The subprocesses get nnU-Net's three path variables (plus CPU-sized process counts) and nothing nnyseg-specific: the
trainer folder must reach ``nnUNet_extTrainer`` through the installed start-up hook, and each trainer must build its
own network from plans that name PlainConvUNet or ResidualEncoderUNet. The one edit to nnU-Net's plans files is a
1 epoch x 2 iterations schedule (``nnyseg_trainer_settings``), so that nine trainings fit in minutes on 2 cores.
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
import torch

from nnyseg.registry import PLANS_MODEL_KEY, get_model

from .conftest import QUICK_TRAINER_SETTINGS

pytestmark = pytest.mark.slow

DATASET_ID = 992
CONFIG = "3d_fullres"
#: model -> its CPU-sized trainer, and the start of its state-dict keys (proof of the network in the checkpoint).
METHODS = {
    "nnynet": ("nnYNetTrainer_tiny", "cross_attention."),
    "dyntransnet": ("DynTransNetTrainer_tiny", "decoder."),
    "elanres_msca": ("ELANResMSCATrainer_tiny", "encoder."),
}
RESENC = "nnUNetResEncUNetMPlans"


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

    def run(*cmd: str, timeout: int = 600, env_override: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            cmd, env={**env, **(env_override or {})}, capture_output=True, text=True, encoding="utf-8", timeout=timeout
        )
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        return result.stdout + result.stderr

    return root, env, run


def _dataset_folder(root: Path, kind: str) -> Path:
    return next((root / kind).glob(f"Dataset{DATASET_ID}_*"))


def _quick_schedule(root: Path, plans: str) -> None:
    path = _dataset_folder(root, "nnUNet_preprocessed") / f"{plans}.json"
    content = json.loads(path.read_text(encoding="utf-8"))
    content["configurations"][CONFIG]["nnyseg_trainer_settings"] = dict(QUICK_TRAINER_SETTINGS)
    path.write_text(json.dumps(content, indent=1), encoding="utf-8")


def _train(run, trainer: str, plans: str, folds=("0", "1")) -> list[str]:
    return [
        run(
            _script("nnUNetv2_train"),
            str(DATASET_ID),
            CONFIG,
            f,
            "-tr",
            trainer,
            "-p",
            plans,
            "-device",
            "cpu",
            "--npz",
        )
        for f in folds
    ]


def _find_best_and_predict(root: Path, run, trainers: list[str], plans: str, out: Path, folds=("0", "1")) -> None:
    run(
        _script("nnUNetv2_find_best_configuration"),
        str(DATASET_ID),
        "-c",
        CONFIG,
        "-tr",
        *trainers,
        "-p",
        plans,
        "-f",
        *folds,
        "-np",
        "2",
    )
    instructions = (_dataset_folder(root, "nnUNet_results") / "inference_instructions.txt").read_text(encoding="utf-8")
    assert "nnUNetv2_predict" in instructions and plans in instructions
    for trainer in trainers:
        _predict(root, run, trainer, plans, out / trainer, folds)


def _predict(root: Path, run, trainer: str, plans: str, out: Path, folds=("0", "1"), *extra: str, **kwargs) -> None:
    """``nnUNetv2_predict`` of the held-out cases on the CPU, without test-time mirroring."""
    images = _dataset_folder(root, "nnUNet_raw") / "imagesTs"
    run(_script("nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIG, "-tr",
        trainer, "-p", plans, "-f", *folds, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta", *extra,
        **kwargs)  # fmt: skip


def _check_model(root: Path, model: str, trainer: str, plans: str, prefix: str, folds=(0, 1)) -> dict:
    """The results folder holds ``model``'s network: in its plans.json and in every fold's checkpoint."""
    folder = _dataset_folder(root, "nnUNet_results") / f"{trainer}__{plans}__{CONFIG}"
    saved = json.loads((folder / "plans.json").read_text(encoding="utf-8"))["configurations"][CONFIG]
    assert saved["architecture"]["network_class_name"] == get_model(model).network_class_name
    assert saved[PLANS_MODEL_KEY]["preset"] == "tiny"
    for fold in folds:
        checkpoint = torch.load(
            folder / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False
        )
        assert checkpoint["trainer_name"] == trainer
        keys = list(checkpoint["network_weights"])
        assert any(k.startswith(prefix) for k in keys), keys[:5]
        assert not any(k.startswith("encoder.stages.0.0.convs") for k in keys)  # not PlainConvUNet's layout
        log = next((folder / f"fold_{fold}").glob("training_log_*.txt")).read_text(encoding="utf-8")
        assert f"network {saved[PLANS_MODEL_KEY]['adapted_from']['network_class_name'].rsplit('.', 1)[-1]} ->" in log
        assert list((folder / f"fold_{fold}" / "validation").glob("*.npz")), "--npz must write probabilities"
    return saved


def _check_predictions(root: Path, out: Path) -> None:
    raw = _dataset_folder(root, "nnUNet_raw")
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
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1, 2}


@pytest.fixture(scope="module")
def planned(workspace):
    root, _env, run = workspace
    run(
        sys.executable,
        "-m",
        "nnyseg.cli",
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
    run(_script("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", CONFIG, "-npfp", "2", "-np", "2")
    _quick_schedule(root, "nnUNetPlans")
    return root


def test_stock_commands_train_each_method_and_ensemble_two_folds(planned, workspace):
    root, _env, run = workspace
    preprocessed = _dataset_folder(root, "nnUNet_preprocessed")

    def data_snapshot() -> dict:
        return {
            str(p.relative_to(preprocessed)): p.stat().st_mtime_ns
            for p in preprocessed.rglob("*")
            if p.is_dir() or p.parent != preprocessed
        }  # the data folders; splits_final.json is written by training

    data_before = data_snapshot()
    trainers = []
    for model, (trainer, prefix) in METHODS.items():
        _train(run, trainer, "nnUNetPlans")
        _check_model(root, model, trainer, "nnUNetPlans", prefix)
        trainers.append(trainer)
    assert data_snapshot() == data_before  # nothing was preprocessed again
    out = root / "predictions"
    _find_best_and_predict(root, run, trainers, "nnUNetPlans", out)
    for trainer in trainers:
        _check_predictions(root, out / trainer)

    # --val --npz, nnUNetv2_ensemble and the model zip round trip rebuild the same network from the saved plans.
    nnynet, dyntransnet = METHODS["nnynet"][0], METHODS["dyntransnet"][0]
    run(_script("nnUNetv2_train"), str(DATASET_ID), CONFIG, "0", "-tr", nnynet, "-device", "cpu", "--val", "--npz")
    for trainer in (nnynet, dyntransnet):
        _predict(root, run, trainer, "nnUNetPlans", root / "probabilities" / trainer, ("0",), "--save_probabilities")
    run(_script("nnUNetv2_ensemble"), "-i", *(str(root / "probabilities" / t) for t in (nnynet, dyntransnet)),
        "-o", str(root / "ensembled"), "-np", "2")  # fmt: skip
    _check_predictions(root, root / "ensembled")
    archive = root / "nnynet_model.zip"
    run(_script("nnUNetv2_export_model_to_zip"), "-d", str(DATASET_ID), "-o", str(archive), "-c", CONFIG, "-tr",
        nnynet, "-f", "0", "1", "--not_strict")  # fmt: skip
    installed = root / "installed_results"
    installed.mkdir()
    run(_script("nnUNetv2_install_pretrained_model_from_zip"), str(archive), env_override={"nnUNet_results":
        str(installed)})  # fmt: skip
    _predict(root, run, nnynet, "nnUNetPlans", root / "from_zip", env_override={"nnUNet_results": str(installed)})
    _check_predictions(root, root / "from_zip")


def test_resenc_m_plans(planned, workspace):
    root, _env, run = workspace
    run(
        _script("nnUNetv2_plan_and_preprocess"),
        "-d",
        str(DATASET_ID),
        "-c",
        CONFIG,
        "-pl",
        "nnUNetPlannerResEncM",
        "--no_pp",
        "-npfp",
        "2",
    )  # ResEnc M shares nnU-Net's 3d_fullres data
    _quick_schedule(root, RESENC)
    trainer = "ELANResMSCATrainer_tiny"
    _train(run, trainer, RESENC)
    saved = _check_model(root, "elanres_msca", trainer, RESENC, "encoder.")
    assert saved[PLANS_MODEL_KEY]["adapted_from"]["network_class_name"].endswith("ResidualEncoderUNet")
    out = root / "predictions_resenc"
    _find_best_and_predict(root, run, [trainer], RESENC, out)
    _check_predictions(root, out / trainer)


def test_nnyseg_own_plans_still_work(planned, workspace):
    root, _env, run = workspace
    run(
        sys.executable,
        "-m",
        "nnyseg.cli",
        "plan_and_preprocess",
        "-d",
        str(DATASET_ID),
        "-pl",
        "nnYNetPlanner",
        "--no_pp",
        "-npfp",
        "2",
    )  # the data are nnU-Net's 3d_fullres data
    plans = json.loads((_dataset_folder(root, "nnUNet_preprocessed") / "nnYNetPlans.json").read_text(encoding="utf-8"))
    assert plans["configurations"][CONFIG]["data_identifier"] == "nnUNetPlans_3d_fullres"
    _quick_schedule(root, "nnYNetPlans")
    trainer = "nnYNetTrainer_tiny"
    _train(run, trainer, "nnYNetPlans", folds=("0",))
    _check_model(root, "nnynet", trainer, "nnYNetPlans", "cross_attention.", folds=(0,))
    out = root / "predictions_nnynetplans"
    _predict(root, run, trainer, "nnYNetPlans", out, ("0",))
    _check_predictions(root, out)
