"""Truncated or corrupt files and NaN/inf voxels, which SimpleITK reads without a word, are named by every command.

Each bad file is first shown to get past SimpleITK (it reads the file, or reads 0 where the file holds NaN), so that
each test proves what the integrity check adds. Inputs are never modified.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from nnyseg.cli import main as cli_main
from nnyseg.data.convert import convert_dicom, convert_lits
from nnyseg.data.integrity import (
    CORRUPT,
    check_dicom_series,
    check_image_file,
    check_image_files,
    input_image_files,
)
from nnyseg.data.validation import DatasetError, InputImageError, check_input_images, validate_raw_dataset
from tests.conftest import load_benchmark_script, make_raw_dataset, tree_digest, write_image

# Big enough (about 220 kB compressed) that SimpleITK's header probe does not happen to reach the gzip trailer: then
# it reads a damaged file without error, as it does with real CT volumes.
SHAPE = (40, 64, 64)


def _truncate(path: Path, fraction: float = 2 / 3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _flip_bytes(path: Path, at: float = 0.5, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + n] = bytes(b ^ 0xFF for b in data[start : start + n])
    path.write_bytes(bytes(data))


def _noise(seed: int = 0, dtype=np.int16) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 100, SHAPE).astype(dtype)


def _put_non_finite(path: Path, value: float) -> None:
    """Rewrite a float NIfTI with nibabel, geometry unchanged, with ``value`` in two voxels."""
    image = nib.load(path)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    data[1, 2, 3] = value
    data[4, 5, 6] = value
    nib.save(nib.Nifti1Image(data, image.affine, image.header), path)


def _sitk_reads(path: Path) -> np.ndarray:
    """SimpleITK's reading of the file, which must succeed: the damage is invisible to it."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ----------------------------------------------------------------------------------------------------------------
# nnyseg check-dataset and nnyseg plan_and_preprocess


def test_check_dataset_names_a_truncated_and_a_corrupt_file(nnunet_env, capsys):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"], shape=SHAPE)
    truncated = folder / "imagesTr" / "case_001_0000.nii.gz"
    corrupt = folder / "imagesTr" / "case_002_0000.nii.gz"
    _truncate(truncated)
    _flip_bytes(corrupt)
    assert _sitk_reads(truncated).shape == SHAPE  # the user's report: SimpleITK reads it, "no problems found"
    assert _sitk_reads(corrupt).shape == SHAPE
    before = tree_digest(folder)

    with pytest.raises(DatasetError) as info:
        validate_raw_dataset(990, progress=False)
    problems = info.value.problems
    assert any(p.startswith(str(truncated)) and CORRUPT in p and "end-of-stream" in p for p in problems), problems
    assert any(p.startswith(str(corrupt)) and CORRUPT in p for p in problems), problems
    assert not any("case_000" in p for p in problems)  # the intact case is not accused

    assert cli_main(["check-dataset", "990"]) == 2
    err = capsys.readouterr().err
    assert f"{truncated}: truncated or corrupt, download it again" in err
    assert f"{corrupt}: truncated or corrupt, download it again" in err
    assert "Traceback" not in err
    assert tree_digest(folder) == before


def test_headers_only_still_reads_labels_whole(nnunet_env, capsys):
    # --headers-only skips reading the images' voxels (and so their integrity check); labels are read whole anyway.
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"], shape=SHAPE)
    label = folder / "labelsTr" / "case_000.nii.gz"
    _truncate(label)
    assert _sitk_reads(label).shape == SHAPE
    assert cli_main(["check-dataset", "990", "--headers-only"]) == 2
    assert f"{label}: {CORRUPT}" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "counted"), [(np.nan, "2 NaN, 0 infinite"), (np.inf, "0 NaN, 2 infinite")])
def test_check_dataset_finds_non_finite_voxels_that_simpleitk_reads_as_zero(nnunet_env, capsys, value, counted):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"])
    image = folder / "imagesTr" / "case_001_0000.nii.gz"
    write_image(image, np.zeros((8, 16, 16), np.float32))
    _put_non_finite(image, value)
    assert not np.isfinite(np.asanyarray(nib.load(image).dataobj)).all()  # the file holds them ...
    assert np.isfinite(_sitk_reads(image)).all()  # ... but SimpleITK, nnU-Net's reader, hides them
    before = tree_digest(folder)

    with pytest.raises(DatasetError, match=rf"case_001_0000\.nii\.gz: 2 NaN or infinite voxel\(s\) \({counted}\)"):
        validate_raw_dataset(990, progress=False)
    assert cli_main(["check-dataset", "990"]) == 2
    assert f"{image}: 2 NaN or infinite voxel(s) ({counted}); SimpleITK" in capsys.readouterr().err
    assert tree_digest(folder) == before


