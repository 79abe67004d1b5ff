"""Tests of nnyseg.data.convert: LiTS and ATLAS releases -> nnU-Net raw datasets, DICOM series -> NIfTI.

The fake releases are built from micro phantom cases with the real file names and folder layouts, plus the odd cases
real releases have: a case without tumour, flipped and oblique directions, uncompressed ``.nii``, float labels and a
float image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnyseg.data.convert import convert_atlas, convert_dicom, convert_lits
from nnyseg.data.phantom import make_case
from nnyseg.data.validation import DatasetError, validate_raw_dataset
from tests.conftest import REAL_DATA, tree_digest

REGION_LABELS = {"background": 0, "liver": [1, 2], "tumor": 2}


def _write_pair(image_path: Path, label_path: Path | None, seed: int, **case_options) -> tuple[sitk.Image, sitk.Image]:
    """Write a micro phantom case; returns the (image, label) as written."""
    image, label = make_case(seed, "micro", **case_options).to_sitk()
    image_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(image_path))
    if label_path is not None:
        sitk.WriteImage(label, str(label_path))
    return image, label


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _leftovers(raw_root: Path) -> list[str]:
    return sorted(p.name for p in raw_root.iterdir()) if raw_root.exists() else []


@pytest.fixture
def lits_source(tmp_path) -> Path:
    """A LiTS-like release: two training batches, a test folder, and the odd cases of the real one."""
    src = tmp_path / "LiTS"
    b1, b2, test = src / "Training Batch 1", src / "Training Batch 2", src / "Test Data"
    _write_pair(b1 / "volume-0.nii.gz", b1 / "segmentation-0.nii.gz", 0, min_tumours=2)
    _write_pair(b1 / "volume-1.nii", b1 / "segmentation-1.nii", 1, direction="flipped")  # uncompressed
    # Case 12: oblique direction; a float32 segmentation (0.0 / 1.0 / 2.0), which some LiTS files are, whose origin
    # differs from the volume's by less than the tolerance (the converted label must get the volume's exact header).
    image, label = _write_pair(b2 / "volume-12.nii.gz", None, 2, direction="oblique")
    label = sitk.Cast(label, sitk.sitkFloat32)
    label.SetOrigin(tuple(v + 5e-5 for v in label.GetOrigin()))
    sitk.WriteImage(label, str(b2 / "segmentation-12.nii.gz"))
    # Case 13: no tumour, and a float32 image (the dtype must survive).
    image, label = make_case(3, "micro", min_tumours=0).to_sitk()
    assert 2 not in np.unique(sitk.GetArrayFromImage(label))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(b2 / "volume-13.nii.gz"))
    sitk.WriteImage(label, str(b2 / "segmentation-13.nii.gz"))
    # Test volume 0 shares its number with training case 0: it must not be taken for volume-0.
    _write_pair(test / "test-volume-0.nii", None, 10)
    _write_pair(test / "test-volume-5.nii", None, 11, direction="flipped")
    (src / "README.txt").write_text("not a case\n", encoding="utf-8")
    return src


EXPECTED_LITS = {  # case id -> source file (relative to the release), split
    "lits_000": ("Training Batch 1/volume-0.nii.gz", "Training Batch 1/segmentation-0.nii.gz"),
    "lits_001": ("Training Batch 1/volume-1.nii", "Training Batch 1/segmentation-1.nii"),
    "lits_012": ("Training Batch 2/volume-12.nii.gz", "Training Batch 2/segmentation-12.nii.gz"),
    "lits_013": ("Training Batch 2/volume-13.nii.gz", "Training Batch 2/segmentation-13.nii.gz"),
    "lits_test_000": ("Test Data/test-volume-0.nii", None),
    "lits_test_005": ("Test Data/test-volume-5.nii", None),
}


def _check_case_copied(folder: Path, src: Path, case_id: str, image_rel: str, label_rel: str | None) -> None:
    """The converted image equals its source voxel for voxel, in dtype and in geometry; the label likewise."""
    split = "Tr" if label_rel else "Ts"
    source_image = sitk.ReadImage(str(src / image_rel))
    image = sitk.ReadImage(str(folder / f"images{split}" / f"{case_id}_0000.nii.gz"))
    assert image.GetPixelID() == source_image.GetPixelID(), case_id
    assert _geometry(image) == _geometry(source_image), case_id
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(source_image))
    if label_rel is None:
        return
    source_label = sitk.GetArrayFromImage(sitk.ReadImage(str(src / label_rel)))
    label = sitk.ReadImage(str(folder / "labelsTr" / f"{case_id}.nii.gz"))
    assert label.GetPixelID() == sitk.sitkUInt8, case_id
    assert _geometry(label) == _geometry(image), case_id
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(label), source_label)


def test_lits_conversion_copies_every_case_exactly(lits_source, tmp_path):
    raw = tmp_path / "raw"
    before = tree_digest(lits_source)
    folder = convert_lits(lits_source, 501, raw_root=raw, num_processes=1, progress=False)

    assert folder == raw / "Dataset501_LiTS"
    assert tree_digest(lits_source) == before
    assert _leftovers(raw) == ["Dataset501_LiTS"]
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert dataset_json["channel_names"] == {"0": "CT"}
    assert dataset_json["labels"] == REGION_LABELS
    assert dataset_json["regions_class_order"] == [1, 2]
    assert dataset_json["numTraining"] == 4
    assert dataset_json["file_ending"] == ".nii.gz"
    assert dataset_json["name"] == "Dataset501_LiTS"
    assert dataset_json["licence"] == "CC BY-NC-SA 4.0"
    assert "LiTS" in dataset_json["reference"] and dataset_json["description"]

    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        f"{c}_0000.nii.gz" for c in EXPECTED_LITS if "test" not in c
    ]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [
        f"{c}.nii.gz" for c in EXPECTED_LITS if "test" not in c
    ]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == [
        "lits_test_000_0000.nii.gz",
        "lits_test_005_0000.nii.gz",
    ]
    for case_id, (image_rel, label_rel) in EXPECTED_LITS.items():
        _check_case_copied(folder, lits_source, case_id, image_rel, label_rel)
    off_grid_label = sitk.ReadImage(str(lits_source / EXPECTED_LITS["lits_012"][1]))
    assert off_grid_label.GetOrigin() != sitk.ReadImage(str(lits_source / EXPECTED_LITS["lits_012"][0])).GetOrigin()
    tumour_free = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "lits_013.nii.gz")))
    assert set(np.unique(tumour_free).tolist()) == {0, 1}

    sidecar = json.loads((folder / "conversion.json").read_text(encoding="utf-8"))
    assert sidecar["nnyseg_version"]
    assert sidecar["cases"] == {
        c: {"image": i} | ({"label": lab} if lab else {}) for c, (i, lab) in EXPECTED_LITS.items()
    }
    assert validate_raw_dataset(folder, progress=False) == folder


def test_lits_uses_nnunet_raw_when_no_folder_is_given(lits_source, nnunet_env):
    folder = convert_lits(lits_source, 7, name="LiverCT", num_processes=1, progress=False)
    assert folder == nnunet_env["nnUNet_raw"] / "Dataset007_LiverCT"


def test_lits_without_nnunet_raw_says_so(lits_source, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(DatasetError, match="nnUNet_raw is not set"):
        convert_lits(lits_source, 7, progress=False)


def _remove(src: Path, name: str) -> None:
    next(src.rglob(name)).unlink()


def _shift_origin(src: Path) -> None:
    path = next(src.rglob("segmentation-12.nii.gz"))
    label = sitk.ReadImage(str(path))
    label.SetOrigin(tuple(v + 2.5 for v in label.GetOrigin()))
    sitk.WriteImage(label, str(path))


def _crop(src: Path) -> None:
    path = next(src.rglob("segmentation-1.nii"))
    label = sitk.ReadImage(str(path))
    sitk.WriteImage(label[:, :, :-1], str(path))


def _paint_label_3(src: Path) -> None:
    path = next(src.rglob("segmentation-13.nii.gz"))
    label = sitk.ReadImage(str(path))
    label[5, 5, 5] = 3
    label[6, 5, 5] = 7
    sitk.WriteImage(label, str(path))


def _duplicate(src: Path) -> None:
    (src / "extra").mkdir()
    shutil.copy(next(src.rglob("volume-1.nii")), src / "extra" / "volume-1.nii.gz")


@pytest.mark.parametrize(
    ("break_source", "expected"),
    [
        (lambda src: _remove(src, "segmentation-1.nii"), r"case lits_001: Training Batch 1/volume-1.nii has no segm"),
        (
            lambda src: _remove(src, "volume-12.nii.gz"),
            r"case lits_012: Training Batch 2/segmentation-12.nii.gz has no",
        ),
        (_shift_origin, r"case lits_012: segmentation-12.nii.gz: origin .* differs from volume-12.nii.gz"),
        (_crop, r"case lits_001: segmentation-1.nii: size .*23.* differs from volume-1.nii's .*24"),
        (_paint_label_3, r"case lits_013: segmentation-13.nii.gz holds label values 3, 7; only 0"),
        (_duplicate, r"case number 1 is found twice: Training Batch 1/volume-1.nii and extra/volume-1.nii.gz"),
    ],
    ids=["no-segmentation", "no-volume", "origin-differs", "size-differs", "label-3", "duplicate-number"],
)
def test_lits_errors_name_the_case_and_leave_nothing(lits_source, tmp_path, break_source, expected):
    break_source(lits_source)
    raw = tmp_path / "raw"
    with pytest.raises(DatasetError, match=expected):
        convert_lits(lits_source, 502, raw_root=raw, num_processes=1, progress=False)
    assert _leftovers(raw) == []


def test_lits_error_found_in_a_worker_process_leaves_nothing(lits_source, tmp_path):
    """The label values are checked while converting, in the pool: the half-built dataset must go."""
    _paint_label_3(lits_source)
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(DatasetError, match=r"case lits_013: segmentation-13\.nii\.gz holds label values 3, 7"):
        convert_lits(lits_source, 502, raw_root=raw, num_processes=2, progress=False)
    assert _leftovers(raw) == []


def test_lits_without_cases_says_so(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no LiTS training files found"):
        convert_lits(tmp_path / "empty", 503, raw_root=tmp_path / "raw", progress=False)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        convert_lits(tmp_path / "missing", 503, raw_root=tmp_path / "raw", progress=False)


def test_lits_existing_dataset_needs_overwrite(lits_source, tmp_path):
    raw = tmp_path / "raw"
    folder = convert_lits(lits_source, 504, raw_root=raw, num_processes=1, progress=False)
    (folder / "marker").write_text("old", encoding="utf-8")
    with pytest.raises(FileExistsError, match="Dataset504_LiTS: already exists"):
        convert_lits(lits_source, 504, raw_root=raw, num_processes=1, progress=False)
    assert (folder / "marker").exists()
    # Another name with the same id would give nnU-Net two datasets with one id; it is never replaced silently.
    with pytest.raises(FileExistsError, match="dataset id 504 is already used by Dataset504_LiTS"):
        convert_lits(lits_source, 504, name="Other", raw_root=raw, overwrite=True, progress=False)

    convert_lits(lits_source, 504, raw_root=raw, overwrite=True, num_processes=1, progress=False)
    assert not (folder / "marker").exists()
    assert _leftovers(raw) == ["Dataset504_LiTS"]
    validate_raw_dataset(folder, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# ATLAS


def _write_mri_pair(image_path: Path, label_path: Path | None, seed: int, **case_options) -> None:
    """An "MRI" case: the phantom rescaled to arbitrary float32 intensities, as MR scanners give."""
    image, label = make_case(seed, "micro", **case_options).to_sitk()
    mri = sitk.Cast(image, sitk.sitkFloat32) * 0.37 + 412.5
    image_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(mri, str(image_path))
    if label_path is not None:
        label_path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(label, str(label_path))


@pytest.fixture
def atlas_source(tmp_path) -> Path:
    """An ATLAS-2023-like release: train/imagesTr + train/labelsTr, test/imagesTs."""
    src = tmp_path / "ATLAS"
    train = src / "atlas-train-dataset-1.0.1" / "train"
    _write_mri_pair(train / "imagesTr" / "im0.nii.gz", train / "labelsTr" / "lb0.nii.gz", 0)
    _write_mri_pair(train / "imagesTr" / "im1.nii.gz", train / "labelsTr" / "lb1.nii.gz", 3, min_tumours=0)
    _write_mri_pair(train / "imagesTr" / "im10.nii", train / "labelsTr" / "lb10.nii", 4, direction="oblique")
    _write_mri_pair(src / "atlas-test-dataset-1.0.0" / "test" / "imagesTs" / "im60.nii.gz", None, 5)
    return src


def test_atlas_conversion_copies_every_case_and_asks_for_zscore(atlas_source, tmp_path):
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme

    before = tree_digest(atlas_source)
    folder = convert_atlas(atlas_source, 601, raw_root=tmp_path / "raw", num_processes=1, progress=False)

    assert folder.name == "Dataset601_ATLAS"
    assert tree_digest(atlas_source) == before
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert dataset_json["channel_names"] == {"0": "MRI"}
    assert get_normalization_scheme(dataset_json["channel_names"]["0"]) is ZScoreNormalization
    assert dataset_json["labels"] == REGION_LABELS
    assert dataset_json["regions_class_order"] == [1, 2]
    assert dataset_json["numTraining"] == 3
    train = "atlas-train-dataset-1.0.1/train"
    expected = {
        "atlas_000": (f"{train}/imagesTr/im0.nii.gz", f"{train}/labelsTr/lb0.nii.gz"),
        "atlas_001": (f"{train}/imagesTr/im1.nii.gz", f"{train}/labelsTr/lb1.nii.gz"),
        "atlas_010": (f"{train}/imagesTr/im10.nii", f"{train}/labelsTr/lb10.nii"),
        "atlas_test_060": ("atlas-test-dataset-1.0.0/test/imagesTs/im60.nii.gz", None),
    }
    for case_id, (image_rel, label_rel) in expected.items():
        _check_case_copied(folder, atlas_source, case_id, image_rel, label_rel)
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["atlas_test_060_0000.nii.gz"]
    sidecar = json.loads((folder / "conversion.json").read_text(encoding="utf-8"))
    assert sidecar["cases"]["atlas_010"] == {"image": expected["atlas_010"][0], "label": expected["atlas_010"][1]}
    validate_raw_dataset(folder, progress=False)


def _atlas_train(src: Path) -> Path:
    return src / "atlas-train-dataset-1.0.1" / "train"


@pytest.mark.parametrize(
    ("break_source", "expected"),
    [
        (
            lambda src: (_atlas_train(src) / "labelsTr" / "lb1.nii.gz").unlink(),
            r"case atlas_001: atlas-train-dataset-1.0.1/train/imagesTr/im1.nii.gz has no label numbered 1",
        ),
        (
            lambda src: (_atlas_train(src) / "imagesTr" / "im0.nii.gz").rename(
                _atlas_train(src) / "imagesTr" / "x.nii.gz"
            ),
            r"atlas-train-dataset-1.0.1/train/imagesTr/x.nii.gz: no case number in the file name",
        ),
        (lambda src: shutil.rmtree(_atlas_train(src) / "labelsTr"), r"no training label folder"),
        (
            lambda src: shutil.copytree(_atlas_train(src) / "labelsTr", src / "more_labels"),
            r"several training label folders",
        ),
    ],
    ids=["no-label", "no-number", "no-labels-folder", "two-labels-folders"],
)
def test_atlas_errors_name_the_file_and_leave_nothing(atlas_source, tmp_path, break_source, expected):
    break_source(atlas_source)
    raw = tmp_path / "raw"
    with pytest.raises(DatasetError, match=expected):
        convert_atlas(atlas_source, 602, raw_root=raw, num_processes=1, progress=False)
    assert _leftovers(raw) == []


# ----------------------------------------------------------------------------------------------------------------
# DICOM

DICOM_SERIES = REAL_DATA / "example_ct_dicom"
DICOM_MASK = REAL_DATA / "example_seg_dicom.nii.gz"
TOTALSEG_LIVER = 5


@pytest.mark.realdata
@pytest.mark.skipif(not DICOM_SERIES.exists(), reason="real data not available")
def test_dicom_series_keeps_geometry_and_voxel_order(tmp_path):
    """The mask of the series (TotalSegmentator output, stored flipped in y) must land on the liver.

    The mask's grid covers the same voxel centres with the y axis reversed, so after resampling it onto the
    converted image in physical space (an exact voxel permutation) the liver must have liver CT numbers. Reading
    the slices in the wrong order or dropping the direction would put the mask on other tissue.
    """
    before = tree_digest(DICOM_SERIES)
    out = convert_dicom(DICOM_SERIES, tmp_path / "ct.nii.gz")
    assert tree_digest(DICOM_SERIES) == before
    image = sitk.ReadImage(str(out))
    mask = sitk.ReadImage(str(DICOM_MASK))
    assert image.GetPixelID() == sitk.sitkInt16
    assert image.GetSize() == mask.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(image.GetSpacing(), mask.GetSpacing(), atol=1e-3)
    # The series' orientation tag is 1\0\0\0\1\0 and its lowest slice sits at z = -804.5 mm.
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), (-249.51171875, -437.51171875, -804.5), atol=1e-3)
    corners = [(0, 0, 0), (511, 511, 19)]
    image_box = np.sort([image.TransformIndexToPhysicalPoint(c) for c in corners], axis=0)
    mask_box = np.sort([mask.TransformIndexToPhysicalPoint(c) for c in corners], axis=0)
    np.testing.assert_allclose(image_box, mask_box, atol=1e-3)

    on_image = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    liver = sitk.GetArrayFromImage(on_image) == TOTALSEG_LIVER
    assert liver.sum() == (sitk.GetArrayFromImage(mask) == TOTALSEG_LIVER).sum()  # nothing lost: a permutation
    liver_hu = sitk.GetArrayFromImage(image)[liver].mean()
    assert 0 < liver_hu < 200, liver_hu  # contrast-enhanced liver; the y-flipped mask would give about -75 HU

    with pytest.raises(FileExistsError, match="already exists"):
        convert_dicom(DICOM_SERIES, out)
    with pytest.raises(ValueError, match=r"no DICOM series 'nope'; the folder holds '.*' \(20 files\)"):
        convert_dicom(DICOM_SERIES, tmp_path / "other.nii.gz", series_uid="nope")


def _write_dicom_series(folder: Path, image: sitk.Image, series_uid: str, prefix: str = "slice") -> None:
    """Write a 3-D image as a CT DICOM series, one file per slice, named in reverse slice order.

    The reverse naming makes sure the reader orders slices by their position tag, not by file name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n_slices = image.GetDepth()
    for i in range(n_slices):
        slice_ = image[:, :, i]
        tags = {
            "0008|0060": "CT",
            "0008|0018": f"{series_uid}.{i + 1}",  # SOP instance UID
            "0020|000d": f"{series_uid}.0",  # study instance UID
            "0020|000e": series_uid,
            "0020|0013": str(i + 1),  # instance number
            "0020|0032": "\\".join(f"{v:.10g}" for v in image.TransformIndexToPhysicalPoint((0, 0, i))),
            "0020|0037": "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),  # row, column
            "0018|0050": f"{image.GetSpacing()[2]:g}",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}_{n_slices - 1 - i:03d}.dcm"))
        writer.Execute(slice_)


