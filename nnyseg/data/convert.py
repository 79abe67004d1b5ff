"""Conversion of public liver datasets into nnU-Net v2 raw datasets, and of DICOM CT series into NIfTI.

* :func:`convert_lits` reads the LiTS release (``volume-N.nii`` with ``segmentation-N.nii``, possibly spread over
  several batch folders, and ``test-volume-N.nii``),
* :func:`convert_atlas` reads the ATLAS 2023 MRI release (an images folder and a labels folder whose files are
  matched by case number, and optionally a test images folder),
* :func:`convert_dicom` reads one CT DICOM series into one NIfTI file.

Conventions:

* Labels follow LiTS: 0 background, 1 liver, 2 tumour. The written ``dataset.json`` is region based
  (liver = (1, 2), tumour = (2,)), as nnyseg's trainers expect.
* Case ids are ``lits_{N:03d}`` / ``lits_test_{N:03d}`` and ``atlas_{N:03d}`` / ``atlas_test_{N:03d}``, where N is
  the number in the source file name; ``nnyseg export-submission`` recovers N from the trailing digits.
* Images are copied with their pixel type, voxel values and geometry (spacing, origin, direction) unchanged; labels
  are written as uint8 on their image's exact geometry, so each pair matches bit for bit in the header.
* Sources are only read. A dataset is built in a hidden sibling folder that replaces the target only when complete
  (:func:`nnyseg.io.atomic_folder`), so a failure at any point leaves nothing behind.
* Problems are collected rather than raised one at a time: cheap header checks (partners, grids) run over every case
  before any voxel is converted, and one :class:`~nnyseg.data.validation.DatasetError` lists them all, each naming
  its case and file.
* Every source file is read to its end before it is converted (:func:`nnyseg.data.integrity.check_image_file`): a
  truncated or corrupt download ("truncated or corrupt, download it again") and NaN or infinite voxels, which
  SimpleITK reads without a word, are problems like the others. Of a DICOM series, a file that GDCM would silently
  leave out (a truncated slice) is named too.
"""

from __future__ import annotations

import functools
import multiprocessing
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

import nnyseg
from nnyseg.data.integrity import check_dicom_series, check_image_file
from nnyseg.data.validation import DatasetError, compare_geometry, nnunet_raw_folder
from nnyseg.io import atomic_file, atomic_folder, write_json_atomic

__all__ = ["LABEL_VALUES", "convert_atlas", "convert_dicom", "convert_lits"]

LABEL_VALUES = (0, 1, 2)
"""Allowed label values: background, liver, tumour."""
FILE_ENDING = ".nii.gz"
_REGION_LABELS = {"background": 0, "liver": [1, 2], "tumor": 2}
_REGIONS_CLASS_ORDER = [1, 2]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_NIFTI_ENDINGS = (".nii", ".nii.gz")

# Anchored on the whole file name: "test-volume-3.nii" must not count as training volume 3.
_LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(?:\.gz)?$")
_LITS_SEGMENTATION = re.compile(r"^segmentation-(\d+)\.nii(?:\.gz)?$")
_LITS_TEST_VOLUME = re.compile(r"^test-volume-(\d+)\.nii(?:\.gz)?$")

_LITS_INFO = {
    "description": (
        "Liver Tumor Segmentation Challenge (LiTS): contrast-enhanced abdominal CT with liver and liver-tumour "
        "labels (0 background, 1 liver, 2 tumour). Test volumes (no labels) in imagesTs."
    ),
    "reference": (
        "Bilic P. et al., The Liver Tumor Segmentation Benchmark (LiTS), Medical Image Analysis 84 (2023) 102680"
    ),
    "licence": "CC BY-NC-SA 4.0",
}
_ATLAS_INFO = {
    "description": (
        "ATLAS 2023 (A Tumour and Liver Automatic Segmentation): T1 contrast-enhanced MRI of patients with "
        "hepatocellular carcinoma, liver and tumour labels (0 background, 1 liver, 2 tumour)."
    ),
    "reference": (
        "Quinton F. et al., A Tumour and Liver Automatic Segmentation (ATLAS) Dataset on Contrast-Enhanced Magnetic "
        "Resonance Imaging for Hepatocellular Carcinoma, Data 8(5) (2023) 79"
    ),
    "licence": "see the data terms of the ATLAS challenge (https://atlas-challenge.u-bourgogne.fr)",
}