def test_check_dataset_reads_the_test_images_too(nnunet_env):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"])
    test_image = folder / "imagesTs" / "case_100_0000.nii.gz"
    write_image(test_image, _noise(3))
    _truncate(test_image)
    with pytest.raises(DatasetError, match=rf"{test_image}: {CORRUPT}"):
        validate_raw_dataset(990, progress=False)


def test_plan_and_preprocess_refuses_a_truncated_file_before_nnunet(nnunet_env, capsys):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"], shape=SHAPE)
    truncated = folder / "imagesTr" / "case_000_0000.nii.gz"
    _truncate(truncated)
    before = tree_digest(folder)
    assert cli_main(["plan_and_preprocess", "-d", "990", "-pl", "nnYNetPlanner"]) == 2
    assert f"{truncated}: {CORRUPT}" in capsys.readouterr().err
    assert tree_digest(folder) == before
    assert not any(nnunet_env["nnUNet_preprocessed"].iterdir())


# ----------------------------------------------------------------------------------------------------------------
# nnyseg convert


def _fake_lits(src: Path) -> None:
    """Four training cases (two compressed, two not) and a test volume, all valid."""
    for n, ending in ((0, ".nii.gz"), (1, ".nii"), (2, ".nii"), (3, ".nii.gz")):
        image = _noise(n)
        label = np.zeros(SHAPE, np.uint8)
        label[10:30, 16:48, 16:48] = 1
        label[15:20, 20:30, 20:30] = 2
        write_image(src / "Training Batch 1" / f"volume-{n}{ending}", image)
        write_image(src / "Training Batch 1" / f"segmentation-{n}{ending}", label)
    write_image(src / "Test Data" / "test-volume-7.nii.gz", _noise(7))


def test_convert_lits_names_every_damaged_file_and_writes_nothing(tmp_path, capsys):
    src, raw = tmp_path / "LiTS", tmp_path / "raw"
    _fake_lits(src)
    batch = src / "Training Batch 1"
    _truncate(batch / "volume-0.nii.gz")  # the user's report
    _truncate(batch / "segmentation-2.nii")  # uncompressed: only its size gives it away
    _flip_bytes(src / "Test Data" / "test-volume-7.nii.gz")
    write_image(batch / "volume-1.nii", _noise(1, np.float32))
    _put_non_finite(batch / "volume-1.nii", np.nan)
    for path in (batch / "volume-0.nii.gz", batch / "segmentation-2.nii", src / "Test Data" / "test-volume-7.nii.gz"):
        _sitk_reads(path)  # SimpleITK would have converted every one of them
    assert np.isfinite(_sitk_reads(batch / "volume-1.nii")).all()
    before = tree_digest(src)

    with pytest.raises(DatasetError) as info:
        convert_lits(src, 501, raw_root=raw, num_processes=1, progress=False)
    problems = info.value.problems
    assert len(problems) == 4, problems
    expected = {
        "lits_000": f"{batch / 'volume-0.nii.gz'}: {CORRUPT}",
        "lits_001": f"{batch / 'volume-1.nii'}: 2 NaN or infinite voxel(s) (2 NaN, 0 infinite)",
        "lits_002": f"{batch / 'segmentation-2.nii'}: {CORRUPT} (its data block holds",
        "lits_test_007": f"{src / 'Test Data' / 'test-volume-7.nii.gz'}: {CORRUPT}",
    }
    for case_id, start in expected.items():
        assert any(p.startswith(f"case {case_id}: {start}") for p in problems), (case_id, problems)
    assert not (raw.exists() and any(raw.iterdir()))  # nothing half-built is left

    assert cli_main(["convert", "lits", str(src), "-d", "501", "-o", str(raw), "-np", "2"]) == 2
    err = capsys.readouterr().err
    assert "4 problem(s)" in err and f"{batch / 'volume-0.nii.gz'}: {CORRUPT}" in err
    assert not (raw.exists() and any(raw.iterdir()))
    assert tree_digest(src) == before