def _small_ct(seed: int, direction: str) -> sitk.Image:
    image, _ = make_case(seed, "micro", direction=direction).to_sitk()
    return image[::4, ::4, :6]  # 12 x 10 x 6 voxels of 24 x 24 x 8 mm


def test_dicom_series_keeps_voxels_and_oblique_geometry(tmp_path):
    image = _small_ct(0, "oblique")
    _write_dicom_series(tmp_path / "series", image, "1.2.826.0.1.3680043.8.498.101")
    out = convert_dicom(tmp_path / "series", tmp_path / "ct.nii.gz")
    converted = sitk.ReadImage(str(out))
    assert converted.GetPixelID() == sitk.sitkInt16
    assert converted.GetSize() == image.GetSize()
    for read, written in zip(_geometry(converted)[1:], _geometry(image)[1:], strict=True):
        np.testing.assert_allclose(read, written, atol=1e-4)  # DICOM stores decimal strings, NIfTI float32
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(converted), sitk.GetArrayViewFromImage(image))


def test_dicom_folder_with_two_series_asks_which(tmp_path):
    folder = tmp_path / "two"
    first, second = _small_ct(0, "identity"), _small_ct(1, "flipped")[:, :, :4]
    _write_dicom_series(folder, first, "1.2.826.0.1.3680043.8.498.201")
    _write_dicom_series(folder, second, "1.2.826.0.1.3680043.8.498.202", prefix="other")

    with pytest.raises(
        ValueError, match=r"holds 2 DICOM series, choose one with --series-uid: .*201' \(6 files\); .*202' \(4 files\)"
    ):
        convert_dicom(folder, tmp_path / "ct.nii.gz")
    with pytest.raises(ValueError, match=r"no DICOM series '9.9'; the folder holds .*201' \(6 files\)"):
        convert_dicom(folder, tmp_path / "ct.nii.gz", series_uid="9.9")
    assert not (tmp_path / "ct.nii.gz").exists()
    out = convert_dicom(folder, tmp_path / "ct.nii.gz", series_uid="1.2.826.0.1.3680043.8.498.202")
    converted = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(converted), sitk.GetArrayViewFromImage(second))
    np.testing.assert_allclose(converted.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1), atol=1e-6)
    with pytest.raises(FileExistsError, match=r"ct\.nii\.gz: already exists"):
        convert_dicom(folder, out, series_uid="1.2.826.0.1.3680043.8.498.202")
    convert_dicom(folder, out, series_uid="1.2.826.0.1.3680043.8.498.201", overwrite=True)
    assert sitk.ReadImage(str(out)).GetSize() == first.GetSize()


