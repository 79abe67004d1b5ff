"""Dice of liver and tumour per case and over all cases (the LiTS leaderboard's "global Dice").

Regions follow LiTS: liver = labels {1, 2} (liver including tumour), tumour = label {2}. A case where both the
ground truth and the prediction of a region are empty has Dice 1 for it (nothing to find, nothing found); a case
where only one is empty has Dice 0. Global Dice sums intersections and volumes over all cases first, so it has no
empty-case convention.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnyseg.data.validation import compare_geometry

REGIONS: dict[str, tuple[int, ...]] = {"liver": (1, 2), "tumour": (2,)}
NIFTI_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(gt.sum()) + int(pred.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(gt, pred).sum()) / total


def _label_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.name.endswith(NIFTI_ENDINGS)}


def evaluate_folders(gt_dir: str | Path, pred_dir: str | Path, output_json: str | Path | None = None) -> dict:
    """Compare every prediction in ``pred_dir`` with the label of the same name in ``gt_dir``.

    Raises:
        ValueError: A folder is empty or missing, a prediction has no ground truth, or their grids differ.
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for d in (gt_dir, pred_dir):
        if not d.is_dir():
            raise ValueError(f"{d}: not a folder")
    gts, preds = _label_files(gt_dir), _label_files(pred_dir)
    if not preds:
        raise ValueError(f"{pred_dir}: no prediction files ({', '.join(NIFTI_ENDINGS)})")
    missing = sorted(set(preds) - set(gts))
    if missing:
        raise ValueError(f"{gt_dir}: no ground truth for prediction(s) {missing}")
    cases, sums = {}, {r: [0, 0] for r in REGIONS}
    for name, pred_path in preds.items():
        problems = compare_geometry(gts[name], pred_path)
        if problems:
            raise ValueError(f"{pred_path}: grid differs from the ground truth: {'; '.join(problems)}")
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(gts[name])))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_path)))
        cases[name] = {}
        for region, labels in REGIONS.items():
            g, p = np.isin(gt, labels), np.isin(pred, labels)
            cases[name][region] = dice(g, p)
            sums[region][0] += 2 * int(np.logical_and(g, p).sum())
            sums[region][1] += int(g.sum()) + int(p.sum())
    result = {
        "regions": {r: list(v) for r, v in REGIONS.items()},
        "per_case": cases,
        "mean": {r: float(np.mean([c[r] for c in cases.values()])) for r in REGIONS},
        "global": {r: (1.0 if s[1] == 0 else s[0] / s[1]) for r, s in sums.items()},
        "num_cases": len(cases),
    }
    if output_json is not None:
        write_json_atomic(Path(output_json), result)
    return result


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_summary(result: dict) -> str:
    lines = [f"{'case':28s} " + " ".join(f"{r:>8s}" for r in REGIONS)]
    for name, values in result["per_case"].items():
        lines.append(f"{name:28s} " + " ".join(f"{values[r]:8.3f}" for r in REGIONS))
    lines.append(f"{'mean Dice':28s} " + " ".join(f"{result['mean'][r]:8.3f}" for r in REGIONS))
    lines.append(f"{'global Dice':28s} " + " ".join(f"{result['global'][r]:8.3f}" for r in REGIONS))
    return "\n".join(lines)
