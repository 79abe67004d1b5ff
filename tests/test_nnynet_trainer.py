"""nnYNetTrainer: the recipe (docs/nnynet.md) and the clinical plumbing of the Y branch, on a micro phantom.

The module fixture writes a 5-case micro phantom, plans it with nnYNetPlanner and preprocesses 3d_fullres in-process.
Derived plans configurations inherit the tiny preset and shorten training to 1 epoch x 2 iterations x 1 validation
iteration, so the two real training runs (latent and clinical mode) go through nnU-Net's own ``run_training`` on CPU.
"""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnyseg.data.clinical import ClinicalNormalisation, dataset_case_ids, load_clinical_table
from nnyseg.losses.dice_focal_ce import DiceFocalCELoss
from nnyseg.planning.planners import TINY_CONFIGURATION, nnYNetPlanner
from nnyseg.registry import get_model
from nnyseg.trainers.base import PLANS_SETTINGS_KEY
from nnyseg.trainers.nnynet import CLINICAL_NORMALISATION_FILE, YBRANCH_TRACE_FILE, nnYNetTrainer
from tests.conftest import QUICK_TRAINER_SETTINGS, plan_micro_phantom

DATASET_ID = 994
PLANS = "nnYNetPlans"
LATENT_RUN, CLINICAL, CLINICAL_RUN = "3d_fullres_tiny_run", "3d_fullres_tiny_clinical", "3d_fullres_tiny_clinical_run"
SHORT = QUICK_TRAINER_SETTINGS
SCHEMA = [
    {"name": "age", "type": "numeric"},
    {"name": "diagnosis", "type": "categorical", "categories": ["HCC", "metastasis"]},
]
AGES = [64.0, None, 58.0, 71.0, 49.0, 66.0]  # case i; case_0005 is the imagesTs case
DIAGNOSES = ["HCC", "metastasis", None, "HCC", "metastasis", "HCC"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Micro phantom -> fingerprint -> nnYNetPlans (+ derived configurations) -> preprocessed 3d_fullres."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    root = tmp_path_factory.mktemp("nnynet")
    mp = pytest.MonkeyPatch()
    mp.setenv("nnUNet_n_proc_DA", "1")  # the planner sets torch's thread count from it
    raw, _, _ = plan_micro_phantom(root, mp, DATASET_ID, nnYNetPlanner, name="YNetPhantom", num_test=1)
    mp.setenv("nnUNet_n_proc_DA", "0")  # training: single-threaded data augmentation (tiny inputs, 2 CPU cores)
    mp.setattr(trainer_module, "default_num_processes", 1)  # export/metrics pool of the final validation
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores, one torch thread is several times faster than two

    training, test = dataset_case_ids(raw)
    ids = training + test
    assert len(ids) == len(AGES)
    cases = {case: {"age": age, "diagnosis": diag} for case, age, diag in zip(ids, AGES, DIAGNOSES, strict=True)}
    (raw / "clinical.json").write_text(json.dumps({"schema": SCHEMA, "cases": cases}, indent=2), encoding="utf-8")

    preprocessed = root / "nnUNet_preprocessed" / raw.name
    plans = json.loads((preprocessed / f"{PLANS}.json").read_text(encoding="utf-8"))
    configurations = plans["configurations"]
    configurations[LATENT_RUN] = {"inherits_from": TINY_CONFIGURATION, PLANS_SETTINGS_KEY: SHORT}
    assert add_clinical_configuration(plans, SCHEMA, base_configuration=TINY_CONFIGURATION) == CLINICAL
    configurations[CLINICAL_RUN] = {"inherits_from": CLINICAL, PLANS_SETTINGS_KEY: SHORT}
    (preprocessed / f"{PLANS}.json").write_text(json.dumps(plans, indent=2), encoding="utf-8")
    dataset_json = json.loads((preprocessed / "dataset.json").read_text(encoding="utf-8"))
    yield {"root": root, "raw": raw, "plans": plans, "dataset_json": dataset_json, "ids": ids}
    torch.set_num_threads(threads)
    mp.undo()


def add_clinical_configuration(plans: dict, schema: list, *, base_configuration: str, name: str | None = None) -> str:
    """A clinical-mode copy of a configuration (the table was added after planning; a user would re-plan)."""
    name = name or f"{base_configuration}_clinical"
    architecture = deepcopy(plans["configurations"][base_configuration]["architecture"])
    architecture["arch_kwargs"].update(cross_attention="clinical", clinical_schema=schema)
    plans["configurations"][name] = {"inherits_from": base_configuration, "architecture": architecture}
    return name


def make_trainer(ws: dict, configuration: str, plans: dict | None = None, fold: int = 0) -> nnYNetTrainer:
    plans = deepcopy(plans or ws["plans"])
    plans["continue_training"] = False  # nnU-Net's run_training puts this in; the trainer pops it
    return nnYNetTrainer(plans, configuration, fold, deepcopy(ws["dataset_json"]), device=torch.device("cpu"))


def fold0(ws: dict) -> dict[str, list[str]]:
    """nnU-Net's fold-0 split (``splits_final.json``, written by the first ``do_split``)."""
    return json.loads(
        (ws["root"] / "nnUNet_preprocessed" / ws["raw"].name / "splits_final.json").read_text(encoding="utf-8")
    )[0]


def fold0_training_keys(ws: dict) -> list[str]:
    return fold0(ws)["train"]


# ----------------------------------------------------------------------------------------------------------- recipe
def test_recipe_settings_optimiser_scheduler_and_loss(workspace):
    s = nnYNetTrainer.settings
    assert (s["optimizer"], s["initial_lr"], s["weight_decay"], s["lr_schedule"], s["num_epochs"]) == (
        "adamw",
        1e-4,
        1e-5,
        "poly",
        1000,
    )
    assert s["num_iterations_per_epoch"] == 250 and s["enable_deep_supervision"] is True
    assert (s["loss_weight_dice"], s["loss_weight_focal"], s["loss_weight_ce"], s["focal_gamma"]) == (1, 1, 1, 2)
    assert s["focal_alpha"] is None

    trainer = make_trainer(workspace, TINY_CONFIGURATION)
    trainer.initialize()
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    cpu = get_model("nnynet").preset("tiny").trainer_settings  # the CPU preset's schedule overrides the recipe's
    lr, epochs = cpu["initial_lr"], cpu["num_epochs"]
    assert group["lr"] == pytest.approx(lr) and group["weight_decay"] == pytest.approx(1e-5)
    assert isinstance(scheduler, PolyLRScheduler)
    assert scheduler.max_steps == trainer.num_epochs == epochs != 1000
    scheduler.step(5)
    assert group["lr"] == pytest.approx(lr * (1 - 5 / epochs) ** 0.9)

    loss = trainer.loss
    assert isinstance(loss, DeepSupervisionWrapper) and isinstance(loss.loss, DiceFocalCELoss)
    n_outputs = 5  # SwinNeXtUNet: /1 ... /16
    expected = np.array([1 / 2**i for i in range(n_outputs)])
    expected[-1] = 0
    np.testing.assert_allclose(loss.weight_factors, expected / expected.sum())  # nnU-Net's weights
    inner = loss.loss
    assert inner.region_based is True  # the phantom is region-based (liver incl. tumour, tumour)
    assert inner.dc.batch_dice == trainer.configuration_manager.batch_dice and inner.dc.smooth == 1e-5
    assert (inner.weight_dice, inner.weight_focal, inner.weight_ce, inner.gamma, inner.alpha) == (1, 1, 1, 2, None)
    assert trainer.cross_attention_mode == "latent" and trainer.clinical_normalisation is None


def test_loss_settings_come_from_the_plans_and_are_validated(workspace):
    plans = deepcopy(workspace["plans"])
    overrides = {"focal_gamma": 1.0, "focal_alpha": 0.25, "loss_weight_ce": 0.5, "initial_lr": 1e-3}
    plans["configurations"]["tuned"] = {"inherits_from": TINY_CONFIGURATION, PLANS_SETTINGS_KEY: overrides}
    trainer = make_trainer(workspace, "tuned", plans)
    trainer.initialize()
    inner = trainer.loss.loss
    assert (inner.gamma, inner.alpha, inner.weight_ce, inner.weight_dice) == (1.0, 0.25, 0.5, 1.0)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)

    plans["configurations"]["bad"] = {"inherits_from": TINY_CONFIGURATION, PLANS_SETTINGS_KEY: {"focal_gamma": -1}}
    trainer = make_trainer(workspace, "bad", plans)
    with pytest.raises(ValueError, match=r"plans 'nnYNetPlans', configuration 'bad'.*gamma"):
        trainer.initialize()


