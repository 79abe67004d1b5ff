"""The ELANRes-MSCA paper's two-stage cascade: liver first, then tumour inside a crop around the liver.

The paper states the two stages and the post-processing; the crop margins and the label layout are nnyseg's choice
(docs/elanres_msca.md, "Cascade"):

* **Stage 1** segments the liver (liver and tumour merged into label 1); its prediction keeps only the largest
  connected component.
* **Stage 2** segments tumour (label 1) on the image cropped to the liver's bounding box grown by a margin. Its
  training crops come from the ground-truth liver with a margin drawn per side uniformly from 5-20 mm (seeded); at
  test time the box is stage 1's liver with a fixed 10 mm margin. Intensities outside the liver are kept, so the
  network sees the liver boundary's context.
* **Final map** (LiTS labels): 1 on stage 1's liver, 2 where stage 2's tumour lies inside that liver, 0 elsewhere,
  pasted back onto the input image's grid (crops keep the physical geometry, so pasting is exact).

Both stages are ordinary nnU-Net datasets, planned and trained with the stock commands
(``nnyseg plan_and_preprocess``, ``nnUNetv2_train``). This differs from nnU-Net's own ``3d_cascade_fullres``, which
feeds a low-resolution prediction as extra input channels and never crops.

:func:`prepare_cascade` writes the two datasets from a LiTS-labelled raw dataset; :func:`predict_cascade` runs both
trained stages with nnU-Net's ``nnUNetPredictor``. The geometry (boxes, margins, crops, paste-back) lives in
:mod:`nnyseg.data.cropping`; arrays are numpy ``(z, y, x)``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnyseg.data.cropping import (
    Box,
    bounding_box,
    case_images,
    copy_geometry,
    crop_image,
    grow_box,
    largest_component,
    new_dataset_folder,
    paste_array,
    read_header,
    spacing_zyx,
)
from nnyseg.io import atomic_folder

LIVER, TUMOUR = 1, 2  # LiTS labels of the source datasets and of the final maps
DEFAULT_MARGIN_MM = 10.0
DEFAULT_JITTER_MM = (5.0, 20.0)


# ------------------------------------------------------------------------------------------------------------------
# Pure logic
# ------------------------------------------------------------------------------------------------------------------
def case_rng(seed: int, case: str) -> np.random.Generator:
    """A random stream of its own for each case: a case's jitter does not depend on which other cases exist."""
    return np.random.default_rng([seed, zlib.crc32(case.encode())])


def jittered_margins(rng: np.random.Generator, jitter_mm: Sequence[float], ndim: int = 3) -> np.ndarray:
    """Margins in mm drawn uniformly from ``jitter_mm = (low, high)``, one per side: shape ``(ndim, 2)``."""
    low, high = (float(v) for v in jitter_mm)
    if not 0 <= low <= high:
        raise ValueError(f"jitter range must satisfy 0 <= low <= high (mm), got {tuple(jitter_mm)}")
    return rng.uniform(low, high, size=(ndim, 2))


def liver_crop_box(liver: np.ndarray, spacing: Sequence[float], margin_mm: float | np.ndarray | Sequence) -> Box | None:
    """The liver's bounding box grown by ``margin_mm`` (see :func:`~nnyseg.data.cropping.grow_box`); None if empty."""
    box = bounding_box(liver)
    return None if box is None else grow_box(box, margin_mm, spacing, liver.shape)


def combine_stages(liver: np.ndarray, tumour: np.ndarray) -> np.ndarray:
    """The final LiTS map: 1 on the liver, 2 where tumour lies inside the liver, 0 elsewhere (uint8)."""
    liver = np.asarray(liver, dtype=bool)
    final = liver.astype(np.uint8) * LIVER
    final[liver & np.asarray(tumour, dtype=bool)] = TUMOUR
    return final


# ------------------------------------------------------------------------------------------------------------------
# Stage datasets
# ------------------------------------------------------------------------------------------------------------------
def _read_lits_label(path: Path) -> sitk.Image:
    label = sitk.ReadImage(str(path))
    values = np.unique(sitk.GetArrayViewFromImage(label))
    unexpected = sorted(set(values.tolist()) - {0, LIVER, TUMOUR})
    if unexpected:
        raise ValueError(f"{path}: label values {unexpected}; the cascade expects LiTS labels 0, 1 (liver), 2 (tumour)")
    return label