@dataclass(frozen=True)
class _Case:
    """One case to convert: its nnU-Net id and source files (``label`` is None for test cases)."""

    case_id: str
    image: Path
    label: Path | None = None

    def image_output(self, dataset: Path) -> Path:
        split = "imagesTr" if self.label is not None else "imagesTs"
        return dataset / split / f"{self.case_id}_0000{FILE_ENDING}"

    def label_output(self, dataset: Path) -> Path:
        return dataset / "labelsTr" / f"{self.case_id}{FILE_ENDING}"


# ----------------------------------------------------------------------------------------------------------------
# Public converters


def convert_lits(
    source: str | Path,
    dataset_id: int,
    *,
    name: str = "LiTS",
    raw_root: str | Path | None = None,
    overwrite: bool = False,
    num_processes: int = 2,
    progress: bool = True,
) -> Path:
    """Convert the LiTS release into the nnU-Net raw dataset ``Dataset{ID:03d}_{name}``.

    ``source`` is searched recursively, so the training cases may be split over "Training Batch 1" and
    "Training Batch 2" and the test volumes may lie anywhere below it; ``.nii`` and ``.nii.gz`` are both read.

    Args:
        source: The downloaded release (only read).
        dataset_id: nnU-Net dataset id, 1-999.
        name: Dataset name (letters, digits, ``_`` and ``-``).
        raw_root: Raw folder to write into; None uses ``$nnUNet_raw``.
        overwrite: Replace an existing dataset of the same name (only once the new one is complete).
        num_processes: Cases converted in parallel; 1 converts in this process.
        progress: Show a progress bar.

    Returns:
        The dataset folder.

    Raises:
        FileNotFoundError: ``source`` is not a folder.
        FileExistsError: A dataset with this id exists (and ``overwrite`` is False, or it has another name).
        DatasetError: (a ValueError) listing every problem found, each naming its case and file: a volume without
            segmentation or vice versa, a case number found twice, a label grid that differs from its image, label
            values outside 0/1/2, a truncated or corrupt file, NaN or infinite voxels, or no cases at all.
    """
    source = _existing_folder(source)
    target = _dataset_target(raw_root, dataset_id, name, overwrite)
    files = [p for p in sorted(source.rglob("*")) if p.is_file()]
    problems: list[str] = []
    volumes = _numbered(files, _LITS_VOLUME, source, problems)
    segmentations = _numbered(files, _LITS_SEGMENTATION, source, problems)
    test_volumes = _numbered(files, _LITS_TEST_VOLUME, source, problems)
    if not (volumes or segmentations):
        problems.append(f"no LiTS training files found (volume-N.nii[.gz] with segmentation-N.nii[.gz]) in {source}")
    for n in sorted(volumes.keys() - segmentations.keys()):
        problems.append(f"case lits_{n:03d}: {_rel(volumes[n], source)} has no segmentation-{n}.nii[.gz]")
    for n in sorted(segmentations.keys() - volumes.keys()):
        problems.append(f"case lits_{n:03d}: {_rel(segmentations[n], source)} has no volume-{n}.nii[.gz]")
    paired = sorted(volumes.keys() & segmentations.keys())
    cases = [_Case(f"lits_{n:03d}", volumes[n], segmentations[n]) for n in paired]
    cases += [_Case(f"lits_test_{n:03d}", test_volumes[n]) for n in sorted(test_volumes)]
    return _build_dataset(
        source,
        target,
        cases,
        problems,
        channel_name="CT",
        info=_LITS_INFO,
        converter="nnyseg convert lits",
        overwrite=overwrite,
        num_processes=num_processes,
        progress=progress,
    )


