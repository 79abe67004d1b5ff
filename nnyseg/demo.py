"""``nnyseg demo``: the main job end to end on the phantom, on a CPU, with the stock nnU-Net commands.

phantom dataset -> ``nnyseg plan_and_preprocess`` (one planner per model) -> ``nnUNetv2_train`` of each model's tiny
preset, fold 0 -> ``nnUNetv2_predict`` on the held-out cases -> ``nnyseg evaluate`` (LiTS metrics) -> ``nnyseg report``
(an HTML page with overlays and the training curve) per model.

Every step is the command a user would type; the demo prints each one before it runs it. Models are tiny presets
(``3d_fullres_tiny``) so that the whole run takes minutes on 2 CPU cores; their numbers say that the pipeline works,
not how good the architectures are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEMO_DATASET_ID = 501
DEMO_DATASET_NAME = "LiverPhantomDemo"


@dataclass(frozen=True)
class DemoModel:
    """One model of the demo: the planner that writes its plans and the trainer that trains it."""

    key: str
    planner: str
    plans: str
    trainer: str
    description: str


#: Models the demo can train; the order is the order of training.
DEMO_MODELS: dict[str, DemoModel] = {
    m.key: m
    for m in (
        DemoModel("baseline", "nnysegBaselinePlanner", "nnysegBaselinePlans", "nnysegTrainer", "nnU-Net PlainConvUNet"),
        DemoModel("elanres", "ELANResMSCAPlanner", "ELANResMSCAPlans", "nnysegTrainer", "ELANRes-MSCA-UNet"),
        DemoModel("nnynet", "nnYNetPlanner", "nnYNetPlans", "nnysegTrainer", "nnY-Net (Swin-NeXt, latent queries)"),
        DemoModel(
            "dyntransnet", "DynTransNetPlanner", "DynTransNetPlans", "nnysegTrainer", "DynTransNet (D-MSA, FM-M)"
        ),
    )
}

#: What ``nnyseg demo`` trains by default: the baseline and one nnyseg architecture keep it under 15 minutes on 2
#: CPU cores; ``--models baseline elanres nnynet dyntransnet`` adds the Swin-based networks.
DEFAULT_DEMO_MODELS = ("baseline", "elanres")


def _script(name: str) -> str:
    """Path of a console script of this environment (nnUNetv2_train, ...), falling back to PATH."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"console script {name} not found next to {sys.executable} or on PATH")
    return found


def _run(cmd: list[str], env: dict[str, str], log: Path) -> None:
    """Run one step, echoing the command; its output goes to the terminal and to ``log``."""
    shown = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))
    print(f"\n$ {shown}", flush=True)
    start = time.perf_counter()
    with log.open("a", buffering=1, encoding="utf-8") as f:  # line-buffered, so `tail -f demo.log` follows along
        f.write(f"\n$ {shown}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8"
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if _worth_showing(line):
                print("  " + line.rstrip(), flush=True)
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"step failed with exit code {code}: {shown}\nfull log: {log}")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def _worth_showing(line: str) -> bool:
    """nnU-Net is chatty; show progress lines, results and errors, skip banners and plans dumps."""
    keys = (
        "Epoch ",
        "train_loss",
        "val_loss",
        "Pseudo dice",
        "Epoch time",
        "Traceback",
        "Error",
        "error",
        "written",
        "Plans were saved",
        "Predicting",
        "done",
        "Mean Validation Dice",
    )
    return any(k in line for k in keys) and "warn" not in line.lower()


