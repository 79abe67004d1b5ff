"""LiTS-style evaluation of liver and tumour predictions against ground-truth label files (``nnyseg evaluate``).

Labels follow LiTS: 0 background, 1 liver, 2 tumour. Two regions are scored: liver = labels {1, 2} (the liver
including its tumours) and tumour = label {2}. Arrays are (z, y, x); spacings are given in the same order, in mm.

Voxel metrics of a region, with A the ground-truth mask and B the predicted mask (``|.|`` counts voxels):

* ``dice`` = 2 |A∩B| / (|A| + |B|)
* ``voe`` (volumetric overlap error) = 1 - |A∩B| / |A∪B|
* ``rvd`` (relative volume difference) = (|B| - |A|) / |A|, signed: positive means over-segmentation (the prediction
  is larger than the ground truth), negative under-segmentation.
* ``precision`` = |A∩B| / |B| and ``recall`` = |A∩B| / |A|.

Surface metrics, in mm. The surface of a mask is its boundary voxels: voxels of the mask with at least one of their
six face neighbours outside it (the mask minus its erosion by the 6-connected structuring element; outside the
array counts as background). For every surface voxel of A the distance to the nearest surface voxel of B is taken
between voxel centres, using the spacing, and vice versa; the two directed sets are pooled, and

* ``assd_mm`` (average symmetric surface distance) is the mean of the pooled distances,
* ``msd_mm`` (maximum surface distance, the symmetric Hausdorff distance) is their maximum,
* ``hd95_mm`` is their 95th percentile (numpy's linear interpolation), as ``medpy.metric.binary.hd95`` computes it.

Empty masks. Where a formula would divide by zero the value is defined by this table or is ``None`` (JSON null);
no metric is ever NaN or infinite:

=====================  ====  ===  ====  =========  =========  ======
case                   dice  voe  rvd   distances  precision  recall
=====================  ====  ===  ====  =========  =========  ======
both empty             1     0    0     0          1          1
only A (truth) empty   0     1    None  None       0          None
only B (pred.) empty   0     1    -1    None       None       0
=====================  ====  ===  ====  =========  =========  ======

"Both empty" scores as perfect: there was nothing to find and nothing was found.

Lesion detection compares the connected components (26-connectivity) of the two tumour masks. GT and predicted
components are matched one to one so that the summed IoU of the matched pairs is largest (the Hungarian algorithm);
a matched pair with IoU > 0 and IoU >= ``iou_threshold`` (default 0: any overlap) is a detection. TP = detections,
FN = GT lesions not detected, FP = predicted components that detect nothing, so one predicted blob covering two GT
lesions detects one of them only. Lesion precision = TP / (TP + FP) (None without predicted components), recall =
TP / (TP + FN) (None without GT lesions) and F1 = 2 TP / (2 TP + FP + FN); no lesion in either mask scores 1, 1, 1.
This rule is nnyseg's own; it is not the official LiTS lesion-detection rule.

Aggregates over cases: ``mean`` is the mean and sample standard deviation (n - 1) of each metric over the cases where
it is defined, with their count ``n`` (``sd`` is None below two values). ``global`` sums voxel counts over all cases
before applying the formulas (the LiTS leaderboard's "Dice global"), so large livers weigh more than small ones.
Lesion counts are summed over all cases before computing lesion precision, recall and F1.
"""

from __future__ import annotations

import csv
import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from nnyseg.data.validation import compare_geometry
from nnyseg.io import atomic_file, write_json_atomic

REGIONS: dict[str, tuple[int, ...]] = {"liver": (1, 2), "tumour": (2,)}
METRICS = ("dice", "voe", "rvd", "assd_mm", "msd_mm", "hd95_mm", "precision", "recall")
VOLUME_KEYS = ("gt_volume_ml", "pred_volume_ml")
LESION_KEYS = ("num_gt", "num_pred", "tp", "fp", "fn", "precision", "recall", "f1")
LABEL_VALUES = (0, 1, 2)
LABEL_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
DEFAULT_IOU_THRESHOLD = 0.0

