"""The QC report (``nnyseg report``) and the three-view overlay it embeds.

The report tests run on a micro phantom with three test cases and hand-made predictions whose ranking is known:
case_0002 misses its tumour (tumour Dice 0), case_0003 has no tumour anywhere and a shifted liver (ranked by liver
Dice, between 0 and 1), case_0001 is perfect (tumour Dice 1).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk

from nnyseg.evaluation.metrics import evaluate_folders
from nnyseg.evaluation.overlay import (
    CT_WINDOW,
    VIEWS,
    intensity_window,
    overlay_centre,
    render_overlay,
    save_overlay,
    to_lps,
    view_aspects,
    view_slices,
)
from nnyseg.evaluation.report import sort_score, worst_first, write_report
from tests.conftest import write_image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED_ORDER = ["case_0002", "case_0003", "case_0001"]


def _write_like(reference: Path, array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(sitk.ReadImage(str(reference)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)


@pytest.fixture(scope="module")
def qc(tmp_path_factory) -> dict[str, Path]:
    """Folders of images, ground truth, predictions and a fake nnU-Net results folder with two folds."""
    from nnyseg.data.phantom import write_nnunet_dataset

    root = tmp_path_factory.mktemp("qc")
    dataset = write_nnunet_dataset(root / "raw", 990, "QC", num_training=1, num_test=3, preset="micro", progress=False)
    gt, pred = root / "gt", root / "pred"
    for case in ("case_0001", "case_0002", "case_0003"):
        source = dataset / "labelsTs" / f"{case}.nii.gz"
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(source)))
        assert (label == 2).any(), "the phantom should give every case a tumour"
        truth, prediction = label.copy(), label.copy()
        if case == "case_0002":
            prediction[prediction == 2] = 1
        if case == "case_0003":
            truth[truth == 2] = 1
            prediction = np.roll(truth, 3, axis=2)
        _write_like(source, truth, gt / f"{case}.nii.gz")
        _write_like(source, prediction, pred / f"{case}.nii.gz")
    (pred / "plans.json").write_text("{}", encoding="utf-8")  # nnU-Net's companions of the predictions must be ignored
    results = root / "results" / "nnysegTrainer__nnysegBaselinePlans__3d_fullres_tiny"
    for fold in (0, 1):
        (results / f"fold_{fold}").mkdir(parents=True)
        matplotlib.image.imsave(results / f"fold_{fold}" / "progress.png", np.full((4, 6), fold, float))
    return {"images": dataset / "imagesTs", "gt": gt, "pred": pred, "results": results, "root": root}


@pytest.fixture(scope="module")
def report(qc) -> Path:
    return write_report(
        qc["images"],
        qc["gt"],
        qc["pred"],
        qc["root"] / "report",
        results=qc["results"],
        title="QC <liver> & tumour",
        progress=False,
    )


def _ids_in_page_order(page: str) -> list[str]:
    return re.findall(r'<section id="case-\d+">\n<h3>\d+\. (case_\d+)</h3>', page)


# --- the report ---------------------------------------------------------------------------------------------------


def test_report_lists_every_case_worst_first(qc, report):
    page = report.read_text(encoding="utf-8")
    assert report == qc["root"] / "report" / "index.html"
    result = evaluate_folders(qc["gt"], qc["pred"], progress=False)
    assert _ids_in_page_order(page) == EXPECTED_ORDER
    scores = [sort_score(result["per_case"][case]) for case in EXPECTED_ORDER]
    assert scores[0] == ("tumour", 0.0)
    assert scores[1][0] == "liver" and 0.0 < scores[1][1] < 1.0
    assert scores[2] == ("tumour", 1.0)
    assert "sorted worst first by tumour Dice" in page


def test_report_is_self_contained(report):
    page = report.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3 + 2  # three overlays, two training curves
    references = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert references and not [r for r in references if r.startswith(("http://", "https://", "//"))]
    assert "<link" not in page and "<script" not in page
    assert "<title>QC &lt;liver&gt; &amp; tumour</title>" in page  # the user's title is escaped


def test_report_summary_matches_evaluate_folders(qc, report):
    page = report.read_text(encoding="utf-8")
    result = evaluate_folders(qc["gt"], qc["pred"], progress=False)
    for region in ("liver", "tumour"):
        dice = result["mean"][region]["dice"]
        assert f"{dice['mean']:.3f} ± {dice['sd']:.3f} (n = {dice['n']})" in page
        assert f"<td>{result['global'][region]['dice']:.3f}</td>" in page
    lesions = result["lesions"]
    row = "".join(f"<td>{lesions[k]}</td>" for k in ("tp", "fp", "fn"))
    row += "".join(f"<td>{lesions[k]:.3f}</td>" for k in ("precision", "recall", "f1"))
    assert f"<tr><td>tumour lesions</td>{row}</tr>" in page
    assert json.loads((report.parent / "metrics.json").read_text(encoding="utf-8"))["per_case"] == result["per_case"]


def test_report_writes_overlays_and_training_curves(qc, report):
    folder = report.parent
    page = report.read_text(encoding="utf-8")
    for case in EXPECTED_ORDER:
        assert (folder / "images" / f"{case}.png").read_bytes().startswith(PNG_SIGNATURE)
        assert f'href="images/{case}.png"' in page
    for fold in ("fold_0", "fold_1"):
        copied = folder / "training" / f"{fold}.png"
        assert copied.read_bytes() == (qc["results"] / fold / "progress.png").read_bytes()
        assert f'href="training/{fold}.png"' in page
    assert "Training curves" in page


def test_report_reuses_a_metrics_file(qc, report, tmp_path):
    reused = write_report(
        qc["images"], qc["gt"], qc["pred"], tmp_path / "again", metrics=report.parent / "metrics.json", progress=False
    )
    assert _ids_in_page_order(reused.read_text(encoding="utf-8")) == EXPECTED_ORDER
    partial = json.loads((report.parent / "metrics.json").read_text(encoding="utf-8"))
    del partial["per_case"]["case_0003"]
    (tmp_path / "partial.json").write_text(json.dumps(partial), encoding="utf-8")
    with pytest.raises(ValueError, match=r"no metrics for predicted case\(s\) \['case_0003'\]"):
        write_report(qc["images"], qc["gt"], qc["pred"], tmp_path / "x", metrics=tmp_path / "partial.json")


def test_report_refuses_bad_input(qc, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(qc["images"], images)
    (images / "case_0003_0000.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"case case_0003: no image case_0003_0000\.nii\.gz"):
        write_report(images, qc["gt"], qc["pred"], tmp_path / "r1", progress=False)

    curves = tmp_path / "results"
    (curves / "fold_0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no fold_\*/progress\.png"):
        write_report(qc["images"], qc["gt"], qc["pred"], tmp_path / "r2", results=curves, progress=False)

    other_grid = tmp_path / "gt"
    shutil.copytree(qc["gt"], other_grid)
    write_image(other_grid / "case_0001.nii.gz", np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="case case_0001: label and image grids differ"):
        write_report(qc["images"], other_grid, qc["pred"], tmp_path / "r3", progress=False)
    assert not any(p.name.startswith(("r1", "r2", "r3", ".r")) for p in tmp_path.iterdir())


def test_report_overwrite(qc, tmp_path):
    output = tmp_path / "report"
    output.mkdir()
    (output / "old.txt").write_text("earlier report", encoding="utf-8")
    with pytest.raises(FileExistsError, match="already exists"):
        write_report(qc["images"], qc["gt"], qc["pred"], output, progress=False)
    assert (output / "old.txt").exists()
    write_report(qc["images"], qc["gt"], qc["pred"], output, overwrite=True, progress=False)
    assert not (output / "old.txt").exists() and (output / "index.html").is_file()


def test_worst_first_rule_on_hand_made_metrics():
    def case(liver, tumour, tumour_gt_ml=0.0, tumour_pred_ml=0.0):
        tumour_metrics = {"dice": tumour, "gt_volume_ml": tumour_gt_ml, "pred_volume_ml": tumour_pred_ml}
        return {"liver": {"dice": liver}, "tumour": tumour_metrics}

    per_case = {
        "a": case(0.2, 1.0),  # no tumour anywhere: liver Dice 0.2 counts, not the "both empty" tumour Dice of 1
        "b": case(0.9, 0.0, tumour_pred_ml=3.0),  # a false-positive tumour: tumour Dice 0
        "c": case(0.9, 0.5, tumour_gt_ml=2.0),
        "d": case(None, None),  # undefined: first
        "e": case(0.9, 0.5, tumour_gt_ml=4.0, tumour_pred_ml=1.0),  # tie with c: by case id
    }
    assert worst_first(list(per_case), per_case) == ["d", "b", "a", "c", "e"]


def test_cli_report(qc, tmp_path):
    def nnyseg(*args):
        exe = shutil.which("nnyseg")
        cmd = [exe, *args] if exe else [sys.executable, "-m", "nnyseg.cli", *args]
        return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", timeout=120)

    folders = ["--images", str(qc["images"]), "--gt", str(qc["gt"]), "--pred", str(qc["pred"])]
    done = nnyseg("report", *folders, str(tmp_path / "cli"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cli" / "index.html").is_file()
    failed = nnyseg("report", *folders, str(tmp_path / "bad"), "--results", str(tmp_path / "missing"))
    assert failed.returncode == 2
    assert "nnyseg report: error:" in failed.stderr and "no such results folder" in failed.stderr


# --- the overlay ----------------------------------------------------------------------------------------------------


def test_overlay_centre_is_in_the_largest_tumour():
    label = np.zeros((20, 30, 30), np.uint8)
    label[2:18, 3:27, 3:27] = 1
    label[4:7, 5:8, 5:8] = 2  # small tumour, 27 voxels
    label[9:16, 14:24, 12:20] = 2  # large tumour, 560 voxels
    big = np.zeros(label.shape, bool)
    big[9:16, 14:24, 12:20] = True
    centre, source = overlay_centre(label, np.zeros_like(label))
    assert source == "largest ground-truth tumour"
    assert centre == (12, 18, 16)  # rounded centre of mass of the large box
    z, y, x = centre
    assert big[z].any() and big[:, y].any() and big[:, :, x].any()


def test_overlay_centre_fallbacks():
    label = np.zeros((10, 12, 12), np.uint8)
    prediction = label.copy()
    assert overlay_centre(label, prediction) == ((5, 6, 6), "volume centre")
    prediction[1:4, 1:4, 1:4] = 1
    assert overlay_centre(label, prediction) == ((2, 2, 2), "largest predicted liver")
    label[5:10, 6:12, 6:12] = 1
    assert overlay_centre(label, prediction) == ((7, 8, 8), "largest ground-truth liver")  # 7.0, 8.5->8, 8.5->8
    prediction[2, 2, 2] = 2
    assert overlay_centre(label, prediction) == ((2, 2, 2), "largest predicted tumour")


def test_intensity_window():
    ct = np.linspace(-1024, 1500, 1000)
    assert intensity_window(ct) == CT_WINDOW
    mri = np.arange(100, dtype=float)
    assert intensity_window(mri) == pytest.approx((0.99, 98.01))  # numpy's linear-interpolated percentiles
    assert intensity_window(np.zeros(10)) == (0.0, 1.0)


def test_views_put_the_head_up_whatever_the_direction(tmp_path):
    # A z-reversed file: index 0 is the most superior slice. A marker there must end up in row 0 after reorienting.
    array = np.zeros((6, 5, 4), np.uint8)
    array[0, 1, 2] = 2
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 2.0, 5.0))
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    lps = to_lps(image)
    assert lps.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    views = view_slices(sitk.GetArrayFromImage(lps), (5, 1, 2))
    assert views["coronal"][0, 2] == 2 and views["sagittal"][0, 1] == 2
    assert views["axial"].shape == (5, 4) and views["coronal"].shape == (6, 4) and views["sagittal"].shape == (6, 5)
    assert view_aspects(lps.GetSpacing()) == {"axial": 2.0, "coronal": 5.0, "sagittal": 2.5}


def test_render_overlay_three_views_anisotropic_and_without_tumour(tmp_path):
    label = np.zeros((8, 32, 32), np.uint8)
    label[2:7, 8:25, 6:21] = 1
    image = np.where(label > 0, 60, -1000).astype(np.int16)
    spacing = (0.8, 0.8, 4.0)
    write_image(tmp_path / "img.nii.gz", image, spacing=spacing)
    write_image(tmp_path / "gt.nii.gz", label, spacing=spacing)
    write_image(tmp_path / "pred.nii.gz", label, spacing=spacing)
    overlay = render_overlay(tmp_path / "img.nii.gz", tmp_path / "gt.nii.gz", tmp_path / "pred.nii.gz")
    assert overlay.views == VIEWS == ("axial", "coronal", "sagittal")
    assert overlay.centre_source == "largest ground-truth liver" and overlay.centre == (4, 16, 13)
    assert overlay.window == CT_WINDOW
    (tmp_path / "overlay.png").write_bytes(overlay.png)
    pixels = matplotlib.image.imread(tmp_path / "overlay.png")
    assert pixels.shape[:2] == (768, 720)  # 9 x 9.6 inches at 80 dpi: three rows of panels


def test_save_overlay_writes_png_and_checks_grids(tmp_path):
    label = np.zeros((6, 20, 20), np.uint8)
    label[1:5, 4:16, 4:16] = 1
    label[2:4, 8:11, 8:11] = 2
    write_image(tmp_path / "img.nii.gz", (100.0 * (label > 0)).astype(np.int16))
    write_image(tmp_path / "gt.nii.gz", label)
    write_image(tmp_path / "pred.nii.gz", (label > 0).astype(np.uint8))
    png = save_overlay(tmp_path / "img.nii.gz", tmp_path / "gt.nii.gz", tmp_path / "pred.nii.gz", tmp_path / "o.png")
    assert png == tmp_path / "o.png" and png.read_bytes().startswith(PNG_SIGNATURE)
    write_image(tmp_path / "bad.nii.gz", label[:, :, :10])
    with pytest.raises(ValueError, match=r"cannot overlay: bad\.nii\.gz: size"):
        save_overlay(tmp_path / "img.nii.gz", tmp_path / "bad.nii.gz", tmp_path / "pred.nii.gz", tmp_path / "x.png")
