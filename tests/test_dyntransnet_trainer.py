"""DynTransNet trainers: the paper's recipe and nnU-Net's recipe, their losses against the Dice formula, short runs.

A micro phantom is planned once per module with ``DynTransNetPlanner`` and preprocessed in-process. The recipe tests
instantiate the trainers from those plans on the CPU and call ``initialize()``; the two training runs use a derived
configuration that inherits ``3d_fullres_tiny`` with 1 epoch x 2 iterations x 1 validation iteration and go through
nnU-Net's own ``run_training()`` and ``perform_actual_validation()``.
"""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1

from nnyseg.planning.planners import TINY_CONFIGURATION, DynTransNetPlanner
from nnyseg.trainers.base import PLANS_SETTINGS_KEY
from nnyseg.trainers.dyntransnet import (
    DynTransNetTrainer,
    DynTransNetTrainer_nnUNet,
    build_dice_loss,
    deep_supervision_weights,
    iteration_budget,
)
from tests.conftest import plan_micro_phantom

DATASET_ID = 981
PLANS = DynTransNetPlanner.default_plans_name()
SMOKE = "3d_fullres_tiny_smoke"


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Micro phantom -> fingerprint -> DynTransNetPlans (+ the smoke configuration) -> preprocessed 3d_fullres."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    root = tmp_path_factory.mktemp("dyntransnet_trainer")
    mp = pytest.MonkeyPatch()
    _, folder, plans = plan_micro_phantom(
        root, mp, DATASET_ID, DynTransNetPlanner, name="DynTransTrainer", quick_configuration=SMOKE
    )
    plans_file = folder / f"{PLANS}.json"
    dataset_json = json.loads((plans_file.parent / "dataset.json").read_text(encoding="utf-8"))
    # CPU-sized process counts for training (planning needs n_proc_DA > 0): augmentation in the main process, one
    # export/metrics worker. They change speed, not results.
    mp.setenv("nnUNet_n_proc_DA", "0")
    mp.setattr(trainer_module, "default_num_processes", 1)
    yield root, plans, dataset_json
    mp.undo()


def _make_trainer(cls, planned, configuration: str = TINY_CONFIGURATION, dataset_json: dict | None = None):
    _, plans, ds_json = planned
    plans = {**deepcopy(plans), "continue_training": False}  # nnU-Net's __init__ pops this key
    return cls(plans, configuration, 0, deepcopy(dataset_json or ds_json), device=torch.device("cpu"))


def _lr_per_epoch(trainer, epochs: list[int]) -> list[float]:
    lrs = []
    for epoch in epochs:
        trainer.lr_scheduler.step(epoch)  # nnU-Net's on_train_epoch_start call
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    return lrs


# ----------------------------------------------------------------------------------------------------------------
# Hand-computed Dice
# ----------------------------------------------------------------------------------------------------------------
def _hand_dice_loss(probs: np.ndarray, onehot: np.ndarray, *, batch_dice: bool, smooth: float = 1e-5) -> float:
    """``-mean (2 sum p g + s) / (sum p + sum g + s)`` over channels (and samples without batch_dice), in numpy."""
    axes = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
    intersect = (probs * onehot).sum(axis=axes)
    dice = (2 * intersect + smooth) / (probs.sum(axis=axes) + onehot.sum(axis=axes) + smooth)
    return float(-dice.mean())