CONVENTIONS = {
    "rvd_sign": "RVD = (|pred| - |gt|) / |gt|: positive = over-segmentation, negative = under-segmentation",
    "empty_masks": (
        "both empty: dice 1, voe 0, rvd 0, distances 0, precision 1, recall 1; "
        "gt empty only: dice 0, voe 1, rvd null, distances null, precision 0, recall null; "
        "prediction empty only: dice 0, voe 1, rvd -1, distances null, precision null, recall 0"
    ),
    "surface": (
        "mask voxels with a face neighbour outside the mask (6-connected erosion, outside the array is background); "
        "distances between voxel centres in mm using the image spacing; both directions pooled"
    ),
    "assd_msd_hd95": (
        "ASSD = mean, MSD = maximum (symmetric Hausdorff), HD95 = 95th percentile (linear interpolation) "
        "of the pooled surface distances, as medpy.metric.binary.hd95"
    ),
    "lesion_matching": (
        "connected tumour components (26-connectivity) matched one to one maximising the summed IoU; "
        f"a matched pair with IoU > 0 and IoU >= {DEFAULT_IOU_THRESHOLD:g} (0: any overlap) is a true positive; "
        "unmatched GT lesions are false negatives, unmatched predicted components false positives; "
        "F1 = 2TP / (2TP + FP + FN); "
        "no lesions in either: precision = recall = F1 = 1"
    ),
    "mean": "mean and sample SD (n - 1) over the cases where the metric is defined (n); null values excluded",
    "global": "voxel counts summed over all cases before applying the formula (LiTS leaderboard 'Dice global')",
}


# --- voxel and surface metrics of one region -------------------------------------------------------------------


@dataclass(frozen=True)
class OverlapCounts:
    """Voxel counts of a ground-truth mask, a predicted mask and their intersection; they add up over cases."""

    gt: int
    pred: int
    intersection: int

    @classmethod
    def of(cls, gt: np.ndarray, pred: np.ndarray) -> OverlapCounts:
        return cls(int(np.count_nonzero(gt)), int(np.count_nonzero(pred)), int(np.count_nonzero(gt & pred)))

    def __add__(self, other: OverlapCounts) -> OverlapCounts:
        return OverlapCounts(self.gt + other.gt, self.pred + other.pred, self.intersection + other.intersection)


def overlap_metrics(counts: OverlapCounts) -> dict[str, float | None]:
    """Dice, VOE, RVD, precision and recall from voxel counts, with the module's empty-mask rules."""
    if counts.gt == 0 and counts.pred == 0:
        return {"dice": 1.0, "voe": 0.0, "rvd": 0.0, "precision": 1.0, "recall": 1.0}
    union = counts.gt + counts.pred - counts.intersection
    return {
        "dice": 2.0 * counts.intersection / (counts.gt + counts.pred),
        "voe": 1.0 - counts.intersection / union,
        "rvd": (counts.pred - counts.gt) / counts.gt if counts.gt else None,
        "precision": counts.intersection / counts.pred if counts.pred else None,
        "recall": counts.intersection / counts.gt if counts.gt else None,
    }


def _surface(mask: np.ndarray) -> np.ndarray:
    face_neighbours = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=face_neighbours, border_value=0)


