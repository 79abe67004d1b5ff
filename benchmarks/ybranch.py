"""Does nnY-Net's cross-attention ("Y") branch learn from clinical features? Issue #3, requirement 6.

The phantom's clinical variant (``write_nnunet_dataset(..., diagnosis=True)``) has lesions that look the same in
every case, labelled tumour in "malignant" cases and liver in "benign" ones; only the clinical field ``diagnosis``
tells them apart. The tiny nnY-Net is trained twice with the same seed, data, schedule and budget: once in
``clinical`` cross-attention mode (queries from ``diagnosis`` plus the latent tokens) and once in ``latent`` mode
(latent tokens only). Both predict the held-out test cases with the stock commands (``nnyseg predict --clinical`` for
the clinical model), and ``nnyseg.evaluation.metrics`` scores them. The latent model cannot know which lesions are
tumour, so it must either miss the malignant ones or mark the benign ones; the clinical model need do neither.
As a causal check the clinical model also predicts the test cases with every diagnosis flipped: if it uses the field,
its tumour Dice collapses.

Many training cases (64 by default) cost no training time (the budget is iterations) and make it harder for the
network to tell the training cases' diagnoses apart by memorising their images instead of reading the field. Fold 0
trains on all of them and validates on four (fold ``all`` would re-predict every one at the end).

Reported (appended to benchmarks/RESULTS.md): global tumour Dice over all test cases, over the malignant ones,
the tumour voxels predicted in benign cases (all false positives), and global liver Dice.

    python benchmarks/ybranch.py                      # the reported run (about 25 min on 2 CPU cores)
    python benchmarks/ybranch.py --num-training 8 --num-test 4 --epochs 1 --iterations 4 --no-write   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
DATASET_ID, DATASET_NAME, PLANS = 502, "YBranchPhantom", "nnYNetPlans"
VALIDATION_CASES = 4
MIN_TUMOURS = 3  # lesions per case: enough tumour voxels for a stable global Dice on a dozen test cases
MODES = ("clinical", "latent")
FLIPPED = "clinical, every diagnosis flipped"


def flip_diagnoses(table: dict) -> dict:
    """The clinical table with ``benign`` and ``malignant`` swapped in every case."""
    swap = {"benign": "malignant", "malignant": "benign"}
    cases = {case: {**fields, "diagnosis": swap[fields["diagnosis"]]} for case, fields in table["cases"].items()}
    return {**table, "cases": cases}


def run(cmd: list[str], env: dict[str, str], log: Path) -> None:
    """Run one stock command, its output into ``log``; fail loudly with the log's tail."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"\n$ {shlex.join(cmd)}\n")
        handle.flush()
        result = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode:
        tail = "\n".join(log.read_text(encoding="utf-8").splitlines()[-30:])
        raise SystemExit(f"command failed ({result.returncode}): {shlex.join(cmd)}\n{tail}")


