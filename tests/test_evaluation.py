"""Folder evaluation (``nnyseg evaluate``): NIfTI files in, metrics.json / per_case.csv / summary.md out; global
against mean Dice by hand; every kind of bad input named in its error; the command in a subprocess. Also the
overlay PNG."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnyseg.evaluation.metrics import METRICS, REGIONS, evaluate_case, evaluate_folders, format_summary, write_outputs
from nnyseg.evaluation.overlay import save_overlay
from tests.conftest import REAL_DATA, REPO, write_image

SPACING_XYZ = (0.8, 0.7, 3.0)  # anisotropic; SimpleITK order


def _label(shape=(6, 16, 16), liver=None, tumours=()) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    if liver is not None:
        label[liver] = 1
    for tumour in tumours:
        label[tumour] = 2
    return label


def _write_pair(root, case, gt, pred, ending=".nii.gz", spacing=SPACING_XYZ):
    write_image(root / "gt" / f"{case}{ending}", gt, spacing=spacing)
    write_image(root / "pred" / f"{case}{ending}", pred, spacing=spacing)


def _example_folders(root) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three predicted cases (one of them .nii) and one ground truth without prediction; returns the arrays."""
    liver = np.s_[1:5, 2:12, 3:13]
    cases = {
        "case_a": (
            _label(liver=liver, tumours=[np.s_[2:4, 4:7, 4:7], np.s_[3, 10, 10]]),
            _label(liver=np.s_[1:5, 3:12, 3:14], tumours=[np.s_[2:4, 4:7, 5:8]]),
        ),
        "case_b": (_label(liver=liver), _label(liver=liver, tumours=[np.s_[2, 5, 5]])),
        "case_c": (_label(), _label()),
    }
    for case, (gt, pred) in cases.items():
        _write_pair(root, case, gt, pred, ending=".nii" if case == "case_b" else ".nii.gz")
    write_image(root / "gt" / "case_d.nii.gz", _label(liver=liver), spacing=SPACING_XYZ)
    # nnU-Net writes these beside its predictions; they are not cases.
    (root / "pred" / "plans.json").write_text("{}", encoding="utf-8")
    (root / "pred" / "dataset.json").write_text("{}", encoding="utf-8")
    return cases


def test_folders_equal_evaluate_case_on_the_arrays(tmp_path):
    cases = _example_folders(tmp_path)
    result = evaluate_folders(tmp_path / "gt", tmp_path / "pred", progress=False)
    assert result["cases"] == ["case_a", "case_b", "case_c"]
    assert result["num_cases"] == 3
    assert result["gt_without_prediction"] == ["case_d"]
    assert result["regions"] == {"liver": [1, 2], "tumour": [2]}
    spacing_zyx = tuple(reversed(SPACING_XYZ))
    for case, (gt, pred) in cases.items():
        expected = evaluate_case(gt, pred, spacing_zyx)
        assert result["per_case"][case].keys() == expected.keys()
        for section, values in expected.items():  # NIfTI stores the spacing as float32: approx, not ==
            assert result["per_case"][case][section] == pytest.approx(values), (case, section)
    # The surface distances used the file's spacing: case_a's liver is one 0.8 mm column wider at x and one 0.7 mm
    # row shorter at y, so its largest surface distance is one of those steps.
    assert result["per_case"]["case_a"]["liver"]["msd_mm"] == pytest.approx(0.8)
    lesions = result["lesions"]  # case_a: 1 TP, 1 FN; case_b: 1 FP; case_c: nothing
    assert (lesions["tp"], lesions["fp"], lesions["fn"]) == (1, 1, 1)
    assert lesions["precision"] == lesions["recall"] == lesions["f1"] == 0.5
    json.dumps(result, allow_nan=False)


