"""Dataset checks reject bad input with a message that names the file and the problem, and never modify it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nnyseg.cli import main as cli_main
from nnyseg.data.validation import DatasetError, find_raw_dataset, validate_raw_dataset
from tests.conftest import make_raw_dataset, tree_digest, write_image


def test_valid_dataset_passes_and_is_not_modified(nnunet_env):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"])
    before = tree_digest(folder)
    assert validate_raw_dataset(990, progress=False) == folder
    assert tree_digest(folder) == before


def test_unknown_dataset_id_lists_available(nnunet_env):
    make_raw_dataset(nnunet_env["nnUNet_raw"])
    with pytest.raises(DatasetError, match=r"no dataset with id 7 .*Dataset990_Handmade"):
        find_raw_dataset(7)


def test_unset_nnunet_raw(monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(DatasetError, match="nnUNet_raw is not set"):
        find_raw_dataset(1)


def test_missing_dataset_json(nnunet_env):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"])
    (folder / "dataset.json").unlink()
    with pytest.raises(DatasetError, match=r"(?s)dataset\.json.*dataset\.json is missing"):
        validate_raw_dataset(990, progress=False)


def test_malformed_dataset_json(nnunet_env):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"])
    (folder / "dataset.json").write_text('{"channel_names": {"0": "CT"},\n "labels": ')
    with pytest.raises(DatasetError, match=r"(?s)dataset\.json.*not valid JSON.*line 2"):
        validate_raw_dataset(990, progress=False)


def test_dataset_json_missing_keys_and_regions(nnunet_env):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"])
    data = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    del data["file_ending"]
    del data["regions_class_order"]
    (folder / "dataset.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        validate_raw_dataset(990, progress=False)
    message = str(info.value)
    assert "'file_ending' is missing" in message
    assert "regions_class_order" in message


def test_geometry_mismatch_names_both_files(nnunet_env):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"])
    label = np.zeros((8, 16, 16), np.uint8)
    write_image(folder / "labelsTr" / "case_001.nii.gz", label, spacing=(1.5, 1.5, 2.0))
    with pytest.raises(DatasetError, match=r"case_001\.nii\.gz: spacing .* differs from case_001_0000\.nii\.gz"):
        validate_raw_dataset(990, progress=False)


def test_shape_and_origin_mismatch(nnunet_env):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"])
    write_image(folder / "labelsTr" / "case_000.nii.gz", np.zeros((8, 16, 15), np.uint8))
    write_image(folder / "labelsTr" / "case_002.nii.gz", np.zeros((8, 16, 16), np.uint8), origin=(5.0, 0.0, 0.0))
    with pytest.raises(DatasetError) as info:
        validate_raw_dataset(990, progress=False)
    assert "case_000.nii.gz: size" in str(info.value)
    assert "case_002.nii.gz: origin" in str(info.value)


def test_undeclared_label_values(nnunet_env):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"])
    label = np.zeros((8, 16, 16), np.uint8)
    label[0, 0, 0] = 5
    write_image(folder / "labelsTr" / "case_002.nii.gz", label)
    with pytest.raises(DatasetError, match=r"case_002\.nii\.gz: label values \[5\] are not declared"):
        validate_raw_dataset(990, progress=False)


def test_nan_voxels(nnunet_env):
    # .mha keeps NaNs; SimpleITK's NIfTI reader (which nnU-Net uses) turns them into 0, so nnU-Net never sees them.
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"], ending=".mha")
    image = np.zeros((8, 16, 16), np.float32)
    image[1, 2, 3] = np.nan
    image[2, 2, 3] = np.inf
    write_image(folder / "imagesTr" / "case_001_0000.mha", image)
    with pytest.raises(DatasetError, match=r"case_001_0000\.mha: 2 NaN or infinite voxel"):
        validate_raw_dataset(990, progress=False)


def test_missing_image_and_count(nnunet_env):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"])
    (folder / "imagesTr" / "case_002_0000.nii.gz").unlink()
    (folder / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(DatasetError) as info:
        validate_raw_dataset(990, progress=False)
    message = str(info.value)
    assert "imagesTr/case_002_0000.nii.gz: missing" in message
    assert "imagesTr/case_001_0000.nii.gz: has no label" in message
    assert "numTraining=3 but labelsTr has 2" in message


def test_cli_reports_bad_input_without_traceback(nnunet_env, capsys):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"])
    (folder / "dataset.json").write_text("{")
    assert cli_main(["check-dataset", "990"]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "Traceback" not in err


def test_plan_and_preprocess_rejects_bad_dataset_before_nnunet(nnunet_env, capsys):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"])
    label = np.zeros((8, 16, 16), np.uint8)
    label[0, 0, 0] = 3
    write_image(folder / "labelsTr" / "case_000.nii.gz", label)
    before = tree_digest(folder)
    assert cli_main(["plan_and_preprocess", "-d", "990", "-pl", "nnYNetPlanner"]) == 2
    assert "label values [3]" in capsys.readouterr().err
    assert tree_digest(folder) == before
    assert not any(nnunet_env["nnUNet_preprocessed"].iterdir())