def test_seed_setting_gives_the_same_initial_network(workspace):
    plans = deepcopy(workspace["plans"])
    for name, seed in (("seed0", 0), ("seed0_again", 0), ("seed1", 1)):
        plans["configurations"][name] = {"inherits_from": TINY_CONFIGURATION, PLANS_SETTINGS_KEY: {"seed": seed}}
    weights = {}
    for name in ("seed0", "seed0_again", "seed1"):
        torch.manual_seed(1234 + len(weights))  # whatever state the process is in, the setting decides
        trainer = make_trainer(workspace, name, plans)
        trainer.initialize()
        weights[name] = torch.cat([p.detach().flatten() for p in trainer.network.parameters()])
    assert torch.equal(weights["seed0"], weights["seed0_again"])
    assert not torch.equal(weights["seed0"], weights["seed1"])


# --------------------------------------------------------------------------------------------------------- clinical
def test_clinical_batch_maps_keys_to_rows_in_order(workspace):
    trainer = make_trainer(workspace, CLINICAL)
    trainer.initialize()
    assert trainer.cross_attention_mode == "clinical"
    train_keys = fold0_training_keys(workspace)
    ids = workspace["ids"]
    ages = {case: age for case, age in zip(ids, AGES, strict=True)}
    known = np.array([ages[k] for k in train_keys if ages[k] is not None])
    mean, sd = known.mean(), known.std()
    stats = trainer.clinical_normalisation
    assert stats.fitted_on == sorted(train_keys)
    assert stats.mean["age"] == pytest.approx(mean) and stats.std["age"] == pytest.approx(sd)
    saved = ClinicalNormalisation.load(Path(trainer.output_folder) / CLINICAL_NORMALISATION_FILE)
    assert saved == stats

    # the fold's statistics are in the network's tokenizer, which z-scores the raw rows
    tokenizer = trainer.network.cross_attention.tokenizer
    assert tokenizer.numeric_mean.tolist() == pytest.approx([mean]) and tokenizer.numeric_std.tolist() == pytest.approx(
        [sd]
    )

    keys = [ids[3], ids[1], ids[5], ids[0]]  # any order, a missing age, the imagesTs case
    values, missing = trainer.clinical_batch(keys)
    assert values.shape == missing.shape == (4, 2) and values.dtype == torch.float32
    expected = [[AGES[3], 0.0], [0.0, 1.0], [AGES[5], 0.0], [AGES[0], 0.0]]
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-5)
    np.testing.assert_array_equal(missing.numpy(), [[False, False], [True, False], [False, False], [False, False]])
    with pytest.raises(KeyError, match="case_9999"):
        trainer.clinical_batch(["case_9999"])