def _logits_and_regions() -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-made logits (b=2, c=2, 2x2x3) and nested region masks liver (1, 2) >= tumour (2)."""
    logits = torch.tensor(
        [
            [[[0.0, 1.0, -1.0], [2.0, -2.0, 0.5]], [[3.0, -0.5, 1.5], [-3.0, 0.0, 1.0]]],
            [[[-1.0, -2.0, 0.0], [1.0, 1.0, -0.5]], [[0.5, 2.5, -1.5], [0.0, 2.0, -1.0]]],
            [[[1.0, 0.0, 0.0], [-1.0, 2.0, 0.0]], [[0.0, 0.0, 4.0], [-4.0, 0.2, 0.0]]],
            [[[2.0, 2.0, -2.0], [0.0, -1.0, 1.0]], [[1.0, -1.0, 0.0], [0.0, 3.0, -3.0]]],
        ],
        dtype=torch.float32,
    ).reshape(2, 2, 2, 2, 3)
    labels = np.array(
        [[[[0, 1, 2], [1, 1, 0]], [[2, 2, 1], [0, 0, 1]]], [[[1, 1, 1], [0, 2, 0]], [[0, 0, 0], [1, 2, 2]]]]
    )  # (b, x, y, z)
    regions = np.stack([labels >= 1, labels == 2], axis=1).astype(np.float32)  # liver incl. tumour, tumour
    return logits, torch.from_numpy(regions)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_region_dice_loss_equals_the_formula(batch_dice):
    logits, regions = _logits_and_regions()
    loss = build_dice_loss(regions=True, batch_dice=batch_dice)
    assert isinstance(loss, MemoryEfficientSoftDiceLoss) and loss.do_bg is True and loss.smooth == 1e-5
    probs = 1 / (1 + np.exp(-logits.numpy().astype(np.float64)))  # sigmoid, every region channel counts
    expected = _hand_dice_loss(probs, regions.numpy(), batch_dice=batch_dice)
    assert loss(logits, regions).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_label_dice_loss_equals_the_formula_without_background(batch_dice):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 3, 2)
    labels = torch.tensor([0, 1, 2, 2, 1, 0] * 4).reshape(2, 1, 2, 3, 2)
    loss = build_dice_loss(regions=False, batch_dice=batch_dice)
    x = logits.numpy().astype(np.float64)
    probs = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)  # softmax over channels
    onehot = np.stack([(labels[:, 0].numpy() == k) for k in range(3)], axis=1).astype(np.float64)
    expected = _hand_dice_loss(probs[:, 1:], onehot[:, 1:], batch_dice=batch_dice)  # do_bg=False
    assert loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_dice_loss_is_perfect_for_a_perfect_prediction():
    _, regions = _logits_and_regions()
    logits = (regions * 2 - 1) * 50.0  # sigmoid saturates to the masks
    assert build_dice_loss(regions=True, batch_dice=False)(logits, regions).item() == pytest.approx(-1.0, abs=1e-6)


def test_deep_supervision_wrapper_weights_the_scales_like_nnunet():
    weights = deep_supervision_weights(5)
    np.testing.assert_allclose(weights, np.array([1, 0.5, 0.25, 0.125, 0]) / 1.875)
    assert deep_supervision_weights(3, ddp=True)[-1] > 0
    with pytest.raises(ValueError, match="at least 2 outputs"):
        deep_supervision_weights(1)

    logits, regions = _logits_and_regions()
    scales = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    loss = build_dice_loss(regions=True, batch_dice=False, deep_supervision_scales=scales)
    assert isinstance(loss, DeepSupervisionWrapper)
    half = logits[:, :, ::2, ::2, ::2]
    half_target = regions[:, :, ::2, ::2, ::2]
    plain = build_dice_loss(regions=True, batch_dice=False)
    w = deep_supervision_weights(3)
    expected = w[0] * plain(logits, regions).item() + w[1] * plain(half, half_target).item()  # w[2] = 0
    got = loss([logits, half, half], [regions, half_target, half_target]).item()
    assert got == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="smooth"):
        build_dice_loss(regions=True, batch_dice=False, smooth=-1)


def test_iteration_budget_records_both_totals():
    budget = iteration_budget(num_epochs=300, iterations_per_epoch=250, batch_size=2, num_training_cases=105)
    assert budget == {"iterations": 75_000, "patches": 150_000, "paper_iterations": 300 * 53, "paper_patches": 31_500}
    with pytest.raises(ValueError, match="positive integers"):
        iteration_budget(num_epochs=0, iterations_per_epoch=250, batch_size=2, num_training_cases=4)


# ----------------------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------------------
def test_paper_recipe(planned):
    trainer = _make_trainer(DynTransNetTrainer, planned)
    s = DynTransNetTrainer.settings
    assert (s["num_epochs"], s["initial_lr"], s["optimizer"], s["lr_schedule"]) == (300, 1e-4, "adam", "constant")
    assert s["enable_deep_supervision"] is False and s["loss"] == "dice" and s["weight_decay"] == 0.0
    assert trainer.num_epochs == 10  # the tiny preset's override of the class's 300
    trainer.initialize()
    assert trainer.batch_size == 2 and trainer.enable_deep_supervision is False

    opt = trainer.optimizer
    assert type(opt) is torch.optim.Adam
    assert opt.param_groups[0]["lr"] == 1e-4 and opt.param_groups[0]["weight_decay"] == 0.0
    assert _lr_per_epoch(trainer, [0, 1, 5, 9]) == [1e-4] * 4

    loss = trainer.loss
    assert type(loss) is MemoryEfficientSoftDiceLoss  # Dice only, not wrapped for deep supervision
    assert loss.apply_nonlin is torch.sigmoid and loss.do_bg is True and loss.smooth == 1e-5
    assert loss.batch_dice == trainer.configuration_manager.batch_dice
    assert trainer._get_deep_supervision_scales() is None  # nnU-Net then feeds one full-resolution target

    net = trainer.network
    assert net.decoder.deep_supervision is False
    trainer.set_deep_supervision_enabled(True)  # as perform_actual_validation does at its end
    assert net.decoder.deep_supervision is False
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *trainer.configuration_manager.patch_size))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, *trainer.configuration_manager.patch_size)


def test_paper_recipe_at_full_length(planned):
    trainer = _make_trainer(DynTransNetTrainer, planned, "3d_fullres")
    assert trainer.num_epochs == 300 and trainer.num_iterations_per_epoch == 250
    assert trainer.configuration_manager.batch_size >= 2
    trainer.network = torch.nn.Linear(1, 1)  # the optimiser and schedule only need parameters
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    assert _lr_per_epoch(trainer, [0, 1, 150, 299]) == [1e-4] * 4  # constant over all 300 epochs


def test_nnunet_recipe(planned):
    trainer = _make_trainer(DynTransNetTrainer_nnUNet, planned, "3d_fullres")
    assert (trainer.num_epochs, trainer.initial_lr, trainer.weight_decay) == (1000, 1e-4, 3e-5)
    assert trainer.enable_deep_supervision is True
    assert DynTransNetTrainer_nnUNet.settings["loss"] == "nnunet"
    trainer.network = torch.nn.Linear(1, 1)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    epochs = [0, 1, 500, 999]  # nnU-Net's poly schedule: lr0 * (1 - e / 1000) ** 0.9
    expected = [1e-4 * (1 - e / 1000) ** 0.9 for e in epochs]
    np.testing.assert_allclose(_lr_per_epoch(trainer, epochs), expected, rtol=1e-12)

    trainer = _make_trainer(DynTransNetTrainer_nnUNet, planned)
    trainer.initialize()
    opt = trainer.optimizer
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["lr"] == 1e-4 and opt.param_groups[0]["weight_decay"] == 3e-5
    epochs = [0, 3, 9]  # tiny preset: 10 epochs; poly: lr0 * (1 - e / E) ** 0.9
    expected = [1e-4 * (1 - e / 10) ** 0.9 for e in epochs]
    np.testing.assert_allclose(_lr_per_epoch(trainer, epochs), expected, rtol=1e-12)

    loss = trainer.loss
    assert isinstance(loss, DeepSupervisionWrapper) and isinstance(loss.loss, DC_and_BCE_loss)  # regions
    np.testing.assert_allclose(loss.weight_factors, deep_supervision_weights(5))  # /1 ... /16
    assert trainer.network.decoder.deep_supervision is True
    with torch.no_grad():
        out = trainer.network(torch.zeros(1, 1, *trainer.configuration_manager.patch_size))
    assert isinstance(out, list) and len(out) == 5


def test_label_based_dataset_warns_and_uses_softmax_dice(planned):
    ds_json = {**planned[2], "labels": {"background": 0, "liver": 1, "tumor": 2}}
    ds_json.pop("regions_class_order", None)
    trainer = _make_trainer(DynTransNetTrainer, planned, dataset_json=ds_json)
    with pytest.warns(UserWarning, match="label-based.*sigmoid.*do_bg=False") as record:
        trainer.initialize()
    assert sum("label-based" in str(w.message) for w in record) == 1  # warned once
    assert type(trainer.loss) is MemoryEfficientSoftDiceLoss and trainer.loss.do_bg is False
    assert trainer.loss.apply_nonlin is softmax_helper_dim1
    assert "paper trains sigmoid outputs" in Path(trainer.log_file).read_text(encoding="utf-8")

    trainer = _make_trainer(DynTransNetTrainer_nnUNet, planned, dataset_json=ds_json)
    trainer.initialize()
    assert isinstance(trainer.loss.loss, DC_and_CE_loss)


def test_bad_loss_setting_and_ignore_label_are_clear_errors(planned):
    _, plans, ds_json = planned
    plans = deepcopy(plans)
    plans["configurations"]["bad_loss"] = {"inherits_from": TINY_CONFIGURATION, PLANS_SETTINGS_KEY: {"loss": "focal"}}
    with pytest.raises(ValueError, match=r"configuration 'bad_loss': loss='focal' is not one of \('dice', 'nnunet'\)"):
        DynTransNetTrainer(
            {**plans, "continue_training": False}, "bad_loss", 0, deepcopy(ds_json), device=torch.device("cpu")
        )

    ignore_json = {**ds_json, "labels": {**ds_json["labels"], "ignore": 3}}
    trainer = _make_trainer(DynTransNetTrainer, planned, dataset_json=ignore_json)
    with pytest.raises(ValueError, match="does not support an ignore label"):
        trainer.initialize()


# ----------------------------------------------------------------------------------------------------------------
# Short real training runs through nnU-Net's machinery
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "optimizer_name"), [(DynTransNetTrainer, "Adam"), (DynTransNetTrainer_nnUNet, "AdamW")]
)
def test_short_training_run(planned, cls, optimizer_name):
    trainer = _make_trainer(cls, planned, SMOKE)
    trainer.run_training()
    trainer.perform_actual_validation(False)

    folder = Path(trainer.output_folder)
    assert folder.parent.name == f"{cls.__name__}__{PLANS}__{SMOKE}"
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == cls.__name__
    assert checkpoint["current_epoch"] == 1
    assert checkpoint["optimizer_state"]["param_groups"][0]["lr"] == 1e-4
    assert checkpoint["init_args"]["configuration"] == SMOKE

    summary = json.loads((folder / "validation" / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["mean"]) == {"(1, 2)", "2"}  # region-based: liver incl. tumour, and tumour
    assert "Dice" in summary["foreground_mean"]

    log = next(folder.glob("training_log_*.txt")).read_text(encoding="utf-8")
    assert "'num_epochs': 1" in log and "'num_iterations_per_epoch': 2" in log
    assert f"'optimizer': '{optimizer_name.lower()}'" in log
    assert "Iteration budget: 1 epochs x 2 iterations = 2 total iterations of batch 2" in log
    assert "Epoch 0" in log and "train_loss" in log and "Mean Validation Dice" in log