def test_global_dice_differs_from_mean_dice(tmp_path):
    # case 1: 8 tumour voxels, all missed (Dice 0). case 2: one tumour voxel, found (Dice 1).
    # mean Dice (0 + 1) / 2 = 0.5; global Dice 2 * (0 + 1) / ((8 + 0) + (1 + 1)) = 0.2.
    gt1 = _label(liver=np.s_[1:5, 2:12, 2:12], tumours=[np.s_[2:4, 4:6, 4:6]])
    pred1 = _label(liver=np.s_[1:5, 2:12, 2:12])
    gt2 = _label(liver=np.s_[1:5, 2:12, 2:12], tumours=[np.s_[3, 6, 6]])
    _write_pair(tmp_path, "one", gt1, pred1)
    _write_pair(tmp_path, "two", gt2, gt2)
    result = evaluate_folders(tmp_path / "gt", tmp_path / "pred", progress=False)
    dice = result["mean"]["tumour"]["dice"]
    assert dice["mean"] == pytest.approx(0.5)
    assert dice["sd"] == pytest.approx(np.sqrt(0.5))  # sample SD of {0, 1}
    assert dice["n"] == 2
    assert result["global"]["tumour"]["dice"] == pytest.approx(0.2)
    assert result["global"]["tumour"]["voe"] == pytest.approx(1 - 1 / 9)
    assert result["global"]["tumour"]["rvd"] == pytest.approx((1 - 9) / 9)
    # RVD is undefined for neither case here, but surface distances are for case 1 (prediction empty): n = 1.
    assert result["mean"]["tumour"]["assd_mm"] == {"mean": 0.0, "sd": None, "n": 1}
    assert result["global"]["liver"] == {"dice": 1.0, "voe": 0.0, "rvd": 0.0}


def test_parallel_evaluation_equals_serial(tmp_path):
    _example_folders(tmp_path)
    serial = evaluate_folders(tmp_path / "gt", tmp_path / "pred", progress=False)
    parallel = evaluate_folders(tmp_path / "gt", tmp_path / "pred", num_processes=2, progress=False)
    assert parallel == serial


def test_outputs(tmp_path):
    _example_folders(tmp_path)
    result = evaluate_folders(tmp_path / "gt", tmp_path / "pred", progress=False)
    written = write_outputs(result, tmp_path / "out")
    assert [p.name for p in written] == ["metrics.json", "per_case.csv", "summary.md"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "per_case.csv", "summary.md"]

    def no_nan(token):
        raise AssertionError(f"metrics.json holds {token}")

    assert json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"), parse_constant=no_nan) == result

    with open(tmp_path / "out" / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["case"] for row in rows] == ["case_a", "case_b", "case_c"]
    for row in rows:
        for region in REGIONS:
            for metric in (*METRICS, "gt_volume_ml", "pred_volume_ml"):
                value = result["per_case"][row["case"]][region][metric]
                cell = row[f"{region}_{metric}"]
                assert cell == "" if value is None else float(cell) == value
    assert rows[0]["lesions_tp"] == "1" and rows[0]["lesions_fn"] == "1"
    assert rows[1]["tumour_rvd"] == ""  # no true tumour in case_b: RVD undefined

    summary = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    liver_dice = result["mean"]["liver"]["dice"]
    assert f"| dice | {liver_dice['mean']:.4f} | {liver_dice['sd']:.4f} | 3 |" in summary
    assert "case_d" in summary  # the ground truth without prediction is reported
    assert "over-segmentation" in summary  # the RVD sign convention

    terminal = format_summary(result)
    assert f"{result['global']['tumour']['dice']:.4f}" in terminal
    assert all(case in terminal for case in result["cases"])


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing gt folder", r"gt: ground-truth folder does not exist"),
        ("empty prediction folder", r"pred: no prediction label files"),
        ("prediction without ground truth", r"no ground truth .* for prediction\(s\) extra\.nii\.gz"),
        ("spacing differs", r"pred/a\.nii\.gz: grid differs .*spacing"),
        ("shape differs", r"pred/a\.nii\.gz: grid differs .*size"),
        ("label value 3", r"pred/a\.nii\.gz: label values outside \{0, 1, 2\}: 3"),
        ("unreadable file", r"pred/a\.nii\.gz: cannot read"),
        ("same case twice", r"pred/a\.nii(\.gz)?: case 'a' has two files"),
    ],
)
def test_bad_input_names_the_file(tmp_path, problem, message):
    label = _label(liver=np.s_[1:5, 2:12, 2:12])
    _write_pair(tmp_path, "a", label, label)
    pred = tmp_path / "pred" / "a.nii.gz"
    if problem == "missing gt folder":
        for f in (tmp_path / "gt").iterdir():
            f.unlink()
        (tmp_path / "gt").rmdir()
    elif problem == "empty prediction folder":
        pred.unlink()
        (tmp_path / "pred" / "plans.json").write_text("{}", encoding="utf-8")
    elif problem == "prediction without ground truth":
        write_image(tmp_path / "pred" / "extra.nii.gz", label, spacing=SPACING_XYZ)
    elif problem == "spacing differs":
        write_image(pred, label, spacing=(0.8, 0.7, 2.5))
    elif problem == "shape differs":
        write_image(pred, label[:, :, :10], spacing=SPACING_XYZ)
    elif problem == "label value 3":
        write_image(pred, np.where(label == 1, 3, 0).astype(np.uint8), spacing=SPACING_XYZ)
    elif problem == "unreadable file":
        pred.write_bytes(b"not an image")
    elif problem == "same case twice":
        write_image(tmp_path / "pred" / "a.nii", label, spacing=SPACING_XYZ)
    with pytest.raises(ValueError, match=message):
        evaluate_folders(tmp_path / "gt", tmp_path / "pred", progress=False)


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA.exists(), reason="needs ../shared/data/totalsegmentator_examples")
def test_real_liver_against_its_erosion(tmp_path):
    # TotalSegmentator's liver (label 5; 3 mm voxels, flipped direction) against itself minus its surface voxels.
    # Every surface voxel of the eroded liver has a face neighbour on the liver's surface, 3 mm away, and no
    # distance can be smaller, so the smallest distance is 3 mm and precision is 1.
    seg = sitk.ReadImage(str(REAL_DATA / "example_seg.nii.gz"))
    liver = sitk.GetArrayFromImage(seg) == 5
    eroded = ndimage.binary_erosion(liver, ndimage.generate_binary_structure(3, 1))
    for folder, mask in (("gt", liver), ("pred", eroded)):
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.CopyInformation(seg)
        (tmp_path / folder).mkdir()
        sitk.WriteImage(image, str(tmp_path / folder / "example.nii.gz"))
    m = evaluate_folders(tmp_path / "gt", tmp_path / "pred", progress=False)["per_case"]["example"]["liver"]
    assert m["precision"] == 1.0
    assert m["recall"] == pytest.approx(eroded.sum() / liver.sum())
    assert m["rvd"] == pytest.approx(eroded.sum() / liver.sum() - 1) and m["rvd"] < 0
    assert 3.0 <= m["hd95_mm"] <= m["msd_mm"]
    assert m["assd_mm"] >= 3.0


