"""Does nnY-Net's cross-attention ("Y") branch learn from clinical features, on every seed? Issues #3 and #15.

The phantom's clinical variant (``write_nnunet_dataset(..., diagnosis=True)``) has lesions that look the same in
every case, labelled tumour in "malignant" cases and liver in "benign" ones; only the clinical field ``diagnosis``
tells them apart. Per seed, the tiny nnY-Net is trained twice with the same seed, data, schedule and budget: once in
``clinical`` cross-attention mode (queries from ``diagnosis`` plus the latent tokens) and once in ``latent`` mode
(latent tokens only). Both predict the held-out test cases with the stock commands (``nnyseg predict --clinical`` for
the clinical model), and ``nnyseg.evaluation.metrics`` scores them. The latent model cannot know which lesions are
tumour, so it must either miss the malignant ones or mark the benign ones; the clinical model need do neither.
As a causal check the clinical model also predicts the test cases with every diagnosis flipped: if it uses the field,
its tumour Dice collapses. The clinical model trains with ``ybranch_trace`` on (FiLM weight and gradient norms, and
the effect of flipping the diagnosis on its output, per epoch).

Each seed makes its own phantom (and trains with that seed). Many training cases cost no training time (the budget
is iterations) and make it harder for the network to tell the training cases' diagnoses apart by memorising their
images instead of reading the field. Fold 0 trains on all of them and validates on four.

Reported (appended to benchmarks/RESULTS.md): one row per seed with the global tumour Dice of both models and of the
flipped predictions, and issue #15's three criteria (margin >= +0.05, flip cost >= 0.10, benign-case tumour voxels at
most half the latent model's). Test cases cost prediction time only, so there are 32 of them (half malignant): with
the 8 of the earlier protocol the margin depended on which cases were drawn by more than the criterion's +0.05
(RESULTS.md, issue #15, "32 test cases"). Each row also gives a bootstrap interval of the margin over the test cases
and the criteria on the first 8 test cases alone, the earlier protocol's test set (case i depends only on the seed
and i), scored with the same trained models.

    python benchmarks/ybranch.py --seeds 0 1 2 3 4             # the reported run (about 30 min on 2 CPU cores)
    python benchmarks/ybranch.py --seeds 5 --set ca_token_std=0.02 --trace-seed 5   # one seed, before issue #15
    python benchmarks/ybranch.py --seeds 0 --num-training 8 --num-test 4 --epochs 1 --iterations 4 --no-write  # smoke
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
from typing import Any

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
DATASET_ID, DATASET_NAME, PLANS = 502, "YBranchPhantom", "nnYNetPlans"
VALIDATION_CASES = 1  # nnU-Net needs one; its final validation of each model predicts it
MIN_TUMOURS = 3  # lesions per case: enough tumour voxels for a stable global Dice on a dozen test cases
MODES = ("clinical", "latent")
FLIPPED = "clinical, every diagnosis flipped"
MIN_MARGIN, MIN_FLIP_COST, MAX_BENIGN_RATIO = 0.05, 0.10, 0.5  # issue #15, requirement 2


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


def run_parallel(commands: list[list[str]], env: dict[str, str], logs: list[Path]) -> None:
    """Run commands side by side, each into its own log; fail loudly with the first failure's tail."""
    processes = []
    for cmd, log in zip(commands, logs, strict=True):
        print(f"$ {shlex.join(cmd)} &", flush=True)
        handle = log.open("w", encoding="utf-8")
        processes.append((cmd, log, handle, subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)))
    failed = []
    for cmd, log, handle, process in processes:
        if process.wait():
            failed.append((cmd, log, process.returncode))
        handle.close()
    if failed:
        cmd, log, code = failed[0]
        tail = "\n".join(log.read_text(encoding="utf-8").splitlines()[-30:])
        raise SystemExit(f"command failed ({code}): {shlex.join(cmd)}\n{tail}")


def single_threaded(module: str, function: str, prog: str) -> list[str]:
    """A command running ``module.function`` (an entry point reading ``sys.argv``) where the CPU count reads 1.

    ``nnUNetv2_train`` and ``nnUNetv2_predict`` set torch's threads to the CPU count; this keeps them at one.
    """
    shim = (
        f"import multiprocessing, sys; multiprocessing.cpu_count = lambda: 1; from {module} import {function}; "
        f"sys.argv[0] = {prog!r}; sys.exit({function}())"
    )
    return [sys.executable, "-c", shim]


TRAIN = single_threaded("nnunetv2.run.run_training", "run_training_entry", "nnUNetv2_train")
PREDICT = single_threaded("nnunetv2.inference.predict_from_raw_data", "predict_entry_point", "nnUNetv2_predict")
PREDICT_CLINICAL = single_threaded("nnyseg.prediction", "main", "nnyseg predict")