def test_convert_lits_names_a_file_cut_inside_its_header(tmp_path):
    src = tmp_path / "LiTS"
    _fake_lits(src)
    shutil.rmtree(src / "Test Data")
    volume = src / "Training Batch 1" / "volume-3.nii.gz"
    volume.write_bytes(gzip.compress(gzip.decompress(volume.read_bytes())[:200]))  # a valid gzip of half a header
    with pytest.raises(DatasetError, match=rf"case lits_003: {volume}: {CORRUPT} \(the file ends inside its NIfTI"):
        convert_lits(src, 501, raw_root=tmp_path / "raw", num_processes=1, progress=False)


def _write_dicom_series(folder: Path, image: sitk.Image, series_uid: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(image.GetDepth()):
        slice_ = image[:, :, i]
        tags = {
            "0008|0060": "CT",
            "0008|0018": f"{series_uid}.{i + 1}",
            "0020|000d": f"{series_uid}.0",
            "0020|000e": series_uid,
            "0020|0013": str(i + 1),
            "0020|0032": "\\".join(f"{v:.10g}" for v in image.TransformIndexToPhysicalPoint((0, 0, i))),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": f"{image.GetSpacing()[2]:g}",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice_{i:03d}.dcm"))
        writer.Execute(slice_)


def test_convert_dicom_names_a_truncated_slice_that_gdcm_would_leave_out(tmp_path, capsys):
    uid = "1.2.826.0.1.3680043.8.498.401"
    image = sitk.GetImageFromArray(_noise(0)[:6])  # 6 slices of 64 x 64
    image.SetSpacing((0.8, 0.8, 2.5))
    series = tmp_path / "series"
    _write_dicom_series(series, image, uid)
    slice_ = series / "slice_003.dcm"
    _truncate(slice_)
    # GDCM silently drops the slice: the series would convert to a 5-slice volume with a gap.
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series), uid)) == 5
    before = tree_digest(series)

    with pytest.raises(DatasetError, match=rf"{slice_}: {CORRUPT} \(a file of DICOM series {uid}"):
        convert_dicom(series, tmp_path / "ct.nii.gz")
    assert cli_main(["convert", "dicom", str(series), str(tmp_path / "ct.nii.gz")]) == 2
    assert f"{slice_}: {CORRUPT}" in capsys.readouterr().err
    assert not (tmp_path / "ct.nii.gz").exists()
    assert tree_digest(series) == before


def test_check_dicom_series_names_a_listed_file_simpleitk_cannot_read(tmp_path, monkeypatch):
    uid = "1.2.826.0.1.3680043.8.498.402"
    series = tmp_path / "series"
    _write_dicom_series(series, sitk.GetImageFromArray(_noise(0)[:3]), uid)
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series), uid)
    assert check_dicom_series(series, uid, files) == []
    _truncate(series / "slice_001.dcm", 0.1)  # as if it broke after GDCM listed it
    problems = check_dicom_series(series, uid, files)
    assert len(problems) == 1 and problems[0].startswith(f"{series / 'slice_001.dcm'}: {CORRUPT}"), problems


# ----------------------------------------------------------------------------------------------------------------
# nnyseg predict (and the API nnyseg segment uses)


