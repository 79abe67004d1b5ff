"""The demo's guards and environment (the full pipeline it drives is exercised by test_end_to_end.py)."""

from __future__ import annotations

import pytest

import nnyseg.trainers
from nnyseg.demo import (
    DEFAULT_DEMO_MODELS,
    DEMO_MODELS,
    DEMO_TEST_CASES,
    SMOKE_SCHEDULE,
    cpu_trainer,
    demo_environment,
    run_demo,
)
from nnyseg.registry import list_models


def test_demo_models_are_the_registry_methods_and_train_their_cpu_preset():
    assert set(DEMO_MODELS) == set(list_models(methods_only=True))
    assert DEFAULT_DEMO_MODELS == ("nnynet",)  # the flagship
    for model in DEMO_MODELS:
        trainer = getattr(nnyseg.trainers, cpu_trainer(model))
        assert trainer.model == model and trainer.preset == "tiny"


def test_environment_points_nnunet_into_the_workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_def_n_proc", raising=False)
    env = demo_environment(tmp_path)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        assert env[var] == str(tmp_path / var) and (tmp_path / var).is_dir()
    assert int(env["nnUNet_def_n_proc"]) <= 2


def test_refuses_to_wipe_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(FileExistsError, match="not made by the demo"):
        run_demo(precious)
    assert (precious / "data.txt").read_text(encoding="utf-8") == "keep me"


def test_unknown_model(tmp_path):
    with pytest.raises(ValueError, match="unknown demo model"):
        run_demo(tmp_path / "w", trainers=["nope"])


@pytest.mark.slow
def test_demo_runs_end_to_end_on_the_micro_phantom(tmp_path, capsys):
    results = run_demo(tmp_path / "demo", preset="micro")
    out = capsys.readouterr().out
    workdir = tmp_path / "demo"
    assert set(results) == {"nnynet"}
    assert results["nnynet"]["num_cases"] == DEMO_TEST_CASES
    assert 0.0 <= results["nnynet"]["global"]["liver"]["dice"] <= 1.0
    evaluation = workdir / "evaluation" / "nnynet"
    assert {p.name for p in evaluation.iterdir()} >= {"metrics.json", "per_case.csv", "summary.md"}
    report = workdir / "report" / "nnynet"
    html = (report / "index.html").read_text(encoding="utf-8")
    assert all(case in html for case in results["nnynet"]["cases"])
    pngs = sorted((report / "images").glob("*.png"))
    assert len(pngs) == DEMO_TEST_CASES and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (report / "training" / "fold_0.png").is_file()  # nnU-Net's progress.png, linked from the page
    # the smoke run's short schedule reached the trainer through the plans: 5 epochs, not the CPU preset's 26
    logs = list((workdir / "nnUNet_results").glob("Dataset*/nnYNetTrainer_tiny__nnUNetPlans__3d_fullres/fold_0/*.txt"))
    log = logs[0].read_text(encoding="utf-8")
    last = SMOKE_SCHEDULE["num_epochs"] - 1
    assert f": Epoch {last} \n" in log and f": Epoch {last + 1} \n" not in log
    # the stock commands ran: nnU-Net's own plans, the method trainer's CPU variant
    for shown in (str(report / "index.html"), "nnYNetTrainer_tiny__nnUNetPlans__3d_fullres", "mean ± SD"):
        assert shown in out
    # the demo ends by segmenting one held-out case: its burden from nnyseg segment beside the phantom's truth
    case = sorted(results["nnynet"]["cases"])[0]
    stats = workdir / "segment" / case / "stats.json"
    assert stats.is_file() and (workdir / "segment" / case / "preview.png").is_file()
    assert f"Tumour burden of {case} (nnyseg segment): liver" in out
    assert f"Tumour burden of {case} (the phantom's true labels): liver" in out
    assert "tumour global Dice" in out and "lesion recall" in out
