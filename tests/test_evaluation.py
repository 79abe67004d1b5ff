"""Dice per class and global Dice against hand-computed values; the overlay PNG; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nnyseg.evaluation.dice import dice, evaluate_folders
from nnyseg.evaluation.overlay import save_overlay
from tests.conftest import write_image


def test_dice_formula():
    gt = np.zeros((4, 4, 4), bool)
    pred = np.zeros((4, 4, 4), bool)
    gt[:2] = True  # 32 voxels
    pred[1:3] = True  # 32 voxels, 16 shared
    assert dice(gt, pred) == pytest.approx(2 * 16 / 64)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert dice(gt, np.zeros_like(gt)) == 0.0


def _pair(tmp_path, name, gt, pred, spacing=(1.0, 1.0, 2.0)):
    write_image(tmp_path / "gt" / name, gt.astype(np.uint8), spacing=spacing)
    write_image(tmp_path / "pred" / name, pred.astype(np.uint8), spacing=spacing)


def test_regions_per_case_and_global(tmp_path):
    gt1 = np.zeros((4, 10, 10), np.uint8)
    gt1[:, :5] = 1  # 200 liver voxels
    gt1[:, :2, :2] = 2  # 16 of them tumour
    pred1 = gt1.copy()
    pred1[:, :2, :2] = 1  # tumour missed, liver region unchanged
    gt2 = np.zeros((4, 10, 10), np.uint8)
    gt2[:, :, :5] = 1
    gt2[:2, :2, :2] = 2  # 8 tumour voxels
    pred2 = gt2.copy()  # perfect
    _pair(tmp_path, "a.nii.gz", gt1, pred1)
    _pair(tmp_path, "b.nii.gz", gt2, pred2)
    out = tmp_path / "metrics" / "dice.json"
    result = evaluate_folders(tmp_path / "gt", tmp_path / "pred", output_json=out)
    assert result["per_case"]["a.nii.gz"] == {"liver": 1.0, "tumour": 0.0}
    assert result["per_case"]["b.nii.gz"] == {"liver": 1.0, "tumour": 1.0}
    assert result["mean"]["tumour"] == pytest.approx(0.5)
    # global: 2 * 8 / (16 + 8 + 0 + 8)
    assert result["global"]["tumour"] == pytest.approx(16 / 32)
    assert json.loads(out.read_text())["global"]["tumour"] == pytest.approx(0.5)
    assert not list(out.parent.glob(".*tmp"))


def test_grid_mismatch_and_missing_gt(tmp_path):
    a = np.zeros((4, 6, 6), np.uint8)
    write_image(tmp_path / "gt" / "a.nii.gz", a, spacing=(1.0, 1.0, 2.0))
    write_image(tmp_path / "pred" / "a.nii.gz", a, spacing=(1.0, 1.0, 2.5))
    with pytest.raises(ValueError, match=r"a\.nii\.gz: grid differs.*spacing"):
        evaluate_folders(tmp_path / "gt", tmp_path / "pred")
    write_image(tmp_path / "pred" / "b.nii.gz", a)
    with pytest.raises(ValueError, match=r"no ground truth for prediction\(s\) \['b\.nii\.gz'\]"):
        evaluate_folders(tmp_path / "gt", tmp_path / "pred")


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