def test_clinical_mode_without_a_table_or_with_another_schema_is_a_clear_error(workspace, tmp_path, monkeypatch):
    empty_raw = tmp_path / "raw"
    (empty_raw / workspace["raw"].name).mkdir(parents=True)
    (empty_raw / workspace["raw"].name / "dataset.json").write_text(
        json.dumps(workspace["dataset_json"]), encoding="utf-8"
    )
    monkeypatch.setenv("nnUNet_raw", str(empty_raw))
    trainer = make_trainer(workspace, CLINICAL)
    with pytest.raises(ValueError, match=r"'clinical' cross-attention mode but the raw dataset .* no clinical table"):
        trainer.initialize()

    monkeypatch.setenv("nnUNet_raw", str(workspace["raw"].parent))
    plans = deepcopy(workspace["plans"])
    add_clinical_configuration(plans, SCHEMA[::-1], base_configuration=TINY_CONFIGURATION, name="swapped")
    trainer = make_trainer(workspace, "swapped", plans)
    with pytest.raises(ValueError, match=r"clinical schema of plans 'nnYNetPlans', configuration 'swapped'"):
        trainer.initialize()


# ---------------------------------------------------------------------------------------------- real training runs
def _check_run(trainer: nnYNetTrainer) -> tuple[dict, str]:
    folder = Path(trainer.output_folder)
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnYNetTrainer" and checkpoint["current_epoch"] == 1
    assert any(k.startswith("cross_attention.") for k in checkpoint["network_weights"])
    assert checkpoint["optimizer_state"]["param_groups"][0]["weight_decay"] == pytest.approx(1e-5)
    log = next(folder.glob("training_log_*.txt")).read_text(encoding="utf-8")
    assert "nnyseg trainer settings (nnYNetTrainer)" in log and "'optimizer': 'adamw'" in log
    assert "'num_epochs': 1" in log and "Epoch 0" in log and "Training done." in log
    train_loss = trainer.logger.get_value("train_losses", step=-1)
    assert np.isfinite(train_loss) and np.isfinite(trainer.logger.get_value("val_losses", step=-1))
    return checkpoint, log


