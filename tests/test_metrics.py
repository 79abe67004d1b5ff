"""Each metric of nnyseg.evaluation.metrics against answers derived by hand: shifted cubes with anisotropic spacing,
single voxels and lines, every empty-mask combination, one-voxel lesions and the lesion matching rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from nnyseg.evaluation.metrics import (
    METRICS,
    evaluate_case,
    lesion_detection,
    region_metrics,
    surface_distances,
)

SPACING = (3.0, 0.8, 0.8)  # (z, y, x) mm, anisotropic like a thick-slice CT


def _cubes(shift_axis: int, shift: int, side: int = 5, shape=(12, 12, 12)) -> tuple[np.ndarray, np.ndarray]:
    """A side^3 cube at (1, 1, 1) and the same cube moved by ``shift`` voxels along ``shift_axis``."""
    gt = np.zeros(shape, bool)
    gt[1 : 1 + side, 1 : 1 + side, 1 : 1 + side] = True
    return gt, np.roll(gt, shift, axis=shift_axis)


def test_shifted_cubes_along_z_overlap_metrics():
    gt, pred = _cubes(shift_axis=0, shift=2)  # 125 voxels each, 3 of 5 slices shared: 75 voxels
    m = region_metrics(gt, pred, SPACING)
    assert m["dice"] == pytest.approx(2 * 75 / 250)
    assert m["voe"] == pytest.approx(1 - 75 / 175)
    assert m["rvd"] == 0.0
    assert m["precision"] == pytest.approx(75 / 125)
    assert m["recall"] == pytest.approx(75 / 125)
    assert m["gt_volume_ml"] == pytest.approx(125 * 3.0 * 0.8 * 0.8 / 1000)
    assert set(m) == {*METRICS, "gt_volume_ml", "pred_volume_ml"}


def test_shifted_cubes_along_z_surface_distances():
    # Cubes of 5 voxels (z 1-5 and 3-7), spacing 3.0 mm along z. The 98 surface voxels of the ground-truth cube:
    #   bottom face z=1 (25): nearest predicted surface is its bottom face two slices up  -> 6.0 mm
    #   ring z=2 (16): the predicted bottom face one slice up                             -> 3.0 mm
    #   rings z=3, 4 (32) and the ring of the top face z=5 (16): predicted ring voxels    -> 0
    #   inside of the top face z=5 (9) lies inside the prediction; nearest is its ring in y/x:
    #       8 voxels one in-plane step away -> 0.8 mm, the centre two steps away -> 1.6 mm
    # The other direction is the mirror image, so the pooled 196 distances are these twice.
    gt, pred = _cubes(shift_axis=0, shift=2)
    m = region_metrics(gt, pred, SPACING)
    one_direction = 25 * 6.0 + 16 * 3.0 + 8 * 0.8 + 1 * 1.6
    assert m["assd_mm"] == pytest.approx(2 * one_direction / 196)
    assert m["msd_mm"] == pytest.approx(6.0)  # the shift in mm
    assert m["hd95_mm"] == pytest.approx(6.0)  # the 50 largest of 196 distances are all 6.0


def test_shifted_cubes_along_x_surface_distances():
    # The same cubes shifted by 2 voxels along x (0.8 mm). Per direction: near face (25) -> 1.6 mm, next ring
    # (16) -> 0.8 mm, two rings and the far face's ring (48) -> 0; the inside of the far face (9): the 6 voxels
    # next to its ring in y -> 0.8 mm, the 3 others -> 1.6 mm (to the predicted face two columns away; the ring in
    # z is 3.0 mm per step).
    gt, pred = _cubes(shift_axis=2, shift=2)
    m = region_metrics(gt, pred, SPACING)
    one_direction = 25 * 1.6 + 16 * 0.8 + 6 * 0.8 + 3 * 1.6
    assert m["assd_mm"] == pytest.approx(2 * one_direction / 196)
    assert m["msd_mm"] == pytest.approx(1.6)
    assert m["hd95_mm"] == pytest.approx(1.6)


def test_two_single_voxels():
    gt, pred = np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool)
    gt[0, 0, 0] = pred[1, 0, 2] = True
    m = region_metrics(gt, pred, SPACING)
    distance = np.hypot(3.0, 2 * 0.8)  # 3.4 mm
    assert m["assd_mm"] == m["msd_mm"] == m["hd95_mm"] == pytest.approx(distance)
    assert (m["dice"], m["voe"], m["rvd"], m["precision"], m["recall"]) == (0.0, 1.0, 0.0, 0.0, 0.0)


def test_one_voxel_against_three_voxel_line():
    # Every voxel of a one-voxel-thick line is a surface voxel. Distances: voxel -> line 0; line -> voxel 0.8, 0,
    # 0.8. Pooled [0, 0.8, 0, 0.8]: mean 0.4, max 0.8, 95th percentile 0.8.
    gt, pred = np.zeros((3, 3, 5), bool), np.zeros((3, 3, 5), bool)
    gt[1, 1, 2] = True
    pred[1, 1, 1:4] = True
    m = region_metrics(gt, pred, SPACING)
    assert m["assd_mm"] == pytest.approx(0.4)
    assert m["msd_mm"] == pytest.approx(0.8)
    assert m["hd95_mm"] == pytest.approx(0.8)
    assert m["dice"] == pytest.approx(0.5)
    assert m["voe"] == pytest.approx(2 / 3)
    assert m["rvd"] == pytest.approx(2.0)  # prediction three times the truth: +200 % (over-segmentation)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == 1.0


def test_hd95_is_the_percentile_of_the_pooled_distances():
    # One voxel in the middle of a 21-voxel line along x (step s = 0.8 mm). Pooled distances: 0 (voxel -> line) and
    # 0, s, s, 2s, 2s, ..., 10s, 10s (line -> voxel); 22 values. numpy's 95th percentile sits at rank
    # 0.95 * 21 = 19.95 of the sorted values, between 9s and 10s: 9.95 s. (The larger of the two directed 95th
    # percentiles would be 10 s.)
    gt, pred = np.zeros((1, 1, 21), bool), np.zeros((1, 1, 21), bool)
    gt[0, 0, 10] = True
    pred[0, 0, :] = True
    m = region_metrics(gt, pred, SPACING)
    assert m["hd95_mm"] == pytest.approx(9.95 * 0.8)
    assert m["msd_mm"] == pytest.approx(10 * 0.8)
    assert m["assd_mm"] == pytest.approx(2 * 0.8 * sum(range(1, 11)) / 22)


def _brute_force_surface_distances(gt: np.ndarray, pred: np.ndarray, spacing) -> np.ndarray:
    """The same definition written out plainly: face neighbours by padding and shifting, all pairwise distances."""

    def surface_points(mask):
        padded = np.pad(mask, 1)  # outside the array is background
        inner = np.ones_like(mask)
        for axis in range(3):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    a, b = surface_points(gt), surface_points(pred)
    pairwise = cdist(a, b)
    return np.concatenate([pairwise.min(axis=1), pairwise.min(axis=0)])


def test_surface_distances_match_brute_force_on_irregular_shapes():
    rng = np.random.default_rng(7)
    for _ in range(3):
        gt = rng.random((6, 9, 10)) < 0.35
        pred = rng.random((6, 9, 10)) < 0.35
        gt[0, 0, 0] = pred[-1, -1, -1] = True  # masks touch the array's border: those voxels are surface voxels
        expected = np.sort(_brute_force_surface_distances(gt, pred, SPACING))
        assert np.allclose(np.sort(surface_distances(gt, pred, SPACING)), expected)


def test_mask_filling_the_array_has_its_border_as_surface():
    full = np.ones((3, 4, 4), bool)
    centre = np.zeros_like(full)
    centre[1, 1:3, 1:3] = True  # the only voxels of `full` that are not on the array's border
    # full -> centre: the 44 border voxels; centre -> full: its 4 voxels, each one step in y or x from the border.
    distances = surface_distances(full, centre, SPACING)
    assert distances.size == 44 + 4
    assert distances.min() == pytest.approx(0.8)
    assert region_metrics(full, centre, SPACING)["msd_mm"] == pytest.approx(
        _brute_force_surface_distances(full, centre, SPACING).max()
    )


@pytest.mark.parametrize(
    ("gt_voxels", "pred_voxels", "expected"),
    [
        (0, 0, {"dice": 1.0, "voe": 0.0, "rvd": 0.0, "assd_mm": 0.0, "msd_mm": 0.0, "hd95_mm": 0.0,
                "precision": 1.0, "recall": 1.0}),
        (0, 4, {"dice": 0.0, "voe": 1.0, "rvd": None, "assd_mm": None, "msd_mm": None, "hd95_mm": None,
                "precision": 0.0, "recall": None}),
        (4, 0, {"dice": 0.0, "voe": 1.0, "rvd": -1.0, "assd_mm": None, "msd_mm": None, "hd95_mm": None,
                "precision": None, "recall": 0.0}),
    ],
)  # fmt: skip
def test_empty_masks(gt_voxels, pred_voxels, expected):
    gt, pred = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    gt.flat[:gt_voxels] = True
    pred.flat[:pred_voxels] = True
    m = region_metrics(gt, pred, SPACING)
    assert {k: m[k] for k in METRICS} == expected
    json.dumps(m, allow_nan=False)


def test_evaluate_case_with_empty_labels_is_json_without_nan():
    empty = np.zeros((4, 6, 6), np.uint8)
    liver = empty.copy()
    liver[1:3, 1:5, 1:5] = 1
    for gt, pred in [(empty, empty), (empty, liver), (liver, empty), (liver, liver)]:
        result = evaluate_case(gt, pred, SPACING)
        assert set(result) == {"liver", "tumour", "lesions"}
        assert result["tumour"]["dice"] == 1.0 and result["lesions"]["f1"] == 1.0  # no tumour anywhere
        json.dumps(result, allow_nan=False)


def test_evaluate_case_regions():
    gt = np.zeros((4, 8, 8), np.uint8)
    gt[:, :4] = 1  # 128 liver voxels
    gt[1:3, 1:3, 1:3] = 2  # 8 of them tumour
    pred = gt.copy()
    pred[1:3, 1:3, 1:3] = 1  # tumour called liver: the liver region is unchanged, the tumour is missed
    pred[0, 6, 6] = 2  # a spurious one-voxel tumour outside the true liver
    result = evaluate_case(gt, pred, SPACING)
    assert result["liver"]["dice"] == pytest.approx(2 * 128 / 257)
    assert result["liver"]["rvd"] == pytest.approx(1 / 128)
    assert result["tumour"]["dice"] == 0.0
    assert result["tumour"]["rvd"] == pytest.approx(-7 / 8)
    assert result["lesions"] == {
        "num_gt": 1, "num_pred": 1, "tp": 0, "fp": 1, "fn": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0
    }  # fmt: skip


# --- lesion detection -------------------------------------------------------------------------------------------


def _mask(shape, *voxels) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for v in voxels:
        mask[v] = True
    return mask


def test_one_voxel_lesions_hit_missed_and_spurious():
    shape = (5, 9, 9)
    gt = _mask(shape, (1, 1, 1), (3, 7, 7))
    pred = _mask(shape, (1, 1, 1), (3, 4, 1))  # first lesion hit; second missed; one spurious component
    d = lesion_detection(gt, pred)
    assert (d["num_gt"], d["num_pred"], d["tp"], d["fp"], d["fn"]) == (2, 2, 1, 1, 1)
    assert (d["precision"], d["recall"], d["f1"]) == (0.5, 0.5, 0.5)


def test_lesions_use_26_connectivity():
    gt = _mask((3, 3, 3), (0, 0, 0), (1, 1, 1))  # touching at a corner only: one lesion
    assert lesion_detection(gt, gt)["num_gt"] == 1


def test_one_blob_over_two_lesions_detects_one():
    gt = _mask((3, 3, 9), (1, 1, 1), (1, 1, 6))
    pred = np.zeros_like(gt)
    pred[:, :, 0:9] = True
    d = lesion_detection(gt, pred)
    assert (d["tp"], d["fp"], d["fn"]) == (1, 0, 1)
    assert d["precision"] == 1.0 and d["recall"] == 0.5 and d["f1"] == pytest.approx(2 / 3)


def test_matching_maximises_summed_iou():
    # Along one row of x: GT1 = x 0-5, GT2 = x 7-8; P2 = x 0, P1 = x 2-8 (overlapping both lesions).
    # IoU(GT1, P1) = 4/9, IoU(GT1, P2) = 1/6, IoU(GT2, P1) = 2/7. Taking the best pair first (GT1-P1) would detect
    # one lesion; the assignment with the largest sum, GT1-P2 + GT2-P1 = 0.452 > 0.444, detects both.
    gt, pred = np.zeros((1, 1, 9), bool), np.zeros((1, 1, 9), bool)
    gt[0, 0, 0:6] = gt[0, 0, 7:9] = True
    pred[0, 0, 0] = pred[0, 0, 2:9] = True
    d = lesion_detection(gt, pred)
    assert (d["num_gt"], d["num_pred"], d["tp"], d["fp"], d["fn"]) == (2, 2, 2, 0, 0)


def test_matching_prefers_a_large_overlap_to_more_matches():
    # GT1 = a 5 x 10 slab, GT2 = one voxel beyond it. P1 covers the lower 3 rows of GT1 and reaches GT2 through a
    # bridge (32 voxels): IoU(GT1, P1) = 30/52, IoU(GT2, P1) = 1/32. P2 = one voxel of GT1's top row: IoU 1/50.
    # The largest sum is GT1-P1 alone (0.58 > 0.02 + 0.03), so one detection, not two.
    gt, pred = np.zeros((1, 5, 12), bool), np.zeros((1, 5, 12), bool)
    gt[0, :, 0:10] = gt[0, 4, 11] = True
    pred[0, 2:5, 0:10] = pred[0, 4, 10:12] = pred[0, 0, 0] = True
    d = lesion_detection(gt, pred)
    assert (d["num_gt"], d["num_pred"], d["tp"], d["fp"], d["fn"]) == (2, 2, 1, 1, 1)


def test_iou_threshold():
    gt = np.zeros((4, 4, 4), bool)
    gt[0:2, 0:2, 0:2] = True  # 8 voxels
    pred = np.zeros_like(gt)
    pred[1:3, 0:2, 0:2] = True  # 8 voxels, 4 shared: IoU 4 / 12
    assert lesion_detection(gt, pred)["tp"] == 1  # default: any overlap
    assert lesion_detection(gt, pred, iou_threshold=0.33)["tp"] == 1
    below = lesion_detection(gt, pred, iou_threshold=0.34)
    assert (below["tp"], below["fp"], below["fn"]) == (0, 1, 1)


@pytest.mark.parametrize(
    ("gt_lesions", "pred_lesions", "scores"),
    [
        (0, 0, (1.0, 1.0, 1.0)),
        (0, 1, (0.0, None, 0.0)),
        (1, 0, (None, 0.0, 0.0)),
    ],
)
def test_lesion_scores_without_lesions(gt_lesions, pred_lesions, scores):
    gt = _mask((3, 3, 3), *[(1, 1, 1)] * gt_lesions)
    pred = _mask((3, 3, 3), *[(1, 1, 1)] * pred_lesions)
    d = lesion_detection(gt, pred)
    assert (d["precision"], d["recall"], d["f1"]) == scores
    assert (d["num_gt"], d["num_pred"]) == (gt_lesions, pred_lesions)
    json.dumps(d, allow_nan=False)
