"""Tumour burden without ground truth (``nnyseg stats``, :mod:`nnyseg.evaluation.burden`) on shapes with known answers.

Definitions under test (module docstring of :mod:`nnyseg.evaluation.burden`): diameters are measured between voxel
centres in the axial slice plane, in mm from the spacing and direction. For a digitised ellipse with semi-axes a > b
the longest diameter therefore lies in [2a - 2d, 2a], d the in-plane voxel diagonal (every voxel centre lies inside
the ellipse; near each end of the major axis there is a voxel centre within d of the tip), and the perpendicular one
within 2d of 2b. Volumes of digitised ellipsoids are compared within 2 %.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnyseg import cli
from nnyseg.evaluation.burden import (
    LESION_COLUMNS,
    axial_axis,
    axial_diameters,
    lesions_csv,
    measure_burden,
    write_stats_folder,
)
from nnyseg.evaluation.report import write_report


def _rotation_z(degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    return np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])


def _image(shape_ijk, spacing, direction: np.ndarray, origin=(10.0, -20.0, 30.0)) -> sitk.Image:
    image = sitk.Image([int(n) for n in shape_ijk], sitk.sitkUInt8)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin(origin)
    return image


def _physical_points(image: sitk.Image) -> np.ndarray:
    """(k, j, i, 3) array of every voxel centre's physical position (numpy order, like GetArrayFromImage)."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(float)
    matrix = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())[None, :]
    return index @ matrix.T + np.asarray(image.GetOrigin())


