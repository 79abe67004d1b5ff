"""Kill and resume (issue #14, requirement 2): ``nnUNetv2_train`` killed with SIGKILL mid-epoch, resumed with ``--c``.

For every nnyseg method trainer (its CPU-sized ``_tiny`` variant) on nnU-Net's default plans of a micro phantom with
a clinical table, three stock ``nnUNetv2_train`` subprocesses run:

* an **uninterrupted** run into its own ``nnUNet_results`` (same preprocessed data), the reference;
* a run that is **killed** (SIGKILL to its process group) in the middle of epoch 1, after ``checkpoint_latest.pth``
  of epoch 0 was written;
* the **resumed** run (``--c``) of the killed one, to the end.

The schedule is 3 epochs x 2 iterations with a checkpoint every epoch; ELANRes's step schedule decays the learning
rate and the deep-supervision weights every epoch, so each resumed epoch has values of its own. nnU-Net's training is
not deterministic (augmentation), so the runs are compared on what must not depend on chance: epoch counters,
learning rates, deep-supervision weights and nnY-Net's clinical statistics, never losses. Then the resumed ELANRes
model's fused RepConv inference is compared with the unfused network, and every resumed model is predicted with the
stock ``nnUNetv2_predict``.

The subprocesses get nnU-Net's three path variables plus CPU-sized process counts, and ``OMP_WAIT_POLICY=PASSIVE``:
``nnUNetv2_train -device cpu`` sets as many torch threads as there are cores, and on 2 shared cores spinning OpenMP
threads made every iteration ~15x slower (measured; passive waiting changes speed only, not results).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnyseg.data.phantom import write_nnunet_dataset
from nnyseg.trainers import ELANResMSCATrainer_tiny
from nnyseg.trainers.nnynet import CLINICAL_NORMALISATION_FILE

pytestmark = pytest.mark.slow

DATASET_ID = 971
NAME = "ResumePhantom"
NUM_TRAINING, NUM_TEST = 6, 1
#: A short schedule with a checkpoint_latest.pth after every epoch but the last.
SCHEDULE = {"num_epochs": 3, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "save_every": 1}
#: ELANRes's step schedule, decaying every epoch (the recipe's 30 epochs would not decay within 3).
ELANRES_STEPS = {"lr_step_size": 1, "ds_alpha_every": 1}
STEPS_CONFIGURATION = "3d_fullres_steps"
#: trainer -> configuration of nnU-Net's plans it trains.
TRAINERS = {
    "nnYNetTrainer_tiny": "3d_fullres",
    "DynTransNetTrainer_tiny": "3d_fullres",
    "ELANResMSCATrainer_tiny": STEPS_CONFIGURATION,
}
KILL_EPOCH = 1  # killed during this epoch; checkpoint_latest.pth of epoch KILL_EPOCH - 1 exists then
#: A numeric clinical field added to the phantom's table, so that nnY-Net has z-score statistics to keep (the
#: phantom's own field, ``diagnosis``, is categorical). case_0003 has none: n_cases must count it out.
AGES = [64.0, 51.0, 73.0, None, 58.0, 69.0, 60.0]
FOLD0_TRAIN = [f"case_{i:04d}" for i in range(5)]
FOLD0_VAL = ["case_0005"]  # one validation case: nnU-Net's final validation of each run takes half the time
EPOCH_LINE = re.compile(r": Epoch (\d+)$", re.MULTILINE)
DS_LINE = re.compile(r": Deep supervision weights: \[([^\]]*)\]$", re.MULTILINE)


def _script(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name)


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]
    raw: Path
    preprocessed: Path

    def env_for(self, results: Path) -> dict[str, str]:
        return {**self.env, "nnUNet_results": str(results)}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    """Micro phantom with a clinical table -> stock plan_and_preprocess -> short schedules and a one-fold split."""
    root = tmp_path_factory.mktemp("resume")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet", "NNYSEG"))}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(root / var)
        (root / var).mkdir()
    env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="2", PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")
    phantom = dict(num_training=NUM_TRAINING, num_test=NUM_TEST, preset="micro", progress=False, diagnosis=True)
    raw = write_nnunet_dataset(root / "nnUNet_raw", DATASET_ID, NAME, **phantom)
    table_path = raw / "clinical.json"
    table = json.loads(table_path.read_text(encoding="utf-8"))
    table["schema"].append({"name": "age", "type": "numeric"})
    cases = sorted(table["cases"])
    assert len(cases) == len(AGES)
    for case, age in zip(cases, AGES, strict=True):
        table["cases"][case]["age"] = age
    table_path.write_text(json.dumps(table, indent=1), encoding="utf-8")

    _run(
        env,
        _script("nnUNetv2_plan_and_preprocess"),
        "-d",
        str(DATASET_ID),
        *("-c", "3d_fullres", "-npfp", "2", "-np", "2"),
    )
    preprocessed = root / "nnUNet_preprocessed" / raw.name
    plans_file = preprocessed / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    plans["configurations"]["3d_fullres"]["nnyseg_trainer_settings"] = dict(SCHEDULE)
    # ELANRes's extra settings are unknown to the other trainers: a derived configuration of the same data.
    plans["configurations"][STEPS_CONFIGURATION] = {
        "inherits_from": "3d_fullres",
        "nnyseg_trainer_settings": {**SCHEDULE, **ELANRES_STEPS},
    }
    plans_file.write_text(json.dumps(plans, indent=1), encoding="utf-8")
    splits = [{"train": FOLD0_TRAIN, "val": FOLD0_VAL}]
    (preprocessed / "splits_final.json").write_text(json.dumps(splits), encoding="utf-8")
    # Training: augmentation in the training process, so that killing the process group leaves no orphan.
    env["nnUNet_n_proc_DA"] = "0"
    return Workspace(root, env, raw, preprocessed)


def _run(env: dict[str, str], *cmd: str, timeout: float = 600) -> str:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def _train_command(trainer: str, *extra: str) -> list[str]:
    configuration = TRAINERS[trainer]
    return [_script("nnUNetv2_train"), str(DATASET_ID), configuration, "0", "-tr", trainer, "-device", "cpu", *extra]


def _start(env: dict[str, str], cmd: list[str], log: Path) -> subprocess.Popen:
    """Starts ``cmd`` in its own process group (so that SIGKILL reaches everything it started), output to ``log``."""
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text(encoding="utf-8")
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{text[-6000:]}"
    return text


def _epochs(text: str) -> list[int]:
    return [int(m) for m in EPOCH_LINE.findall(text)]


def _ds_weights(text: str) -> dict[int, list[float]]:
    """Epoch -> the deep-supervision weights ELANRes logged at its start."""
    weights: dict[int, list[float]] = {}
    epoch = None
    for line in text.splitlines():
        if m := EPOCH_LINE.search(line):
            epoch = int(m.group(1))
        elif (m := DS_LINE.search(line)) and epoch is not None:
            weights[epoch] = [float(w) for w in m.group(1).split(",")]
    return weights


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@dataclass
class Resumed:
    """Everything the checks need about one trainer's three runs."""

    trainer: str
    fold: Path  # fold_0 of the killed and resumed run
    reference_fold: Path  # fold_0 of the uninterrupted run
    killed_log: str
    resumed_log: str
    reference_log: str
    latest: dict  # checkpoint_latest.pth as the killed run left it
    final: dict
    reference_final: dict
    results: Path