def script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def tumour_scores(gt_dir: Path, pred_dir: Path, diagnoses: dict[str, str]) -> dict[str, float]:
    from nnyseg.evaluation.metrics import evaluate_folders

    result = evaluate_folders(gt_dir, pred_dir, progress=False)
    malignant = [c for c in result["cases"] if diagnoses[c] == "malignant"]
    inter = total = benign_fp = 0
    for case in result["cases"]:
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_dir / f"{case}.nii.gz"))) == 2
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / f"{case}.nii.gz"))) == 2
        if case in malignant:
            inter += int(np.logical_and(gt, pred).sum())
            total += int(gt.sum()) + int(pred.sum())
        else:
            benign_fp += int(pred.sum())
    return {
        "tumour_global_dice": result["global"]["tumour"]["dice"],
        "tumour_global_dice_malignant": 2 * inter / total if total else 1.0,
        "tumour_voxels_in_benign_cases": benign_fp,
        "liver_global_dice": result["global"]["liver"]["dice"],
        "num_cases": result["num_cases"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/nnyseg_ybranch", help="scratch folder (replaced)")
    parser.add_argument("--preset", default="tiny", help="phantom grid preset (default: %(default)s)")
    parser.add_argument("--num-training", type=int, default=64, help="training cases (cost no training time)")
    parser.add_argument("--num-test", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=40, help="training iterations per epoch")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, both runs")
    parser.add_argument("--seed", type=int, default=0, help="phantom and training seed, both runs")
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)

    import shutil

    from nnyseg.data.clinical import load_clinical_table
    from nnyseg.data.phantom import write_nnunet_dataset
    from nnyseg.planning.planners import TINY_CONFIGURATION
    from nnyseg.trainers.base import PLANS_SETTINGS_KEY

    started = time.time()
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / var).mkdir(parents=True)
        env[var] = str(work / var)
    # single-process augmentation: the seed then fixes the batches too; 2 cores as on the development machine
    env.update({"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "2", "nnUNet_compile": "false"})
    log = work / "commands.log"

    raw = write_nnunet_dataset(
        work / "nnUNet_raw",
        DATASET_ID,
        DATASET_NAME,
        num_training=args.num_training,
        num_test=args.num_test,
        preset=args.preset,
        seed=args.seed,
        min_tumours=MIN_TUMOURS,
        diagnosis=True,
        progress=False,
    )
    table = load_clinical_table(raw)
    cases_with_schema = json.loads((raw / "clinical.json").read_text(encoding="utf-8"))
    cases = cases_with_schema["cases"]
    diagnoses = {case: fields["diagnosis"] for case, fields in cases.items()}
    plan_env = {**env, "nnUNet_n_proc_DA": "2"}  # nnU-Net's planner sets torch's threads from it: must be > 0
    run([script("nnyseg"), "plan_and_preprocess", "-d", str(DATASET_ID), "-pl", "nnYNetPlanner", "-c", "3d_fullres",
         "-npfp", "2", "-np", "2"], plan_env, log)  # fmt: skip

    plans_file = work / "nnUNet_preprocessed" / raw.name / f"{PLANS}.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    settings = {
        "num_epochs": args.epochs,
        "num_iterations_per_epoch": args.iterations,
        "num_val_iterations_per_epoch": 4,
        "save_every": args.epochs,
        "initial_lr": args.lr,
        "seed": args.seed,
    }
    # The planner saw the clinical table beside dataset.json: its CPU preset is in clinical mode with the table's
    # schema. The latent model is the same configuration with the cross-attention switch set to "latent".
    tiny_architecture = plans["configurations"][TINY_CONFIGURATION]["architecture"]
    tiny_kwargs = tiny_architecture["arch_kwargs"]
    if tiny_kwargs.get("cross_attention") != "clinical" or tiny_kwargs.get("clinical_schema") != table.schema:
        raise RuntimeError(f"{plans_file}: nnYNetPlanner did not plan clinical mode from {table.source}")
    film_levels = tiny_kwargs.get("ca_film_levels", "all")
    latent_architecture = json.loads(json.dumps(tiny_architecture))
    latent_architecture["arch_kwargs"]["cross_attention"] = "latent"
    del latent_architecture["arch_kwargs"]["clinical_schema"]
    configurations = {"latent": "ybranch_latent", "clinical": "ybranch_clinical"}
    plans["configurations"]["ybranch_latent"] = {
        "inherits_from": TINY_CONFIGURATION,
        "architecture": latent_architecture,
        PLANS_SETTINGS_KEY: settings,
    }
    plans["configurations"]["ybranch_clinical"] = {"inherits_from": TINY_CONFIGURATION, PLANS_SETTINGS_KEY: settings}
    plans_file.write_text(json.dumps(plans, indent=1), encoding="utf-8")

    # One split: train on every training case; validate (nnU-Net's per-epoch pseudo Dice and its final validation)
    # on a few of them only, since fold "all" would re-predict every training case at the end of each run.
    train_ids = sorted(f.name[: -len(".nii.gz")] for f in (raw / "labelsTr").glob("*.nii.gz"))
    splits = [{"train": train_ids, "val": train_ids[:VALIDATION_CASES]}]
    (plans_file.parent / "splits_final.json").write_text(json.dumps(splits, indent=1), encoding="utf-8")

    scores, seconds = {}, {}
    for mode in MODES:
        t0 = time.time()
        config = configurations[mode]
        run([script("nnUNetv2_train"), str(DATASET_ID), config, "0", "-tr", "nnYNetTrainer", "-p", PLANS,
             "-device", "cpu"], env, log)  # fmt: skip
        out = work / f"pred_{mode}"
        common = ["-i", str(raw / "imagesTs"), "-d", str(DATASET_ID), "-c", config, "-f", "0",
                  "-tr", "nnYNetTrainer", "-p", PLANS, "-device", "cpu", "-npp", "0", "-nps", "0"]  # fmt: skip
        if mode == "clinical":
            table_file = raw / "clinical.json"
            run([script("nnyseg"), "predict", "-o", str(out), *common, "--clinical", str(table_file)], env, log)
        else:
            run([script("nnUNetv2_predict"), "-o", str(out), *common], env, log)
        scores[mode] = tumour_scores(raw / "labelsTs", out, diagnoses)
        seconds[mode] = time.time() - t0
        print(f"{mode}: {scores[mode]} ({seconds[mode]:.0f} s)", flush=True)
        if mode == "clinical":
            # The causal check: the same trained model, told the opposite diagnosis for every test case, should
            # mark the benign cases' lesions and miss the malignant ones.
            flipped_table = work / "clinical_flipped.json"
            flipped_table.write_text(json.dumps(flip_diagnoses(cases_with_schema)), encoding="utf-8")
            out = work / "pred_clinical_flipped"
            run([script("nnyseg"), "predict", "-o", str(out), *common, "--clinical", str(flipped_table)], env, log)
            scores[FLIPPED] = tumour_scores(raw / "labelsTs", out, diagnoses)
            print(f"{FLIPPED}: {scores[FLIPPED]}", flush=True)

    margin = scores["clinical"]["tumour_global_dice"] - scores["latent"]["tumour_global_dice"]
    command = "python benchmarks/ybranch.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    test_ids = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTs").glob("*.nii.gz"))
    n_malignant = sum(diagnoses[c] == "malignant" for c in test_ids)
    lines = [
        "",
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, the Y branch learns from clinical features "
        "(issue #3, requirement 6)",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Phantom clinical variant (`nnyseg phantom --diagnosis`), preset `{args.preset}`, seed {args.seed}: "
        f"{args.num_training} training cases (all in fold 0's training set, {VALIDATION_CASES} of them also its "
        f"validation set), {len(test_ids)} held-out test cases ({n_malignant} "
        f"malignant, {len(test_ids) - n_malignant} benign), at least {MIN_TUMOURS} lesions per case. Tiny nnY-Net "
        f'(`3d_fullres_tiny`, `ca_film_levels: "{film_levels}"`), '
        f"`nnYNetTrainer` (AdamW, DiceFocalCE, poly), lr {args.lr:g}, {args.epochs} epochs x "
        f"{args.iterations} iterations, trainer seed {args.seed}, CPU. Both runs differ only in the cross-attention "
        "mode. Total wall time {:.0f} min.".format((time.time() - started) / 60),
        "",
        "| mode | tumour global Dice (all test cases) | tumour global Dice (malignant cases) "
        "| tumour voxels predicted in benign cases | liver global Dice | train + predict (min) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode in (*MODES, FLIPPED):
        s = scores[mode]
        minutes = f"{seconds[mode] / 60:.1f}" if mode in seconds else "(same model)"
        lines.append(
            f"| {mode} | {s['tumour_global_dice']:.3f} | {s['tumour_global_dice_malignant']:.3f} | "
            f"{s['tumour_voxels_in_benign_cases']} | {s['liver_global_dice']:.3f} | {minutes} |"
        )
    lines += ["", f"Margin (clinical - latent, tumour global Dice over all test cases): **{margin:+.3f}**.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        from nnyseg.io import atomic_file

        with atomic_file(RESULTS) as tmp:
            tmp.write_text(RESULTS.read_text(encoding="utf-8").rstrip("\n") + "\n" + text)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