def test_predict_refuses_damaged_inputs_before_loading_any_model(nnunet_env, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_image(inputs / "a_0000.nii.gz", _noise(0))
    write_image(inputs / "b_0000.nii.gz", _noise(1))
    write_image(inputs / "c_0000.nii.gz", np.zeros((8, 16, 16), np.float32))
    (inputs / "notes.txt").write_text("not an image\n", encoding="utf-8")
    # Dataset 999 has no model: had nnU-Net started first, it would fail on that instead.
    argv = ["predict", "-i", str(inputs), "-o", str(out), "-d", "999", "-c", "3d_fullres", "-f", "0", "-device", "cpu"]
    with pytest.raises(RuntimeError, match="999"):  # the intact folder gets as far as nnU-Net's model lookup
        cli_main(argv)
    capsys.readouterr()

    _truncate(inputs / "b_0000.nii.gz")
    _put_non_finite(inputs / "c_0000.nii.gz", np.inf)
    before = tree_digest(inputs)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"nnyseg predict: error: {inputs}: 2 problem(s)" in err
    assert f"{inputs / 'b_0000.nii.gz'}: {CORRUPT}" in err
    assert f"{inputs / 'c_0000.nii.gz'}: 2 NaN or infinite voxel(s) (0 NaN, 2 infinite)" in err
    assert "a_0000" not in err and "Traceback" not in err
    assert not out.exists()
    assert tree_digest(inputs) == before


def test_check_input_images_lists_the_nnunet_inputs(tmp_path):
    write_image(tmp_path / "case_0000.nii.gz", _noise(0)[:4])
    write_image(tmp_path / "case_0001.mha", _noise(1)[:4])
    write_image(tmp_path / "case.nii.gz", _noise(2)[:4])  # no channel index: nnU-Net does not read it
    (tmp_path / "._case_0002.nii.gz").write_bytes(b"macOS resource fork")
    expected = [tmp_path / "case_0000.nii.gz", tmp_path / "case_0001.mha"]
    assert input_image_files(tmp_path) == expected
    assert check_input_images(tmp_path, progress=False) == expected
    with pytest.raises(InputImageError, match="no such input folder"):
        check_input_images(tmp_path / "missing", progress=False)


def test_check_image_files_covers_the_formats_and_keeps_the_order(tmp_path):
    good = _noise(0)
    files = {}
    for name, compress in (
        ("good.nii.gz", True),
        ("good.nii", False),
        ("good.mha", True),
        ("truncated.mha", False),
        ("corrupt.mha", True),
        ("truncated.nrrd", True),
    ):
        files[name] = tmp_path / name
        sitk.WriteImage(sitk.GetImageFromArray(good), str(files[name]), useCompression=compress)
    _truncate(files["truncated.mha"])
    _truncate(files["truncated.nrrd"])
    _flip_bytes(files["corrupt.mha"])
    _sitk_reads(files["corrupt.mha"])  # ITK does not check the zlib stream's Adler-32
    # NIfTI-2 and big-endian float64, with NaN
    nan = np.zeros((4, 5, 6), ">f8")
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti2Image(nan, np.eye(4)), tmp_path / "nan2.nii.gz")
    files["nan2.nii.gz"] = tmp_path / "nan2.nii.gz"
    # valid gzip variants: two members, zero padding after the stream
    raw = gzip.decompress(files["good.nii.gz"].read_bytes())
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    (tmp_path / "padded.nii.gz").write_bytes(files["good.nii.gz"].read_bytes() + bytes(64))
    files["members.nii.gz"], files["padded.nii.gz"] = tmp_path / "members.nii.gz", tmp_path / "padded.nii.gz"
    (tmp_path / "page.nii.gz").write_bytes(b"<html>404 Not Found</html>")  # a failed download
    files["page.nii.gz"] = tmp_path / "page.nii.gz"
    files["missing.nii.gz"] = tmp_path / "missing.nii.gz"

    by_name = {name: check_image_file(path) for name, path in files.items()}
    for name in ("good.nii.gz", "good.nii", "good.mha", "members.nii.gz", "padded.nii.gz"):
        assert by_name[name] == [], name
    for name in ("truncated.mha", "corrupt.mha", "truncated.nrrd", "page.nii.gz"):
        assert len(by_name[name]) == 1 and by_name[name][0].startswith(f"{files[name]}: {CORRUPT} ("), by_name[name]
    assert "zlib" in by_name["corrupt.mha"][0]
    assert by_name["nan2.nii.gz"] == [
        f"{files['nan2.nii.gz']}: 1 NaN or infinite voxel(s) (1 NaN, 0 infinite); SimpleITK (nnU-Net's reader) "
        "silently reads them as 0"
    ]
    assert by_name["missing.nii.gz"] == [f"{files['missing.nii.gz']}: no such file"]
    # in parallel, in the order given
    paths = list(files.values())
    expected = [p for path in paths for p in check_image_file(path)]
    assert check_image_files(paths, num_processes=3, progress=False) == expected
    assert check_image_files(reversed(paths), num_processes=1, progress=False) == [
        p for path in reversed(paths) for p in check_image_file(path)
    ]


def test_benchmark_script_measures_both_side_by_side(capsys, monkeypatch, tmp_path):
    bench = load_benchmark_script("integrity")
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "RESULTS.md")
    assert bench.main(["--size-mb", "1", "--repeats", "1", "--no-write"]) == 0
    out = capsys.readouterr().out
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| CT ")]
    assert [row[0] for row in rows] == [name for name, _, _ in bench.KINDS]
    assert all(float(row[-1]) > 0 for row in rows)  # check / read, measured side by side
    threads = [line.split(" | ")[0] for line in out.splitlines() if line.startswith(("| 1 | ", "| 2 | "))]
    assert threads == ["| 1", "| 2"]  # validate_raw_dataset with one and two threads
    assert not (tmp_path / "RESULTS.md").exists()  # --no-write
