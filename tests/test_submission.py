"""Tests of nnyseg.evaluation.submission: predictions -> validated LiTS leaderboard archive.

The "test volumes" are micro phantom cases written as uncompressed ``test-volume-N.nii``, with identity, flipped and
oblique directions; the "predictions" are their phantom labels, written as nnU-Net writes them (SimpleITK, the
converted image's geometry, ``lits_test_NNN.nii.gz``).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from nnyseg.data.phantom import make_case
from nnyseg.evaluation.submission import export_submission
from tests.conftest import tree_digest

CASES = {0: ("identity", 20), 7: ("flipped", 21), 12: ("oblique", 22)}  # N -> (direction, phantom seed)


@pytest.fixture
def lits_test(tmp_path) -> tuple[Path, Path, dict[int, np.ndarray]]:
    """(test volumes folder, predictions folder, N -> expected label array (z, y, x))."""
    volumes, predictions = tmp_path / "LiTS" / "Test Data", tmp_path / "predictions"
    volumes.mkdir(parents=True)
    predictions.mkdir()
    labels = {}
    for n, (direction, seed) in CASES.items():
        image, label = make_case(seed, "micro", direction=direction).to_sitk()
        sitk.WriteImage(image, str(volumes / f"test-volume-{n}.nii"))
        sitk.WriteImage(label, str(predictions / f"lits_test_{n:03d}.nii.gz"))
        labels[n] = sitk.GetArrayFromImage(label)
    for name in ("dataset.json", "plans.json", "predict_from_raw_data_args.json"):  # what nnU-Net leaves beside
        (predictions / name).write_text("{}\n", encoding="utf-8")
    return volumes, predictions, labels


def _members(archive: Path) -> dict[str, nib.Nifti1Image]:
    with zipfile.ZipFile(archive) as zf:
        return {name: nib.Nifti1Image.from_bytes(zf.read(name)) for name in zf.namelist()}


def test_round_trip_gives_the_labels_on_the_test_volume_header(lits_test, tmp_path):
    volumes, predictions, labels = lits_test
    before = tree_digest(tmp_path / "LiTS") | tree_digest(predictions)
    out = export_submission(predictions, tmp_path / "submission.zip", volumes, progress=False)

    assert out == tmp_path / "submission.zip"
    assert tree_digest(tmp_path / "LiTS") | tree_digest(predictions) == before
    with zipfile.ZipFile(out) as zf:
        infos = {info.filename: info for info in zf.infolist()}
    assert sorted(infos) == ["test-segmentation-0.nii", "test-segmentation-12.nii", "test-segmentation-7.nii"]
    assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in infos.values())

    for name, member in _members(out).items():
        n = int(name.removeprefix("test-segmentation-").removesuffix(".nii"))
        volume = nib.load(volumes / f"test-volume-{n}.nii")
        header, reference = member.header, volume.header
        assert header.get_data_dtype() == np.uint8
        assert header.get_slope_inter() in ((1.0, 0.0), (None, None))
        np.testing.assert_array_equal(header["pixdim"], reference["pixdim"])
        for get in ("get_qform", "get_sform"):
            affine, code = getattr(header, get)(coded=True)
            ref_affine, ref_code = getattr(reference, get)(coded=True)
            assert code == ref_code, (name, get)
            np.testing.assert_array_equal(affine, ref_affine)
        assert header["xyzt_units"] == reference["xyzt_units"]
        # nibabel holds (x, y, z); SimpleITK arrays are (z, y, x).
        np.testing.assert_array_equal(np.asarray(member.dataobj).transpose(2, 1, 0), labels[n])

    # SimpleITK reads the member on the test volume's exact grid too.
    with zipfile.ZipFile(out) as zf:
        zf.extract("test-segmentation-12.nii", tmp_path / "unzipped")
    member = sitk.ReadImage(str(tmp_path / "unzipped" / "test-segmentation-12.nii"))
    volume = sitk.ReadImage(str(volumes / "test-volume-12.nii"))
    assert member.GetSize() == volume.GetSize()
    np.testing.assert_allclose(member.GetDirection(), volume.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(member.GetOrigin(), volume.GetOrigin(), atol=1e-4)


def test_test_volume_style_names_are_accepted(lits_test, tmp_path):
    volumes, predictions, labels = lits_test
    for n in CASES:
        (predictions / f"lits_test_{n:03d}.nii.gz").rename(predictions / f"test-volume-{n}.nii.gz")
    out = export_submission(predictions, tmp_path / "submission.zip", volumes, progress=False)
    member = _members(out)["test-segmentation-7.nii"]
    np.testing.assert_array_equal(np.asarray(member.dataobj).transpose(2, 1, 0), labels[7])


def _rewrite(path: Path, change) -> None:
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(change(image), str(path))


def _shift(image: sitk.Image) -> sitk.Image:
    image.SetOrigin(tuple(v + 0.5 for v in image.GetOrigin()))
    return image


def _paint_3(image: sitk.Image) -> sitk.Image:
    image[3, 4, 5] = 3
    return image


@pytest.mark.parametrize(
    ("break_predictions", "expected"),
    [
        (lambda p: (p / "lits_test_007.nii.gz").unlink(), r"no prediction for test volume\(s\) 7"),
        (
            lambda p: _rewrite(p / "lits_test_012.nii.gz", _shift),
            r"test case 12 \(lits_test_012.nii.gz for test-volume-12.nii\): not on the test volume's grid "
            r"\(affines differ by up to 0.5 mm\)",
        ),
        (
            lambda p: _rewrite(p / "lits_test_000.nii.gz", lambda im: im[:, :, :-2]),
            r"test case 0 \(lits_test_000.nii.gz for test-volume-0.nii\): shape \(48, 40, 22\) differs from the "
            r"test volume's \(48, 40, 24\)",
        ),
        (
            lambda p: _rewrite(p / "lits_test_007.nii.gz", _paint_3),
            r"test case 7 \(lits_test_007.nii.gz .*\): label values 3 found; only 0 \(background\), 1 \(liver\)",
        ),
        (
            lambda p: (p / "lits_007.nii.gz").write_bytes((p / "lits_test_007.nii.gz").read_bytes()),
            r"test volume 7 has several predictions: lits_007.nii.gz, lits_test_007.nii.gz",
        ),
        (
            lambda p: (p / "lits_test_099.nii.gz").write_bytes((p / "lits_test_007.nii.gz").read_bytes()),
            r"prediction\(s\) without a test volume in the test-volumes folder: lits_test_099.nii.gz",
        ),
    ],
    ids=["missing", "wrong-origin", "wrong-shape", "label-3", "ambiguous", "unexpected"],
)
def test_bad_predictions_give_errors_and_no_archive(lits_test, tmp_path, break_predictions, expected):
    volumes, predictions, _ = lits_test
    break_predictions(predictions)
    with pytest.raises(ValueError, match=expected):
        export_submission(predictions, tmp_path / "out" / "submission.zip", volumes, progress=False)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_existing_archive_and_missing_folders(lits_test, tmp_path):
    volumes, predictions, _ = lits_test
    out = tmp_path / "submission.zip"
    out.write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"submission\.zip: already exists"):
        export_submission(predictions, out, volumes, progress=False)
    assert out.read_bytes() == b"old"
    export_submission(predictions, out, volumes, overwrite=True, progress=False)
    assert len(_members(out)) == 3

    with pytest.raises(FileNotFoundError, match="no such folder"):
        export_submission(tmp_path / "missing", tmp_path / "x.zip", volumes, progress=False)
    with pytest.raises(ValueError, match="no LiTS test volumes"):
        export_submission(predictions, tmp_path / "x.zip", predictions, progress=False)
    with pytest.raises(ValueError, match=r"must be a \.zip file"):
        export_submission(predictions, tmp_path / "x.tar", volumes, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LiTS", "predictions", "submission.zip"]


def test_cli_export_submission(lits_test, tmp_path):
    volumes, predictions, _ = lits_test
    out = tmp_path / "submission.zip"
    command = [sys.executable, "-m", "nnyseg.cli", "export-submission", str(predictions), str(out)]
    result = subprocess.run([*command, "--test-volumes", str(volumes)], capture_output=True, encoding="utf-8")
    assert result.returncode == 0, result.stderr
    assert f"submission archive written and validated: {out}" in result.stdout
    assert len(_members(out)) == 3

    (predictions / "lits_test_012.nii.gz").unlink()
    result = subprocess.run(
        [*command, "--test-volumes", str(volumes), "--overwrite"], capture_output=True, encoding="utf-8"
    )
    assert result.returncode == 2
    assert "nnyseg export-submission: error:" in result.stderr
    assert "no prediction for test volume(s) 12" in result.stderr
    assert len(_members(out)) == 3  # the old archive is kept