def _with_labels(reference: sitk.Image, labels: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.CopyInformation(reference)
    return image


# Two grids: a flipped, rotated axial one, and a "coronal" acquisition whose j axis runs head-foot (slice axis 1).
_COS, _SIN = math.cos(math.radians(20)), math.sin(math.radians(20))
GRIDS = {
    "axial_rotated_flipped": (
        (70, 64, 26),
        (0.7, 0.9, 2.5),
        _rotation_z(20) @ np.diag([-1.0, 1.0, 1.0]),
        2,
    ),
    "coronal_slices": (
        (64, 24, 72),
        (0.8, 2.0, 0.6),
        np.array([[_COS, 0.0, -_SIN], [_SIN, 0.0, _COS], [0.0, 1.0, 0.0]]),
        1,
    ),
}


@pytest.mark.parametrize("grid", list(GRIDS))
def test_ellipsoid_under_anisotropic_spacing_and_direction(grid):
    size, spacing, direction, slice_axis = GRIDS[grid]
    reference = _image(size, spacing, direction)
    points = _physical_points(reference)
    centre_index = tuple(n // 2 for n in size)
    centre = np.asarray(reference.TransformIndexToPhysicalPoint(centre_index))
    a, b, c = 14.0, 8.0, 12.0  # semi-axes, mm; a in the axial plane at 35 degrees from the patient's x axis
    long_axis, short_axis = _rotation_z(35)[:, 0], _rotation_z(35)[:, 1]
    q = points - centre
    lesion = (q @ long_axis / a) ** 2 + (q @ short_axis / b) ** 2 + (q[..., 2] / c) ** 2 <= 1.0
    liver = np.zeros(lesion.shape, bool)
    liver[2:-2, 2:-2, 2:-2] = True  # a box around the lesion: its volume is known exactly on the grid
    labels = np.where(lesion, 2, np.where(liver, 1, 0))
    assert not (lesion & ~liver).any()
    ct = sitk.GetImageFromArray(np.where(lesion, 40.0, 100.0).astype(np.float32))
    ct.CopyInformation(reference)

    result = measure_burden(_with_labels(reference, labels), ct)

    voxel_ml = float(np.prod(spacing)) / 1000.0
    assert result.slice_axis == slice_axis and result.axial_tilt_deg == pytest.approx(0.0, abs=1e-6)
    assert result.liver_volume_ml == pytest.approx(liver.sum() * voxel_ml, rel=1e-9)
    assert result.tumour_volume_ml == pytest.approx(4 / 3 * math.pi * a * b * c / 1000.0, rel=0.02)
    assert result.tumour_burden_percent == pytest.approx(100.0 * lesion.sum() / liver.sum(), rel=1e-9)
    assert result.lesion_count == 1 and result.excluded_components == 0
    (only,) = result.lesions
    in_plane = [s for axis, s in enumerate(spacing) if axis != slice_axis]
    d = math.hypot(*in_plane)
    assert 2 * a - 2 * d <= only.longest_axial_diameter_mm <= 2 * a + 1e-9
    assert only.perpendicular_diameter_mm == pytest.approx(2 * b, abs=2 * d)
    assert abs(only.axial_slice - centre_index[slice_axis]) <= 1
    # The digitised ellipsoid is symmetric about its centre voxel, so its centroid is that voxel's position.
    np.testing.assert_allclose(only.centroid_mm, centre, atol=1e-6)
    assert only.mean_hu == pytest.approx(40.0)
    assert only.volume_ml == pytest.approx(result.tumour_volume_ml)


def test_measurements_read_the_same_from_nifti_files(tmp_path):
    size, spacing, direction, _ = GRIDS["axial_rotated_flipped"]
    reference = _image(size, spacing, direction)
    labels = np.zeros(size[::-1], np.uint8)
    labels[5:20, 10:50, 10:60] = 1
    labels[10:14, 20:30, 15:40] = 2
    mask = _with_labels(reference, labels)
    sitk.WriteImage(mask, str(tmp_path / "case.nii.gz"))
    in_memory, from_file = measure_burden(mask), measure_burden(tmp_path / "case.nii.gz")
    assert from_file.lesion_count == in_memory.lesion_count == 1
    for key in ("liver_volume_ml", "tumour_volume_ml", "tumour_burden_percent"):
        assert getattr(from_file, key) == pytest.approx(getattr(in_memory, key), rel=1e-6)
    a, b = from_file.lesions[0], in_memory.lesions[0]
    assert a.longest_axial_diameter_mm == pytest.approx(b.longest_axial_diameter_mm, abs=1e-4)
    np.testing.assert_allclose(a.centroid_mm, b.centroid_mm, atol=1e-3)
    # A box of 25 x 10 voxels in-plane: its diagonal between the corner voxel centres.
    assert b.longest_axial_diameter_mm == pytest.approx(math.hypot(24 * 0.7, 9 * 0.9))


def test_two_touching_lesions_are_one_and_a_gap_makes_two():
    reference = _image((48, 32, 24), (1.0, 1.0, 1.0), np.diag([1.0, -1.0, -1.0]))
    points = _physical_points(reference)
    c1 = np.asarray(reference.TransformIndexToPhysicalPoint((14, 16, 12)))

    def balls(gap_mm: float) -> np.ndarray:
        c2 = c1 + np.array([6.0 + 4.0 + gap_mm, 0.0, 0.0])  # radius 6 and 4 along the patient's x axis
        first = np.linalg.norm(points - c1, axis=-1) <= 6.0
        second = np.linalg.norm(points - c2, axis=-1) <= 4.0
        return np.where(first | second, 2, 0)

    touching = measure_burden(_with_labels(reference, balls(0.0)))
    assert touching.lesion_count == 1  # they share the voxel where they touch: one component
    (lesion,) = touching.lesions
    assert lesion.longest_axial_diameter_mm == pytest.approx(2 * 6.0 + 2 * 4.0)  # tip to tip, voxel centres
    assert lesion.volume_ml == pytest.approx(4 / 3 * math.pi * (6.0**3 + 4.0**3) / 1000.0, rel=0.03)
    assert touching.tumour_burden_percent == 100.0  # liver counts labels 1 and 2: here all of it is tumour

    apart = measure_burden(_with_labels(reference, balls(2.0)))
    assert apart.lesion_count == 2
    big, small = apart.lesions
    assert (big.lesion, small.lesion) == (1, 2) and big.volume_ml > small.volume_ml
    assert big.longest_axial_diameter_mm == pytest.approx(12.0) and small.longest_axial_diameter_mm == pytest.approx(
        8.0
    )
    np.testing.assert_allclose(big.centroid_mm, c1, atol=1e-9)


def test_26_connectivity_and_the_minimum_lesion_size():
    reference = _image((20, 20, 20), (2.0, 2.0, 2.0), np.eye(3))
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:5, 2:5, 2:5] = 2
    labels[5:8, 5:8, 5:8] = 2  # touches the first cube only at a corner: one lesion under 26-connectivity
    labels[15, 15, 15] = 2  # a speck of one voxel, 8 mm^3
    result = measure_burden(_with_labels(reference, labels))
    assert result.lesion_count == 2 and result.lesions[0].voxels == 54 and result.lesions[1].voxels == 1
    assert result.lesions[1].longest_axial_diameter_mm == 0.0  # one voxel centre: no distance
    filtered = measure_burden(_with_labels(reference, labels), min_lesion_mm3=10.0)
    assert filtered.lesion_count == 1 and filtered.excluded_components == 1
    assert filtered.excluded_volume_ml == pytest.approx(0.008)
    assert filtered.tumour_volume_ml == pytest.approx(55 * 0.008)  # the total still counts every tumour voxel


def test_empty_mask_and_liver_without_tumour():
    reference = _image((10, 12, 8), (1.5, 1.5, 3.0), np.eye(3))
    empty = measure_burden(_with_labels(reference, np.zeros((8, 12, 10))))
    assert (empty.liver_volume_ml, empty.tumour_volume_ml, empty.lesion_count) == (0.0, 0.0, 0)
    assert empty.tumour_burden_percent is None and empty.lesions == ()
    assert lesions_csv([("empty", empty)]) == ",".join(LESION_COLUMNS) + "\n"
    assert json.loads(json.dumps(empty.to_dict()))["lesions"] == []
    liver = np.zeros((8, 12, 10))
    liver[2:6, 3:9, 3:8] = 1
    only_liver = measure_burden(_with_labels(reference, liver))
    assert only_liver.tumour_burden_percent == 0.0
    assert only_liver.liver_volume_ml == pytest.approx(4 * 6 * 5 * 1.5 * 1.5 * 3.0 / 1000.0)


def test_axial_diameters_of_exact_point_sets():
    t = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    rotation = _rotation_z(-50)[:2, :2]
    ellipse = (rotation @ np.stack([20 * np.cos(t), 12 * np.sin(t)])).T
    assert axial_diameters(ellipse) == pytest.approx((40.0, 24.0))
    square = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), axis=-1).reshape(-1, 2)
    assert axial_diameters(square) == pytest.approx((9 * math.sqrt(2), 9 * math.sqrt(2)))
    assert axial_diameters(np.array([[0.0, 0.0], [1.0, 1.0], [3.0, 3.0]])) == pytest.approx((3 * math.sqrt(2), 0.0))
    assert axial_diameters(np.array([[5.0, 5.0]])) == (0.0, 0.0)


