"""Export of predicted test-set segmentations as a LiTS leaderboard submission archive.

The LiTS evaluation server expects one zip archive holding, at its root, a ``test-segmentation-N.nii`` for every
``test-volume-N.nii`` of the release: uncompressed NIfTI, labels 0 background / 1 liver / 2 tumour, on exactly the
test volume's voxel grid. :func:`export_submission` writes that archive and then re-opens and checks it, so a
finished export is known to be complete and well-formed before it is uploaded.

Conventions:

* The prediction for test volume N is the NIfTI file in the prediction folder whose name ends with the number N:
  ``lits_test_007.nii.gz`` (a case converted by ``nnyseg convert lits`` and predicted by nnU-Net) or
  ``test-volume-7.nii.gz``. Other files in the folder (nnU-Net's ``plans.json`` and the like) are ignored.
* Files are read with nibabel, which works in the NIfTI's own voxel order and RAS affine, so "same grid" means same
  shape and same affine (within :data:`AFFINE_TOLERANCE_MM`).
* Each written segmentation carries a copy of its test volume's header (qform, sform, pixdim, units), changed only
  to say uint8 voxels without scaling.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from nnyseg.data.convert import LABEL_VALUES
from nnyseg.io import atomic_file

__all__ = ["AFFINE_TOLERANCE_MM", "export_submission", "submission_member_name"]

AFFINE_TOLERANCE_MM = 1e-4
"""Largest difference between a prediction's and its test volume's affine entries that still counts as the same
grid; NIfTI stores the affine in float32, whose resolution at 500 mm is 3e-5 mm."""

_TEST_VOLUME = re.compile(r"^test-volume-(\d+)\.nii(?:\.gz)?$")
_TRAILING_NUMBER = re.compile(r"(\d+)\.nii(?:\.gz)?$")


def submission_member_name(case_number: int) -> str:
    """The archive member the LiTS server expects for test volume ``case_number``."""
    return f"test-segmentation-{case_number}.nii"


def export_submission(
    pred_dir: str | Path,
    output_zip: str | Path,
    test_volumes_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the predictions for the LiTS test volumes into a validated submission archive.

    Args:
        pred_dir: Folder of predicted label files, one per test volume (see the module conventions for names).
        output_zip: Archive to write; written under a temporary name and renamed only after validation.
        test_volumes_dir: Folder of the original ``test-volume-N.nii[.gz]`` files (searched recursively; only their
            headers are read).
        overwrite: Replace an existing ``output_zip``.
        progress: Show a progress bar.

    Returns:
        ``output_zip``.

    Raises:
        FileNotFoundError: A folder does not exist.
        FileExistsError: ``output_zip`` exists and ``overwrite`` is False.
        ValueError: No test volumes; a prediction missing, ambiguous or without a test volume (the case numbers are
            listed); a prediction whose shape or affine differs from its test volume's, or with labels outside
            0/1/2 (naming the case); or an archive that fails validation. No archive is left behind.
    """
    pred_dir, test_volumes_dir, output_zip = Path(pred_dir), Path(test_volumes_dir), Path(output_zip)
    for folder in (pred_dir, test_volumes_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
    if output_zip.suffix.lower() != ".zip":
        raise ValueError(f"{output_zip}: the submission archive must be a .zip file")
    if output_zip.exists() and not overwrite:
        raise FileExistsError(f"{output_zip}: already exists (pass --overwrite to replace it)")
    test_volumes = _find_test_volumes(test_volumes_dir)
    predictions = _match_predictions(pred_dir, test_volumes)

    with atomic_file(output_zip, overwrite=overwrite) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for n in tqdm(sorted(test_volumes), desc="exporting", unit="case", disable=not progress):
                segmentation = _submission_image(n, predictions[n], test_volumes[n])
                archive.writestr(submission_member_name(n), segmentation.to_bytes())
        _validate_archive(tmp, test_volumes, progress)
    return output_zip


def _find_test_volumes(folder: Path) -> dict[int, Path]:
    """Case number -> ``test-volume-N.nii[.gz]`` below ``folder``."""
    found: dict[int, Path] = {}
    for path in sorted(folder.rglob("*")):
        match = _TEST_VOLUME.match(path.name)
        if match is None or not path.is_file():
            continue
        n = int(match.group(1))
        if n in found:
            raise ValueError(f"{folder}: test volume {n} is found twice: {found[n]} and {path}")
        found[n] = path
    if not found:
        raise ValueError(f"{folder}: no LiTS test volumes (test-volume-N.nii or .nii.gz) found")
    return found


def _match_predictions(pred_dir: Path, test_volumes: dict[int, Path]) -> dict[int, Path]:
    """Case number -> prediction file, with every missing, ambiguous or unexpected prediction reported at once."""
    candidates: dict[int, list[Path]] = {}
    for path in sorted(pred_dir.iterdir()):
        match = _TRAILING_NUMBER.search(path.name)
        if match is not None and path.is_file() and not path.name.startswith("."):
            candidates.setdefault(int(match.group(1)), []).append(path)
    problems = []
    missing = sorted(test_volumes.keys() - candidates.keys())
    if missing:
        problems.append(f"no prediction for test volume(s) {', '.join(map(str, missing))}")
    for n, paths in sorted(candidates.items()):
        if len(paths) > 1:
            problems.append(f"test volume {n} has several predictions: {', '.join(p.name for p in paths)}")
    unexpected = sorted(candidates.keys() - test_volumes.keys())
    if unexpected:
        names = ", ".join(candidates[n][0].name for n in unexpected)
        problems.append(f"prediction(s) without a test volume in the test-volumes folder: {names}")
    if problems:
        raise ValueError(f"{pred_dir}: " + "; ".join(problems))
    return {n: paths[0] for n, paths in candidates.items()}


def _check_grid(what: str, image: nib.spatialimages.SpatialImage, volume: nib.spatialimages.SpatialImage) -> None:
    if image.shape != volume.shape:
        raise ValueError(f"{what}: shape {image.shape} differs from the test volume's {volume.shape}")
    difference = float(np.abs(image.affine - volume.affine).max())
    if difference > AFFINE_TOLERANCE_MM:
        raise ValueError(
            f"{what}: not on the test volume's grid (affines differ by up to {difference:.4g} mm):\n"
            f"{np.round(image.affine, 4)}\nversus the test volume's\n{np.round(volume.affine, 4)}"
        )


def _check_labels(what: str, labels: np.ndarray) -> None:
    bad = [v for v in np.unique(labels).tolist() if v not in LABEL_VALUES]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise ValueError(f"{what}: label values {shown} found; only 0 (background), 1 (liver) and 2 (tumour) allowed")


def _submission_image(n: int, prediction_path: Path, volume_path: Path) -> nib.Nifti1Image:
    """The prediction's labels as uint8 with the test volume's header and affine."""
    volume = nib.load(volume_path)  # only the header is read
    prediction = nib.load(prediction_path)
    what = f"test case {n} ({prediction_path.name} for {volume_path.name})"
    _check_grid(what, prediction, volume)
    labels = np.asanyarray(prediction.dataobj)
    _check_labels(what, labels)
    header = volume.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    # The affine equals the header's own, so nibabel keeps the header's qform and sform (codes included) untouched.
    return nib.Nifti1Image(labels.astype(np.uint8), volume.affine, header)


def _validate_archive(archive_path: Path, test_volumes: dict[int, Path], progress: bool) -> None:
    """Re-open the written archive and check it as the server would read it."""
    expected = {submission_member_name(n): n for n in test_volumes}
    with zipfile.ZipFile(archive_path) as archive:
        names = set(archive.namelist())
        if names != expected.keys():
            missing, extra = sorted(expected.keys() - names), sorted(names - expected.keys())
            raise ValueError(f"{archive_path}: archive members are wrong (missing: {missing}, unexpected: {extra})")
        for name in tqdm(sorted(names), desc="validating", unit="case", disable=not progress):
            member = nib.Nifti1Image.from_bytes(archive.read(name))
            what = f"archive member {name}"
            _check_grid(what, member, nib.load(test_volumes[expected[name]]))
            _check_labels(what, np.asanyarray(member.dataobj))