def test_dicom_errors_name_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty: no DICOM series found \(0 file\(s\)"):
        convert_dicom(empty, tmp_path / "ct.nii.gz")
    not_dicom = tmp_path / "not_dicom"
    not_dicom.mkdir()
    (not_dicom / "notes.txt").write_text("hello\n", encoding="utf-8")
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkInt16), str(not_dicom / "scan.nii.gz"))
    with pytest.raises(ValueError, match=r"not_dicom: no DICOM series found \(2 file\(s\) in the folder, none a DICOM"):
        convert_dicom(not_dicom, tmp_path / "ct.nii.gz")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        convert_dicom(tmp_path / "missing", tmp_path / "ct.nii.gz")
    with pytest.raises(ValueError, match="must be a NIfTI file"):
        convert_dicom(empty, tmp_path / "ct.mha")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "not_dicom"]


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _nnyseg(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nnyseg.cli", *args], capture_output=True, encoding="utf-8", env=env, timeout=120
    )


def test_cli_convert_lits(lits_source, tmp_path):
    raw = tmp_path / "raw"
    result = _nnyseg("convert", "lits", str(lits_source), "-d", "505", "-o", str(raw))  # 2 processes by default
    assert result.returncode == 0, result.stderr
    assert "Dataset505_LiTS" in result.stdout
    for case_id, (image_rel, label_rel) in EXPECTED_LITS.items():
        _check_case_copied(raw / "Dataset505_LiTS", lits_source, case_id, image_rel, label_rel)

    _remove(lits_source, "segmentation-13.nii.gz")
    result = _nnyseg("convert", "lits", str(lits_source), "-d", "506", "-o", str(raw))
    assert result.returncode == 2
    assert "nnyseg convert: error:" in result.stderr
    assert "case lits_013: Training Batch 2/volume-13.nii.gz has no segmentation-13" in result.stderr


