"""The ``nnyseg`` command. Training and prediction use the stock ``nnUNetv2_*`` commands; this adds what they lack."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import nnyseg


def _cmd_phantom(args: argparse.Namespace) -> int:
    from nnyseg.data.phantom import write_nnunet_dataset
    from nnyseg.data.validation import nnunet_raw_folder

    raw = Path(args.output) if args.output else nnunet_raw_folder()
    folder = write_nnunet_dataset(
        raw,
        args.dataset_id,
        args.name,
        num_training=args.num_training,
        num_test=args.num_test,
        preset=args.preset,
        seed=args.seed,
        phase=args.phase,
        direction=args.direction,
        overwrite=args.overwrite,
        min_tumours=args.min_tumours,
    )
    print(f"phantom dataset written to {folder}")
    return 0


def _cmd_plan_and_preprocess(args: argparse.Namespace, rest: list[str]) -> int:
    from nnyseg.planning.plan_and_preprocess import main

    main(rest)
    return 0


def _cmd_check_dataset(args: argparse.Namespace) -> int:
    from nnyseg.data.validation import validate_raw_dataset

    folder = validate_raw_dataset(args.dataset, check_intensities=not args.headers_only)
    print(f"{folder}: no problems found")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from nnyseg.doctor import main

    return main(lookup=not args.no_lookup)


def _cmd_trainer_dir(args: argparse.Namespace) -> int:
    print(nnyseg.TRAINER_DIR)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from nnyseg.evaluation.metrics import evaluate_folders, format_summary, write_outputs

    result = evaluate_folders(args.gt, args.pred, num_processes=args.num_processes)
    print(format_summary(result))
    if args.output:
        written = write_outputs(result, args.output)
        print(f"metrics written to {', '.join(str(p) for p in written)}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from nnyseg.data import convert

    if args.source_kind == "dicom":
        out = convert.convert_dicom(args.source, args.output_file, series_uid=args.series_uid, overwrite=args.overwrite)
        print(f"DICOM series written to {out}")
        return 0
    raw = Path(args.output) if args.output else None
    converter = {"lits": convert.convert_lits, "atlas": convert.convert_atlas}[args.source_kind]
    folder = converter(
        args.source,
        args.dataset_id,
        name=args.name,
        raw_root=raw,
        overwrite=args.overwrite,
        num_processes=args.num_processes,
    )
    print(f"nnU-Net raw dataset written to {folder}")
    return 0


def _cmd_export_submission(args: argparse.Namespace) -> int:
    from nnyseg.evaluation.submission import export_submission

    out = export_submission(args.pred_dir, args.output_zip, args.test_volumes, overwrite=args.overwrite)
    print(f"submission archive written and validated: {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from nnyseg.evaluation.report import write_report

    out = write_report(
        args.images,
        args.gt,
        args.pred,
        args.output,
        metrics=args.metrics,
        results=args.results,
        title=args.title,
        overwrite=args.overwrite,
    )
    print(f"QC report written to {out}")
    return 0


def _cmd_predict(args: argparse.Namespace, rest: list[str]) -> int:
    from nnyseg.prediction import main

    main(rest)
    return 0


def _cmd_overlay(args: argparse.Namespace) -> int:
    from nnyseg.evaluation.overlay import save_overlay

    path = save_overlay(args.image, args.gt, args.pred, args.output)
    print(f"overlay written to {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from nnyseg.demo import run_demo

    run_demo(Path(args.workdir), trainers=args.models, keep=args.keep, preset=args.preset)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nnyseg.demo import DEFAULT_DEMO_MODELS, DEMO_MODELS  # standard library only: keeps --help fast

    parser = argparse.ArgumentParser(
        prog="nnyseg",
        description="Liver and liver-tumour segmentation networks for nnU-Net v2. Train and predict with the stock "
        "nnUNetv2_train / nnUNetv2_predict commands (`-tr nnYNetTrainer`, ...); this command adds data, planning, "
        "checks and evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"nnyseg {nnyseg.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("phantom", help="write a synthetic CT liver/tumour dataset in nnU-Net raw format")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    p.add_argument("--name", default="LiverPhantom", help="dataset name (default: %(default)s)")
    p.add_argument("-o", "--output", help="raw folder to write into (default: $nnUNet_raw)")
    p.add_argument("--num-training", type=int, default=8, help="training cases (default: %(default)s)")
    p.add_argument("--num-test", type=int, default=2, help="test cases in imagesTs/labelsTs (default: %(default)s)")
    p.add_argument(
        "--preset", default="tiny", help="grid: micro, tiny, small, clinical, lits_like (default: %(default)s)"
    )
    p.add_argument("--phase", default="portal", help="native, portal or arterial (default: %(default)s)")
    p.add_argument("--direction", default="identity", help="identity, flipped or oblique (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default: %(default)s)")
    p.add_argument("--min-tumours", type=int, default=1, help="at least this many lesions per case, 0-8 (default: 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same name")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser(
        "plan_and_preprocess",
        help="nnUNetv2_plan_and_preprocess that also knows nnyseg's planners (-pl nnYNetPlanner, ...)",
        add_help=False,
        description="Takes exactly nnUNetv2_plan_and_preprocess's flags; see `nnyseg plan_and_preprocess --help`.",
    )
    p.set_defaults(func=_cmd_plan_and_preprocess, passthrough=True)

    p = sub.add_parser("check-dataset", help="check a raw dataset: dataset.json, geometry, labels, NaNs")
    p.add_argument("dataset", help="dataset id, DatasetXXX_Name, or a folder")
    p.add_argument("--headers-only", action="store_true", help="skip the NaN scan of the image voxels")
    p.set_defaults(func=_cmd_check_dataset)

    p = sub.add_parser("doctor", help="check that the stock nnU-Net commands can find and run nnyseg")
    p.add_argument("--no-lookup", action="store_true", help="skip running nnU-Net's trainer lookup (a few seconds)")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("trainer-dir", help="print the folder to put into nnUNet_extTrainer")
    p.set_defaults(func=_cmd_trainer_dir)

    p = sub.add_parser(
        "evaluate",
        help="LiTS-style metrics of predictions against labels: Dice, VOE, RVD, surface distances, lesion detection",
    )
    p.add_argument("--gt", required=True, help="folder of ground-truth label files")
    p.add_argument("--pred", required=True, help="folder of predicted label files (same names)")
    p.add_argument("-o", "--output", help="folder to write metrics.json, per_case.csv and summary.md into")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="cases evaluated in parallel (default: 1)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("convert", help="LiTS / ATLAS release -> nnU-Net raw dataset; DICOM CT series -> NIfTI")
    conv = p.add_subparsers(dest="source_kind", metavar="SOURCE", required=True)
    for kind, what, default_name in (
        ("lits", "the LiTS release (volume-N.nii, segmentation-N.nii, test-volume-N.nii)", "LiTS"),
        ("atlas", "the ATLAS 2023 MRI release (image and label folders matched by case number)", "ATLAS"),
    ):
        c = conv.add_parser(kind, help=f"convert {what}")
        c.add_argument("source", help="folder of the downloaded release (only read, never modified)")
        c.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
        c.add_argument("--name", default=default_name, help="dataset name (default: %(default)s)")
        c.add_argument("-o", "--output", help="raw folder to write into (default: $nnUNet_raw)")
        c.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same name")
        c.add_argument("-np", "--num-processes", type=int, default=2, help="cases converted in parallel (default: 2)")
        c.set_defaults(func=_cmd_convert)
    c = conv.add_parser("dicom", help="convert one CT DICOM series into a NIfTI file")
    c.add_argument("source", help="folder holding the DICOM series")
    c.add_argument("output_file", help="NIfTI file to write (.nii.gz)")
    c.add_argument("--series-uid", help="series to read when the folder holds several")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    c.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export-submission", help="predictions -> validated LiTS leaderboard archive")
    p.add_argument("pred_dir", help="folder of predicted label files of the converted LiTS test cases")
    p.add_argument("output_zip", help="zip archive to write")
    p.add_argument(
        "--test-volumes", required=True, help="folder of the original LiTS test-volume-N.nii files (grid and header)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing archive")
    p.set_defaults(func=_cmd_export_submission)

    p = sub.add_parser("report", help="self-contained HTML QC page: metrics and overlays per case, worst first")
    p.add_argument("--images", required=True, help="folder of the images (nnU-Net naming, CASE_0000.nii.gz)")
    p.add_argument("--gt", required=True, help="folder of ground-truth label files")
    p.add_argument("--pred", required=True, help="folder of predicted label files")
    p.add_argument("output", help="folder to write index.html and its images into")
    p.add_argument("--metrics", help="metrics.json of `nnyseg evaluate` (computed afresh when not given)")
    p.add_argument("--results", help="nnU-Net results folder of the model, to link its training curves")
    p.add_argument("--title", default="nnyseg QC report", help="page title")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "predict",
        help="nnUNetv2_predict that also feeds each case's clinical features to nnY-Net (--clinical TABLE)",
        add_help=False,
        description="Takes nnUNetv2_predict's flags plus --clinical TABLE; see `nnyseg predict --help`.",
    )
    p.set_defaults(func=_cmd_predict, passthrough=True)

    # --- cascade parsers (issue #5) go here ---

    p = sub.add_parser("overlay", help="PNG of image, ground truth and prediction through the largest tumour")
    p.add_argument("--image", required=True, help="image file (e.g. case_0000_0000.nii.gz)")
    p.add_argument("--gt", required=True, help="ground-truth label file")
    p.add_argument("--pred", required=True, help="predicted label file")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.set_defaults(func=_cmd_overlay)

    p = sub.add_parser("demo", help="phantom -> plan -> train tiny models on the CPU -> predict -> evaluate -> PNG")
    p.add_argument("--workdir", default="nnyseg_demo", help="folder for all demo outputs (default: %(default)s)")
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=list(DEMO_MODELS),
        help=f"tiny models to train (default: {' '.join(DEFAULT_DEMO_MODELS)})",
    )
    p.add_argument("--keep", action="store_true", help="reuse an existing work folder instead of starting afresh")
    p.add_argument("--preset", default="tiny", help="phantom grid: tiny (default) or micro for a quick smoke run")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = {"plan_and_preprocess": _cmd_plan_and_preprocess, "predict": _cmd_predict}
    if argv and argv[0] in passthrough:
        # nnU-Net's own parser reads these flags (and answers --help), so they are passed through untouched.
        command, run = argv[0], lambda: passthrough[argv[0]](argparse.Namespace(), argv[1:])
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, lambda: args.func(args)
    try:
        return run()
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        # Bad input: one clear message, no traceback. Everything else is a bug and keeps its traceback.
        print(f"nnyseg {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