def test_short_training_run_latent_mode(workspace):
    trainer = make_trainer(workspace, LATENT_RUN)
    trainer.run_training()
    checkpoint, log = _check_run(trainer)
    assert "cross-attention mode: 'latent'" in log
    assert "cross_attention.latent_tokens" in checkpoint["network_weights"]
    assert not any("numeric_mean" in k for k in checkpoint["network_weights"])
    assert not (Path(trainer.output_folder) / CLINICAL_NORMALISATION_FILE).exists()


def test_short_training_run_clinical_mode_feeds_each_cases_row(workspace):
    trainer = make_trainer(workspace, CLINICAL_RUN)
    trainer.initialize()
    network = trainer.network
    seen_conditions: list = []
    network.register_forward_pre_hook(lambda module, args: seen_conditions.append(module.condition))
    step_keys: list = []
    for name in ("train_step", "validation_step"):
        original = getattr(trainer, name)

        def recording(batch, _original=original):
            step_keys.append(list(batch["keys"]))
            return _original(batch)

        setattr(trainer, name, recording)

    trainer.run_training()
    checkpoint, log = _check_run(trainer)
    assert "nnY-Net clinical mode" in log
    # every training/validation forward got the rows of its batch keys, in order; the condition is cleared after
    assert len(seen_conditions) == len(step_keys) == 3
    for condition, keys in zip(seen_conditions, step_keys, strict=True):
        expected = trainer.clinical_batch(keys)
        torch.testing.assert_close(condition[0], expected[0])
        torch.testing.assert_close(condition[1], expected[1])
    assert network.condition is None
    # the fold's statistics are saved beside the checkpoint and inside it
    saved = json.loads((Path(trainer.output_folder) / CLINICAL_NORMALISATION_FILE).read_text(encoding="utf-8"))
    assert saved == trainer.clinical_normalisation.to_dict()
    weights = checkpoint["network_weights"]
    assert weights["cross_attention.tokenizer.numeric_mean"].tolist() == pytest.approx(
        [saved["numeric"]["age"]["mean"]]
    )
    assert weights["cross_attention.tokenizer.numeric_std"].tolist() == pytest.approx([saved["numeric"]["age"]["std"]])
    assert saved["fitted_on"] == sorted(fold0_training_keys(workspace))

    # nnU-Net's final validation predicts each validation case with that case's row set on the network
    seen_conditions.clear()
    trainer.perform_actual_validation()
    (val_key,) = fold0(workspace)["val"]
    assert seen_conditions and all(c is not None for c in seen_conditions)
    expected = trainer.clinical_batch([val_key])
    for condition in seen_conditions:
        torch.testing.assert_close(condition[0], expected[0])
    assert network.condition is None
    assert (Path(trainer.output_folder) / "validation" / "summary.json").is_file()

    # a new trainer (e.g. nnUNetv2_train --val) loads the checkpoint and keeps its statistics
    again = make_trainer(workspace, CLINICAL_RUN)
    again.load_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    assert again.clinical_normalisation.to_dict() == saved
    table = load_clinical_table(workspace["raw"])
    assert again.clinical_table.rows == table.rows