def demo_environment(workdir: Path) -> dict[str, str]:
    """Environment for the stock commands: the demo's own nnU-Net folders and CPU-friendly process counts."""
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(workdir / var)
        Path(env[var]).mkdir(parents=True, exist_ok=True)
    # nnU-Net's defaults are sized for GPU nodes: 8 worker processes for validation and export, 12 for augmentation.
    cores = str(min(2, os.cpu_count() or 1))
    env.setdefault("nnUNet_def_n_proc", cores)
    env.setdefault("nnUNet_n_proc_DA", cores)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_demo(workdir: Path, trainers: list[str] | None = None, keep: bool = False, preset: str = "tiny") -> dict:
    """Run the demo in ``workdir`` and return the metrics per model (``nnyseg evaluate``'s metrics.json).

    Args:
        workdir: Folder for every output (created; replaced unless ``keep``).
        trainers: Keys of :data:`DEMO_MODELS` to train (default: :data:`DEFAULT_DEMO_MODELS`).
        keep: Reuse an existing work folder (skips the phantom and planning steps that already ran).
        preset: Phantom grid; ``micro`` (6 x 6 x 8 mm voxels) makes a quick smoke run of the whole pipeline.
    """
    from nnyseg.data.phantom import write_nnunet_dataset
    from nnyseg.evaluation.metrics import format_summary
    from nnyseg.planning.planners import nnysegPlannerBase

    keys = list(trainers or DEFAULT_DEMO_MODELS)
    unknown = [k for k in keys if k not in DEMO_MODELS]
    if unknown:
        raise ValueError(f"unknown demo model(s) {unknown}; choose from {list(DEMO_MODELS)}")
    models = [DEMO_MODELS[k] for k in keys]

    workdir = workdir.resolve()
    if workdir.exists() and not keep:
        marker = workdir / ".nnyseg_demo"
        if not marker.exists():
            raise FileExistsError(f"{workdir} exists and was not made by the demo; pick another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ".nnyseg_demo").touch()
    env = demo_environment(workdir)
    log = workdir / "demo.log"
    start = time.perf_counter()
    print(f"nnyseg demo in {workdir} (full log: {log})")

    raw = Path(env["nnUNet_raw"])
    dataset_dir = raw / f"Dataset{DEMO_DATASET_ID:03d}_{DEMO_DATASET_NAME}"
    if not dataset_dir.exists():
        print("\n== 1. phantom dataset")
        write_nnunet_dataset(
            raw, DEMO_DATASET_ID, DEMO_DATASET_NAME, num_training=10, num_test=2, preset=preset, seed=0
        )

    print("\n== 2. plan and preprocess (nnU-Net's fingerprint planning, adapted per architecture)")
    nnyseg_cmd = [sys.executable, "-m", "nnyseg.cli"]
    for i, model in enumerate(models):
        plans_file = Path(env["nnUNet_preprocessed"]) / dataset_dir.name / f"{model.plans}.json"
        if keep and plans_file.exists():
            continue
        # The 3d_fullres data are shared by every nnyseg plans file, so they are preprocessed once.
        preprocess = ["-c", "3d_fullres", "-np", "2"] if i == 0 else ["--no_pp"]
        _run(
            [
                *nnyseg_cmd,
                "plan_and_preprocess",
                "-d",
                str(DEMO_DATASET_ID),
                "-pl",
                model.planner,
                "-npfp",
                "2",
                *preprocess,
            ],
            env,
            log,
        )

    print("\n== 3. train each model's tiny CPU preset (fold 0)")
    for model in models:
        _run(
            [
                _script("nnUNetv2_train"),
                str(DEMO_DATASET_ID),
                "3d_fullres_tiny",
                "0",
                "-tr",
                model.trainer,
                "-p",
                model.plans,
                "-device",
                "cpu",
            ],
            env,
            log,
        )

    print("\n== 4. predict the held-out cases, 5. evaluate, 6. QC report")
    results = {}
    for model in models:
        out = workdir / "predictions" / model.key
        model_folder = (
            Path(env["nnUNet_results"]) / dataset_dir.name / f"{model.trainer}__{model.plans}__3d_fullres_tiny"
        )
        _run(
            [
                _script("nnUNetv2_predict"),
                "-i",
                str(dataset_dir / "imagesTs"),
                "-o",
                str(out),
                "-d",
                str(DEMO_DATASET_ID),
                "-c",
                "3d_fullres_tiny",
                "-tr",
                model.trainer,
                "-p",
                model.plans,
                "-f",
                "0",
                "-device",
                "cpu",
                "-npp",
                "0",
                "-nps",
                "0",
            ],
            env,
            log,
        )
        evaluation = workdir / "evaluation" / model.key
        gt = str(dataset_dir / "labelsTs")
        _run([*nnyseg_cmd, "evaluate", "--gt", gt, "--pred", str(out), "-o", str(evaluation)], env, log)
        results[model.key] = json.loads((evaluation / "metrics.json").read_text(encoding="utf-8"))
        _run(
            [
                *nnyseg_cmd,
                "report",
                "--images",
                str(dataset_dir / "imagesTs"),
                "--gt",
                str(dataset_dir / "labelsTs"),
                "--pred",
                str(out),
                str(workdir / "report" / model.key),
                "--metrics",
                str(evaluation / "metrics.json"),
                "--results",
                str(model_folder),
                "--title",
                f"nnyseg demo: {model.description} ({model.key}), tiny CPU preset, fold 0",
                "--overwrite",
            ],
            env,
            log,
        )

    print(f"\n== done in {time.perf_counter() - start:.0f} s. Held-out metrics (tiny CPU presets, fold 0):")
    for model in models:
        print(f"\n-- {model.key}: {model.description}")
        print(format_summary(results[model.key]))
    tiny = nnysegPlannerBase.tiny_trainer_settings
    print(
        f"\nThe tiny presets train for {tiny['num_epochs'] * tiny['num_iterations_per_epoch']} iterations: enough to "
        "find the liver, usually not yet the tumours, which need nnU-Net's full schedule (1000 x 250 iterations)."
    )
    print("\nOutputs:")
    print(f"  raw dataset       {dataset_dir}")
    print(f"  plans             {Path(env['nnUNet_preprocessed']) / dataset_dir.name}")
    for model in models:
        print(
            f"  {model.key:17s} model {Path(env['nnUNet_results']) / dataset_dir.name}/"
            f"{model.trainer}__{model.plans}__3d_fullres_tiny"
        )
        print(f"  {'':17s} predictions {workdir / 'predictions' / model.key}")
        print(f"  {'':17s} metrics {workdir / 'evaluation' / model.key} (metrics.json, per_case.csv, summary.md)")
        print(f"  {'':17s} QC report {workdir / 'report' / model.key / 'index.html'}")
    print(f"  log               {log}")
    return results