def convert_atlas(
    source: str | Path,
    dataset_id: int,
    *,
    name: str = "ATLAS",
    raw_root: str | Path | None = None,
    overwrite: bool = False,
    num_processes: int = 2,
    progress: bool = True,
) -> Path:
    """Convert the ATLAS 2023 MRI release into the nnU-Net raw dataset ``Dataset{ID:03d}_{name}``.

    Below ``source``, the folder of NIfTI files whose name contains "label" holds the training labels and the one
    whose name contains "image" beside it the training images (case-insensitive; e.g. ``train/imagesTr`` and
    ``train/labelsTr``). A further images folder whose path says "test" (or whose name ends in "Ts") holds test
    images without labels, written to ``imagesTs``. Images and labels are matched by the last number in their file
    names (``im12.nii.gz`` with ``lb12.nii.gz``). The channel is named "MRI", so nnU-Net normalises each image by
    its own mean and standard deviation (z-score) instead of the CT intensity statistics.

    Arguments, return value and errors are those of :func:`convert_lits`; a file without a partner, without a
    number, or a folder layout that cannot be told apart is reported by name.
    """
    source = _existing_folder(source)
    target = _dataset_target(raw_root, dataset_id, name, overwrite)
    problems: list[str] = []
    images_dir, labels_dir, test_dir = _atlas_folders(source, problems)
    cases: list[_Case] = []
    if images_dir is not None and labels_dir is not None:
        images = _numbered_by_last_integer(_nifti_files(images_dir), source, problems)
        labels = _numbered_by_last_integer(_nifti_files(labels_dir), source, problems)
        for n in sorted(images.keys() - labels.keys()):
            problems.append(f"case atlas_{n:03d}: {_rel(images[n], source)} has no label numbered {n}")
        for n in sorted(labels.keys() - images.keys()):
            problems.append(f"case atlas_{n:03d}: {_rel(labels[n], source)} has no image numbered {n}")
        cases = [_Case(f"atlas_{n:03d}", images[n], labels[n]) for n in sorted(images.keys() & labels.keys())]
    if test_dir is not None:
        test_images = _numbered_by_last_integer(_nifti_files(test_dir), source, problems)
        cases += [_Case(f"atlas_test_{n:03d}", test_images[n]) for n in sorted(test_images)]
    return _build_dataset(
        source,
        target,
        cases,
        problems,
        channel_name="MRI",
        info=_ATLAS_INFO,
        converter="nnyseg convert atlas",
        overwrite=overwrite,
        num_processes=num_processes,
        progress=progress,
    )


def convert_dicom(
    series_dir: str | Path, output_file: str | Path, *, series_uid: str | None = None, overwrite: bool = False
) -> Path:
    """Read one DICOM series (a CT scan) from ``series_dir`` and write it as NIfTI (``.nii.gz``).

    Slices are ordered and the geometry (spacing, origin, direction) is taken by ITK/GDCM from the DICOM position
    and orientation tags; CT numbers come out in HU (rescale slope and intercept applied).

    Args:
        series_dir: Folder of DICOM files (only read).
        output_file: NIfTI file to write, atomically.
        series_uid: The series to read when the folder holds several.
        overwrite: Replace an existing ``output_file``.

    Returns:
        ``output_file``.

    Raises:
        FileNotFoundError: ``series_dir`` is not a folder.
        FileExistsError: ``output_file`` exists and ``overwrite`` is False.
        ValueError: The folder holds no DICOM series; or several and no (or an unknown) ``series_uid``; or the
            series cannot be read. The message names the folder and lists the series found.
        DatasetError: (a ValueError) naming every file of the series that is truncated or corrupt: one GDCM cannot
            read, or would leave out of the series (it does so silently, and the volume would miss a slice).
    """
    series_dir = _existing_folder(series_dir)
    output_file = Path(output_file)
    if not output_file.name.endswith(_NIFTI_ENDINGS):
        raise ValueError(f"{output_file}: the output must be a NIfTI file ending in .nii.gz (or .nii)")
    if output_file.exists() and not overwrite:  # fail before reading a possibly large series
        raise FileExistsError(f"{output_file}: already exists (pass --overwrite to replace it)")
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(series_dir))
    if not uids:
        n_files = sum(1 for p in series_dir.iterdir() if p.is_file())
        raise ValueError(f"{series_dir}: no DICOM series found ({n_files} file(s) in the folder, none a DICOM image)")
    files = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir), uid) for uid in uids}
    listing = "; ".join(f"{uid!r} ({len(names)} files)" for uid, names in files.items())
    if series_uid is None and len(uids) > 1:
        raise ValueError(f"{series_dir}: holds {len(uids)} DICOM series, choose one with --series-uid: {listing}")
    if series_uid is not None and series_uid not in files:
        raise ValueError(f"{series_dir}: no DICOM series {series_uid!r}; the folder holds {listing}")
    chosen = series_uid if series_uid is not None else uids[0]
    problems = check_dicom_series(series_dir, chosen, files[chosen])
    if problems:
        raise DatasetError(series_dir, problems)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    reader.MetaDataDictionaryArrayUpdateOff()  # the per-slice tags are not needed and are slow to collect
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise ValueError(f"{series_dir}: cannot read DICOM series {chosen!r}: {_itk_reason(e)}") from e
    with atomic_file(output_file, overwrite=overwrite) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return output_file


# ----------------------------------------------------------------------------------------------------------------
# Finding the source files