def test_ybranch_lr_scale_gives_the_branch_its_own_learning_rate_under_the_poly_schedule(workspace):
    plans = deepcopy(workspace["plans"])
    plans["configurations"]["scaled"] = {
        "inherits_from": CLINICAL,
        PLANS_SETTINGS_KEY: {**SHORT, "num_epochs": 10, "ybranch_lr_scale": 10.0},
    }
    trainer = make_trainer(workspace, "scaled", plans)
    trainer.initialize()
    main, branch = trainer.optimizer.param_groups
    branch_ids = {id(p) for p in trainer.network.cross_attention.parameters()}
    assert {id(p) for p in branch["params"]} == branch_ids
    assert not branch_ids & {id(p) for p in main["params"]}
    assert len(main["params"]) + len(branch["params"]) == len(list(trainer.network.parameters()))
    initial_lr = trainer.resolved_settings["initial_lr"]
    for epoch in (0, 3, 9):
        trainer.lr_scheduler.step(epoch)
        poly = initial_lr * (1 - epoch / 10) ** 0.9  # nnU-Net's PolyLR
        assert main["lr"] == pytest.approx(poly) and branch["lr"] == pytest.approx(10 * poly)

    default = make_trainer(workspace, CLINICAL_RUN)
    default.initialize()
    main, branch = default.optimizer.param_groups  # the recipe's default: 5x (docs/nnynet.md, issue #15)
    assert branch["lr"] == pytest.approx(5 * main["lr"])
    plans["configurations"]["scaled"][PLANS_SETTINGS_KEY]["ybranch_lr_scale"] = 1.0
    unscaled = make_trainer(workspace, "scaled", plans)
    unscaled.initialize()
    assert len(unscaled.optimizer.param_groups) == 1  # scale 1: nnU-Net's single group, the behaviour before
    plans["configurations"]["scaled"][PLANS_SETTINGS_KEY]["ybranch_lr_scale"] = 0.0
    with pytest.raises(ValueError, match="ybranch_lr_scale must be > 0"):
        make_trainer(workspace, "scaled", plans).initialize()


def test_ybranch_trace_records_film_sizes_gradients_and_the_flip_effect_per_epoch(workspace):
    plans = deepcopy(workspace["plans"])
    plans["configurations"]["traced"] = {
        "inherits_from": CLINICAL,
        PLANS_SETTINGS_KEY: {**SHORT, "num_epochs": 2, "ybranch_trace": True},
    }
    trainer = make_trainer(workspace, "traced", plans)
    trainer.run_training()
    trace = json.loads((Path(trainer.output_folder) / YBRANCH_TRACE_FILE).read_text(encoding="utf-8"))
    assert [r["epoch"] for r in trace] == [0, 1]
    films = trainer._film_layers()
    assert list(trace[-1]["film_weight_norm"]) == list(films) == ["bottleneck", *[f"level_{i}" for i in range(5)]]
    for name, film in films.items():
        assert trace[-1]["film_weight_norm"][name] == pytest.approx(float(film.weight.detach().norm()), rel=1e-6)
        assert trace[-1]["film_grad_norm"][name] > 0  # every FiLM got a gradient in every epoch
    assert list(trace[-1]["flip_effect"]) == ["diagnosis"]  # categorical fields only
    assert trace[-1]["flip_effect"]["diagnosis"] > 0  # trained FiLMs: the diagnosis moves the output
    # zero FiLMs make the branch the identity, so no diagnosis can change the output
    with torch.no_grad():
        for film in films.values():
            film.weight.zero_()
            film.bias.zero_()
    assert trainer._flip_effects() == {"diagnosis": 0.0}


# ------------------------------------------------------------------------------------------------------- prediction
@pytest.fixture(scope="module")
def clinical_model(workspace):
    """Folds 0 and 1 of the clinical configuration, trained briefly: two folds with their own statistics."""
    means = {}
    for fold in (0, 1):
        trainer = make_trainer(workspace, CLINICAL_RUN, fold=fold)
        trainer.run_training()
        means[fold] = trainer.clinical_normalisation.mean["age"]
    assert means[0] != means[1]  # the folds' training cases differ, and so do their statistics
    return {"folder": Path(trainer.output_folder).parent, "age_means": means}


def _prediction_inputs(ws: dict, folder: Path) -> list[str]:
    """Two cases to predict: the imagesTs case and a training case (so two different clinical rows)."""
    import shutil

    folder.mkdir()
    cases = [ws["ids"][5], ws["ids"][1]]  # case_0005 (imagesTs), case_0001 (its age is missing)
    for case in cases:
        split = "imagesTs" if case == ws["ids"][5] else "imagesTr"
        shutil.copy(ws["raw"] / split / f"{case}_0000.nii.gz", folder / f"{case}_0000.nii.gz")
    return cases