def _nnyseg(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "nnyseg.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=120, cwd=REPO)


def test_cli(tmp_path):
    _example_folders(tmp_path)
    out = tmp_path / "metrics"
    done = _nnyseg("evaluate", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "per_case.csv", "summary.md"]
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["num_cases"] == 3
    assert "global" in done.stdout and "case_a" in done.stdout

    write_image(tmp_path / "pred" / "case_a.nii.gz", _label()[:, :4], spacing=SPACING_XYZ)
    failed = _nnyseg("evaluate", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"))
    assert failed.returncode == 2
    assert "nnyseg evaluate: error:" in failed.stderr and "case_a.nii.gz: grid differs" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_overlay_png(tmp_path):
    label = np.zeros((6, 20, 20), np.uint8)
    label[1:5, 4:16, 4:16] = 1
    label[2:4, 8:11, 8:11] = 2
    image = (100.0 * (label > 0) - 40.0 * (label == 2)).astype(np.int16)
    write_image(tmp_path / "img.nii.gz", image)
    write_image(tmp_path / "gt.nii.gz", label)
    write_image(tmp_path / "pred.nii.gz", (label > 0).astype(np.uint8))
    png = save_overlay(
        tmp_path / "img.nii.gz", tmp_path / "gt.nii.gz", tmp_path / "pred.nii.gz", tmp_path / "out" / "overlay.png"
    )
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    write_image(tmp_path / "bad.nii.gz", label[:, :, :10])
    with pytest.raises(ValueError, match="cannot overlay"):
        save_overlay(tmp_path / "img.nii.gz", tmp_path / "bad.nii.gz", tmp_path / "pred.nii.gz", tmp_path / "x.png")