def script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def tumour_scores(gt_dir: Path, pred_dir: Path, diagnoses: dict[str, str]) -> dict[str, Any]:
    """Global tumour Dice (all cases, malignant cases), benign-case tumour voxels, liver Dice and per-case counts.

    ``cases`` maps each case to its tumour voxel counts ``tp`` (true positives), ``pred`` and ``gt``, from which
    :func:`subset_scores` recomputes the scores on any subset of the cases.
    """
    from nnyseg.evaluation.metrics import evaluate_folders

    result = evaluate_folders(gt_dir, pred_dir, progress=False)
    cases = {}
    for case in result["cases"]:
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_dir / f"{case}.nii.gz"))) == 2
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / f"{case}.nii.gz"))) == 2
        cases[case] = {"tp": int(np.logical_and(gt, pred).sum()), "pred": int(pred.sum()), "gt": int(gt.sum())}
    scores = subset_scores(cases, diagnoses, list(cases))
    return {
        "tumour_global_dice": result["global"]["tumour"]["dice"],
        "tumour_global_dice_malignant": scores["tumour_global_dice_malignant"],
        "tumour_voxels_in_benign_cases": scores["tumour_voxels_in_benign_cases"],
        "liver_global_dice": result["global"]["liver"]["dice"],
        "num_cases": result["num_cases"],
        "cases": cases,
    }


def subset_scores(cases: dict[str, dict[str, int]], diagnoses: dict[str, str], subset: list[str]) -> dict[str, Any]:
    """The tumour scores of :func:`tumour_scores` from its per-case counts, on ``subset`` (repeats allowed)."""

    def dice(names: list[str]) -> float:
        total = sum(cases[c]["pred"] + cases[c]["gt"] for c in names)
        return 2 * sum(cases[c]["tp"] for c in names) / total if total else 1.0

    malignant = [c for c in subset if diagnoses[c] == "malignant"]
    return {
        "tumour_global_dice": dice(subset),
        "tumour_global_dice_malignant": dice(malignant),
        "tumour_voxels_in_benign_cases": sum(cases[c]["pred"] for c in subset if diagnoses[c] == "benign"),
    }