def _kill_and_resume(ws: Workspace, trainer: str) -> Resumed:
    results, reference_results = ws.root / "nnUNet_results", ws.root / f"results_uninterrupted_{trainer}"
    reference_results.mkdir()
    logs = ws.root / f"logs_{trainer}"
    logs.mkdir()
    folder = f"{trainer}__nnUNetPlans__{TRAINERS[trainer]}"
    fold = results / ws.raw.name / folder / "fold_0"
    reference_fold = reference_results / ws.raw.name / folder / "fold_0"
    # The reference runs alongside the killed and the resumed run: independent processes and results folders.
    reference = _start(ws.env_for(reference_results), _train_command(trainer), logs / "uninterrupted.txt")
    killed = resumed = None
    try:
        killed = _start(ws.env_for(results), _train_command(trainer), logs / "killed.txt")
        deadline = time.monotonic() + 600
        while True:
            text = (logs / "killed.txt").read_text(encoding="utf-8")
            if KILL_EPOCH in _epochs(text) and (fold / "checkpoint_latest.pth").is_file():
                os.killpg(killed.pid, signal.SIGKILL)
                break
            assert killed.poll() is None, f"the run to be killed ended before epoch {KILL_EPOCH}:\n{text[-6000:]}"
            assert time.monotonic() < deadline, f"no epoch {KILL_EPOCH} within 600 s:\n{text[-6000:]}"
            time.sleep(0.02)
        killed.wait(timeout=60)
        assert killed.returncode == -signal.SIGKILL
        killed_log = (logs / "killed.txt").read_text(encoding="utf-8")
        latest = _load(fold / "checkpoint_latest.pth")
        resumed = _start(ws.env_for(results), _train_command(trainer, "--c"), logs / "resumed.txt")
        resumed_log = _finish(resumed, logs / "resumed.txt")
        reference_log = _finish(reference, logs / "uninterrupted.txt")
    finally:
        for proc in (reference, killed, resumed):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return Resumed(
        trainer=trainer,
        fold=fold,
        reference_fold=reference_fold,
        killed_log=killed_log,
        resumed_log=resumed_log,
        reference_log=reference_log,
        latest=latest,
        final=_load(fold / "checkpoint_final.pth"),
        reference_final=_load(reference_fold / "checkpoint_final.pth"),
        results=results,
    )


