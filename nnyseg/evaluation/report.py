"""``nnyseg report``: a self-contained HTML quality-control page, one section per case, worst case first.

The output folder holds

* ``index.html``: title, date, the folders used, the summary metrics, a colour legend, a table of contents and one
  section per case (its metrics, the tumour burden of its prediction from :mod:`nnyseg.evaluation.burden`, and its
  axial/coronal/sagittal overlay from :mod:`nnyseg.evaluation.overlay`);
  plus a "Training curves" section with nnU-Net's ``progress.png`` of each fold when a results folder is given;
* ``images/CASE.png``: the overlays; ``training/fold_K.png``: the training curves;
* ``metrics.json``, ``per_case.csv`` and ``summary.md``: the metrics shown, as ``nnyseg evaluate -o`` writes them;
  ``metrics.json`` can be reused with ``nnyseg report --metrics``.

The page opens offline from ``file://``: the CSS is inline, every image is embedded as a base64 ``data:`` URI (the
files beside it are copies to download or link to), and nothing refers to another site.

Conventions: the cases are the predicted label files; a case's ground truth has the same file name and its image is
``CASE_0000`` (nnU-Net's first channel) or ``CASE`` with the same ending in the image folder. Metrics follow the
schema of :func:`nnyseg.evaluation.metrics.evaluate_folders`; an undefined value (None) is shown as an en dash.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import quote

from tqdm import tqdm

from nnyseg.data.validation import compare_geometry
from nnyseg.evaluation.burden import Burden, measure_burden
from nnyseg.evaluation.metrics import LABEL_ENDINGS, evaluate_folders, write_outputs
from nnyseg.evaluation.overlay import COLOURS, LABEL_NAMES, LIVER, TUMOUR, render_overlay
from nnyseg.io import atomic_folder

REGIONS = ("liver", "tumour")
# Metric key -> row label, in display order; keys missing from a result are skipped.
METRIC_LABELS = {
    "dice": "Dice",
    "voe": "VOE",
    "rvd": "RVD",
    "assd_mm": "ASSD (mm)",
    "msd_mm": "MSD (mm)",
    "hd95_mm": "HD95 (mm)",
    "precision": "precision",
    "recall": "recall",
    "gt_volume_ml": "volume, ground truth (ml)",
    "pred_volume_ml": "volume, prediction (ml)",
}
LESION_LABELS = {
    "num_gt": "lesions in ground truth",
    "num_pred": "lesions predicted",
    "tp": "true positives",
    "fp": "false positives",
    "fn": "false negatives",
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
}
SORT_RULE = (
    "Cases are sorted worst first by tumour Dice when the ground truth or the prediction contains tumour, otherwise by "
    "liver Dice; cases whose Dice is undefined come first, ties are broken by case id."
)
MISSING = "\N{EN DASH}"

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>$title</title>
<style>
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: middle; margin: 0 0.3em 0 1em; }
section { border-top: 2px solid #ddd; margin-top: 2em; }
img { max-width: 100%; }
.note { color: #555; }
</style>
</head>
<body>
<h1>$title</h1>
<p class="note">Written $date by nnyseg.</p>
<table>
<tr><th>images</th><td>$images</td></tr>
<tr><th>ground truth</th><td>$gt</td></tr>
<tr><th>predictions</th><td>$pred</td></tr>
<tr><th>metrics</th><td>$metrics</td></tr>
<tr><th>training results</th><td>$results</td></tr>
</table>
<p>Contents: <a href="#summary">summary</a>$training_link, <a href="#cases">cases, worst first</a></p>
<h2 id="summary">Summary</h2>
$summary
<p>Overlay colours:$legend (semi-transparent; left column the image alone).</p>
$training
<h2 id="cases">Cases, worst first</h2>
<p>$sort_rule</p>
<ol>
$toc
</ol>
$cases
</body>
</html>
""")


@dataclass(frozen=True)
class CaseFiles:
    """The three files of one case."""

    case: str
    image: Path
    gt: Path
    pred: Path