def parse_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE as JSON (numbers, strings in quotes or bare, true/false)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def fresh_workdir(work: Path) -> dict[str, str]:
    """Empties ``work``, makes nnU-Net's three folders in it and returns the environment that points there."""
    import shutil

    if work.exists():
        shutil.rmtree(work)
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / var).mkdir(parents=True)
        env[var] = str(work / var)
    # single-process augmentation: the seed then fixes the batches too; 2 cores as on the development machine
    env.update({"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "2", "nnUNet_compile": "false"})
    return env


def write_single_split(raw: Path, preprocessed: Path) -> None:
    """One split: fold 0 trains on every training case and validates on the first :data:`VALIDATION_CASES`."""
    train_ids = sorted(f.name[: -len(".nii.gz")] for f in (raw / "labelsTr").glob("*.nii.gz"))
    splits = [{"train": train_ids, "val": train_ids[:VALIDATION_CASES]}]
    (preprocessed / "splits_final.json").write_text(json.dumps(splits, indent=1), encoding="utf-8")


def run_seed(args: argparse.Namespace, seed: int, work: Path) -> dict[str, Any]:
    """Phantom, planning, the two trainings and the three predictions of one seed; returns its scores."""

    from nnyseg.data.clinical import load_clinical_table
    from nnyseg.data.phantom import write_nnunet_dataset
    from nnyseg.planning.planners import TINY_CONFIGURATION
    from nnyseg.trainers.base import PLANS_SETTINGS_KEY

    started = time.time()
    env = fresh_workdir(work)
    log = work / "commands.log"

    raw = write_nnunet_dataset(
        work / "nnUNet_raw",
        DATASET_ID,
        DATASET_NAME,
        num_training=args.num_training,
        num_test=args.num_test,
        preset=args.preset,
        seed=seed,
        min_tumours=MIN_TUMOURS,
        diagnosis=True,
        progress=False,
    )
    table = load_clinical_table(raw)
    cases_with_schema = json.loads((raw / "clinical.json").read_text(encoding="utf-8"))
    diagnoses = {case: fields["diagnosis"] for case, fields in cases_with_schema["cases"].items()}
    plan_env = {**env, "nnUNet_n_proc_DA": "2"}  # nnU-Net's planner sets torch's threads from it: must be > 0
    run([script("nnyseg"), "plan_and_preprocess", "-d", str(DATASET_ID), "-pl", "nnYNetPlanner", "-c", "3d_fullres",
         "-npfp", "2", "-np", "2"], plan_env, log)  # fmt: skip

    plans_file = work / "nnUNet_preprocessed" / raw.name / f"{PLANS}.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    settings = {
        "num_epochs": args.epochs,
        "num_iterations_per_epoch": args.iterations,
        "num_val_iterations_per_epoch": 2,
        "save_every": args.epochs,
        "initial_lr": args.lr,
        "seed": seed,
        **args.trainer_set,
    }
    # The planner saw the clinical table beside dataset.json: its CPU preset is in clinical mode with the table's
    # schema. The latent model is the same configuration with the cross-attention switch set to "latent".
    tiny_architecture = plans["configurations"][TINY_CONFIGURATION]["architecture"]
    tiny_kwargs = tiny_architecture["arch_kwargs"]
    if tiny_kwargs.get("cross_attention") != "clinical" or tiny_kwargs.get("clinical_schema") != table.schema:
        raise RuntimeError(f"{plans_file}: nnYNetPlanner did not plan clinical mode from {table.source}")
    clinical_architecture = json.loads(json.dumps(tiny_architecture))
    clinical_architecture["arch_kwargs"].update(args.set)
    latent_architecture = json.loads(json.dumps(clinical_architecture))
    latent_architecture["arch_kwargs"]["cross_attention"] = "latent"
    del latent_architecture["arch_kwargs"]["clinical_schema"]
    configurations = {"latent": "ybranch_latent", "clinical": "ybranch_clinical"}
    for mode, architecture in (("latent", latent_architecture), ("clinical", clinical_architecture)):
        plans["configurations"][configurations[mode]] = {
            "inherits_from": TINY_CONFIGURATION,
            "architecture": architecture,
            "patch_size": list(args.patch),
            PLANS_SETTINGS_KEY: {**settings, "ybranch_trace": mode == "clinical"},
        }
    plans_file.write_text(json.dumps(plans, indent=1), encoding="utf-8")

    # One split: train on every training case; validate (nnU-Net's per-epoch pseudo Dice and its final validation)
    # on a few of them only, since fold "all" would re-predict every training case at the end of each run.
    write_single_split(raw, plans_file.parent)

    # The two trainings run side by side, one torch thread each: at 32^3 two single-threaded processes do 1.5x the
    # work of one two-threaded process on 2 cores (benchmarks/RESULTS.md, issue #15). nnUNetv2_train sets torch's
    # threads to the CPU count, so it runs through nnU-Net's own entry point with the CPU count set to 1.
    run_parallel(
        [[*TRAIN, str(DATASET_ID), configurations[mode], "0", "-tr", "nnYNetTrainer", "-p", PLANS,
          "-device", "cpu"] for mode in MODES],
        env,
        [work / f"train_{mode}.log" for mode in MODES],
    )  # fmt: skip
    # The three predictions run side by side, one torch thread each, like the trainings. No mirroring at test time:
    # at 32^3 it would cost 8x, and it treats both models alike.
    flipped_table = work / "clinical_flipped.json"
    flipped_table.write_text(json.dumps(flip_diagnoses(cases_with_schema)), encoding="utf-8")
    predictions = {  # name: (configuration, clinical table or None, output folder, log)
        "clinical": ("clinical", raw / "clinical.json", work / "pred_clinical", work / "predict_clinical.log"),
        # The causal check: the clinical model told the opposite diagnosis for every test case should mark the
        # benign cases' lesions and miss the malignant ones.
        FLIPPED: ("clinical", flipped_table, work / "pred_clinical_flipped", work / "predict_flipped.log"),
        "latent": ("latent", None, work / "pred_latent", work / "predict_latent.log"),
    }
    commands = []
    for mode, table_file, out, _ in predictions.values():
        cmd = [*(PREDICT if table_file is None else PREDICT_CLINICAL), "-i", str(raw / "imagesTs"), "-o", str(out),
               "-d", str(DATASET_ID), "-c", configurations[mode], "-f", "0", "-tr", "nnYNetTrainer", "-p", PLANS,
               "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"]  # fmt: skip
        commands.append(cmd if table_file is None else [*cmd, "--clinical", str(table_file)])
    run_parallel(commands, env, [log for *_, log in predictions.values()])
    scores: dict[str, Any] = {}
    for name, (_, _, out, _) in predictions.items():
        scores[name] = tumour_scores(raw / "labelsTs", out, diagnoses)
        print(f"seed {seed}, {name}: { {k: v for k, v in scores[name].items() if k != 'cases'} }", flush=True)
    model = work / "nnUNet_results" / raw.name / f"nnYNetTrainer__{PLANS}__{configurations['clinical']}"
    trace = model / "fold_0" / "ybranch_trace.json"
    scores["trace"] = json.loads(trace.read_text(encoding="utf-8")) if trace.is_file() else []
    test_ids = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTs").glob("*.nii.gz"))
    scores["n_test"] = len(test_ids)
    scores["diagnoses"] = {case: diagnoses[case] for case in test_ids}
    scores["n_malignant"] = sum(diagnoses[c] == "malignant" for c in test_ids)
    scores["minutes"] = (time.time() - started) / 60
    return scores


def criteria(scores: dict[str, Any]) -> dict[str, Any]:
    """Issue #15's three criteria for one seed: margin >= +0.05, flip cost >= 0.10, benign voxels <= half latent's."""
    clinical, latent, flipped = scores["clinical"], scores["latent"], scores[FLIPPED]
    margin = clinical["tumour_global_dice"] - latent["tumour_global_dice"]
    flip_cost = clinical["tumour_global_dice"] - flipped["tumour_global_dice"]
    benign_ratio = clinical["tumour_voxels_in_benign_cases"] / max(latent["tumour_voxels_in_benign_cases"], 1)
    return {
        "margin": margin,
        "flip_cost": flip_cost,
        "benign_ratio": benign_ratio,
        "met": margin >= MIN_MARGIN and flip_cost >= MIN_FLIP_COST and benign_ratio <= MAX_BENIGN_RATIO,
    }


def restrict(scores: dict[str, Any], subset: list[str]) -> dict[str, Any]:
    """A seed's scores (``run_seed``) recomputed on ``subset`` of its test cases, for :func:`criteria`."""
    return {name: subset_scores(scores[name]["cases"], scores["diagnoses"], subset) for name in (*MODES, FLIPPED)}


def margin_interval(
    scores: dict[str, Any], draws: int = 2000, level: float = 0.9, cases: list[str] | None = None
) -> tuple[float, float]:
    """Bootstrap interval of the margin over the test cases (or ``cases``): how much it owes to which were drawn.

    Malignant and benign cases are resampled separately, with replacement, so every draw keeps their numbers; the
    same cases score both models (a paired bootstrap).
    """
    rng = np.random.default_rng(0)
    names = sorted(scores["diagnoses"]) if cases is None else cases
    groups = [[c for c in names if scores["diagnoses"][c] == kind] for kind in ("malignant", "benign")]
    margins = []
    for _ in range(draws):
        subset = [c for group in groups for c in rng.choice(group, size=len(group), replace=True)]
        restricted = restrict(scores, subset)
        margins.append(restricted["clinical"]["tumour_global_dice"] - restricted["latent"]["tumour_global_dice"])
    low, high = np.quantile(margins, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def trace_table(trace: list[dict[str, Any]]) -> list[str]:
    """The clinical model's per-epoch Y-branch trace as Markdown rows."""
    if not trace:
        return []
    levels = list(trace[0]["film_weight_norm"])
    fields = list(trace[0]["flip_effect"])
    header = ["epoch", *[f"W norm {n}" for n in levels], *[f"grad norm {n}" for n in levels]]
    header += [f"flip effect ({f})" for f in fields] + ["category token norm"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for record in trace:
        cells = [str(record["epoch"])]
        cells += [f"{record['film_weight_norm'][n]:.3g}" for n in levels]
        cells += [f"{record['film_grad_norm'].get(n, 0.0):.2g}" for n in levels]
        cells += [f"{record['flip_effect'][f]:.3f}" for f in fields]
        cells.append(f"{record.get('category_token_norm', float('nan')):.3g}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/nnyseg_ybranch", help="scratch folder (one subfolder per seed)")
    parser.add_argument("--preset", default="tiny", help="phantom grid preset (default: %(default)s)")
    parser.add_argument("--num-training", type=int, default=32, help="training cases (cost no training time)")
    parser.add_argument("--num-test", type=int, default=32, help="held-out test cases (cost prediction time only)")
    parser.add_argument(
        "--also-first",
        type=int,
        default=8,
        metavar="N",
        help="also score the first N test cases alone, the earlier protocol's test set (0: don't)",
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=30, help="training iterations per epoch")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, both runs")
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32], help="training patch, both runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="phantom and training seeds")
    parser.add_argument(
        "--set",
        type=parse_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an nnY-Net arch_kwargs entry for both models, e.g. ca_token_std=1.0 (the previous default)",
    )
    parser.add_argument(
        "--trainer-set",
        type=parse_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an nnYNetTrainer setting for both models, e.g. ybranch_lr_scale=1 (the previous default)",
    )
    parser.add_argument("--trace-seed", type=int, help="also print the clinical model's per-epoch trace of this seed")
    parser.add_argument("--note", default="", help="a sentence for the results section")
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    args.set = dict(args.set)
    args.trainer_set = dict(args.trainer_set)

    started = time.time()
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(args, seed, Path(args.workdir) / f"seed_{seed}")
        results[seed]["criteria"] = criteria(results[seed])
        results[seed]["margin_interval"] = margin_interval(results[seed])
        test_ids = sorted(results[seed]["diagnoses"])
        if 0 < args.also_first < len(test_ids):
            results[seed]["criteria_first"] = criteria(restrict(results[seed], test_ids[: args.also_first]))
        print(f"seed {seed}: {results[seed]['criteria']} ({results[seed]['minutes']:.1f} min)", flush=True)
    (Path(args.workdir) / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")

    from bench import device_name  # this folder's timing benchmark; imported here, where it is needed

    command = "python benchmarks/ybranch.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    scored_first = all("criteria_first" in r for r in results.values())
    n_test = results[args.seeds[0]]["n_test"]
    overrides = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in args.set.items()) or "none (the defaults)"
    trainer_overrides = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in args.trainer_set.items())
    lines = [
        "",
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, the Y branch on {len(args.seeds)} seeds (issue #15)",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Phantom clinical variant (`nnyseg phantom --diagnosis`), preset `{args.preset}`: per seed a new phantom "
        f"({args.num_training} training cases, all in fold 0's training set, {VALIDATION_CASES} of them also its "
        f"validation set; {n_test} held-out test cases, at least {MIN_TUMOURS} lesions per case) and that "
        f"trainer seed. Tiny nnY-Net (`3d_fullres_tiny`), arch_kwargs overrides: {overrides}. `nnYNetTrainer` "
        f"(AdamW, DiceFocalCE, poly), lr {args.lr:g}, {args.epochs} epochs x {args.iterations} iterations, "
        f"patch {'x'.join(map(str, args.patch))}, {device_name('cpu')}"
        + (f", trainer settings {trainer_overrides}" if trainer_overrides else "")
        + ". "
        "The two models of a seed differ only in the cross-attention mode. "
        f"Total wall time {(time.time() - started) / 60:.0f} min. {args.note}".rstrip(),
        "",
        "| seed | malignant / test cases | tumour Dice clinical | latent | clinical, diagnoses flipped "
        "| margin (>= +0.05) | margin, 90 % bootstrap interval | flip cost (>= 0.10) "
        "| benign-case tumour voxels clinical / latent (<= 0.5) | all met |"
        + (f" first {args.also_first} test cases: margin, flip cost, benign ratio, all met |" if scored_first else ""),
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---|" + ("---|" if scored_first else ""),
    ]
    for seed, r in results.items():
        c = r["criteria"]
        low, high = r["margin_interval"]
        row = (
            f"| {seed} | {r['n_malignant']} / {r['n_test']} | {r['clinical']['tumour_global_dice']:.3f} | "
            f"{r['latent']['tumour_global_dice']:.3f} | {r[FLIPPED]['tumour_global_dice']:.3f} | "
            f"{c['margin']:+.3f} | {low:+.3f} to {high:+.3f} | {c['flip_cost']:.3f} | "
            f"{r['clinical']['tumour_voxels_in_benign_cases']} / "
            f"{r['latent']['tumour_voxels_in_benign_cases']} = {c['benign_ratio']:.2f} | "
            f"{'yes' if c['met'] else '**no**'} |"
        )
        if "criteria_first" in r:
            f = r["criteria_first"]
            row += (
                f" {f['margin']:+.3f}, {f['flip_cost']:.3f}, {f['benign_ratio']:.2f}, "
                f"{'yes' if f['met'] else '**no**'} |"
            )
        lines.append(row)
    n_met = sum(r["criteria"]["met"] for r in results.values())
    lines += ["", f"Seeds meeting all three criteria: **{n_met} of {len(results)}**."]
    if scored_first:
        n_first = sum(r["criteria_first"]["met"] for r in results.values())
        lines += [
            f"On the first {args.also_first} test cases alone (the same trained models): {n_first} of {len(results)}."
        ]
    lines.append("")
    if args.trace_seed is not None and args.trace_seed in results:
        lines += [f"Per-epoch trace of the clinical model, seed {args.trace_seed} (`ybranch_trace`):", ""]
        lines += [*trace_table(results[args.trace_seed].get("trace", [])), ""]
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