@pytest.fixture(scope="module")
def resumed(workspace) -> Callable[[str], Resumed]:
    """``resumed(trainer)``: that trainer's three runs, made once per module whichever test asks first."""
    cache: dict[str, Resumed] = {}

    def get(trainer: str) -> Resumed:
        if trainer not in cache:
            start = time.perf_counter()
            cache[trainer] = _kill_and_resume(workspace, trainer)
            print(f"{trainer}: uninterrupted, killed and resumed runs in {time.perf_counter() - start:.0f} s")
        return cache[trainer]

    return get


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_resume_continues_the_epoch_counter_and_the_schedule(resumed, trainer):
    r = resumed(trainer)
    # Killed in the middle of epoch KILL_EPOCH: it started, never ended, and the checkpoint is the previous epoch's.
    killed_epochs = _epochs(r.killed_log)
    assert killed_epochs == list(range(KILL_EPOCH + 1))
    assert "Epoch time" not in r.killed_log.rsplit(f": Epoch {KILL_EPOCH}\n", 1)[1]
    assert r.latest["current_epoch"] == KILL_EPOCH
    assert len(r.latest["logging"]["lrs"]) == KILL_EPOCH

    # The resumed run starts at the checkpoint's epoch and trains to the end; the logger's history continues.
    num_epochs = SCHEDULE["num_epochs"]
    assert _epochs(r.resumed_log) == list(range(KILL_EPOCH, num_epochs))
    assert _epochs(r.reference_log) == list(range(num_epochs))
    assert r.final["current_epoch"] == r.reference_final["current_epoch"] == num_epochs
    for key in ("lrs", "train_losses", "epoch_start_timestamps"):
        assert len(r.final["logging"][key]) == num_epochs, key
    assert r.final["logging"]["epoch_start_timestamps"][:KILL_EPOCH] == r.latest["logging"]["epoch_start_timestamps"]
    assert "Training done." in r.resumed_log and not (r.fold / "checkpoint_latest.pth").exists()

    # Learning rates: every epoch's, exactly those of the uninterrupted run (logged unrounded in the checkpoints).
    lrs, reference_lrs = r.final["logging"]["lrs"], r.reference_final["logging"]["lrs"]
    np.testing.assert_allclose(lrs, reference_lrs, rtol=1e-12, atol=0)
    final_lr = r.final["optimizer_state"]["param_groups"][0]["lr"]
    assert final_lr == pytest.approx(r.reference_final["optimizer_state"]["param_groups"][0]["lr"], rel=1e-12)
    if trainer == "ELANResMSCATrainer_tiny":
        # The schedule is not trivially constant: x0.8 every epoch.
        np.testing.assert_allclose(lrs, [1e-4 * 0.8**e for e in range(num_epochs)], rtol=1e-9)
        resumed_ds, reference_ds = _ds_weights(r.resumed_log), _ds_weights(r.reference_log)
        assert sorted(resumed_ds) == list(range(KILL_EPOCH, num_epochs))
        assert sorted(reference_ds) == list(range(num_epochs))
        for epoch, weights in resumed_ds.items():
            assert weights == reference_ds[epoch], epoch
            alpha = round(0.4 * 0.8**epoch, 6)
            assert weights == [1.0] + [alpha] * (len(weights) - 1), epoch
    elif trainer == "nnYNetTrainer_tiny":
        assert len(set(lrs)) == num_epochs  # poly: a new rate every epoch