def test_axial_axis_and_tilt():
    assert axial_axis(np.eye(3).ravel()) == (2, 0.0)
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(0.2), -math.sin(0.2)], [0.0, math.sin(0.2), math.cos(0.2)]])
    axis, degrees = axial_axis(tilt.ravel())
    assert axis == 2 and degrees == pytest.approx(math.degrees(0.2))


def test_bad_input_is_named(tmp_path):
    reference = _image((6, 6, 6), (1.0, 1.0, 1.0), np.eye(3))
    sitk.WriteImage(_with_labels(reference, np.full((6, 6, 6), 5)), str(tmp_path / "organs.nii.gz"))
    with pytest.raises(ValueError, match=r"organs\.nii\.gz: label values 5 are not LiTS labels"):
        measure_burden(tmp_path / "organs.nii.gz")
    other = sitk.Image([6, 6, 7], sitk.sitkInt16)
    sitk.WriteImage(other, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(_with_labels(reference, np.zeros((6, 6, 6))), str(tmp_path / "mask.nii.gz"))
    with pytest.raises(ValueError, match=r"ct\.nii\.gz: not on the grid of mask"):
        measure_burden(tmp_path / "mask.nii.gz", tmp_path / "ct.nii.gz")
    with pytest.raises(ValueError, match="minimum lesion volume"):
        measure_burden(tmp_path / "mask.nii.gz", min_lesion_mm3=-1)


def _two_cases(tmp_path):
    reference = _image((30, 30, 12), (1.0, 1.0, 2.0), _rotation_z(10))
    masks, images = tmp_path / "masks", tmp_path / "images"
    masks.mkdir()
    images.mkdir()
    for case, lesions in (("a", 2), ("b", 0)):
        labels = np.zeros((12, 30, 30), np.uint8)
        labels[2:10, 3:27, 3:27] = 1
        for n in range(lesions):
            labels[4:7, 6 + 10 * n : 10 + 10 * n, 8:12] = 2
        sitk.WriteImage(_with_labels(reference, labels), str(masks / f"{case}.nii.gz"))
        ct = sitk.GetImageFromArray(np.where(labels == 2, -10, 90).astype(np.int16))
        ct.CopyInformation(reference)
        sitk.WriteImage(ct, str(images / f"{case}_0000.nii.gz"))
    return masks, images


def test_stats_command_writes_json_and_csv(tmp_path, capsys):
    masks, images = _two_cases(tmp_path)
    out = tmp_path / "stats"
    assert cli.main(["stats", str(masks), "--images", str(images), "-o", str(out)]) == 0
    document = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert set(document["cases"]) == {"a", "b"} and "longest_axial_diameter_mm" in document["conventions"]
    assert document["cases"]["a"]["lesion_count"] == 2 and document["cases"]["b"]["lesions"] == []
    with (out / "lesions.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["lesion"]) for r in rows] == [("a", "1"), ("a", "2")]
    assert all(float(r["mean_hu"]) == -10.0 for r in rows)
    assert float(rows[0]["volume_ml"]) == pytest.approx(3 * 4 * 4 * 2.0 / 1000.0)
    with (out / "cases.csv").open(encoding="utf-8") as f:
        cases = {r["case"]: r for r in csv.DictReader(f)}
    assert cases["b"]["lesion_count"] == "0" and float(cases["b"]["tumour_burden_percent"]) == 0.0
    assert cli.main(["stats", str(masks), "-o", str(out)]) == 2  # exists: refused without --overwrite
    assert "already exists" in capsys.readouterr().err
    written = write_stats_folder(masks / "a.nii.gz", out, overwrite=True)  # one file, no image: no mean HU
    single = json.loads(written.read_text(encoding="utf-8"))
    assert list(single["cases"]) == ["a"] and single["cases"]["a"]["lesions"][0]["mean_hu"] is None


def test_report_shows_the_predictions_burden(tmp_path):
    masks, images = _two_cases(tmp_path)
    index = write_report(images, masks, masks, tmp_path / "report", progress=False)
    page = index.read_text(encoding="utf-8")
    burden = measure_burden(masks / "a.nii.gz")
    assert page.count("tumour burden, prediction") == 2
    assert f"<td>tumour burden (%)</td><td>{burden.tumour_burden_percent:.3f}</td>" in page
    assert f"<td>tumour volume (ml)</td><td>{burden.tumour_volume_ml:.1f}</td>" in page
