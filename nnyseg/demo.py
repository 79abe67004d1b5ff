"""``nnyseg demo``: the main job end to end on the phantom, on a CPU, with the stock nnU-Net commands.

``nnyseg phantom`` -> ``nnUNetv2_plan_and_preprocess`` (nnU-Net's default plans) -> ``nnUNetv2_train ... -tr
nnYNetTrainer_tiny`` (fold 0; the trainer derives nnY-Net's CPU-sized configuration from nnU-Net's plans) ->
``nnUNetv2_predict`` on the held-out cases -> ``nnyseg evaluate`` (LiTS metrics) -> ``nnyseg report`` (an HTML page
with overlays and the training curve) per model. nnyseg's own commands appear only where nnU-Net has none.

Every step is the command a user would type; the demo prints each one before it runs it. Models are the registry's
CPU presets (the ``*_tiny`` trainers) so that the whole run takes minutes on 2 CPU cores; their numbers say that the
pipeline works, not how good the architectures are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEMO_DATASET_ID = 501
DEMO_DATASET_NAME = "LiverPhantomDemo"


#: Models the demo can train (registry keys); the flagship nnY-Net by default keeps the demo under 15 minutes on
#: 2 CPU cores, ``--models nnynet dyntransnet elanres_msca`` trains all three methods.
DEMO_MODELS: tuple[str, ...] = ("nnynet", "dyntransnet", "elanres_msca")
DEFAULT_DEMO_MODELS: tuple[str, ...] = ("nnynet",)
PLANS = "nnUNetPlans"
#: Phantom training cases: they cost preprocessing seconds, not training time, and more lesions to learn from.
DEMO_TRAINING_CASES = 24
DEMO_TEST_CASES = 3
CONFIGURATION = "3d_fullres"
#: ``--preset micro`` is a smoke run of the pipeline, so its trainings get a short schedule, written into the plans
#: (where nnyseg's trainers read their settings) instead of the CPU preset's longer one.
SMOKE_SCHEDULE = {"num_epochs": 5, "num_iterations_per_epoch": 20, "num_val_iterations_per_epoch": 2, "save_every": 5}


def cpu_trainer(model: str) -> str:
    """The trainer that trains ``model``'s CPU preset (the first ``*_tiny`` trainer of its registry entry)."""
    from nnyseg.registry import get_model

    return next(t for t in get_model(model).trainers if t.endswith("_tiny"))


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


def _set_schedule(plans_file: Path, schedule: dict) -> None:
    """Writes ``schedule`` as the trainer settings of the demo's configuration in ``plans_file`` (atomically)."""
    from nnyseg.io import atomic_file
    from nnyseg.registry import PLANS_SETTINGS_KEY

    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    plans["configurations"][CONFIGURATION][PLANS_SETTINGS_KEY] = dict(schedule)
    with atomic_file(plans_file) as tmp:
        tmp.write_text(json.dumps(plans, indent=4), encoding="utf-8")


