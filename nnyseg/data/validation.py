"""Checks of an nnU-Net raw dataset, with errors that name the file and the problem.

nnU-Net's own ``--verify_dataset_integrity`` stops at the first problem with an assertion; these checks run before
planning, collect every problem in the dataset and say which file has which problem. They only read.

Every image and label file is also read to its end by :mod:`nnyseg.data.integrity`, which finds what SimpleITK (and
so nnU-Net) reads without a word: truncated or corrupt compressed files, and NaN or infinite voxels in NIfTI files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnyseg.data.integrity import check_image_files, check_image_files_by_file, input_image_files

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
# Geometry tolerances: nnU-Net compares spacing with np.allclose; origins and directions are compared the same way.
_ATOL = 1e-4
_RTOL = 1e-5


class ProblemListError(ValueError):
    """Bad input with every problem found, not just the first: ``"<where>: N problem(s):"`` and one line each."""

    max_shown = 25

    def __init__(self, where: str | Path, problems: Iterable[str]):
        self.where = str(where)
        self.problems = list(problems)
        shown = self.problems[: self.max_shown]
        more = f"\n  ... and {len(self.problems) - len(shown)} more" if len(self.problems) > len(shown) else ""
        super().__init__(f"{self.where}: {len(self.problems)} problem(s):\n  - " + "\n  - ".join(shown) + more)


class DatasetError(ProblemListError):
    """A raw dataset (or a file in it) that nnU-Net cannot use; the message lists every problem found."""

    @property
    def dataset(self) -> str:
        return self.where


class InputImageError(ProblemListError):
    """Images to predict from that nnU-Net would read wrongly: truncated or corrupt files, NaN or infinite voxels.

    ``where`` is the input folder; each problem names its file.
    """


def nnunet_raw_folder() -> Path:
    """The folder in ``nnUNet_raw``, or a clear error if the variable is unset or points nowhere."""
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise DatasetError("nnUNet_raw", ["the environment variable nnUNet_raw is not set (see `nnyseg doctor`)"])
    if not Path(raw).is_dir():
        raise DatasetError(raw, ["nnUNet_raw points to a folder that does not exist"])
    return Path(raw)


def find_raw_dataset(dataset: int | str | Path) -> Path:
    """Resolve a dataset id (``4``), name (``Dataset004_Liver``) or folder to its raw dataset folder."""
    if isinstance(dataset, Path) or (isinstance(dataset, str) and os.sep in dataset):
        path = Path(dataset)
        if not path.is_dir():
            raise DatasetError(path, ["no such dataset folder"])
        return path
    raw = nnunet_raw_folder()
    if isinstance(dataset, str) and not dataset.isdigit():
        path = raw / dataset
        if not path.is_dir():
            raise DatasetError(path, [f"no dataset named {dataset!r} in nnUNet_raw={raw}"])
        return path
    dataset_id = int(dataset)
    candidates = sorted(p for p in raw.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())
    if not candidates:
        available = sorted(p.name for p in raw.glob("Dataset*_*") if p.is_dir())
        raise DatasetError(
            raw, [f"no dataset with id {dataset_id} (looked for Dataset{dataset_id:03d}_*); available: {available}"]
        )
    if len(candidates) > 1:
        raise DatasetError(raw, [f"dataset id {dataset_id} is used by several folders: {[p.name for p in candidates]}"])
    return candidates[0]


def load_dataset_json(folder: Path) -> dict:
    """Read and check ``dataset.json``; every problem is reported with the file's path."""
    path = folder / "dataset.json"
    if not path.is_file():
        raise DatasetError(path, ["dataset.json is missing"])
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(path, [f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"]) from e
    if not isinstance(data, dict):
        raise DatasetError(path, ["the top level must be a JSON object"])
    problems = [f"required key '{key}' is missing" for key in REQUIRED_KEYS if key not in data]
    labels = data.get("labels")
    if isinstance(labels, dict):
        if labels.get("background") != 0:
            problems.append("labels must map 'background' to 0")
        if any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values()):
            order = data.get("regions_class_order")
            n_regions = len([k for k in labels if k != "background"])
            if not isinstance(order, list) or len(order) != n_regions:
                problems.append(
                    f"region-based labels need 'regions_class_order' with one entry per region ({n_regions})"
                )
    elif "labels" in data:
        problems.append("'labels' must be an object mapping names to label values")
    if "channel_names" in data and (not isinstance(data["channel_names"], dict) or not data["channel_names"]):
        problems.append('\'channel_names\' must be a non-empty object like {"0": "CT"}')
    if "numTraining" in data and (not isinstance(data["numTraining"], int) or data["numTraining"] < 1):
        problems.append("'numTraining' must be a positive integer")
    if problems:
        raise DatasetError(path, problems)
    return data


def declared_label_values(dataset_json: dict) -> set[int]:
    """All integer values a label file may contain (regions are unions of these)."""
    values: set[int] = set()
    for value in dataset_json["labels"].values():
        values.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return values


def _geometry(reader: sitk.ImageFileReader) -> tuple[tuple, tuple, tuple, tuple]:
    return reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()


def _read_info(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def compare_geometry(image: Path, label: Path) -> list[str]:
    """Problems (empty if none) between an image's and a label's grid: size, spacing, origin, direction."""
    gi, gl = _geometry(_read_info(image)), _geometry(_read_info(label))
    problems = []
    for name, a, b in zip(("size", "spacing", "origin", "direction"), gi, gl, strict=False):
        same = a == b if name == "size" else np.allclose(a, b, rtol=_RTOL, atol=_ATOL)
        if not same:
            problems.append(
                f"{label.name}: {name} {tuple(np.round(b, 5).tolist())} differs from {image.name}'s "
                f"{tuple(np.round(a, 5).tolist())}"
            )
    return problems


def validate_raw_dataset(
    dataset: int | str | Path,
    *,
    check_intensities: bool = True,
    progress: bool = True,
    num_processes: int | None = None,
) -> Path:
    """Check a raw dataset for everything that would make nnU-Net fail or silently train on wrong data.

    Checks ``dataset.json``; that ``imagesTr``/``labelsTr`` exist and every label has all its channels and vice
    versa; that ``numTraining`` matches; that every image channel has its label's size, spacing, origin and
    direction; that labels hold only declared values; and that every image and label file is intact and free of NaN
    and infinite voxels (:func:`nnyseg.data.integrity.check_image_file`: the whole file is read and its gzip
    stream's CRC and length are checked; a NIfTI file must hold its whole data block; NaN and inf are counted on
    the raw voxels, which SimpleITK's NIfTI reader turns into 0). The files of ``imagesTs``/``labelsTs``, where
    present, get the same integrity check. A case with a damaged file is not checked further: its other results
    would be made of garbage.

    Args:
        dataset: Dataset id (``4``), name (``Dataset004_Liver``) or folder.
        check_intensities: Read the images' voxels: the integrity check of every image file. False
            (``nnyseg check-dataset --headers-only``) reads only the images' headers, so that a truncated or corrupt
            image or NaN voxels in it go unnoticed; labels are always read whole (their values are checked anyway)
            and so always get the integrity check.
        progress: Show progress bars.
        num_processes: Files read at the same time (see :func:`nnyseg.data.integrity.check_image_files_by_file`).

    Returns:
        The dataset folder.

    Raises:
        DatasetError: Listing every problem, each naming its file.
    """
    folder = find_raw_dataset(dataset)
    dataset_json = load_dataset_json(folder)
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json["channel_names"])
    problems: list[str] = []
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            problems.append(f"{d}: folder is missing")
    if problems:
        raise DatasetError(folder, problems)

    labels = sorted(labels_dir.glob(f"*{ending}"))
    case_ids = [p.name[: -len(ending)] for p in labels]
    if len(labels) != dataset_json["numTraining"]:
        problems.append(f"dataset.json says numTraining={dataset_json['numTraining']} but labelsTr has {len(labels)}")
    expected_images = {f"{c}_{i:04d}{ending}" for c in case_ids for i in range(n_channels)}
    present_images = {p.name for p in images_dir.glob(f"*{ending}")}
    for name in sorted(expected_images - present_images):
        problems.append(f"imagesTr/{name}: missing (its label exists)")
    for name in sorted(present_images - expected_images):
        problems.append(f"imagesTr/{name}: has no label in labelsTr or an unexpected channel index")

    # Integrity first: every file read to its end (the expensive part, in parallel).
    to_check = list(labels)
    if (folder / "labelsTs").is_dir():
        to_check += sorted((folder / "labelsTs").glob(f"*{ending}"))
    if check_intensities:
        to_check += sorted(images_dir.glob(f"*{ending}"))
        if (folder / "imagesTs").is_dir():
            to_check += sorted((folder / "imagesTs").glob(f"*{ending}"))
    integrity = check_image_files_by_file(
        to_check, num_processes=num_processes, progress=progress, desc=f"reading {folder.name}"
    )
    damaged = {path for path, file_problems in integrity.items() if file_problems}
    problems.extend(problem for file_problems in integrity.values() for problem in file_problems)

    allowed = declared_label_values(dataset_json)
    for case_id, label_path in tqdm(
        list(zip(case_ids, labels, strict=False)), desc=f"checking {folder.name}", disable=not progress, leave=False
    ):
        channels = [images_dir / f"{case_id}_{i:04d}{ending}" for i in range(n_channels)]
        channels = [c for c in channels if c.is_file()]
        if damaged.intersection([label_path, *channels]):
            continue
        try:
            for image_path in channels:
                problems.extend(compare_geometry(image_path, label_path))
            # NaN and inf in a label were found by the integrity check (and the case skipped)
            label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
            extra = sorted(set(np.unique(label).tolist()) - allowed)
            if extra:
                problems.append(
                    f"labelsTr/{label_path.name}: label values {extra} are not declared in dataset.json "
                    f"(allowed: {sorted(allowed)})"
                )
        except RuntimeError as e:  # SimpleITK cannot read the file
            problems.append(f"{label_path.name}: unreadable ({str(e).strip().splitlines()[-1]})")
    if problems:
        raise DatasetError(folder, problems)
    return folder


def check_input_images(folder: str | Path, *, num_processes: int | None = None, progress: bool = True) -> list[Path]:
    """Check the images of an nnU-Net input folder (``CASE_XXXX<ending>``) before predicting from them.

    Every file :func:`nnyseg.data.integrity.input_image_files` finds is read to its end
    (:func:`nnyseg.data.integrity.check_image_files`): truncated or corrupt files and NaN or infinite voxels are
    refused, because nnU-Net would predict from zeros or garbage without a word.

    Returns:
        The files checked.

    Raises:
        InputImageError: ``folder`` does not exist, or listing every problem found, each naming its file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputImageError(folder, ["no such input folder"])
    files = input_image_files(folder)
    problems = check_image_files(files, num_processes=num_processes, progress=progress, desc=f"reading {folder.name}")
    if problems:
        raise InputImageError(folder, problems)
    return files
