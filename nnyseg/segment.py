"""``nnyseg segment``: a new patient's CT in (NIfTI or a DICOM series), mask, DICOM-SEG, numbers and picture out.

::

    nnyseg segment ct_dicom_folder/ -o results/ -d 500 -c 3d_fullres -tr nnYNetTrainer
    nnyseg segment patient.nii.gz -o results/ -m $nnUNet_results/Dataset500_LiTS/nnYNetTrainer__nnUNetPlans__3d_fullres

The model is given as ``nnUNetv2_predict`` takes it (``-d -c -tr -p -f -chk``), or as a model folder (``-m``, for
example one installed with ``nnUNetv2_install_pretrained_model_from_zip``). Prediction is nnU-Net's own
``nnUNetPredictor`` (the ensemble of the folds, test-time mirroring unless ``--disable_tta``) as
:func:`nnyseg.nnunet_integration.safe_predictor_class` makes it (checkpoints unpickled weights-only and checked against
``plans.json``), with nnY-Net's clinical features fed from ``--clinical TABLE``
(:func:`nnyseg.nnunet_integration.clinical_predictor_class`), followed by the postprocessing
``nnUNetv2_find_best_configuration`` chose for the model (:func:`find_postprocessing`). NIfTI inputs are read to
their end first (:mod:`nnyseg.data.integrity`: truncated or corrupt files, NaN voxels).

Input (:func:`find_inputs`): a NIfTI file, a folder of NIfTI files (each one a case; an nnU-Net channel suffix
``_0000`` is dropped from the case name), or a folder holding a CT DICOM series (read with
:func:`nnyseg.data.convert.convert_dicom`; ``--series-uid`` picks one when the folder holds several, and the error
lists them otherwise). The case of a DICOM series is named after its folder.

Output, one folder per case, ``OUT/CASE/``:

* ``mask.nii.gz``: the labels (0 background, 1 liver, 2 tumour) on the input's exact grid (size, spacing, origin and
  direction copied from the input);
* ``seg.dcm``: for DICOM input, the DICOM-SEG object on the source series (:mod:`nnyseg.dicom_seg`);
* ``stats.json`` and ``lesions.csv``: tumour burden and lesions (:mod:`nnyseg.evaluation.burden`), with the input,
  the model and the outputs recorded;
* ``preview.png``: axial, coronal and sagittal views (as in the QC report) through the largest tumour, else the
  largest liver component, image alone and with the segmentation.

Each case is written into a hidden folder beside its target and renamed into place only when complete
(:func:`nnyseg.io.atomic_folder`), so a failure leaves no half-written case; intermediate files live in a hidden work
folder under ``OUT`` that is removed at the end.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from nnyseg.evaluation.burden import DEFAULT_MIN_LESION_MM3, Burden, lesions_csv, measure_burden, stats_header
from nnyseg.io import atomic_folder, write_json_atomic

__all__ = [
    "CaseInput",
    "SegmentOptions",
    "find_inputs",
    "find_postprocessing",
    "load_postprocessing",
    "render_preview",
    "resolve_model_folder",
    "segment",
]

NIFTI_ENDINGS = (".nii.gz", ".nii")
MASK_FILE, DICOM_SEG_FILE, STATS_FILE, LESIONS_FILE, PREVIEW_FILE = (
    "mask.nii.gz",
    "seg.dcm",
    "stats.json",
    "lesions.csv",
    "preview.png",
)
_WORK_PREFIX = ".nnyseg-segment-work-"
#: Geometry tolerance between nnU-Net's exported mask and the input (nnU-Net copies the header, so only rounding).
_GRID_RTOL, _GRID_ATOL = 1e-5, 1e-4
#: What a postprocessing.pkl may refer to: nnU-Net's connected-component function and numpy scalars (label values).
_PICKLE_ALLOWED = {
    ("nnunetv2.postprocessing.remove_connected_components", "remove_all_but_largest_component_from_segmentation"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
}


@dataclass(frozen=True)
class SegmentOptions:
    """How nnU-Net predicts and what is measured (the ``nnUNetv2_predict`` flags of the same names).

    Attributes:
        folds: Folds to ensemble; None uses every ``fold_K`` with a checkpoint.
        checkpoint: Checkpoint file name in each fold folder.
        device: ``cuda``, ``cpu``, ``mps`` or ``auto`` (CUDA when available, else MPS, else the CPU).
        use_mirroring: Test-time mirroring (nnU-Net's default; ``--disable_tta`` switches it off).
        step_size: Sliding-window step as a fraction of the patch size.
        num_processes_preprocessing: nnU-Net's ``-npp``; with ``num_processes_export`` 0 too, cases are predicted
            one after the other in this process (and each case is written as soon as it is predicted).
        num_processes_export: nnU-Net's ``-nps``.
        postprocessing: ``"auto"`` (what :func:`find_postprocessing` finds), ``"none"``, or a postprocessing.pkl.
        min_lesion_mm3: Minimum lesion volume for the lesion count (see :mod:`nnyseg.evaluation.burden`).
        progress: Show nnU-Net's progress bars.
        allow_unsafe_checkpoint: Load checkpoints that need more than the types an nnU-Net checkpoint holds with full
            unpickling (may run code); None reads ``NNYSEG_ALLOW_UNSAFE_CHECKPOINT``
            (:func:`nnyseg.nnunet_integration.load_checkpoint`).
    """

    folds: tuple[int | str, ...] | None = None
    checkpoint: str = "checkpoint_final.pth"
    device: str = "auto"
    use_mirroring: bool = True
    step_size: float = 0.5
    num_processes_preprocessing: int = 0
    num_processes_export: int = 0
    postprocessing: str = "auto"
    min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3
    progress: bool = True
    allow_unsafe_checkpoint: bool | None = None


@dataclass(frozen=True)
class CaseInput:
    """One case to segment: its name, what kind of input it is and where it is."""

    case: str
    kind: str  # "nifti" or "dicom"
    source: Path  # the NIfTI file, or the DICOM series folder


# ----------------------------------------------------------------------------------------------------------------
# The model


def resolve_model_folder(
    *,
    model_folder: str | Path | None = None,
    dataset: str | None = None,
    configuration: str | None = None,
    trainer: str = "nnUNetTrainer",
    plans: str = "nnUNetPlans",
    results: str | Path | None = None,
) -> Path:
    """The trained model folder: ``model_folder`` itself, or ``$nnUNet_results/DatasetXXX_Name/TR__P__C``.

    Args:
        model_folder: A model folder (``-m``); excludes ``dataset``/``configuration``.
        dataset: Dataset id or full name (``-d``).
        configuration: nnU-Net configuration (``-c``).
        trainer: Trainer class name (``-tr``).
        plans: Plans identifier (``-p``).
        results: The results folder; None reads ``$nnUNet_results``.

    Raises:
        ValueError: Both or neither ways of naming the model are given, or ``nnUNet_results`` is not set.
        FileNotFoundError: The folder does not exist or is not a trained model folder.
    """
    if model_folder is not None and (dataset is not None or configuration is not None):
        raise ValueError("give the model either as -m MODEL_FOLDER or as -d DATASET -c CONFIGURATION, not both")
    if model_folder is None:
        if dataset is None or configuration is None:
            raise ValueError("give the model as -d DATASET -c CONFIGURATION [-tr TRAINER -p PLANS] or -m MODEL_FOLDER")
        root = Path(results) if results is not None else None
        if root is None:
            env = os.environ.get("nnUNet_results")
            if not env:
                raise ValueError("nnUNet_results is not set: set it, or give the model folder with -m")
            root = Path(env)
        dataset_folder = _dataset_folder(root, dataset)
        folder = dataset_folder / f"{trainer}__{plans}__{configuration}"
        if not folder.is_dir():
            trained = sorted(p.name for p in dataset_folder.iterdir() if p.is_dir() and p.name.count("__") == 2)
            raise FileNotFoundError(f"{folder}: no such model folder; {dataset_folder} holds {trained or 'none'}")
    else:
        folder = Path(model_folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such model folder (-m)")
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder}: not a trained nnU-Net model folder (no {name}); expected "
                "$nnUNet_results/DatasetXXX_Name/Trainer__Plans__configuration"
            )
    return folder


def _dataset_folder(root: Path, dataset: str) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such nnU-Net results folder")
    if dataset.isdigit():
        matches = sorted(p for p in root.glob(f"Dataset{int(dataset):03d}_*") if p.is_dir())
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ValueError(f"{root}: dataset id {dataset} names several folders: {[p.name for p in matches]}")
    elif (root / dataset).is_dir():
        return root / dataset
    raise FileNotFoundError(f"{root}: no trained models of dataset {dataset!r}")


def _check_model(folder: Path) -> dict[str, Any]:
    """The model's dataset.json, checked to be a one-channel liver/tumour model with LiTS output values."""
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    channels = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    if len(channels) != 1:
        raise ValueError(f"{folder}: the model takes {len(channels)} input channels; segment takes one CT image")
    labels = {str(k).lower(): v for k, v in dataset_json.get("labels", {}).items()}
    liver, tumour = labels.get("liver"), labels.get("tumor", labels.get("tumour"))

    def values(v: Any) -> tuple:
        return tuple(v) if isinstance(v, list | tuple) else (v,)

    if "regions_class_order" in dataset_json:
        ok = list(dataset_json["regions_class_order"]) == [1, 2] and liver is not None and tumour is not None
        ok = ok and set(values(liver)) == {1, 2} and values(tumour) == (2,)
    else:
        ok = liver == 1 and tumour == 2
    if not ok or set(labels) - {"background", "liver", "tumor", "tumour"}:
        raise ValueError(
            f"{folder}: segment needs a liver/tumour model with LiTS labels (liver 1, tumour 2, or the regions liver "
            f"= (1, 2), tumour = 2); this model's labels are {dataset_json.get('labels')}"
        )
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    configuration = folder.name.split("__")[-1]
    if plans.get("configurations", {}).get(configuration, {}).get("previous_stage"):
        raise ValueError(f"{folder}: a cascade stage needs its previous stage's output; use nnUNetv2_predict")
    return dataset_json


def _folds(folder: Path, options: SegmentOptions) -> tuple[int | str, ...]:
    if options.folds is None:
        found = sorted(
            int(p.name.split("_")[-1])
            for p in folder.glob("fold_*")
            if p.name != "fold_all" and (p / options.checkpoint).is_file()
        )
        if not found:
            if (folder / "fold_all" / options.checkpoint).is_file():
                return ("all",)
            raise FileNotFoundError(f"{folder}: no fold_K/{options.checkpoint}; train the model or pass -chk")
        return tuple(found)
    folds = tuple(f if f == "all" else int(f) for f in options.folds)
    for fold in folds:
        if not (folder / f"fold_{fold}" / options.checkpoint).is_file():
            raise FileNotFoundError(f"{folder / f'fold_{fold}' / options.checkpoint}: no such checkpoint (-f, -chk)")
    return folds


def find_postprocessing(model_folder: Path, folds: Sequence[int | str]) -> Path | None:
    """The postprocessing.pkl ``nnUNetv2_find_best_configuration`` chose for this model and these folds, or None.

    Looked for, in order: the ``postprocessing_file`` of ``inference_information.json`` in the dataset's results
    folder, when that names this model alone (trainer, plans, configuration) and the same folds; then the model's own
    ``crossval_results_folds_<folds>/postprocessing.pkl`` (where find_best_configuration writes it for a single model,
    and what ``nnUNetv2_export_model_to_zip`` packs with the model). Postprocessing chosen for an ensemble of
    configurations is not this model's and is not used.
    """
    fold_string = "_".join(str(f) for f in folds)
    info_file = model_folder.parent / "inference_information.json"
    if info_file.is_file():
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
            best = info["best_model_or_ensemble"]
            selected = best["selected_model_or_models"]
            ours = model_folder.name.split("__")
            same_model = (
                len(selected) == 1
                and [
                    selected[0]["trainer"],
                    selected[0]["plans_identifier"],
                    selected[0]["configuration"],
                ]
                == ours
            )
            same_folds = [str(f) for f in info["folds"]] == [str(f) for f in folds]
            if same_model and same_folds and Path(best["postprocessing_file"]).is_file():
                return Path(best["postprocessing_file"])
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            pass  # an unreadable record: fall back to the model folder's own file
    candidate = model_folder / f"crossval_results_folds_{fold_string}" / "postprocessing.pkl"
    return candidate if candidate.is_file() else None


class _PostprocessingUnpickler(pickle.Unpickler):
    """Loads only what nnU-Net's postprocessing.pkl holds: a pickle from a downloaded model runs no other code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which is not nnU-Net postprocessing")


def load_postprocessing(path: str | Path) -> tuple[list, list[dict]]:
    """``(functions, their keyword arguments)`` of an nnU-Net postprocessing.pkl, loaded with a restricted unpickler.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: It is not an nnU-Net postprocessing file (or refers to anything but nnU-Net's postprocessing).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such postprocessing file")
    try:
        with path.open("rb") as f:
            functions, kwargs = _PostprocessingUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise ValueError(f"{path}: not an nnU-Net postprocessing.pkl ({e})") from e
    if not (isinstance(functions, list | tuple) and isinstance(kwargs, list | tuple) and len(functions) == len(kwargs)):
        raise ValueError(f"{path}: not an nnU-Net postprocessing.pkl (expected two lists of the same length)")
    return list(functions), [dict(k) for k in kwargs]


# ----------------------------------------------------------------------------------------------------------------
# The input


def _nifti_case(path: Path) -> str:
    stem = next(path.name[: -len(e)] for e in NIFTI_ENDINGS if path.name.endswith(e))
    return stem.removesuffix("_0000")  # nnU-Net's channel suffix is not part of the case name


def find_inputs(input_path: str | Path, *, series_uid: str | None = None) -> list[CaseInput]:
    """The cases of ``input_path``: a NIfTI file, a folder of NIfTI files, or a DICOM series folder.

    A folder with NIfTI files in it is a folder of NIfTI cases; any other folder is read as a DICOM series (its
    series are checked when it is read, by :func:`nnyseg.data.convert.convert_dicom`).

    Raises:
        FileNotFoundError: ``input_path`` does not exist.
        ValueError: A file that is not NIfTI, two files with one case name, or ``series_uid`` for NIfTI input.
    """
    path = Path(input_path)
    if path.is_file():
        if not path.name.endswith(NIFTI_ENDINGS):
            raise ValueError(
                f"{path}: not a NIfTI file (.nii.gz, .nii); for DICOM, give the folder that holds the series"
            )
        cases = [CaseInput(_nifti_case(path), "nifti", path)]
    elif path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.name.endswith(NIFTI_ENDINGS) and not p.name.startswith(".")
        )
        if not files:
            return [CaseInput(path.resolve().name, "dicom", path)]
        cases = [CaseInput(_nifti_case(p), "nifti", p) for p in files]
    else:
        raise FileNotFoundError(f"{path}: no such file or folder (INPUT)")
    if series_uid is not None:
        raise ValueError(f"{path}: --series-uid is for DICOM input, but this input is NIfTI")
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case in seen:
            raise ValueError(f"{case.source} and {seen[case.case]} are both case {case.case!r}; rename one")
        seen[case.case] = case.source
    return cases


@dataclass
class _Prepared:
    """A case ready for nnU-Net: its image file in the work folder, the image, and its DICOM files if any."""

    case: CaseInput
    image_file: Path
    image: sitk.Image
    dicom_files: tuple[str, ...] = ()
    series_uid: str | None = None


def _prepare(case: CaseInput, images: Path, series_uid: str | None) -> _Prepared:
    """Put the case's image into ``images`` as nnU-Net's ``CASE_0000`` file (a link for NIfTI, converted DICOM)."""
    from nnyseg.data.convert import convert_dicom

    if case.kind == "dicom":
        target = images / f"{case.case}_0000.nii.gz"
        convert_dicom(case.source, target, series_uid=series_uid)
        chosen = series_uid if series_uid is not None else sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(case.source))[0]
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(case.source), chosen))
        return _Prepared(case, target, sitk.ReadImage(str(target)), files, chosen)
    ending = next(e for e in NIFTI_ENDINGS if case.source.name.endswith(e))
    target = images / f"{case.case}_0000{ending}"
    try:
        os.symlink(case.source.resolve(), target)
    except OSError:  # no symlinks (some Windows set-ups): copy
        shutil.copyfile(case.source, target)
    try:
        image = sitk.ReadImage(str(case.source))
    except RuntimeError as e:
        raise ValueError(f"{case.source}: cannot read the image: {str(e).strip().splitlines()[-1]}") from e
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{case.source}: segment takes a 3D single-channel CT image")
    return _Prepared(case, target, image)