def test_cli_convert_atlas(atlas_source, tmp_path):
    env = os.environ | {"nnUNet_raw": str(tmp_path)}
    result = _nnyseg("convert", "atlas", str(atlas_source), "-d", "603", "--name", "LiverMRI", "-np", "1", env=env)
    assert result.returncode == 0, result.stderr
    assert (
        json.loads((tmp_path / "Dataset603_LiverMRI" / "dataset.json").read_text(encoding="utf-8"))["numTraining"] == 3
    )

    result = _nnyseg("convert", "atlas", str(atlas_source), "-d", "603", "--name", "LiverMRI", env=env)
    assert result.returncode == 2
    assert "Dataset603_LiverMRI: already exists (pass --overwrite to replace it)" in result.stderr


def test_cli_convert_dicom(tmp_path):
    image = _small_ct(2, "flipped")
    _write_dicom_series(tmp_path / "series", image, "1.2.826.0.1.3680043.8.498.301")
    out = tmp_path / "ct.nii.gz"
    result = _nnyseg("convert", "dicom", str(tmp_path / "series"), str(out))
    assert result.returncode == 0, result.stderr
    assert f"DICOM series written to {out}" in result.stdout
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), sitk.GetArrayFromImage(image))

    (tmp_path / "empty").mkdir()
    result = _nnyseg("convert", "dicom", str(tmp_path / "empty"), str(tmp_path / "again.nii.gz"))
    assert result.returncode == 2
    assert "nnyseg convert: error:" in result.stderr and "empty: no DICOM series found" in result.stderr