def _existing_folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    return path


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def _nifti_files(folder: Path) -> list[Path]:
    """NIfTI files directly in ``folder``; hidden files (e.g. macOS ``._`` resource forks) are skipped."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_NIFTI_ENDINGS) and p.name[0] != ".")


def _numbered(files: Iterable[Path], pattern: re.Pattern, source: Path, problems: list[str]) -> dict[int, Path]:
    """Case number -> file for the files whose whole name matches ``pattern``; a number found twice is a problem."""
    found: dict[int, Path] = {}
    for path in files:
        match = pattern.match(path.name)
        if match is None:
            continue
        n = int(match.group(1))
        if n in found:
            problems.append(f"case number {n} is found twice: {_rel(found[n], source)} and {_rel(path, source)}")
        else:
            found[n] = path
    return found


def _numbered_by_last_integer(files: Iterable[Path], source: Path, problems: list[str]) -> dict[int, Path]:
    """Case number (the last integer in the file name) -> file.

    Files without a number, or with a number already seen, are added to ``problems``.
    """
    found: dict[int, Path] = {}
    for path in files:
        stem = path.name.removesuffix(".gz").removesuffix(".nii")
        numbers = re.findall(r"\d+", stem)
        if not numbers:
            problems.append(f"{_rel(path, source)}: no case number in the file name")
            continue
        n = int(numbers[-1])
        if n in found:
            problems.append(f"case number {n} is found twice: {_rel(found[n], source)} and {_rel(path, source)}")
        else:
            found[n] = path
    return found


def _atlas_folders(source: Path, problems: list[str]) -> tuple[Path | None, Path | None, Path | None]:
    """(training images folder, training labels folder, test images folder or None) of an ATLAS release."""
    folders = sorted({p.parent for p in source.rglob("*") if p.is_file() and p.name.endswith(_NIFTI_ENDINGS)})

    def is_test(folder: Path) -> bool:
        parts = [part.lower() for part in folder.relative_to(source).parts]
        return any("test" in part for part in parts) or (bool(parts) and parts[-1].endswith("ts"))

    def only(kind: str, candidates: list[Path], required: bool) -> Path | None:
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            names = [_rel(c, source) for c in candidates]
            problems.append(f"several {kind} folders, cannot tell which to use: {names}")
        elif required:
            problems.append(f"no {kind} folder (a folder of NIfTI files with {kind.split()[-1]!r} in its name)")
        return None

    images = [f for f in folders if "image" in f.name.lower()]
    labels = [f for f in folders if "label" in f.name.lower() and not is_test(f)]
    labels_dir = only("training label", labels, required=True)
    train_images = [f for f in images if not is_test(f)]
    if len(train_images) > 1 and labels_dir is not None:  # prefer the images folder beside the labels folder
        train_images = [f for f in train_images if f.parent == labels_dir.parent] or train_images
    images_dir = only("training image", train_images, required=True)
    test_dir = only("test image", [f for f in images if is_test(f)], required=False)
    return images_dir, labels_dir, test_dir


# ----------------------------------------------------------------------------------------------------------------
# Building the dataset


def _dataset_target(raw_root: str | Path | None, dataset_id: int, name: str, overwrite: bool) -> Path:
    """The dataset folder to write.

    An id already in use is refused, unless by this very folder and ``overwrite`` is set.
    """
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id must be an integer from 1 to 999, got {dataset_id!r}")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"dataset name must be letters, digits, '_' or '-', got {name!r}")
    root = nnunet_raw_folder() if raw_root is None else Path(raw_root)
    target = root / f"Dataset{dataset_id:03d}_{name}"
    existing = sorted(p for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir()) if root.is_dir() else []
    others = [p.name for p in existing if p != target]
    if others:
        # Replacing a dataset of another name would mean deleting the user's folder; two folders with one id would
        # make nnU-Net refuse the id. Either way the user decides.
        raise FileExistsError(
            f"{root}: dataset id {dataset_id} is already used by {', '.join(others)}; remove it or choose another id"
        )
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists (pass --overwrite to replace it)")
    return target


def _header_problems(case: _Case, source: Path) -> list[str]:
    """Grid mismatches between a case's label and image, read from the headers only."""
    if case.label is None:
        return []
    try:
        return [f"case {case.case_id}: {p}" for p in compare_geometry(case.image, case.label)]
    except RuntimeError as e:  # SimpleITK cannot read one of the headers
        # Say which file, and whether it is a broken download (a file cut inside its header is one).
        damaged = [f"case {case.case_id}: {p}" for f in (case.image, case.label) for p in check_image_file(f)]
        files = f"{_rel(case.image, source)} or {_rel(case.label, source)}"
        return damaged or [f"case {case.case_id}: cannot read {files}: {_itk_reason(e)}"]