def test_nnynet_clinical_statistics_survive_the_kill(resumed, workspace):
    r = resumed("nnYNetTrainer_tiny")
    # The statistics the fold must have: mean and population SD of the training cases' ages that are not missing.
    ages = [AGES[int(case[-4:])] for case in FOLD0_TRAIN]
    present = np.array([a for a in ages if a is not None])
    expected = {"mean": float(present.mean()), "std": float(present.std()), "n_cases": len(present)}
    assert "nnY-Net clinical mode" in r.resumed_log
    assert "other normalisation statistics" not in r.resumed_log  # the table and the checkpoint agree

    def tokenizer(checkpoint: dict) -> tuple[list[float], list[float]]:
        weights = checkpoint["network_weights"]
        return (
            weights["cross_attention.tokenizer.numeric_mean"].tolist(),
            weights["cross_attention.tokenizer.numeric_std"].tolist(),
        )

    for checkpoint in (r.latest, r.final, r.reference_final):
        mean, std = tokenizer(checkpoint)
        assert mean == pytest.approx([expected["mean"]], rel=1e-6)
        assert std == pytest.approx([expected["std"]], rel=1e-6)
    assert tokenizer(r.final) == tokenizer(r.latest) == tokenizer(r.reference_final)
    saved = json.loads((r.fold / CLINICAL_NORMALISATION_FILE).read_text(encoding="utf-8"))
    reference = json.loads((r.reference_fold / CLINICAL_NORMALISATION_FILE).read_text(encoding="utf-8"))
    assert saved == reference
    assert saved["numeric"]["age"] == pytest.approx(expected, rel=1e-6)


def test_elanres_fused_inference_after_resume_equals_the_unfused_network(resumed):
    r = resumed("ELANResMSCATrainer_tiny")
    plans = json.loads((r.fold.parent / "plans.json").read_text(encoding="utf-8"))
    pm = PlansManager(plans)
    cm = pm.get_configuration(STEPS_CONFIGURATION)
    dataset_json = json.loads((r.fold.parent / "dataset.json").read_text(encoding="utf-8"))
    heads = pm.get_label_manager(dataset_json).num_segmentation_heads
    build = ELANResMSCATrainer_tiny.build_network_architecture
    fused = build(pm, cm, 1, heads, enable_deep_supervision=False)  # what nnUNetv2_predict builds
    unfused = build(pm, cm, 1, heads, enable_deep_supervision=True)
    unfused.eval()
    unfused.decoder.deep_supervision = False
    fused.load_state_dict(r.final["network_weights"])  # re-fuses the RepConvs from the loaded weights
    unfused.load_state_dict(r.final["network_weights"])
    assert fused.deployed and not unfused.deployed
    x = torch.randn(1, 1, *cm.patch_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fused(x), unfused(x)
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_final_checkpoint_of_the_resumed_run_loads_in_nnunetv2_predict(resumed, workspace, trainer):
    r = resumed(trainer)
    out = workspace.root / f"predictions_{trainer}"
    _run(
        workspace.env_for(r.results),
        _script("nnUNetv2_predict"),
        *("-i", str(workspace.raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c", TRAINERS[trainer]),
        *("-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"),
    )
    images = sorted((workspace.raw / "imagesTs").glob("*_0000.nii.gz"))
    assert len(images) == NUM_TEST
    for image_path in images:
        prediction = out / image_path.name.replace("_0000.nii.gz", ".nii.gz")
        assert prediction.is_file()
        assert sitk.ReadImage(str(prediction)).GetSize() == sitk.ReadImage(str(image_path)).GetSize()
