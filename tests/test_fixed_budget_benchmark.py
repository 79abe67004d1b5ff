"""The fixed-budget accuracy benchmark of speed settings (benchmarks/fixed_budget.py, issue #12).

The benchmark trains two networks (about 7 minutes a seed on 2 cores), so it is not run here; what decides its
reported numbers (the variant it trains and the scores) is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnyseg.data.phantom import write_nnunet_dataset
from tests.conftest import load_benchmark_script

fixed_budget = load_benchmark_script("fixed_budget")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fixed_budget")
    return write_nnunet_dataset(
        root, 991, "FB", num_training=1, num_test=3, preset="micro", seed=4, min_tumours=2, progress=False
    )


def test_perfect_prediction_scores_one(dataset: Path) -> None:
    scores = fixed_budget.scores(dataset / "labelsTs", dataset / "labelsTs")
    assert scores["num_cases"] == 3
    assert scores["liver_global_dice"] == pytest.approx(1.0)
    assert scores["tumour_global_dice"] == pytest.approx(1.0)
    assert scores["lesion_recall"] == pytest.approx(1.0)


def test_a_prediction_without_tumour_scores_zero_tumour_and_keeps_the_liver(dataset: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    for label in (dataset / "labelsTs").glob("*.nii.gz"):
        image = sitk.ReadImage(str(label))
        array = sitk.GetArrayFromImage(image)
        assert (array == 2).any()
        no_tumour = sitk.GetImageFromArray(np.where(array == 2, 1, array).astype(array.dtype))
        no_tumour.CopyInformation(image)
        sitk.WriteImage(no_tumour, str(pred / label.name))
    scores = fixed_budget.scores(dataset / "labelsTs", pred)
    assert scores["liver_global_dice"] == pytest.approx(1.0)  # liver is the union of labels 1 and 2
    assert scores["tumour_global_dice"] == 0.0 and scores["lesion_recall"] == 0.0
    shutil.rmtree(pred)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nnynet"], "must differ from the reference"),
        (["--model", "nnynet", "--speed-setting", "nope"], "no speed setting 'nope'"),
        (["--model", "nnynet", "--speed-setting", "window_4"], "no overrides for preset 'tiny'"),
    ],
)
def test_the_variant_must_be_a_real_change_of_the_cpu_preset(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        fixed_budget.main([*argv, "--no-write"])
    assert message in capsys.readouterr().err