def _build_dataset(
    source: Path,
    target: Path,
    cases: list[_Case],
    problems: list[str],
    *,
    channel_name: str,
    info: dict[str, str],
    converter: str,
    overwrite: bool,
    num_processes: int,
    progress: bool,
) -> Path:
    """Check every case's headers, then convert all cases into ``target`` atomically.

    Args:
        problems: Problems already found while finding the cases; reported together with the header problems.
        channel_name: The image channel's name in dataset.json ("CT" or "MRI": it picks nnU-Net's normalisation).
        info: dataset.json's description, reference and licence.
        converter: The command recorded in conversion.json.
    """
    training = [c for c in cases if c.label is not None]
    if not training and not problems:
        problems.append(f"no training cases (image with label) found in {source}")
    for case in tqdm(training, desc="checking headers", unit="case", disable=not progress, leave=False):
        problems.extend(_header_problems(case, source))
    if problems:
        raise DatasetError(source, problems)

    with atomic_folder(target, overwrite=overwrite) as tmp:
        for folder in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / folder).mkdir()
        convert = functools.partial(_convert_case, dataset=tmp)
        bar = dict(total=len(cases), desc=f"converting {target.name}", unit="case", disable=not progress)
        if num_processes <= 1:
            results = [convert(case) for case in tqdm(cases, **bar)]
        else:
            # spawn, as nnU-Net does: forking a process that holds threads (torch, ITK) can deadlock.
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(cases))) as pool:
                results = list(tqdm(pool.imap_unordered(convert, cases), **bar))
        problems = sorted(p for case_problems in results for p in case_problems)
        if problems:
            raise DatasetError(source, problems)  # leaving the block discards the half-built dataset
        if not any((tmp / "imagesTs").iterdir()):
            (tmp / "imagesTs").rmdir()

        dataset_json = {
            "channel_names": {"0": channel_name},
            "labels": _REGION_LABELS,
            "regions_class_order": _REGIONS_CLASS_ORDER,
            "numTraining": len(training),
            "file_ending": FILE_ENDING,
            "name": target.name,
            **info,
        }
        write_json_atomic(tmp / "dataset.json", dataset_json)
        sidecar = {
            "converter": converter,
            "nnyseg_version": nnyseg.__version__,
            "simpleitk_version": sitk.Version_VersionString(),
            "source": str(source.resolve()),
            "cases": {
                c.case_id: {"image": _rel(c.image, source)} | ({"label": _rel(c.label, source)} if c.label else {})
                for c in cases
            },
        }
        write_json_atomic(tmp / "conversion.json", sidecar)
    return target


def _convert_case(case: _Case, dataset: Path) -> list[str]:
    """Copy one case into the dataset folder (top level, so that spawned worker processes can import it).

    Returns:
        The problems found: a truncated or corrupt file, NaN or infinite voxels, label values outside 0/1/2, or a
        file ITK cannot read; empty when the case is good.
    """
    # Read every source file to its end first: SimpleITK would copy a truncated file's zeros and a NIfTI file's NaN
    # (as 0) into the dataset without a word.
    sources = [case.image] if case.label is None else [case.image, case.label]
    damaged = [f"case {case.case_id}: {p}" for f in sources for p in check_image_file(f)]
    if damaged:
        return damaged
    try:
        image = sitk.ReadImage(str(case.image))
        sitk.WriteImage(image, str(case.image_output(dataset)), useCompression=True)
        if case.label is None:
            return []
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
    except RuntimeError as e:  # a header ITK reads but voxels it cannot (e.g. an unsupported pixel type)
        files = case.image.name + (f" / {case.label.name}" if case.label is not None else "")
        return [f"case {case.case_id}: cannot read {files}: {_itk_reason(e)}"]
    bad = [v for v in np.unique(label).tolist() if v not in LABEL_VALUES]  # also catches 0.5 or NaN in float labels
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        return [
            f"case {case.case_id}: {case.label.name} holds label values {shown}; only 0 (background), 1 (liver) and "
            "2 (tumour) are allowed"
        ]
    label_image = sitk.GetImageFromArray(label.astype(np.uint8))
    label_image.CopyInformation(image)  # the image's exact header geometry, within compare_geometry's tolerance
    sitk.WriteImage(label_image, str(case.label_output(dataset)), useCompression=True)
    return []


def _itk_reason(error: RuntimeError) -> str:
    """The last line of an ITK exception, which says what went wrong without the C++ file and line."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown ITK error"
