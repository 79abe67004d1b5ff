"""Does a setting that buys speed cost accuracy? Two models, same seed, data and budget. Issue #12, requirement 4.

Per seed, one phantom (``write_nnunet_dataset``, the demo's data) is planned with the model's own planner, and the
model's CPU preset (``3d_fullres_tiny``) is trained twice with the model's trainer: once as the preset defines it
(``reference``) and once with the ``--set`` overrides (``variant``, for example a speed setting of the registry:
``--speed-setting light_full_res``). Schedule, seed, patch and data are the same; the two trainings run side by side
with one torch thread each. The default schedule is 26 x 40 iterations at lr 1e-3, a budget at which the paper's
nnY-Net CPU preset finds the tumours; at 20 x 30 iterations and the trainer's lr 1e-4 neither model does.
Both predict the held-out test cases with ``nnUNetv2_predict`` and ``nnyseg.evaluation.metrics`` scores them: global
liver and tumour Dice and lesion recall (26-connected).

Reported (appended to benchmarks/RESULTS.md): one row per seed and model, beside the speed rows of ``bench.py``.

    python benchmarks/fixed_budget.py --model nnynet --speed-setting light_full_res --seeds 0 1   # about 15 min
    python benchmarks/fixed_budget.py --model nnynet --set window_size=2 --seeds 0 --no-write
    python benchmarks/fixed_budget.py --model nnynet --speed-setting light_full_res --seeds 0 --num-training 4 \\
        --num-test 2 --epochs 1 --iterations 2 --no-write                                       # smoke
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the Y-branch benchmark's runners, shared
from ybranch import (
    RESULTS,
    TRAIN,
    fresh_workdir,
    parse_setting,
    run,
    run_parallel,
    script,
    write_single_split,
)

DATASET_ID, DATASET_NAME = 503, "FixedBudgetPhantom"
#: The default budget: 1040 iterations at AdamW lr 1e-3 on 32^3 patches, at which the paper's nnY-Net CPU preset
#: finds the phantom's tumours (held-out tumour Dice 0.84 in RESULTS.md).
SCHEDULE = {"num_epochs": 26, "num_iterations_per_epoch": 40, "initial_lr": 1e-3}
MODELS = ("reference", "variant")


def scores(gt_dir: Path, pred_dir: Path) -> dict[str, Any]:
    from nnyseg.evaluation.metrics import evaluate_folders

    result = evaluate_folders(gt_dir, pred_dir, progress=False)
    return {
        "liver_global_dice": result["global"]["liver"]["dice"],
        "tumour_global_dice": result["global"]["tumour"]["dice"],
        "lesion_recall": result["lesions"]["recall"],
        "num_cases": result["num_cases"],
    }


def run_seed(args: argparse.Namespace, seed: int, work: Path) -> dict[str, Any]:
    """Phantom, planning, the two trainings and their predictions of one seed; returns both models' scores."""
    from nnyseg.data.phantom import write_nnunet_dataset
    from nnyseg.planning.planners import TINY_CONFIGURATION
    from nnyseg.registry import get_model
    from nnyseg.trainers.base import PLANS_SETTINGS_KEY

    spec = get_model(args.model)
    trainer, plans_name = spec.trainers[0], spec.plans_name
    started = time.time()
    env = fresh_workdir(work)
    log = work / "commands.log"
    raw = write_nnunet_dataset(
        work / "nnUNet_raw",
        DATASET_ID,
        DATASET_NAME,
        num_training=args.num_training,
        num_test=args.num_test,
        seed=seed,
        min_tumours=args.min_tumours,
        progress=False,
    )
    run([script("nnyseg"), "plan_and_preprocess", "-d", str(DATASET_ID), "-pl", spec.planner, "-c", "3d_fullres",
         "-npfp", "2", "-np", "2"], {**env, "nnUNet_n_proc_DA": "2"}, log)  # fmt: skip
    plans_file = work / "nnUNet_preprocessed" / raw.name / f"{plans_name}.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    settings = {
        "num_epochs": args.epochs,
        "num_iterations_per_epoch": args.iterations,
        "num_val_iterations_per_epoch": 2,
        "save_every": args.epochs,
        "seed": seed,
        "initial_lr": args.lr,
    }
    reference = plans["configurations"][TINY_CONFIGURATION]["architecture"]
    variant = json.loads(json.dumps(reference))
    variant["arch_kwargs"].update(args.set)
    configurations = {"reference": "fixed_budget_reference", "variant": "fixed_budget_variant"}
    for name, architecture in (("reference", reference), ("variant", variant)):
        plans["configurations"][configurations[name]] = {
            "inherits_from": TINY_CONFIGURATION,
            "architecture": architecture,
            "patch_size": list(args.patch),
            PLANS_SETTINGS_KEY: settings,
        }
    plans_file.write_text(json.dumps(plans, indent=1), encoding="utf-8")
    write_single_split(raw, plans_file.parent)

    run_parallel(
        [[*TRAIN, str(DATASET_ID), configurations[name], "0", "-tr", trainer, "-p", plans_name,
          "-device", "cpu"] for name in MODELS],
        env,
        [work / f"train_{name}.log" for name in MODELS],
    )  # fmt: skip
    result: dict[str, Any] = {}
    for name in MODELS:
        out = work / f"pred_{name}"
        run([script("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
             "-c", configurations[name], "-f", "0", "-tr", trainer, "-p", plans_name, "-device", "cpu", "-npp", "0",
             "-nps", "0", "--disable_tta"], env, log)  # fmt: skip
        result[name] = scores(raw / "labelsTs", out)
        print(f"seed {seed}, {name}: {result[name]}", flush=True)
    result["minutes"] = (time.time() - started) / 60
    return result


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="nnynet", help="registry name (default: %(default)s)")
    parser.add_argument("--speed-setting", help="a named speed setting of the model (registry speed_settings)")
    parser.add_argument(
        "--set", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
        help="an arch_kwargs override of the variant (after --speed-setting's)",
    )  # fmt: skip
    parser.add_argument("--workdir", default="/tmp/nnyseg_fixed_budget", help="scratch folder (one per seed)")
    parser.add_argument("--num-training", type=int, default=16)
    parser.add_argument("--num-test", type=int, default=6)
    parser.add_argument("--min-tumours", type=int, default=2, help="lesions per phantom case")
    parser.add_argument("--epochs", type=int, default=SCHEDULE["num_epochs"])
    parser.add_argument(
        "--iterations", type=int, default=SCHEDULE["num_iterations_per_epoch"], help="training iterations per epoch"
    )
    parser.add_argument("--lr", type=float, default=SCHEDULE["initial_lr"], help="initial learning rate, both runs")
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32], help="training patch, both runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="phantom and training seeds")
    parser.add_argument("--note", default="", help="a sentence for the results section")
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)

    from nnyseg.registry import get_model

    spec = get_model(args.model)
    overrides: dict[str, Any] = {}
    if args.speed_setting:
        if args.speed_setting not in spec.speed_settings:
            parser.error(f"{args.model} has no speed setting {args.speed_setting!r}; has {sorted(spec.speed_settings)}")
        speed = spec.speed_settings[args.speed_setting]
        if "tiny" not in speed.overrides:
            parser.error(f"{args.model}'s speed setting {args.speed_setting!r} has no overrides for preset 'tiny'")
        overrides.update(speed.overrides_for("tiny"))
    overrides.update(dict(args.set))
    if not overrides:
        parser.error("give --speed-setting or --set: the variant must differ from the reference")
    args.set = overrides

    started = time.time()
    results = {seed: run_seed(args, seed, Path(args.workdir) / f"seed_{seed}") for seed in args.seeds}
    (Path(args.workdir) / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")

    command = "python benchmarks/fixed_budget.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:]))
    label = f"`{args.speed_setting}`" if args.speed_setting else "the overrides"
    lines = [
        "",
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, fixed-budget accuracy of {args.model} with {label} "
        "(issue #12, requirement 4)",
        "",
        "```bash",
        command.rstrip(),
        "```",
        "",
        f"Phantom (the demo's data), {args.num_training} training cases (fold 0 trains on all of them), "
        f"{args.num_test} held-out test cases, at least {args.min_tumours} lesions per case. {spec.trainers[0]} on "
        f"the CPU preset (`3d_fullres_tiny`), {args.epochs} epochs x {args.iterations} iterations at lr {args.lr:g}, "
        f"patch {'x'.join(map(str, args.patch))}, same seed and data for both models; variant overrides: "
        + ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in overrides.items())
        + f". Total wall time {(time.time() - started) / 60:.0f} min. {args.note}".rstrip(),
        "",
        "| seed | model | liver Dice | tumour Dice | lesion recall |",
        "|---:|---|---:|---:|---:|",
    ]
    for seed, r in results.items():
        for name in MODELS:
            s = r[name]
            lines.append(
                f"| {seed} | {name} | {_cell(s['liver_global_dice'])} | {_cell(s['tumour_global_dice'])} | "
                f"{_cell(s['lesion_recall'])} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        from nnyseg.io import atomic_file

        with atomic_file(RESULTS) as tmp:
            tmp.write_text(RESULTS.read_text(encoding="utf-8").rstrip("\n") + "\n" + text)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