# ----------------------------------------------------------------------------------------------------------------
# The preview


def render_preview(image: sitk.Image, mask: sitk.Image, title: str, *, dpi: int = 80) -> bytes:
    """PNG of the axial, coronal and sagittal views (the QC report's) of ``image`` alone and with ``mask`` over it.

    The views cut through the centre of the largest tumour component, else of the largest liver component, else the
    volume centre; orientation, aspect ratio, colours and intensity window are those of
    :mod:`nnyseg.evaluation.overlay`.
    """
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from nnyseg.evaluation import overlay

    image_lps = overlay.to_lps(image)
    volume = sitk.GetArrayFromImage(image_lps).astype(np.float32)
    labels = sitk.GetArrayFromImage(overlay.to_lps(mask))
    centre, source = None, "volume centre"
    for region, name in ((labels == overlay.TUMOUR, "largest tumour"), (labels > 0, "largest liver component")):
        centre = overlay.largest_component_centre(region)
        if centre is not None:
            source = name
            break
    if centre is None:
        centre = tuple(s // 2 for s in labels.shape)  # type: ignore[assignment]
    low, high = overlay.intensity_window(volume)
    aspects = overlay.view_aspects(image_lps.GetSpacing())
    backgrounds = overlay.view_slices(volume, centre)  # type: ignore[arg-type]
    label_views = overlay.view_slices(labels, centre)  # type: ignore[arg-type]

    # Rows as tall as each view's physical extent (a short series gives flat coronal and sagittal strips).
    nx, ny, nz = image_lps.GetSize()
    sx, sy, sz = image_lps.GetSpacing()
    extents = {"axial": (ny * sy) / (nx * sx), "coronal": (nz * sz) / (nx * sx), "sagittal": (nz * sz) / (ny * sy)}
    heights = [min(1.5, max(0.15, extents[view])) for view in overlay.VIEWS]
    panel = 3.0  # inches per panel width
    fig = Figure(figsize=(2 * panel + 1.0, panel * sum(heights) + 1.5))
    axes = fig.subplots(len(overlay.VIEWS), 2, gridspec_kw={"height_ratios": heights})
    for row, view in enumerate(overlay.VIEWS):
        for col, layer in enumerate(("image", "segmentation")):
            ax = axes[row, col]
            ax.imshow(backgrounds[view], cmap="gray", vmin=low, vmax=high, aspect=aspects[view], interpolation="none")
            if layer == "segmentation":
                rgba = np.zeros((*label_views[view].shape, 4))
                for value, colour in overlay.COLOURS.items():
                    rgba[label_views[view] == value] = to_rgba(colour, overlay.ALPHA)
                ax.imshow(rgba, aspect=aspects[view], interpolation="none")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(layer, fontsize=11)
            if col == 0:  # horizontal, so that a flat strip's label does not run into the next row's
                ax.set_ylabel(view, fontsize=10, rotation=0, ha="right", va="center")
    handles = [
        Patch(facecolor=overlay.COLOURS[v], alpha=overlay.ALPHA, label=overlay.LABEL_NAMES[v])
        for v in (overlay.LIVER, overlay.TUMOUR)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=10)
    fig.suptitle(f"{title}\nviews through the {source}", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Running


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name not in ("cuda", "cpu", "mps"):
        raise ValueError(f"-device must be auto, cuda, cpu or mps, got {name!r}")
    return torch.device(name)


def _predictor(folder: Path, folds: tuple[int | str, ...], options: SegmentOptions, clinical: Path | None) -> Any:
    """nnU-Net's predictor, loading the model folder safely (weights-only checkpoints checked against plans.json)."""
    from nnyseg.nnunet_integration import clinical_predictor_class, safe_predictor_class

    device = _device(options.device)
    kwargs: dict[str, Any] = dict(
        tile_step_size=options.step_size,
        use_gaussian=True,
        use_mirroring=options.use_mirroring,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        allow_tqdm=options.progress,
        allow_unsafe_checkpoint=options.allow_unsafe_checkpoint,
    )
    if clinical is not None:
        from nnyseg.data.clinical import load_clinical_file

        predictor = clinical_predictor_class()(clinical_table=load_clinical_file(clinical), **kwargs)
    else:
        predictor = safe_predictor_class()(**kwargs)
    predictor.initialize_from_trained_model_folder(str(folder), list(folds), options.checkpoint)
    return predictor


def _nnunet_mask(predicted: Path, prepared: _Prepared, postprocessing: tuple[list, list[dict]] | None) -> sitk.Image:
    """nnU-Net's exported mask, postprocessed, as uint8 on the input image's exact grid."""
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing

    exported = sitk.ReadImage(str(predicted))
    image = prepared.image
    problems = [] if exported.GetSize() == image.GetSize() else [f"size {exported.GetSize()} vs {image.GetSize()}"]
    for what, a, b in (
        ("spacing", exported.GetSpacing(), image.GetSpacing()),
        ("origin", exported.GetOrigin(), image.GetOrigin()),
        ("direction", exported.GetDirection(), image.GetDirection()),
    ):
        if not np.allclose(a, b, rtol=_GRID_RTOL, atol=_GRID_ATOL):
            problems.append(f"{what} {tuple(np.round(a, 5))} vs {tuple(np.round(b, 5))}")
    if problems:
        raise RuntimeError(f"case {prepared.case.case}: nnU-Net's mask is not on the input grid: {'; '.join(problems)}")
    labels = sitk.GetArrayFromImage(exported)
    if postprocessing is not None:
        labels = apply_postprocessing(labels, *postprocessing)
    mask = sitk.GetImageFromArray(np.asarray(labels, dtype=np.uint8))
    mask.CopyInformation(image)
    return mask


def _write_case(
    folder: Path,
    prepared: _Prepared,
    mask: sitk.Image,
    record: dict[str, Any],
    options: SegmentOptions,
) -> Burden:
    """Write one case's outputs into ``folder`` (the hidden folder :func:`nnyseg.io.atomic_folder` gives)."""
    from nnyseg.dicom_seg import write_dicom_seg

    case = prepared.case
    sitk.WriteImage(mask, str(folder / MASK_FILE), useCompression=True)
    burden = measure_burden(mask, prepared.image, min_lesion_mm3=options.min_lesion_mm3)
    outputs = {"mask": MASK_FILE, "stats": STATS_FILE, "lesions": LESIONS_FILE, "preview": PREVIEW_FILE}
    notes: list[str] = []
    dicom: dict[str, Any] = {}
    if case.kind == "dicom":
        model = record["model"]
        info = write_dicom_seg(
            sitk.GetArrayViewFromImage(mask),
            prepared.dicom_files,
            folder / DICOM_SEG_FILE,
            reference=prepared.image,
            algorithm_name=model["trainer"],
            algorithm_parameters={
                "plans": model["plans"],
                "configuration": model["configuration"],
                "folds": " ".join(str(f) for f in model["folds"]),
                "checkpoint": model["checkpoint"],
                "postprocessing": "yes" if model["postprocessing"] else "no",
            },
            series_description=f"nnyseg {model['trainer']} liver and tumour",
        )
        outputs["dicom_seg"] = DICOM_SEG_FILE
        notes += list(info.notes)
        dicom = {
            "sop_instance_uid": info.sop_instance_uid,
            "series_instance_uid": info.series_instance_uid,
            "study_instance_uid": info.study_instance_uid,
            "frames": info.frames,
        }
    png = render_preview(prepared.image, mask, f"{case.case}: {burden.summary()}")
    (folder / PREVIEW_FILE).write_bytes(png)
    (folder / LESIONS_FILE).write_text(lesions_csv([(case.case, burden)]), encoding="utf-8")
    document = stats_header(options.min_lesion_mm3)
    document.update(
        case=case.case,
        written=datetime.now().astimezone().isoformat(timespec="seconds"),
        input={
            "kind": case.kind,
            "path": str(case.source.resolve()),
            **(
                {"series_instance_uid": prepared.series_uid, "instances": len(prepared.dicom_files)}
                if case.kind == "dicom"
                else {}
            ),
            "size": list(prepared.image.GetSize()),
        },
        model=record["model"],
        outputs=outputs,
        **({"dicom_seg": dicom} if dicom else {}),
        notes=notes,
        **burden.to_dict(),
    )
    write_json_atomic(folder / STATS_FILE, document)
    return burden


def _check_images(cases: Sequence[CaseInput], where: Path, progress: bool) -> None:
    """Refuse truncated or corrupt NIfTI inputs, or inputs with NaN voxels, before nnU-Net reads them.

    DICOM series are checked when they are converted (:func:`nnyseg.data.convert.convert_dicom`).
    """
    from nnyseg.data.integrity import check_image_files
    from nnyseg.data.validation import InputImageError

    files = [c.source for c in cases if c.kind == "nifti"]
    problems = check_image_files(files, progress=progress) if files else []
    if problems:
        raise InputImageError(where, problems)


def segment(
    input_path: str | Path,
    output: str | Path,
    model_folder: str | Path,
    *,
    clinical: str | Path | None = None,
    series_uid: str | None = None,
    options: SegmentOptions = SegmentOptions(),  # frozen: one shared default is safe
    overwrite: bool = False,
) -> list[Path]:
    """Segment every case of ``input_path`` with the model in ``model_folder`` and write ``output/CASE/`` for each.

    Args:
        input_path: A NIfTI file, a folder of NIfTI files, or a folder holding a CT DICOM series.
        output: Folder to write the case folders into (created if needed).
        model_folder: A trained nnU-Net model folder (see :func:`resolve_model_folder`).
        clinical: Clinical table of the cases for an nnY-Net model in clinical mode (keyed by case name).
        series_uid: The DICOM series to read when the folder holds several.
        options: How to predict and measure.
        overwrite: Replace existing case folders (each only once its new version is complete).

    Returns:
        The case folders written, in input order.

    Raises:
        FileNotFoundError: The input, model, checkpoint, clinical table or postprocessing file is missing.
        FileExistsError: A case folder exists and ``overwrite`` is False (checked before anything is predicted).
        ValueError: Unusable input (not NIfTI/DICOM, several DICOM series without ``series_uid``, unreadable), a
            model that is not a one-channel liver/tumour model, or a clinical table that does not fit the model.
    """
    model_folder, output = Path(model_folder), Path(output)
    _check_model(model_folder)
    folds = _folds(model_folder, options)
    if options.postprocessing == "auto":
        pp_file = find_postprocessing(model_folder, folds)
    elif options.postprocessing == "none":
        pp_file = None
    else:
        pp_file = Path(options.postprocessing)
    postprocessing = load_postprocessing(pp_file) if pp_file is not None else None
    clinical = Path(clinical) if clinical is not None else None
    if clinical is not None and not clinical.is_file():
        raise FileNotFoundError(f"{clinical}: no such clinical table (--clinical)")
    cases = find_inputs(input_path, series_uid=series_uid)
    existing = [str(output / c.case) for c in cases if (output / c.case).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)}: already exist(s) (pass --overwrite to replace)")

    trainer, plans, configuration = model_folder.name.split("__") if model_folder.name.count("__") == 2 else ("?",) * 3
    record = {
        "model": {
            "folder": str(model_folder.resolve()),
            "trainer": trainer,
            "plans": plans,
            "configuration": configuration,
            "folds": list(folds),
            "checkpoint": options.checkpoint,
            "postprocessing": str(pp_file.resolve()) if pp_file is not None else None,
            "clinical_table": str(clinical.resolve()) if clinical is not None else None,
            "device": options.device,
            "test_time_mirroring": options.use_mirroring,
            "step_size": options.step_size,
        }
    }
    created_output = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=output, prefix=_WORK_PREFIX))
    written: list[Path] = []
    try:
        (work / "images").mkdir()
        (work / "predictions").mkdir()
        _check_images(cases, Path(input_path), options.progress)
        prepared = [_prepare(c, work / "images", series_uid) for c in cases]
        predictor = _predictor(model_folder, folds, options, clinical)
        record["model"]["device"] = str(predictor.device)
        ending = predictor.dataset_json["file_ending"]
        truncated = [str(work / "predictions" / p.case.case) for p in prepared]
        sequential = options.num_processes_preprocessing == 0 and options.num_processes_export == 0
        finish = functools.partial(_finish_case, output, record, options, postprocessing, ending, overwrite)
        if sequential:
            for p, out in zip(prepared, truncated, strict=True):
                predictor.predict_from_files_sequential([[str(p.image_file)]], [out])
                written.append(finish(p, Path(out)))
        else:
            predictor.predict_from_files(
                [[str(p.image_file)] for p in prepared],
                truncated,
                num_processes_preprocessing=max(1, options.num_processes_preprocessing),
                num_processes_segmentation_export=max(1, options.num_processes_export),
            )
            written += [finish(p, Path(out)) for p, out in zip(prepared, truncated, strict=True)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created_output and not any(output.iterdir()):
            output.rmdir()
    return written


def _finish_case(
    output: Path,
    record: dict[str, Any],
    options: SegmentOptions,
    postprocessing: tuple[list, list[dict]] | None,
    ending: str,
    overwrite: bool,
    prepared: _Prepared,
    truncated: Path,
) -> Path:
    predicted = truncated.with_name(truncated.name + ending)
    mask = _nnunet_mask(predicted, prepared, postprocessing)
    target = output / prepared.case.case
    with atomic_folder(target, overwrite=overwrite) as folder:
        burden = _write_case(folder, prepared, mask, record, options)
    print(f"{prepared.case.case}: {burden.summary()} -> {target}")
    return target