def _predict_argv(inputs: Path, output: Path, *extra: str) -> list[str]:
    return [
        "-i", str(inputs), "-o", str(output), "-d", str(DATASET_ID), "-c", CLINICAL_RUN, "-tr", "nnYNetTrainer",
        "-p", PLANS, "-f", "0", "1", "-device", "cpu", "--disable_tta", "--disable_progress_bar", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("processes", [("-npp", "0", "-nps", "0"), ("-npp", "1", "-nps", "1")], ids=["seq", "mp"])
def test_nnyseg_predict_feeds_each_cases_row_to_every_fold(workspace, clinical_model, tmp_path, monkeypatch, processes):
    from nnyseg.network_architecture.swin_next import SwinNeXtUNet
    from nnyseg.prediction import main

    cases = _prediction_inputs(workspace, tmp_path / "in")
    table = tmp_path / "new_cases.json"
    rows = {cases[0]: {"age": 80.0, "diagnosis": "metastasis"}, cases[1]: {"age": None, "diagnosis": "HCC"}}
    table.write_text(json.dumps({"schema": SCHEMA, "cases": rows}), encoding="utf-8")

    seen = []  # (condition values, condition missing, the fold's age mean) of every forward pass
    original_forward = SwinNeXtUNet.forward

    def recording_forward(self, x, *args, **kwargs):
        values, missing = self.condition
        seen.append((values.tolist(), missing.tolist(), self.cross_attention.tokenizer.numeric_mean.item()))
        return original_forward(self, x, *args, **kwargs)

    monkeypatch.setattr(SwinNeXtUNet, "forward", recording_forward)
    main(_predict_argv(tmp_path / "in", tmp_path / "out", *processes, "--clinical", str(table)))

    for case in cases:
        assert (tmp_path / "out" / f"{case}.nii.gz").is_file()
    # raw rows (the network z-scores them with the statistics of the fold whose weights are loaded)
    expected_rows = {((80.0, 1.0), (False, False)), ((0.0, 0.0), (True, False))}
    assert {(tuple(v[0]), tuple(m[0])) for v, m, _ in seen} == expected_rows
    assert all(len(values) == 1 for values, _, _ in seen)  # one case per sliding-window batch
    # both folds predicted both cases, each fold with its own statistics
    folds_per_row = {}
    for values, missing, mean in seen:
        folds_per_row.setdefault((tuple(values[0]), tuple(missing[0])), set()).add(round(mean, 4))
    expected_means = {round(m, 4) for m in clinical_model["age_means"].values()}
    assert all(means == expected_means for means in folds_per_row.values())


def test_a_clinical_model_without_features_warns_once_and_uses_missing_tokens(workspace, clinical_model, tmp_path):
    from nnyseg.prediction import main

    _prediction_inputs(workspace, tmp_path / "in")
    with pytest.warns(UserWarning, match="got no clinical input") as caught:
        main(_predict_argv(tmp_path / "in", tmp_path / "out", "-npp", "0", "-nps", "0"))
    assert sum("got no clinical input" in str(w.message) for w in caught) == 1  # 2 cases x 2 folds, one warning
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 2


def test_nnyseg_predict_checks_the_table_and_the_model(workspace, clinical_model, tmp_path):
    from nnyseg.data.clinical import load_clinical_file
    from nnyseg.prediction import ClinicalPredictor, main

    cases = _prediction_inputs(workspace, tmp_path / "in")
    table = tmp_path / "t.json"
    # a case without a row: warned about by name, predicted with every field missing
    table.write_text(json.dumps({"schema": SCHEMA, "cases": {cases[0]: {"age": 50.0}}}), encoding="utf-8")
    with pytest.warns(UserWarning, match=rf"no row for 1 case\(s\) \['{cases[1]}'\]"):
        main(_predict_argv(tmp_path / "in", tmp_path / "out", "-npp", "0", "-nps", "0", "--clinical", str(table)))
    # a table whose schema is not the model's
    table.write_text(json.dumps({"schema": SCHEMA[::-1], "cases": {}}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"clinical schema of the model in .*arch_kwargs\['clinical_schema'\]"):
        main(_predict_argv(tmp_path / "in", tmp_path / "out2", "-npp", "0", "-nps", "0", "--clinical", str(table)))
    with pytest.raises(ValueError, match="--clinical needs a table file"):
        main(_predict_argv(tmp_path / "in", tmp_path / "out3", "--clinical"))
    # a model that takes no clinical features
    table.write_text(json.dumps({"schema": SCHEMA, "cases": {}}), encoding="utf-8")
    predictor = ClinicalPredictor(clinical_table=load_clinical_file(table), device=torch.device("cpu"))
    predictor.network = torch.nn.Conv3d(1, 1, 1)
    with pytest.raises(ValueError, match=r"does not take clinical features .*Conv3d.*drop --clinical"):
        predictor.check_model(where="the model")