def find_cases(images: Path, gt: Path, pred: Path) -> list[CaseFiles]:
    """Every predicted case with its ground truth and image, checked to exist and to share the image's grid.

    Raises:
        FileNotFoundError: A folder, or a case's ground truth or image, is missing.
        ValueError: No predictions, or a case's label is not on its image's grid.
    """
    for folder, flag in ((images, "--images"), (gt, "--gt"), (pred, "--pred")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder ({flag})")
    cases = []
    for pred_file in sorted(pred.iterdir()):
        ending = next((e for e in LABEL_ENDINGS if pred_file.name.endswith(e)), None)
        if ending is None or not pred_file.is_file():
            continue  # nnU-Net also writes dataset.json, plans.json and probabilities beside the predictions
        case = pred_file.name[: -len(ending)]
        gt_file = gt / pred_file.name
        if not gt_file.is_file():
            raise FileNotFoundError(f"case {case}: no ground truth {gt_file} for prediction {pred_file}")
        image_file = next((p for p in (images / f"{case}_0000{ending}", images / pred_file.name) if p.is_file()), None)
        if image_file is None:
            raise FileNotFoundError(f"case {case}: no image {case}_0000{ending} (or {pred_file.name}) in {images}")
        problems = compare_geometry(image_file, gt_file) + compare_geometry(image_file, pred_file)
        if problems:
            raise ValueError(f"case {case}: label and image grids differ: {'; '.join(problems)}")
        cases.append(CaseFiles(case, image_file, gt_file, pred_file))
    if not cases:
        raise ValueError(f"{pred}: no predicted label files (endings {', '.join(LABEL_ENDINGS)})")
    return cases


def load_metrics(
    metrics: Path | None, gt: Path, pred: Path, cases: list[str], *, progress: bool = True
) -> dict[str, Any]:
    """Metrics of ``nnyseg evaluate``: read from ``metrics`` (a metrics.json), or computed from the two folders.

    Raises:
        FileNotFoundError: ``metrics`` does not exist.
        ValueError: ``metrics`` is not a metrics.json or has no entry for one of ``cases``.
    """
    if metrics is None:
        return evaluate_folders(gt, pred, progress=progress)
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no such metrics file (--metrics)")
    try:
        result = json.loads(metrics.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{metrics}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(result, dict) or not isinstance(result.get("per_case"), dict):
        raise ValueError(f"{metrics}: not a metrics.json of `nnyseg evaluate` (no 'per_case' table)")
    missing = [case for case in cases if case not in result["per_case"]]
    if missing:
        raise ValueError(f"{metrics}: no metrics for predicted case(s) {missing}")
    incomplete = [c for c in cases if not all(isinstance(result["per_case"][c].get(r), dict) for r in REGIONS)]
    if incomplete:
        raise ValueError(f"{metrics}: no liver or tumour metrics for case(s) {incomplete}")
    return result


def training_curves(results: Path) -> list[Path]:
    """nnU-Net's ``fold_*/progress.png`` in a model's results folder, by fold name.

    Raises:
        FileNotFoundError: The folder is missing or holds no ``fold_*/progress.png``.
    """
    if not results.is_dir():
        raise FileNotFoundError(f"{results}: no such results folder (--results)")
    curves = sorted(results.glob("fold_*/progress.png"))
    if not curves:
        raise FileNotFoundError(
            f"{results}: no fold_*/progress.png; give the model folder that holds the fold_K folders written by "
            "nnUNetv2_train (e.g. $nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION)"
        )
    return curves


def sort_score(case_metrics: dict[str, Any]) -> tuple[str, float | None]:
    """The region a case is ranked by and its Dice (see ``SORT_RULE``)."""
    tumour = case_metrics["tumour"]
    has_tumour = (tumour.get("gt_volume_ml") or 0) > 0 or (tumour.get("pred_volume_ml") or 0) > 0
    region = "tumour" if has_tumour else "liver"
    return region, _number(case_metrics[region].get("dice"))


def worst_first(cases: list[str], per_case: dict[str, dict[str, Any]]) -> list[str]:
    """``cases`` ordered by ``SORT_RULE``."""

    def key(case: str) -> tuple[float, str]:
        dice = sort_score(per_case[case])[1]
        return (-math.inf if dice is None else dice, case)

    return sorted(cases, key=key)


def write_report(
    images: str | Path,
    gt: str | Path,
    pred: str | Path,
    output: str | Path,
    *,
    metrics: str | Path | None = None,
    results: str | Path | None = None,
    title: str = "nnyseg QC report",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the QC report folder atomically (see the module docstring) and return its ``index.html``.

    Args:
        images: Folder of the images (nnU-Net naming, ``CASE_0000.nii.gz``).
        gt: Folder of the ground-truth label files.
        pred: Folder of the predicted label files; every one is a case of the report.
        output: Report folder to write.
        metrics: A metrics.json of ``nnyseg evaluate``; computed from ``gt`` and ``pred`` when None.
        results: An nnU-Net model results folder (holding ``fold_K/progress.png``) whose training curves to show.
        title: Page title.
        overwrite: Replace an existing ``output`` (only once the new report is complete).
        progress: Show a progress bar.

    Raises:
        FileExistsError: ``output`` exists and ``overwrite`` is False.
        FileNotFoundError: A folder, file or training curve is missing (the message names it and the case).
        ValueError: A case's grids differ, or the metrics file does not fit the predictions.
    """
    images, gt, pred, output = Path(images), Path(gt), Path(pred), Path(output)
    metrics = Path(metrics) if metrics is not None else None
    results = Path(results) if results is not None else None
    if output.exists() and not overwrite:  # before the slow part; atomic_folder checks again
        raise FileExistsError(f"{output}: already exists (pass --overwrite to replace it)")
    cases = {c.case: c for c in find_cases(images, gt, pred)}
    result = load_metrics(metrics, gt, pred, list(cases), progress=progress)
    curves = training_curves(results) if results is not None else []
    order = worst_first(list(cases), result["per_case"])

    with atomic_folder(output, overwrite=overwrite) as folder:
        (folder / "images").mkdir()
        toc, sections = [], []
        for rank, case in enumerate(tqdm(order, desc="QC report", unit="case", disable=not progress), start=1):
            files = cases[case]
            overlay = render_overlay(files.image, files.gt, files.pred, title=f"{case} (rank {rank})")
            (folder / "images" / f"{case}.png").write_bytes(overlay.png)
            region, dice = sort_score(result["per_case"][case])
            toc.append(f'<li><a href="#case-{rank}">{_esc(case)}</a>: {region} Dice {_fmt(dice)}</li>')
            burden = measure_burden(files.pred)
            sections.append(
                _case_section(case, rank, result["per_case"][case], overlay.png, overlay.centre_source, burden)
            )
        training = _training_section(curves, folder) if curves else ""
        write_outputs(result, folder)
        page = PAGE.substitute(
            title=_esc(title),
            date=datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            images=_esc(images.resolve()),
            gt=_esc(gt.resolve()),
            pred=_esc(pred.resolve()),
            metrics=_esc(metrics.resolve()) if metrics else "computed from the two label folders",
            results=_esc(results.resolve()) if results else MISSING,
            summary=_summary_tables(result),
            legend=_legend(),
            sort_rule=_esc(SORT_RULE),
            toc="\n".join(toc),
            training=training,
            training_link=', <a href="#training">training curves</a>' if curves else "",
            cases="\n".join(sections),
        )
        (folder / "index.html").write_text(page, encoding="utf-8")
    return output / "index.html"


# --- HTML pieces ----------------------------------------------------------------------------------------------------


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _href(relative_path: str) -> str:
    """A relative link to a file of the report, safe for any file name (``#``, ``?``, spaces)."""
    return _esc(quote(relative_path))


def _number(value: Any) -> float | None:
    """A finite number, or None for undefined values (None, NaN, or anything not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def _fmt(value: Any, key: str = "") -> str:
    """A metric value for the page: counts as integers, volumes to 0.1 ml, distances to 0.01 mm, the rest to 0.001."""
    number = _number(value)
    if number is None:
        return MISSING
    if isinstance(number, int):
        return str(number)
    digits = 1 if key.endswith("_ml") else 2 if key.endswith("_mm") else 3
    return f"{number:.{digits}f}"


def _mean_sd(summary: dict[str, Any] | None, key: str) -> str:
    if not summary:
        return MISSING
    mean, sd, n = (summary.get(k) for k in ("mean", "sd", "n"))
    if _number(mean) is None:
        return MISSING
    spread = f" \N{PLUS-MINUS SIGN} {_fmt(sd, key)}" if _number(sd) is not None else ""
    return f"{_fmt(mean, key)}{spread} (n = {_fmt(n)})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def _summary_tables(result: dict[str, Any]) -> str:
    means, global_ = result.get("mean", {}), result.get("global", {})
    columns = ("mean \N{PLUS-MINUS SIGN} SD", "global")
    header = ["metric"] + [f"{region} {column}" for region in REGIONS for column in columns]
    rows = []
    for key, label in METRIC_LABELS.items():
        if not any(key in means.get(r, {}) or key in global_.get(r, {}) for r in REGIONS):
            continue
        row = [label]
        for region in REGIONS:
            row += [_mean_sd(means.get(region, {}).get(key), key), _fmt(global_.get(region, {}).get(key), key)]
        rows.append(row)
    lesions = result.get("lesions", {})
    lesion_keys = [k for k in ("tp", "fp", "fn", "precision", "recall", "f1") if k in lesions]
    lesion_table = _table(
        ["lesion detection (all cases)"] + [LESION_LABELS[k] for k in lesion_keys],
        [["tumour lesions"] + [_fmt(lesions[k]) for k in lesion_keys]],
    )
    note = (
        '<p class="note">Mean \N{PLUS-MINUS SIGN} SD over the cases where the metric is defined (n); global: one '
        "value from all cases' voxels pooled.</p>"
    )
    conventions = "".join(
        f"<li><b>{_esc(name)}</b>: {_esc(text)}</li>" for name, text in result.get("conventions", {}).items()
    )
    details = f"<details><summary>Metric conventions</summary><ul>{conventions}</ul></details>" if conventions else ""
    return "\n".join((_table(header, rows), note, lesion_table, details))


def _legend() -> str:
    return "".join(
        f'<span class="swatch" style="background: {COLOURS[value]}"></span>{LABEL_NAMES[value]}'
        for value in (LIVER, TUMOUR)
    )


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _burden_rows(burden: Burden) -> list[list[str]]:
    """The prediction's tumour burden (the numbers of ``nnyseg stats``) as rows of the case section."""
    largest = burden.lesions[0] if burden.lesions else None
    return [
        ["liver volume (ml)", _fmt(burden.liver_volume_ml, "_ml")],
        ["tumour volume (ml)", _fmt(burden.tumour_volume_ml, "_ml")],
        ["tumour burden (%)", _fmt(burden.tumour_burden_percent)],
        ["lesions", _fmt(burden.lesion_count)],
        [
            "largest lesion, axial diameters (mm)",
            _fmt(largest.longest_axial_diameter_mm, "_mm")
            + " \N{MULTIPLICATION SIGN} "
            + _fmt(largest.perpendicular_diameter_mm, "_mm")
            if largest
            else MISSING,
        ],
    ]


def _case_section(
    case: str,
    rank: int,
    case_metrics: dict[str, Any],
    png: bytes,
    centre_source: str,
    burden: Burden | None = None,
) -> str:
    rows = [
        [label] + [_fmt(case_metrics.get(region, {}).get(key), key) for region in REGIONS]
        for key, label in METRIC_LABELS.items()
    ]
    lesions = case_metrics.get("lesions", {})
    lesion_rows = [[label, _fmt(lesions.get(key))] for key, label in LESION_LABELS.items()]
    burden_table = f"\n{_table(['tumour burden, prediction', ''], _burden_rows(burden))}" if burden else ""
    name = _esc(case)
    return (
        f'<section id="case-{rank}">\n<h3>{rank}. {name}</h3>\n'
        f'<div style="display: flex; gap: 2em; flex-wrap: wrap">\n'
        f"{_table(['metric', *REGIONS], rows)}\n{_table(['tumour lesions', ''], lesion_rows)}{burden_table}\n</div>\n"
        f'<p class="note">Axial, coronal and sagittal views through the {_esc(centre_source)}.</p>\n'
        f'<a href="{_href(f"images/{case}.png")}"><img src="{_data_uri(png)}" alt="overlay of {name}"></a>\n</section>'
    )


def _training_section(curves: list[Path], folder: Path) -> str:
    """Copy each fold's progress.png into ``folder/training`` and return the HTML that shows them."""
    (folder / "training").mkdir()
    parts = ['<section id="training">\n<h2>Training curves</h2>']
    for curve in curves:
        fold = curve.parent.name
        shutil.copyfile(curve, folder / "training" / f"{fold}.png")
        parts.append(
            f'<h3>{_esc(fold)}</h3>\n<p class="note">nnU-Net\'s {_esc(curve)}</p>\n'
            f'<a href="{_href(f"training/{fold}.png")}"><img src="{_data_uri(curve.read_bytes())}" '
            f'alt="training curves of {_esc(fold)}"></a>'
        )
    return "\n".join(parts) + "\n</section>"