def _write_label(array: np.ndarray, reference: sitk.Image, path: Path) -> None:
    sitk.WriteImage(copy_geometry(sitk.GetImageFromArray(array.astype(np.uint8)), reference), str(path), True)


def _stage_dataset_json(source_json: dict, folder: Path, labels: dict, num_training: int, description: str) -> dict:
    return {
        "channel_names": source_json["channel_names"],
        "labels": labels,
        "numTraining": num_training,
        "file_ending": source_json["file_ending"],
        "name": folder.name,
        "description": description,
    }


def prepare_cascade(
    dataset: int | str | Path,
    stage1_id: int,
    stage2_id: int,
    *,
    jitter_mm: Sequence[float] = DEFAULT_JITTER_MM,
    seed: int = 0,
    raw_root: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Write the stage-1 (liver) and stage-2 (tumour in a liver crop) raw datasets of a LiTS-labelled dataset.

    * Stage 1 (``DatasetAAA_<name>CascadeLiver``): the same images; labels liver and tumour merged into 1; the test
      images (``imagesTs``) are copied too.
    * Stage 2 (``DatasetBBB_<name>CascadeTumour``): images and labels cropped to the ground-truth liver's box grown
      per side by a margin drawn uniformly from ``jitter_mm`` (a stream per case from ``seed``, so the same seed gives
      the same crops); label 1 = tumour. ``cascade.json`` records every case's margins and box.

    Both datasets are written atomically and the source is only read.

    Returns:
        The stage-1 and stage-2 dataset folders.

    Raises:
        ValueError: A label value other than 0, 1, 2, a training case without liver (names the file), ids in use or
            equal, or a bad jitter range.
        FileExistsError: A target dataset exists and ``overwrite`` is False.
    """
    from nnyseg.data.validation import compare_geometry, find_raw_dataset, load_dataset_json, nnunet_raw_folder

    if stage1_id == stage2_id:
        raise ValueError(f"the two stages need different dataset ids, got {stage1_id} twice")
    jittered_margins(np.random.default_rng(0), jitter_mm)  # checks the range before any work
    source = find_raw_dataset(dataset)
    source_json = load_dataset_json(source)
    ending = source_json["file_ending"]
    raw_root = Path(raw_root) if raw_root is not None else nnunet_raw_folder()
    base_name = source.name.split("_", 1)[1]
    stage1 = new_dataset_folder(raw_root, stage1_id, f"{base_name}CascadeLiver")
    stage2 = new_dataset_folder(raw_root, stage2_id, f"{base_name}CascadeTumour")
    training = case_images(source / "imagesTr", ending)
    if not training:
        raise ValueError(f"{source / 'imagesTr'}: no training images (*_0000{ending})")

    record: dict = {
        "source": str(source),
        "jitter_mm": [float(v) for v in jitter_mm],
        "seed": seed,
        "convention": "margins in mm as [[z_before, z_after], [y_..], [x_..]]; boxes in numpy (z, y, x) voxel "
        "indices of the source image, half-open",
        "cases": {},
    }
    with atomic_folder(stage1, overwrite=overwrite) as out1, atomic_folder(stage2, overwrite=overwrite) as out2:
        for sub in ("imagesTr", "labelsTr"):
            (out1 / sub).mkdir()
            (out2 / sub).mkdir()
        for case, files in tqdm(training.items(), desc="cascade datasets", disable=not progress):
            label_path = source / "labelsTr" / f"{case}{ending}"
            if not label_path.is_file():
                raise FileNotFoundError(f"{files[0]}: no label {label_path}")
            problems = compare_geometry(files[0], label_path)
            if problems:
                raise ValueError(f"{label_path}: " + "; ".join(problems))
            label_image = _read_lits_label(label_path)
            label = sitk.GetArrayFromImage(label_image)
            liver = label > 0
            if not liver.any():
                raise ValueError(f"{label_path}: no liver; stage 2 crops around the liver, so every case needs one")

            for path in files:
                shutil.copy2(path, out1 / "imagesTr" / path.name)
            _write_label(liver, label_image, out1 / "labelsTr" / label_path.name)

            margins = jittered_margins(case_rng(seed, case), jitter_mm)
            box = liver_crop_box(liver, spacing_zyx(label_image), margins)
            for path in files:
                sitk.WriteImage(crop_image(sitk.ReadImage(str(path)), box), str(out2 / "imagesTr" / path.name), True)
            _write_label(label[box.slices] == TUMOUR, crop_image(label_image, box), out2 / "labelsTr" / label_path.name)
            record["cases"][case] = {"margins_mm": np.round(margins, 3).tolist(), "box": box.to_json()}

        test_images = sorted((source / "imagesTs").glob(f"*{ending}")) if (source / "imagesTs").is_dir() else []
        if test_images:
            (out1 / "imagesTs").mkdir()
            for path in test_images:
                shutil.copy2(path, out1 / "imagesTs" / path.name)

        stage1_json = _stage_dataset_json(
            source_json,
            stage1,
            {"background": 0, "liver": 1},
            len(training),
            f"Cascade stage 1 of {source.name}: liver and tumour merged into label 1 (nnyseg cascade prepare)",
        )
        stage2_json = _stage_dataset_json(
            source_json,
            stage2,
            {"background": 0, "tumor": 1},
            len(training),
            f"Cascade stage 2 of {source.name}: crops around the ground-truth liver with a {jitter_mm[0]}-"
            f"{jitter_mm[1]} mm margin per side, label 1 = tumour (nnyseg cascade prepare; see cascade.json)",
        )
        (out1 / "dataset.json").write_text(json.dumps(stage1_json, indent=2) + "\n", encoding="utf-8")
        (out2 / "dataset.json").write_text(json.dumps(stage2_json, indent=2) + "\n", encoding="utf-8")
        (out2 / "cascade.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return stage1, stage2


# ------------------------------------------------------------------------------------------------------------------
# Prediction
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageOptions:
    """How each stage runs nnU-Net's predictor (the flags of ``nnUNetv2_predict`` of the same names)."""

    folds: tuple[int | str, ...] | None = None  # None: every fold the model folder has
    checkpoint: str = "checkpoint_final.pth"
    device: str = "cuda"
    use_mirroring: bool = True
    num_processes_preprocessing: int = 3
    num_processes_export: int = 3
    progress: bool = True


def _model_dataset_json(model_folder: Path) -> dict:
    for name in ("plans.json", "dataset.json"):
        if not (model_folder / name).is_file():
            raise FileNotFoundError(
                f"{model_folder}: not a trained nnU-Net model folder (no {name}); expected "
                "$nnUNet_results/DatasetXXX_Name/Trainer__Plans__configuration"
            )
    return json.loads((model_folder / "dataset.json").read_text(encoding="utf-8"))


def run_nnunet_stage(model_folder: Path, input_folder: Path, output_folder: Path, options: StageOptions) -> None:
    """Predict every case of ``input_folder`` into ``output_folder`` with nnU-Net's predictor, loading checkpoints
    weights-only (:func:`nnyseg.nnunet_integration.safe_predictor_class`)."""
    import torch

    from nnyseg.nnunet_integration import safe_predictor_class

    device = torch.device(options.device)
    predictor = safe_predictor_class()(
        use_mirroring=options.use_mirroring,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        allow_tqdm=options.progress,
    )
    predictor.initialize_from_trained_model_folder(str(model_folder), options.folds, options.checkpoint)
    Path(output_folder).mkdir(parents=True, exist_ok=True)  # the sequential path does not create it
    if options.num_processes_preprocessing == 0 and options.num_processes_export == 0:
        predictor.predict_from_files_sequential(str(input_folder), str(output_folder))  # as nnUNetv2_predict does
    else:
        predictor.predict_from_files(
            str(input_folder),
            str(output_folder),
            num_processes_preprocessing=max(1, options.num_processes_preprocessing),
            num_processes_segmentation_export=max(1, options.num_processes_export),
        )


def _stage1_liver(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    if prediction.shape != shape:
        raise ValueError(f"{path}: stage-1 prediction of shape {prediction.shape}, image shape {shape}")
    return largest_component(prediction > 0)


def predict_cascade(
    images: Path,
    output: Path,
    stage1_model: Path,
    stage2_model: Path,
    *,
    margin_mm: float = DEFAULT_MARGIN_MM,
    options: StageOptions | None = None,
    overwrite: bool = False,
) -> Path:
    """Run both stages on every case of ``images`` and write the final LiTS maps ``output/CASE.ext``.

    Stage 1 predicts the liver on the whole images; its largest component, grown by ``margin_mm`` per side, is the
    box every channel is cropped to for stage 2. The final map (:func:`combine_stages`) gets each input image's exact
    geometry. A case whose stage-1 liver is empty gets an all-zero map and a warning. ``output`` is written
    atomically and also receives ``cascade.json`` (models, margin, boxes).

    Raises:
        FileNotFoundError: ``images`` has no images, or a model folder is not a trained nnU-Net model.
        ValueError: A case has the wrong number of channels.
        FileExistsError: ``output`` exists and ``overwrite`` is False.
    """
    images, output = Path(images), Path(output)
    stage1_model, stage2_model = Path(stage1_model), Path(stage2_model)
    options = options or StageOptions()
    stage1_json, stage2_json = _model_dataset_json(stage1_model), _model_dataset_json(stage2_model)
    if stage1_json["channel_names"] != stage2_json["channel_names"]:
        raise ValueError(
            f"{stage1_model} and {stage2_model}: the stages take different channels "
            f"({stage1_json['channel_names']} and {stage2_json['channel_names']})"
        )
    ending, crop_ending = stage1_json["file_ending"], stage2_json["file_ending"]
    cases = case_images(images, ending) if images.is_dir() else {}
    if not cases:
        raise FileNotFoundError(f"{images}: no images named CASE_0000{ending}")
    num_channels = len(stage1_json["channel_names"])
    for case, files in cases.items():
        if len(files) != num_channels:
            raise ValueError(f"{images}: case {case} has {len(files)} channel file(s), the models take {num_channels}")

    record: dict = {
        "stage1_model": str(stage1_model),
        "stage2_model": str(stage2_model),
        "margin_mm": margin_mm,
        "convention": "boxes in numpy (z, y, x) voxel indices of the input image, half-open",
        "cases": {},
    }
    with (
        tempfile.TemporaryDirectory(prefix="nnyseg-cascade-") as work,
        atomic_folder(output, overwrite=overwrite) as out,
    ):
        stage1_out, crops, stage2_out = Path(work, "stage1"), Path(work, "stage2_input"), Path(work, "stage2")
        crops.mkdir()
        run_nnunet_stage(stage1_model, images, stage1_out, options)

        boxes: dict[str, Box] = {}
        for case, files in tqdm(cases.items(), desc="cascade: crop to stage-1 liver", disable=not options.progress):
            header = read_header(files[0])
            liver = _stage1_liver(stage1_out / f"{case}{ending}", tuple(header.GetSize()[::-1]))
            box = liver_crop_box(liver, header.GetSpacing()[::-1], margin_mm)
            if box is None:
                warnings.warn(f"{files[0]}: stage 1 found no liver; writing an all-zero map", stacklevel=2)
                continue
            boxes[case] = box
            for channel, path in enumerate(files):
                cropped = crop_image(sitk.ReadImage(str(path)), box)
                sitk.WriteImage(cropped, str(crops / f"{case}_{channel:04d}{crop_ending}"), True)
        if boxes:
            run_nnunet_stage(stage2_model, crops, stage2_out, options)

        for case, files in tqdm(cases.items(), desc="cascade: combine", disable=not options.progress):
            header = read_header(files[0])
            shape = tuple(header.GetSize()[::-1])
            if case in boxes:
                # Recomputed rather than kept from the crop loop: a dataset's masks need not fit in memory.
                liver = _stage1_liver(stage1_out / f"{case}{ending}", shape)
                tumour_crop = sitk.GetArrayFromImage(sitk.ReadImage(str(stage2_out / f"{case}{crop_ending}"))) > 0
                final = combine_stages(liver, paste_array(tumour_crop, boxes[case], shape, fill=False))
                record["cases"][case] = {"box": boxes[case].to_json()}
            else:
                final = np.zeros(shape, np.uint8)
                record["cases"][case] = {"box": None, "warning": "stage 1 found no liver"}
            sitk.WriteImage(copy_geometry(sitk.GetImageFromArray(final), header), str(out / f"{case}{ending}"), True)
        (out / "cascade.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return output