def surface_distances(gt: np.ndarray, pred: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Distances in mm from every surface voxel of each mask to the nearest surface voxel of the other, pooled.

    Both masks must be non-empty. Only the bounding box of the two masks is processed: every surface voxel lies in
    it, and the distance transform is exact Euclidean, so cropping changes no distance but saves most of a CT volume.
    """
    box = ndimage.find_objects((gt | pred).astype(np.uint8))[0]
    gt_surface, pred_surface = _surface(gt[box]), _surface(pred[box])
    # The distance transform measures each voxel's distance to the nearest zero, so zeros go where the surface is.
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing_zyx)
    to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=spacing_zyx)
    return np.concatenate([to_pred[gt_surface], to_gt[pred_surface]])


def region_metrics(gt: np.ndarray, pred: np.ndarray, spacing_zyx: Sequence[float]) -> dict[str, float | None]:
    """All :data:`METRICS` of a ground-truth and a predicted boolean mask, plus both volumes in ml."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"masks differ in shape: ground truth {gt.shape}, prediction {pred.shape}")
    counts = OverlapCounts.of(gt, pred)
    result = overlap_metrics(counts)
    if counts.gt and counts.pred:
        distances = surface_distances(gt, pred, spacing_zyx)
        result |= {
            "assd_mm": float(distances.mean()),
            "msd_mm": float(distances.max()),
            "hd95_mm": float(np.percentile(distances, 95)),
        }
    else:
        both_empty = counts.gt == counts.pred == 0
        result |= dict.fromkeys(("assd_mm", "msd_mm", "hd95_mm"), 0.0 if both_empty else None)
    ml_per_voxel = float(np.prod(spacing_zyx)) / 1000.0
    return {key: result[key] for key in METRICS} | {
        "gt_volume_ml": counts.gt * ml_per_voxel,
        "pred_volume_ml": counts.pred * ml_per_voxel,
    }


# --- lesion detection -------------------------------------------------------------------------------------------


def detection_scores(tp: int, fp: int, fn: int) -> dict[str, float | None]:
    """Precision, recall and F1 from detection counts, with the module's empty rules."""
    if tp + fp + fn == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    return {
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "f1": 2 * tp / (2 * tp + fp + fn),
    }


def lesion_detection(
    gt_tumour: np.ndarray, pred_tumour: np.ndarray, *, iou_threshold: float = DEFAULT_IOU_THRESHOLD
) -> dict:
    """Match the connected components of two tumour masks one to one; count detections (see the module docstring).

    Returns:
        ``num_gt``, ``num_pred``, ``tp``, ``fp``, ``fn`` (ints) and ``precision``, ``recall``, ``f1``.
    """
    gt_tumour, pred_tumour = np.asarray(gt_tumour, bool), np.asarray(pred_tumour, bool)
    all_neighbours = np.ones((3,) * gt_tumour.ndim, bool)
    gt_lesions, num_gt = ndimage.label(gt_tumour, structure=all_neighbours)
    pred_lesions, num_pred = ndimage.label(pred_tumour, structure=all_neighbours)
    tp = 0
    if num_gt and num_pred:
        # Joint histogram of the two label maps over the tumour voxels: row i, column j counts the voxels in GT
        # lesion i and predicted component j (0 = none), which gives all intersections and sizes in one pass.
        either = gt_tumour | pred_tumour
        pair_index = gt_lesions[either].astype(np.int64) * (num_pred + 1) + pred_lesions[either]
        joint = np.bincount(pair_index, minlength=(num_gt + 1) * (num_pred + 1)).reshape(num_gt + 1, num_pred + 1)
        intersection = joint[1:, 1:]
        union = joint[1:].sum(axis=1)[:, None] + joint[:, 1:].sum(axis=0)[None, :] - intersection
        iou = intersection / union
        rows, cols = linear_sum_assignment(iou, maximize=True)
        matched = iou[rows, cols]
        tp = int(np.count_nonzero((matched > 0) & (matched >= iou_threshold)))
    fp, fn = num_pred - tp, num_gt - tp
    return {"num_gt": num_gt, "num_pred": num_pred, "tp": tp, "fp": fp, "fn": fn} | detection_scores(tp, fp, fn)


# --- one case ---------------------------------------------------------------------------------------------------


def _case_metrics_and_counts(
    gt: np.ndarray, pred: np.ndarray, spacing_zyx: Sequence[float]
) -> tuple[dict, dict[str, OverlapCounts]]:
    if gt.shape != pred.shape:
        raise ValueError(f"label maps differ in shape: ground truth {gt.shape}, prediction {pred.shape}")
    metrics, counts = {}, {}
    for region, labels in REGIONS.items():
        gt_mask, pred_mask = np.isin(gt, labels), np.isin(pred, labels)
        metrics[region] = region_metrics(gt_mask, pred_mask, spacing_zyx)
        counts[region] = OverlapCounts.of(gt_mask, pred_mask)
    tumour = REGIONS["tumour"]
    metrics["lesions"] = lesion_detection(np.isin(gt, tumour), np.isin(pred, tumour))
    return metrics, counts


def evaluate_case(gt: np.ndarray, pred: np.ndarray, spacing_zyx: Sequence[float]) -> dict:
    """Metrics of one case from its (z, y, x) label maps: ``{"liver": {...}, "tumour": {...}, "lesions": {...}}``."""
    return _case_metrics_and_counts(gt, pred, spacing_zyx)[0]


# --- folders ----------------------------------------------------------------------------------------------------


def case_id(path: Path) -> str:
    """File name without its image ending (``case_001.nii.gz`` -> ``case_001``)."""
    ending = next(e for e in LABEL_ENDINGS if path.name.endswith(e))
    return path.name[: -len(ending)]


def _label_files(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: {role} folder does not exist")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and path.name.endswith(LABEL_ENDINGS)):
            continue  # nnU-Net writes plans.json, dataset.json, summary.json etc. beside its predictions
        case = case_id(path)
        if case in files:
            raise ValueError(f"{path}: case {case!r} has two files in the {role} folder ({files[case].name})")
        files[case] = path
    if not files:
        raise ValueError(f"{folder}: no {role} label files ({', '.join(LABEL_ENDINGS)})")
    return files


def _read_label(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(f"{path}: cannot read the label file ({str(error).strip().splitlines()[-1]})") from error
    array = sitk.GetArrayFromImage(image)
    # min/max settle the usual integer file quickly; np.unique (a sort of the whole volume) only runs otherwise.
    in_range = np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= max(LABEL_VALUES)
    if not in_range:
        unexpected = np.setdiff1d(np.unique(array), LABEL_VALUES)
        if unexpected.size:
            shown = ", ".join(str(v) for v in unexpected[:10])
            raise ValueError(f"{path}: label values outside {{0, 1, 2}}: {shown}")
    return array.astype(np.uint8, copy=False), tuple(reversed(image.GetSpacing()))


def _evaluate_pair(pair: tuple[Path, Path]) -> tuple[dict, dict[str, OverlapCounts]]:
    """Pool worker (top level, so spawned processes can import it): read, check and evaluate one case."""
    gt_path, pred_path = pair
    gt, spacing_zyx = _read_label(gt_path)
    pred, _ = _read_label(pred_path)
    problems = compare_geometry(gt_path, pred_path)
    if problems:
        raise ValueError(f"{pred_path}: grid differs from the ground truth {gt_path}: {'; '.join(problems)}")
    return _case_metrics_and_counts(gt, pred, spacing_zyx)


def _mean_sd(values: list[float | None]) -> dict[str, float | int | None]:
    defined = np.array([v for v in values if v is not None], float)
    n = int(defined.size)
    return {
        "mean": float(defined.mean()) if n else None,
        "sd": float(defined.std(ddof=1)) if n > 1 else None,
        "n": n,
    }


def evaluate_folders(
    gt_dir: str | Path, pred_dir: str | Path, *, num_processes: int = 1, progress: bool = True
) -> dict:
    """Evaluate every prediction in ``pred_dir`` against the label of the same case in ``gt_dir``.

    Files are matched by case id (the name without ``.nii.gz``, ``.nii``, ``.mha`` or ``.nrrd``); other files are
    ignored. Ground-truth cases without a prediction are skipped and listed in ``gt_without_prediction`` (an nnU-Net
    validation folder holds one fold only).

    Returns:
        A JSON-ready dict: ``regions``, ``conventions`` (the rules of the module docstring in short), ``num_cases``,
        ``cases`` (sorted ids), ``gt_without_prediction``, ``per_case`` (case id -> :func:`evaluate_case`'s dict),
        ``mean`` (region -> metric -> ``{"mean", "sd", "n"}``), ``global`` (region -> Dice, VOE and RVD of the
        summed voxel counts) and ``lesions`` (TP, FP, FN summed over cases with their precision, recall and F1).
        Undefined values are None, never NaN.

    Raises:
        ValueError: A folder is missing or holds no label files, a prediction has no ground truth, a file cannot be
            read or holds values other than 0, 1, 2, or a prediction's grid differs from its ground truth's.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    gt_files = _label_files(gt_dir, "ground-truth")
    pred_files = _label_files(pred_dir, "prediction")
    without_gt = sorted(set(pred_files) - set(gt_files))
    if without_gt:
        names = ", ".join(pred_files[c].name for c in without_gt)
        raise ValueError(f"{pred_dir}: no ground truth in {gt_dir} for prediction(s) {names}")
    cases = sorted(pred_files)
    pairs = [(gt_files[c], pred_files[c]) for c in cases]
    bar = {"total": len(pairs), "desc": "evaluating", "unit": "case", "disable": not progress}
    if num_processes == 1:
        outcomes = [_evaluate_pair(pair) for pair in tqdm(pairs, **bar)]
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(pairs))) as pool:
            outcomes = list(tqdm(pool.imap(_evaluate_pair, pairs), **bar))

    per_case = {case: metrics for case, (metrics, _) in zip(cases, outcomes, strict=True)}
    totals = {region: sum((c[region] for _, c in outcomes), OverlapCounts(0, 0, 0)) for region in REGIONS}
    lesion_totals = {key: sum(per_case[c]["lesions"][key] for c in cases) for key in ("tp", "fp", "fn")}
    return {
        "regions": {region: list(labels) for region, labels in REGIONS.items()},
        "conventions": dict(CONVENTIONS),
        "num_cases": len(cases),
        "cases": cases,
        "gt_without_prediction": sorted(set(gt_files) - set(pred_files)),
        "per_case": per_case,
        "mean": {
            region: {metric: _mean_sd([per_case[c][region][metric] for c in cases]) for metric in METRICS}
            for region in REGIONS
        },
        "global": {
            region: {key: overlap_metrics(totals[region])[key] for key in ("dice", "voe", "rvd")} for region in REGIONS
        },
        "lesions": lesion_totals | detection_scores(**lesion_totals),
    }


# --- output -----------------------------------------------------------------------------------------------------


def _cell(value: float | int | None, digits: int = 4) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _csv_columns() -> list[str]:
    region_columns = [f"{region}_{key}" for region in REGIONS for key in (*METRICS, *VOLUME_KEYS)]
    return ["case", *region_columns, *(f"lesions_{key}" for key in LESION_KEYS)]


def _markdown_summary(result: dict) -> str:
    lines = [
        "# nnyseg evaluation",
        "",
        f"{result['num_cases']} case(s) evaluated. n counts the cases where a metric is defined; global values sum"
        " the voxel counts of all cases first (Dice, VOE and RVD only).",
    ]
    if result["gt_without_prediction"]:
        skipped = ", ".join(result["gt_without_prediction"])
        lines.append(f"Ground-truth cases without a prediction (not evaluated): {skipped}.")
    for region, labels in result["regions"].items():
        lines += ["", f"## {region} (labels {', '.join(map(str, labels))})", ""]
        lines += ["| metric | mean | SD | n | global |", "|---|---|---|---|---|"]
        for metric in METRICS:
            stats = result["mean"][region][metric]
            global_value = _cell(result["global"][region].get(metric))
            lines.append(
                f"| {metric} | {_cell(stats['mean'])} | {_cell(stats['sd'])} | {stats['n']} | {global_value} |"
            )
    lesions = result["lesions"]
    lines += ["", "## Lesion detection (all cases)", "", "| TP | FP | FN | precision | recall | F1 |"]
    lines += ["|---|---|---|---|---|---|"]
    lines.append("| " + " | ".join(_cell(lesions[k]) for k in ("tp", "fp", "fn", "precision", "recall", "f1")) + " |")
    lines += ["", "## Conventions", ""]
    lines += [f"- **{name}**: {text}" for name, text in result["conventions"].items()]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, output_dir: str | Path) -> list[Path]:
    """Write ``metrics.json``, ``per_case.csv`` (one row per case) and ``summary.md`` into ``output_dir``.

    Each file is written atomically and replaces an earlier one of the same name. Returns the three paths.
    """
    output_dir = Path(output_dir)
    json_path = write_json_atomic(output_dir / "metrics.json", result)
    csv_path = output_dir / "per_case.csv"
    with atomic_file(csv_path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(_csv_columns())
        for case in result["cases"]:
            metrics = result["per_case"][case]
            row = [metrics[region][key] for region in REGIONS for key in (*METRICS, *VOLUME_KEYS)]
            row += [metrics["lesions"][key] for key in LESION_KEYS]
            writer.writerow([case, *("" if value is None else value for value in row)])
    md_path = output_dir / "summary.md"
    with atomic_file(md_path) as tmp:
        tmp.write_text(_markdown_summary(result), encoding="utf-8")
    return [json_path, csv_path, md_path]


def format_summary(result: dict) -> str:
    """A compact terminal table: Dice per case and region, then mean ± SD, global Dice and lesion detection."""
    width = max(10, *(len(c) for c in result["cases"]))

    def row(name: str, cells: list[str]) -> str:
        return f"{name:{width}s} " + " ".join(f"{cell:>17s}" for cell in cells)

    lines = [row("case", [f"{region} Dice" for region in REGIONS])]
    for case in result["cases"]:
        lines.append(row(case, [f"{result['per_case'][case][region]['dice']:.4f}" for region in REGIONS]))
    means = []
    for region in REGIONS:
        stats = result["mean"][region]["dice"]
        means.append(f"{stats['mean']:.4f}" + ("" if stats["sd"] is None else f" ± {stats['sd']:.4f}"))
    lines.append(row("mean ± SD", means))
    lines.append(row("global", [f"{result['global'][region]['dice']:.4f}" for region in REGIONS]))
    lesions = result["lesions"]
    scores = ", ".join(f"{k} {_cell(lesions[k], 3) or 'n/a'}" for k in ("precision", "recall", "f1"))
    lines.append(f"lesions: TP {lesions['tp']}, FP {lesions['fp']}, FN {lesions['fn']}; {scores}")
    skipped = result["gt_without_prediction"]
    if skipped:
        lines.append(f"{len(skipped)} ground-truth case(s) without a prediction were not evaluated")
    return "\n".join(lines)