def _burden_line(stats: dict) -> str:
    burden = stats.get("tumour_burden_percent")
    count = stats.get("lesion_count", 0)
    return (
        f"liver {stats.get('liver_volume_ml', 0.0):.1f} mL, tumour {stats.get('tumour_volume_ml', 0.0):.1f} mL "
        f"(burden {'n/a' if burden is None else f'{burden:.1f} %'}), {count} lesion{'' if count == 1 else 's'}"
    )


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
        trainers: Models of :data:`DEMO_MODELS` to train (default: :data:`DEFAULT_DEMO_MODELS`).
        keep: Reuse an existing work folder (skips the phantom and planning steps that already ran).
        preset: Phantom grid; ``micro`` (6 x 6 x 8 mm voxels) makes a quick smoke run of the whole pipeline,
            with :data:`SMOKE_SCHEDULE` written into the plans.
    """
    from nnyseg.evaluation.burden import measure_burden
    from nnyseg.evaluation.metrics import format_summary
    from nnyseg.registry import get_model

    models = list(trainers or DEFAULT_DEMO_MODELS)
    unknown = [k for k in models if k not in DEMO_MODELS]
    if unknown:
        raise ValueError(f"unknown demo model(s) {unknown}; choose from {list(DEMO_MODELS)}")

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
    nnyseg_cmd = [sys.executable, "-m", "nnyseg.cli"]
    if not dataset_dir.exists():
        print("\n== 1. phantom dataset (nnyseg phantom)")
        _run(
            [
                *nnyseg_cmd,
                "phantom",
                "-d",
                str(DEMO_DATASET_ID),
                "--name",
                DEMO_DATASET_NAME,
                "--num-training",
                str(DEMO_TRAINING_CASES),
                "--num-test",
                str(DEMO_TEST_CASES),
                "--preset",
                preset,
                "--seed",
                "0",
            ],
            env,
            log,
        )

    print("\n== 2. plan and preprocess (nnU-Net's own command and plans)")
    plans_file = Path(env["nnUNet_preprocessed"]) / dataset_dir.name / f"{PLANS}.json"
    if not (keep and plans_file.exists()):
        _run(
            [
                _script("nnUNetv2_plan_and_preprocess"),
                "-d",
                str(DEMO_DATASET_ID),
                "-c",
                CONFIGURATION,
                "-npfp",
                "2",
                "-np",
                "2",
                "--verify_dataset_integrity",
            ],
            env,
            log,
        )

    if preset == "micro":
        _set_schedule(plans_file, SMOKE_SCHEDULE)
        print(f"  smoke run: {SMOKE_SCHEDULE['num_epochs']} epochs x {SMOKE_SCHEDULE['num_iterations_per_epoch']} "
              f"iterations (set in {plans_file.name}, configuration {CONFIGURATION})")  # fmt: skip

    print("\n== 3. train each model's CPU preset (fold 0): the trainer adapts nnU-Net's plans to its network")
    for model in models:
        _run(
            [
                _script("nnUNetv2_train"),
                str(DEMO_DATASET_ID),
                CONFIGURATION,
                "0",
                "-tr",
                cpu_trainer(model),
                "-device",
                "cpu",
            ],
            env,
            log,
        )

    print("\n== 4. predict the held-out cases (nnUNetv2_predict), 5. evaluate, 6. QC report")
    results = {}
    for model in models:
        trainer = cpu_trainer(model)
        out = workdir / "predictions" / model
        model_folder = Path(env["nnUNet_results"]) / dataset_dir.name / f"{trainer}__{PLANS}__{CONFIGURATION}"
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
                CONFIGURATION,
                "-tr",
                trainer,
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
        evaluation = workdir / "evaluation" / model
        gt = str(dataset_dir / "labelsTs")
        _run([*nnyseg_cmd, "evaluate", "--gt", gt, "--pred", str(out), "-o", str(evaluation)], env, log)
        results[model] = json.loads((evaluation / "metrics.json").read_text(encoding="utf-8"))
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
                str(workdir / "report" / model),
                "--metrics",
                str(evaluation / "metrics.json"),
                "--results",
                str(model_folder),
                "--title",
                f"nnyseg demo: {get_model(model).title}, CPU preset ({trainer}), fold 0",
                "--overwrite",
            ],
            env,
            log,
        )

    flagship = models[0]
    case_image = sorted((dataset_dir / "imagesTs").glob("*_0000.nii.gz"))[0]
    case = case_image.name[: -len("_0000.nii.gz")]
    print(f"\n== 7. segment a new patient ({case}) with nnyseg segment: mask, tumour burden, preview")
    segment_out = workdir / "segment"
    model_folder = Path(env["nnUNet_results"]) / dataset_dir.name / f"{cpu_trainer(flagship)}__{PLANS}__{CONFIGURATION}"
    _run(
        [*nnyseg_cmd, "segment", str(case_image), "-o", str(segment_out), "-m", str(model_folder), "-f", "0",
         "-device", "cpu", "--overwrite"],
        env,
        log,
    )  # fmt: skip
    found = json.loads((segment_out / case / "stats.json").read_text(encoding="utf-8"))
    truth = measure_burden(dataset_dir / "labelsTs" / f"{case}.nii.gz", case_image)

    print(f"\n== done in {time.perf_counter() - start:.0f} s. Held-out metrics (CPU presets, fold 0):")
    for model in models:
        print(f"\n-- {model}: {get_model(model).title}")
        print(format_summary(results[model]))
    metrics = results[flagship]
    tumour = metrics["global"]["tumour"]
    recall = metrics.get("lesions", {}).get("recall")
    print(
        f"\n{get_model(flagship).title}, held-out cases: tumour global Dice {tumour['dice']:.3f}, lesion recall "
        + ("n/a" if recall is None else f"{recall:.3f}")
    )
    predicted = found.get("burden", found)
    print(f"\nTumour burden of {case} (nnyseg segment): {_burden_line(predicted)}")
    print(f"Tumour burden of {case} (the phantom's true labels): {truth.summary()}")
    print("\nOutputs:")
    print(f"  raw dataset       {dataset_dir}")
    print(f"  plans             {Path(env['nnUNet_preprocessed']) / dataset_dir.name}")
    for model in models:
        print(
            f"  {model:17s} model {Path(env['nnUNet_results']) / dataset_dir.name}/"
            f"{cpu_trainer(model)}__{PLANS}__{CONFIGURATION}"
        )
        print(f"  {'':17s} predictions {workdir / 'predictions' / model}")
        print(f"  {'':17s} metrics {workdir / 'evaluation' / model} (metrics.json, per_case.csv, summary.md)")
        print(f"  {'':17s} QC report {workdir / 'report' / model / 'index.html'}")
    print(f"  segment           {segment_out / case} (mask.nii.gz, stats.json, lesions.csv, preview.png)")
    print(f"  log               {log}")
    return results
