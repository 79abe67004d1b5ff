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
        diagnosis=args.diagnosis,
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


def _cmd_body_crop(args: argparse.Namespace) -> int:
    from nnyseg.data.cropping import body_crop_dataset

    folder = body_crop_dataset(
        args.dataset,
        args.dataset_id,
        name=args.name,
        raw_root=Path(args.output) if args.output else None,
        overwrite=args.overwrite,
    )
    print(f"body-cropped dataset written to {folder} (boxes in crops.json)")
    return 0


def _cmd_uncrop(args: argparse.Namespace) -> int:
    from nnyseg.data.cropping import uncrop_predictions

    out = uncrop_predictions(
        Path(args.pred_dir),
        Path(args.reference),
        Path(args.output),
        file_ending=args.file_ending,
        overwrite=args.overwrite,
    )
    print(f"predictions on the original image grids written to {out}")
    return 0


def _cmd_cascade(args: argparse.Namespace) -> int:
    from nnyseg import cascade

    if args.cascade_command == "prepare":
        stage1, stage2 = cascade.prepare_cascade(
            args.dataset,
            args.stage1_id,
            args.stage2_id,
            jitter_mm=args.jitter_mm,
            seed=args.seed,
            raw_root=Path(args.output) if args.output else None,
            overwrite=args.overwrite,
        )
        print(f"stage 1 (liver) written to {stage1}\nstage 2 (tumour in liver crops) written to {stage2}")
        return 0
    folds = None if args.folds is None else tuple(f if f == "all" else int(f) for f in args.folds)
    options = cascade.StageOptions(
        folds=folds,
        checkpoint=args.checkpoint,
        device=args.device,
        use_mirroring=not args.disable_tta,
        num_processes_preprocessing=args.npp,
        num_processes_export=args.nps,
    )
    out = cascade.predict_cascade(
        Path(args.input),
        Path(args.output),
        Path(args.stage1_model),
        Path(args.stage2_model),
        margin_mm=args.margin_mm,
        options=options,
        overwrite=args.overwrite,
    )
    print(f"cascade predictions written to {out}")
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from nnyseg.segment import SegmentOptions, resolve_model_folder, segment

    model = resolve_model_folder(
        model_folder=args.model_folder,
        dataset=args.dataset,
        configuration=args.configuration,
        trainer=args.trainer,
        plans=args.plans,
    )
    options = SegmentOptions(
        folds=None if args.folds is None else tuple(f if f == "all" else int(f) for f in args.folds),
        checkpoint=args.checkpoint,
        device=args.device,
        use_mirroring=not args.disable_tta,
        step_size=args.step_size,
        num_processes_preprocessing=args.npp,
        num_processes_export=args.nps,
        postprocessing=args.postprocessing,
        min_lesion_mm3=args.min_lesion_mm3,
        progress=not args.disable_progress_bar,
        allow_unsafe_checkpoint=True if args.allow_unsafe_checkpoint else None,
    )
    folders = segment(
        args.input,
        args.output,
        model,
        clinical=args.clinical,
        series_uid=args.series_uid,
        options=options,
        overwrite=args.overwrite,
    )
    print(f"{len(folders)} case(s) written to {args.output}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from nnyseg.evaluation.burden import write_stats_folder

    out = write_stats_folder(
        args.masks, args.output, images=args.images, min_lesion_mm3=args.min_lesion_mm3, overwrite=args.overwrite
    )
    print(f"tumour burden written to {out} (with lesions.csv and cases.csv)")
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
    p.add_argument(
        "--diagnosis",
        action="store_true",
        help="clinical variant: half the cases 'benign' (lesions labelled liver), a clinical.json says which",
    )
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
    p.add_argument(
        "--headers-only",
        action="store_true",
        help="read image headers only: no truncation/corruption check or NaN scan of the images "
        "(labels are always read)",
    )
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
    p = sub.add_parser("body-crop", help="copy a raw CT dataset with every case cropped to its body mask (HU > -500)")
    p.add_argument("dataset", help="dataset id, DatasetXXX_Name, or a folder (only read)")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="id of the new dataset (1-999)")
    p.add_argument("--name", help="name of the new dataset (default: the source's name + BodyCrop)")
    p.add_argument("-o", "--output", help="raw folder to write into (default: $nnUNet_raw)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same name")
    p.set_defaults(func=_cmd_body_crop)

    p = sub.add_parser("uncrop", help="paste predictions made on cropped images back onto the original image grids")
    p.add_argument("pred_dir", help="folder of predicted label files (CASE.nii.gz) on the cropped images")
    p.add_argument("--reference", required=True, help="folder of the original images (CASE_0000.nii.gz)")
    p.add_argument("-o", "--output", required=True, help="folder to write the full-size label files into")
    p.add_argument("--file-ending", default=".nii.gz", help="file ending of the images (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_uncrop)

    p = sub.add_parser("cascade", help="the ELANRes-MSCA paper's liver-then-tumour cascade: prepare, predict")
    steps = p.add_subparsers(dest="cascade_command", metavar="STEP", required=True)
    c = steps.add_parser("prepare", help="write the stage-1 (liver) and stage-2 (tumour in liver crops) datasets")
    c.add_argument("dataset", help="raw dataset with LiTS labels (0, 1 liver, 2 tumour): id, name or folder")
    c.add_argument("--stage1-id", type=int, required=True, help="dataset id of stage 1 (liver)")
    c.add_argument("--stage2-id", type=int, required=True, help="dataset id of stage 2 (tumour in liver crops)")
    c.add_argument(
        "--jitter-mm",
        type=float,
        nargs=2,
        default=[5.0, 20.0],
        metavar=("LOW", "HIGH"),
        help="stage-2 margin per side around the ground-truth liver, drawn uniformly from LOW-HIGH mm "
        "(default: 5 20; give LOW = HIGH for a fixed margin)",
    )
    c.add_argument("--seed", type=int, default=0, help="seed of the margins; same seed, same crops (default: 0)")
    c.add_argument("-o", "--output", help="raw folder to write into (default: $nnUNet_raw)")
    c.add_argument("--overwrite", action="store_true", help="replace existing stage datasets of the same names")
    c.set_defaults(func=_cmd_cascade)
    c = steps.add_parser("predict", help="stage 1 -> largest liver component -> crop -> stage 2 -> LiTS maps")
    c.add_argument("-i", "--input", required=True, help="folder of images (CASE_0000.nii.gz, ...)")
    c.add_argument("-o", "--output", required=True, help="folder to write the final label maps into")
    c.add_argument("-m1", "--stage1-model", required=True, help="stage-1 model folder (Trainer__Plans__config)")
    c.add_argument("-m2", "--stage2-model", required=True, help="stage-2 model folder (Trainer__Plans__config)")
    c.add_argument("-f", "--folds", nargs="+", help="folds to use, e.g. 0 1 2 3 4 or all (default: all present)")
    c.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint (default: %(default)s)")
    c.add_argument("-device", "--device", default="cuda", choices=["cuda", "cpu", "mps"], help="(default: cuda)")
    c.add_argument("--margin-mm", type=float, default=10.0, help="margin around the stage-1 liver (default: 10)")
    c.add_argument("-npp", type=int, default=3, help="preprocessing processes; 0 with -nps 0: none (default: 3)")
    c.add_argument("-nps", type=int, default=3, help="export processes (default: 3)")
    c.add_argument("--disable-tta", action="store_true", help="no mirroring at test time (faster, less accurate)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.set_defaults(func=_cmd_cascade)

    p = sub.add_parser("overlay", help="PNG of image, ground truth and prediction through the largest tumour")
    p.add_argument("--image", required=True, help="image file (e.g. case_0000_0000.nii.gz)")
    p.add_argument("--gt", required=True, help="ground-truth label file")
    p.add_argument("--pred", required=True, help="predicted label file")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.set_defaults(func=_cmd_overlay)

    p = sub.add_parser(
        "segment",
        help="segment a new patient: NIfTI or CT DICOM series in; mask, DICOM-SEG, tumour burden and PNG out",
        description="Runs nnU-Net's predictor (the folds' ensemble and the postprocessing nnUNetv2_find_best_"
        "configuration chose) on a NIfTI file, a folder of NIfTI files or a CT DICOM series folder, and writes "
        "OUT/CASE/ with mask.nii.gz (on the input's grid), seg.dcm (DICOM input), stats.json, lesions.csv and "
        "preview.png. See docs/segment.md.",
    )
    p.add_argument("input", help="a NIfTI file, a folder of NIfTI files, or a folder holding a CT DICOM series")
    p.add_argument("-o", "--output", required=True, help="folder to write one folder per case into")
    p.add_argument("-m", "--model-folder", help="trained model folder (Trainer__Plans__configuration); or -d/-c")
    p.add_argument("-d", "--dataset", help="dataset id or name of the model in $nnUNet_results (with -c)")
    p.add_argument("-c", "--configuration", help="nnU-Net configuration, e.g. 3d_fullres (with -d)")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainer", help="trainer class (default: %(default)s)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: %(default)s)")
    p.add_argument("-f", "--folds", nargs="+", help="folds to ensemble, e.g. 0 1 2 3 4 or all (default: all present)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint (default: %(default)s)")
    p.add_argument("--clinical", help="clinical table of the cases (nnY-Net clinical models), keyed by case name")
    p.add_argument("--series-uid", help="DICOM series to read when the folder holds several")
    p.add_argument(
        "-device", "--device", default="auto", choices=["auto", "cuda", "cpu", "mps"], help="(default: auto)"
    )
    p.add_argument("--disable_tta", action="store_true", help="no test-time mirroring (faster, less accurate)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step (default: %(default)s)")
    p.add_argument("-npp", type=int, default=0, help="nnU-Net preprocessing processes; 0 with -nps 0: none (default)")
    p.add_argument("-nps", type=int, default=0, help="nnU-Net export processes (default: 0)")
    p.add_argument(
        "--postprocessing",
        default="auto",
        help="auto (what nnUNetv2_find_best_configuration chose for the model, if anything), none, or a "
        "postprocessing.pkl (default: auto)",
    )
    p.add_argument(
        "--min-lesion-mm3",
        type=float,
        default=0.0,
        help="tumour components smaller than this are not counted as lesions (default: 0, count all)",
    )
    p.add_argument("--disable_progress_bar", action="store_true", help="no progress bars")
    p.add_argument(
        "--allow-unsafe-checkpoint",
        action="store_true",
        help="load checkpoints that need more than an nnU-Net checkpoint's types with full unpickling, which may run "
        "code: only for models from a source you trust",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing case folders")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser(
        "stats",
        help="tumour burden of label masks, no ground truth needed: volumes, burden %%, lesions with diameters",
        description="Liver and tumour volume, tumour burden and per-lesion volume, diameters, centroid and mean HU of "
        "LiTS-labelled masks; writes OUT/stats.json, OUT/lesions.csv (one row per lesion) and OUT/cases.csv. See "
        "docs/segment.md for the definitions.",
    )
    p.add_argument("masks", help="a label file or a folder of label files (0 background, 1 liver, 2 tumour)")
    p.add_argument("--images", help="the CT image file, or a folder of images (CASE_0000.nii.gz), for mean HU")
    p.add_argument("-o", "--output", required=True, help="folder to write stats.json, lesions.csv, cases.csv into")
    p.add_argument(
        "--min-lesion-mm3",
        type=float,
        default=0.0,
        help="tumour components smaller than this are not counted as lesions (default: 0, count all)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_stats)

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
    p.add_argument("--preset", default="tiny", help="phantom grid: tiny (default) or micro (a 5-epoch smoke run)")
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
