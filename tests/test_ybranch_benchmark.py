"""The scoring of the Y-branch benchmark (benchmarks/ybranch.py), on the phantom's clinical variant.

The benchmark itself trains two networks per seed (about 6 minutes a seed on 2 cores), so it is not run here; what
decides its reported numbers (the flipped table, the scores, their subsets and intervals, the report) is.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnyseg.data.phantom import write_nnunet_dataset
from tests.conftest import load_benchmark_script

ybranch = load_benchmark_script("ybranch")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The clinical variant and the plain phantom with the same seed (same images, benign lesions labelled tumour)."""
    root = tmp_path_factory.mktemp("ybranch")
    kwargs = {"num_training": 1, "num_test": 4, "preset": "micro", "seed": 3, "min_tumours": 2, "progress": False}
    clinical = write_nnunet_dataset(root / "clinical", 990, "YB", diagnosis=True, **kwargs)
    plain = write_nnunet_dataset(root / "plain", 990, "YB", **kwargs)
    return clinical, plain


def _diagnoses(raw: Path) -> dict[str, str]:
    cases = json.loads((raw / "clinical.json").read_text(encoding="utf-8"))["cases"]
    return {case: fields["diagnosis"] for case, fields in cases.items()}


def _tumour_voxels(folder: Path, case: str) -> int:
    return int((sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz"))) == 2).sum())


def test_flip_diagnoses_swaps_every_case_and_leaves_the_table_alone(datasets: tuple[Path, Path]) -> None:
    table = json.loads((datasets[0] / "clinical.json").read_text(encoding="utf-8"))
    original = copy.deepcopy(table)
    flipped = ybranch.flip_diagnoses(table)
    assert table == original
    assert flipped["schema"] == table["schema"]
    assert set(flipped["cases"]) == set(table["cases"])
    for case, fields in table["cases"].items():
        assert {fields["diagnosis"], flipped["cases"][case]["diagnosis"]} == {"benign", "malignant"}


def test_perfect_prediction_scores_one_and_no_benign_false_positives(datasets: tuple[Path, Path]) -> None:
    clinical, _ = datasets
    scores = ybranch.tumour_scores(clinical / "labelsTs", clinical / "labelsTs", _diagnoses(clinical))
    assert scores["num_cases"] == 4
    assert scores["tumour_global_dice"] == pytest.approx(1.0)
    assert scores["tumour_global_dice_malignant"] == pytest.approx(1.0)
    assert scores["tumour_voxels_in_benign_cases"] == 0


def test_a_model_blind_to_the_diagnosis_is_charged_for_the_benign_lesions(
    datasets: tuple[Path, Path], tmp_path: Path
) -> None:
    # "Predict" the plain phantom's labels: every lesion marked tumour, what a model that cannot see the diagnosis
    # and finds every lesion does. Malignant cases are then perfect; benign cases hold only false positives.
    clinical, plain = datasets
    diagnoses = _diagnoses(clinical)
    pred = tmp_path / "pred"
    shutil.copytree(plain / "labelsTs", pred)
    scores = ybranch.tumour_scores(clinical / "labelsTs", pred, diagnoses)

    benign = [c for c in sorted(diagnoses) if diagnoses[c] == "benign" and (pred / f"{c}.nii.gz").exists()]
    malignant = [c for c in sorted(diagnoses) if diagnoses[c] == "malignant" and (pred / f"{c}.nii.gz").exists()]
    assert benign and malignant
    false_positives = sum(_tumour_voxels(pred, c) for c in benign)
    true_positives = sum(_tumour_voxels(clinical / "labelsTs", c) for c in malignant)
    assert false_positives > 0 and true_positives > 0
    assert scores["tumour_voxels_in_benign_cases"] == false_positives
    assert scores["tumour_global_dice_malignant"] == pytest.approx(1.0)
    expected = 2 * true_positives / (2 * true_positives + false_positives)
    assert scores["tumour_global_dice"] == pytest.approx(expected)
    assert np.isfinite(scores["liver_global_dice"])


def _seed_scores(clinical: float, latent: float, flipped: float, benign_clinical: int, benign_latent: int) -> dict:
    def mode(dice: float, benign: int) -> dict:
        return {"tumour_global_dice": dice, "tumour_voxels_in_benign_cases": benign}

    return {
        "clinical": mode(clinical, benign_clinical),
        "latent": mode(latent, benign_latent),
        ybranch.FLIPPED: mode(flipped, 0),
    }


@pytest.mark.parametrize(
    ("scores", "met"),
    [
        ((0.80, 0.70, 0.50, 500, 1000), True),  # +0.10 margin, 0.30 flip cost, benign ratio exactly 0.5
        ((0.74, 0.70, 0.50, 100, 1000), False),  # margin +0.04
        ((0.80, 0.70, 0.71, 100, 1000), False),  # flip cost 0.09
        ((0.80, 0.70, 0.50, 501, 1000), False),  # benign ratio 0.501
    ],
)
def test_criteria_are_issue_15s_three_thresholds(scores: tuple, met: bool) -> None:
    result = ybranch.criteria(_seed_scores(*scores))
    clinical, latent, flipped, benign_clinical, benign_latent = scores
    assert result["margin"] == pytest.approx(clinical - latent)
    assert result["flip_cost"] == pytest.approx(clinical - flipped)
    assert result["benign_ratio"] == pytest.approx(benign_clinical / benign_latent)
    assert result["met"] is met


def test_settings_and_trace_rows() -> None:
    assert ybranch.parse_setting("ca_token_std=0.02") == ("ca_token_std", 0.02)
    assert ybranch.parse_setting("ca_film_levels=bottleneck") == ("ca_film_levels", "bottleneck")
    with pytest.raises(Exception, match="KEY=VALUE"):
        ybranch.parse_setting("ca_token_std")
    record = {
        "epoch": 3,
        "film_weight_norm": {"bottleneck": 1.5, "level_0": 0.25},
        "film_grad_norm": {"bottleneck": 0.01, "level_0": 0.5},
        "flip_effect": {"diagnosis": 0.125},
        "category_token_norm": 0.3,
    }
    rows = ybranch.trace_table([record])
    assert len(rows) == 3 and rows[0].count("|") == rows[1].count("|") == rows[2].count("|")
    assert rows[2] == "| 3 | 1.5 | 0.25 | 0.01 | 0.5 | 0.125 | 0.3 |"


def test_scores_on_a_subset_are_the_global_scores_of_those_cases(datasets: tuple[Path, Path], tmp_path: Path) -> None:
    clinical, plain = datasets
    diagnoses = _diagnoses(clinical)
    pred = tmp_path / "pred"
    shutil.copytree(plain / "labelsTs", pred)
    scores = ybranch.tumour_scores(clinical / "labelsTs", pred, diagnoses)
    cases = sorted(scores["cases"])
    whole = ybranch.subset_scores(scores["cases"], diagnoses, cases)
    assert whole["tumour_global_dice"] == pytest.approx(scores["tumour_global_dice"])
    assert whole["tumour_voxels_in_benign_cases"] == scores["tumour_voxels_in_benign_cases"]

    # One benign and one malignant case: the formula on their voxel counts alone.
    benign = next(c for c in cases if diagnoses[c] == "benign")
    malignant = next(c for c in cases if diagnoses[c] == "malignant")
    part = ybranch.subset_scores(scores["cases"], diagnoses, [benign, malignant])
    lesion = _tumour_voxels(clinical / "labelsTs", malignant)
    assert part["tumour_global_dice"] == pytest.approx(2 * lesion / (2 * lesion + _tumour_voxels(pred, benign)))
    assert part["tumour_global_dice_malignant"] == pytest.approx(1.0)
    assert part["tumour_voxels_in_benign_cases"] == _tumour_voxels(pred, benign)


def _counted_seed(clinical_tp: list[int], latent_tp: list[int]) -> dict:
    """A seed's scores from per-case counts: malignant cases of 100 tumour voxels each, then two empty benign ones."""
    names = [f"m{i}" for i in range(len(clinical_tp))] + ["b0", "b1"]
    diagnoses = {n: "malignant" if n.startswith("m") else "benign" for n in names}

    def mode(tps: list[int]) -> dict:
        cases = {f"m{i}": {"tp": tp, "pred": tp, "gt": 100} for i, tp in enumerate(tps)}
        cases.update({b: {"tp": 0, "pred": 0, "gt": 0} for b in ("b0", "b1")})
        return {"cases": cases}

    return {"clinical": mode(clinical_tp), "latent": mode(latent_tp), ybranch.FLIPPED: mode(latent_tp),
            "diagnoses": diagnoses}  # fmt: skip


def test_restrict_recomputes_every_mode_on_the_subset() -> None:
    seed = _counted_seed([100, 50, 0], [50, 50, 50])
    restricted = ybranch.restrict(seed, ["m0", "b0"])
    assert restricted["clinical"]["tumour_global_dice"] == pytest.approx(1.0)
    assert restricted["latent"]["tumour_global_dice"] == pytest.approx(2 * 50 / 150)
    assert ybranch.criteria(restricted)["margin"] == pytest.approx(1.0 - 2 * 50 / 150)


def test_margin_interval_spans_the_case_to_case_spread_and_is_a_point_without_one() -> None:
    # Clinical better on one case, worse on another: the interval must contain both signs.
    low, high = ybranch.margin_interval(_counted_seed([100, 0, 50, 50], [50, 50, 50, 50]), draws=500)
    assert low < 0 < high
    # Clinical better by the same amount on every case: every resample gives the same margin.
    seed = _counted_seed([80, 80, 80], [40, 40, 40])
    margin = ybranch.criteria(ybranch.restrict(seed, list(seed["diagnoses"])))["margin"]
    assert ybranch.margin_interval(seed, draws=200) == pytest.approx((margin, margin))


def test_report_has_one_row_per_seed_and_counts_both_test_sets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No training: run_seed returns per-case counts. Seed 0's clinical model is better on every malignant case;
    # seed 1's only on m2 and m3, so it fails on the first 4 test cases in name order (b0, b1, m0, m1).
    seeds = {0: _counted_seed([90] * 4, [40] * 4), 1: _counted_seed([40, 40, 100, 100], [50] * 4)}
    for scores in seeds.values():
        cases = scores["clinical"]["cases"]
        scores[ybranch.FLIPPED] = {"cases": {c: {**v, "tp": 0, "pred": 0} for c, v in cases.items()}}
        for name in (*ybranch.MODES, ybranch.FLIPPED):
            all_cases = ybranch.subset_scores(scores[name]["cases"], scores["diagnoses"], sorted(cases))
            scores[name].update(all_cases)
        scores.update({"n_test": len(cases), "n_malignant": 4, "minutes": 0.0})

    def fake_run_seed(args: object, seed: int, work: Path) -> dict:
        work.mkdir(parents=True, exist_ok=True)
        return copy.deepcopy(seeds[seed])

    monkeypatch.setattr(ybranch, "run_seed", fake_run_seed)
    monkeypatch.syspath_prepend(str(Path(ybranch.__file__).parent))  # main imports its sibling bench.py
    assert ybranch.main(["--seeds", "0", "1", "--workdir", str(tmp_path), "--also-first", "4", "--no-write"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    header = next(line for line in out.splitlines() if line.startswith("| seed |"))
    assert all(row.count("|") == header.count("|") for row in rows)
    assert "Seeds meeting all three criteria: **2 of 2**." in out
    assert "On the first 4 test cases alone (the same trained models): 1 of 2." in out
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert saved["1"]["criteria"]["met"] is True and saved["1"]["criteria_first"]["met"] is False
    low, high = saved["0"]["margin_interval"]
    assert low == pytest.approx(high) == pytest.approx(saved["0"]["criteria"]["margin"])
