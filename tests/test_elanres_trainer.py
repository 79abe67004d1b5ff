"""ELANRes-MSCA-UNet trainers: the recipes, the decaying deep supervision, fused prediction, and real training runs.

A micro phantom is planned with ``ELANResMSCAPlanner`` and preprocessed once per module, in-process (nnU-Net 2.8
reads its three folders from the environment lazily). The recipe tests build trainers on the CPU and call
``initialize()``; the training runs go through nnU-Net's own ``run_training()`` for 1 epoch x 2 iterations.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch.nn.modules.batchnorm import _BatchNorm

from nnyseg.losses.hybrid import HybridLoss1, HybridLoss2
from nnyseg.network_architecture.building_blocks.reparam import RepConv
from nnyseg.planning.planners import TINY_CONFIGURATION, ELANResMSCAPlanner
from nnyseg.trainers.base import PLANS_SETTINGS_KEY, _EpochStepLR
from nnyseg.trainers.elanres_msca import ELANRES_PAPER_SETTINGS, ELANResMSCATrainer, ELANResMSCATrainer_nnUNet
from tests.conftest import plan_micro_phantom

DATASET_ID = 994
PLANS = "ELANResMSCAPlans"
QUICK = "3d_fullres_tiny_1epoch"  # a derived configuration: the tiny preset, 1 epoch x 2 iterations x 1 validation
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Micro phantom -> fingerprint -> ELANResMSCAPlans (+ the quick configuration) -> 3d_fullres data."""
    root = tmp_path_factory.mktemp("elanres_trainer")
    mp = pytest.MonkeyPatch()
    _, folder, plans = plan_micro_phantom(
        root, mp, DATASET_ID, ELANResMSCAPlanner, name="ElanTrainer", quick_configuration=QUICK
    )
    yield {
        "root": root,
        "folder": folder,
        "plans": plans,
        "dataset_json": json.loads((folder / "dataset.json").read_text(encoding="utf-8")),
    }
    mp.undo()


def _trainer(planned, cls, configuration: str, *, dataset_json: dict | None = None, **settings):
    """A trainer on the CPU; ``settings`` become the configuration's plans overrides."""
    plans = copy.deepcopy(planned["plans"])
    if settings:
        plans["configurations"]["custom"] = {"inherits_from": configuration, PLANS_SETTINGS_KEY: settings}
        configuration = "custom"
    plans["continue_training"] = False  # what nnU-Net's get_trainer_from_args adds
    return cls(plans, configuration, 0, dataset_json or planned["dataset_json"], CPU)


def _epoch_start(trainer, epoch: int) -> tuple[float, tuple[float, ...]]:
    """Runs nnU-Net's epoch-start hook at ``epoch``; returns the learning rate and deep-supervision weights."""
    trainer.current_epoch = epoch
    trainer.on_train_epoch_start()
    return trainer.optimizer.param_groups[0]["lr"], tuple(trainer.loss.weight_factors)


# --------------------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------------------
def test_paper_recipe(planned):
    trainer = _trainer(planned, ELANResMSCATrainer, "3d_fullres")  # no overrides: the class recipe as is
    trainer.initialize()
    s = trainer.resolved_settings
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.enable_deep_supervision) == (300, 250, True)
    assert trainer.batch_size == planned["plans"]["configurations"]["3d_fullres"]["batch_size"]
    assert (s["loss"], s["ds_weights"], s["loss_bce_weight"]) == ("hybrid1", "decay", 1.0)
    optimizer = trainer.optimizer
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["lr"] == 1e-4 and optimizer.param_groups[0]["weight_decay"] == 0.0
    assert isinstance(trainer.lr_scheduler, _EpochStepLR)
    assert (trainer.lr_scheduler.step_size, trainer.lr_scheduler.gamma) == (30, 0.8)
    # Region-based plans (liver incl. tumour, tumour): HybridLoss1 = Dice + BCE on sigmoid outputs, 1:1.
    assert isinstance(trainer.loss, DeepSupervisionWrapper)
    loss = trainer.loss.loss
    assert type(loss) is HybridLoss1 and loss.overlap.use_sigmoid and loss.bce.use_sigmoid
    assert (loss.weight_overlap, loss.weight_bce) == (1.0, 1.0)
    assert loss.overlap.batch_dice == trainer.configuration_manager.batch_dice
    n_outputs = len(trainer._get_deep_supervision_scales())
    assert n_outputs == 3  # 4 stages
    # The schedule: lr 1e-4 x 0.8 ** floor(e / 30); DS weights (1, a, a) with a = 0.4 x 0.8 ** floor(e / 30).
    for epoch, factor in ((0, 1.0), (29, 1.0), (30, 0.8), (61, 0.64)):
        lr, weights = _epoch_start(trainer, epoch)
        assert lr == pytest.approx(1e-4 * factor, rel=1e-12)
        assert weights == pytest.approx((1.0, 0.4 * factor, 0.4 * factor), rel=1e-12)
    assert weights[1] == pytest.approx(0.256)
    log = Path(trainer.log_file).read_text(encoding="utf-8")
    assert "Deep supervision weights: [1.0, 0.256, 0.256]" in log
    # Training and its validation use the branches; only the predictor's build is fused.
    assert not trainer.network.deployed


def test_paper_recipe_on_label_based_plans_uses_softmax_and_ce(planned):
    dataset_json = {**planned["dataset_json"], "labels": {"background": 0, "liver": 1, "tumor": 2}}
    dataset_json.pop("regions_class_order")
    trainer = _trainer(planned, ELANResMSCATrainer, TINY_CONFIGURATION, dataset_json=dataset_json, loss="hybrid2")
    trainer.initialize()
    loss = trainer.loss.loss
    assert type(loss) is HybridLoss2 and not loss.overlap.use_sigmoid and not loss.overlap.do_bg
    assert (loss.overlap.alpha, loss.overlap.beta) == (0.3, 0.7)


def test_nnunet_recipe_variant(planned):
    assert ELANResMSCATrainer_nnUNet.settings == {
        **ELANRES_PAPER_SETTINGS,
        "num_epochs": 1000,
        "optimizer": "sgd",
        "initial_lr": 1e-2,
        "weight_decay": 3e-5,
        "lr_schedule": "poly",
        "loss": "nnunet",
        "ds_weights": "nnunet",
    }
    trainer = _trainer(planned, ELANResMSCATrainer_nnUNet, "3d_fullres")
    trainer.initialize()
    assert trainer.num_epochs == 1000
    optimizer = trainer.optimizer
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["nesterov"]
    assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["momentum"]) == (1e-2, 0.99)
    assert type(trainer.loss.loss) is DC_and_BCE_loss  # nnU-Net's region loss
    nnunet_weights = (4 / 6, 2 / 6, 0.0)  # 1, 1/2, 1/4 with the lowest zeroed, normalised to sum 1
    assert trainer.loss.weight_factors == pytest.approx(nnunet_weights)
    lr, weights = _epoch_start(trainer, 30)
    assert weights == pytest.approx(nnunet_weights)  # fixed, not decayed
    assert lr == pytest.approx(1e-2 * (1 - 30 / 1000) ** 0.9)
    # Label-based plans get nnU-Net's Dice + CE.
    dataset_json = {**planned["dataset_json"], "labels": {"background": 0, "liver": 1, "tumor": 2}}
    dataset_json.pop("regions_class_order")
    trainer = _trainer(planned, ELANResMSCATrainer_nnUNet, TINY_CONFIGURATION, dataset_json=dataset_json)
    trainer.initialize()
    assert type(trainer.loss.loss) is DC_and_CE_loss


def test_settings_are_validated_and_overridable_from_plans(planned):
    with pytest.raises(ValueError, match=r"loss='focal' is not one of"):
        _trainer(planned, ELANResMSCATrainer, TINY_CONFIGURATION, loss="focal")
    with pytest.raises(ValueError, match="ds_alpha_decay"):
        _trainer(planned, ELANResMSCATrainer, TINY_CONFIGURATION, ds_alpha_decay=1.5)
    with pytest.raises(ValueError, match="unknown nnyseg trainer setting"):
        _trainer(planned, ELANResMSCATrainer, TINY_CONFIGURATION, ds_alpha_rate=0.5)
    # nnU-Net's loss with the paper's decaying weights; and training without deep supervision trains the branches.
    trainer = _trainer(planned, ELANResMSCATrainer, TINY_CONFIGURATION, loss="nnunet", ds_alpha=0.5)
    trainer.initialize()
    assert type(trainer.loss.loss) is DC_and_BCE_loss and trainer.loss.weight_factors == (1.0, 0.5, 0.5)
    trainer = _trainer(planned, ELANResMSCATrainer, TINY_CONFIGURATION, enable_deep_supervision=False)
    trainer.initialize()
    assert type(trainer.loss) is HybridLoss1
    assert not trainer.network.deployed and trainer.network.training


# --------------------------------------------------------------------------------------------------------------
# Fused inference through nnU-Net's predictor
# --------------------------------------------------------------------------------------------------------------
def _fold_weights(pm: PlansManager, seed: int) -> dict[str, torch.Tensor]:
    """A 'trained' fold: the training network with seeded weights, warmed-up BN statistics and non-trivial affines."""
    torch.manual_seed(seed)
    cm = pm.get_configuration(TINY_CONFIGURATION)
    net = ELANResMSCATrainer.build_network_architecture(pm, cm, 1, 2, enable_deep_supervision=True)
    assert not net.deployed
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(2, 1, *cm.patch_size))
        for m in net.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.state_dict()


def test_predictor_runs_the_fused_network(planned, monkeypatch):
    """nnU-Net's predictor: build via the trainer (no deep supervision), load fold 0, then each fold per case."""
    pm = PlansManager(planned["plans"])
    model = planned["root"] / "nnUNet_results" / "fused_model"
    (model / "plans.json").parent.mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps(planned["plans"]), encoding="utf-8")
    (model / "dataset.json").write_text(json.dumps(planned["dataset_json"]), encoding="utf-8")
    folds = [_fold_weights(pm, seed) for seed in (0, 1)]
    for fold, weights in enumerate(folds):
        (model / f"fold_{fold}").mkdir()
        checkpoint = {
            "network_weights": weights,
            "trainer_name": "ELANResMSCATrainer",
            "init_args": {"configuration": TINY_CONFIGURATION},
            "inference_allowed_mirroring_axes": (0, 1, 2),
        }
        torch.save(checkpoint, model / f"fold_{fold}" / "checkpoint_final.pth")
    # nnU-Net's predictor finds the class by its checkpoint name through nnUNet_extTrainer, as nnUNetv2_predict does.
    options = dict(tile_step_size=0.5, use_mirroring=False, device=CPU, verbose=False, allow_tqdm=False)
    predictor = nnUNetPredictor(**options)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(0, 1))
    network = predictor.network
    assert network.deployed and network.state_dict().keys() == folds[0].keys()

    data = torch.randn(1, *pm.get_configuration(TINY_CONFIGURATION).patch_size)
    fused = predictor.predict_logits_from_preprocessed_data(data)
    assert network.deployed
    calls = []
    for m in network.modules():
        if isinstance(m, RepConv):
            m.dense.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        network(data[None])
    assert not calls, "the predictor's network ran RepConv branches"
    # The fused kernels hold the last fold loaded.
    repconv = next(m for m in network.modules() if isinstance(m, RepConv))
    kernel, _ = repconv.get_equivalent_kernel_bias()
    assert torch.allclose(repconv.fused_weight, kernel.float())

    # Reference: nnU-Net's predictor on the unfused network (the training network with deep supervision off).
    cm = pm.get_configuration(TINY_CONFIGURATION)
    unfused_net = ELANResMSCATrainer.build_network_architecture(pm, cm, 1, 2, enable_deep_supervision=True)
    unfused_net.decoder.deep_supervision = False
    reference = nnUNetPredictor(**options)
    reference.manual_initialization(
        unfused_net, pm, cm, folds, planned["dataset_json"], "ELANResMSCATrainer", (0, 1, 2)
    )
    unfused = reference.predict_logits_from_preprocessed_data(data)
    assert not unfused_net.deployed
    # nnU-Net accumulates the sliding-window logits in float16 on the CPU: compare at its resolution (2 ** -10)...
    scale = unfused.abs().max().item()
    assert (fused.float() - unfused.float()).abs().max().item() < 1e-3 * scale
    # ...and the networks' own float32 outputs (fold 1, the last one loaded into both) much tighter.
    unfused_net.eval()
    with torch.no_grad():
        a, b = network(data[None]), unfused_net(data[None])
    assert (a - b).abs().max().item() < 1e-5 * b.abs().max().item()
    # Both folds count: fold 0 alone predicts something else.
    reference.list_of_parameters = folds[:1]
    assert (reference.predict_logits_from_preprocessed_data(data) - unfused).abs().max().item() > 1e-2 * scale


# --------------------------------------------------------------------------------------------------------------
# Real training runs (nnU-Net's own loop: 1 epoch x 2 iterations x 1 validation iteration)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ELANResMSCATrainer, ELANResMSCATrainer_nnUNet])
def test_short_training_run(planned, monkeypatch, cls):
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # augmentation in this process: no worker start-up on 2 cores
    monkeypatch.setattr(nnunet_trainer_module, "default_num_processes", 1)  # one export worker in validation
    start = time.perf_counter()
    trainer = _trainer(planned, cls, QUICK)
    trainer.initialize()
    # Two iterations leave BN's exponential running statistics near their initial (0, 1), which makes eval-mode
    # logits of this deep residual network overflow nnU-Net's float16 validation buffer; cumulative averages are
    # the batch statistics after two iterations. (Real runs make thousands of updates.)
    for m in trainer.network.modules():
        if isinstance(m, _BatchNorm):
            m.momentum = None
    trainer.run_training()
    trained = time.perf_counter() - start

    folder = Path(trainer.output_folder)
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == cls.__name__ and checkpoint["current_epoch"] == 1
    fresh = cls.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, 2, enable_deep_supervision=True
    )
    assert checkpoint["network_weights"].keys() == fresh.state_dict().keys()  # no fused state in checkpoints
    assert all(torch.isfinite(v).all() for v in checkpoint["network_weights"].values() if v.is_floating_point())
    log = next(folder.glob("training_log_*.txt")).read_text(encoding="utf-8")
    assert f"nnyseg trainer settings ({cls.__name__})" in log and "'num_epochs': 1" in log
    assert "Training done." in log and np.isfinite(trainer.logger.get_value("train_losses", 0))
    if cls is ELANResMSCATrainer:
        assert "'optimizer': 'adam'" in log and "Current learning rate: 0.0001" in log
        assert "Deep supervision weights: [1.0, 0.4, 0.4]" in log
        # nnU-Net's final validation runs the training network (deep supervision off), unfused.
        trainer.perform_actual_validation(False)
        assert not trainer.network.deployed
        summary = json.loads((folder / "validation" / "summary.json").read_text(encoding="utf-8"))
        assert set(summary["mean"]) == {"(1, 2)", "2"}
    else:
        assert "'optimizer': 'sgd'" in log and "Current learning rate: 0.01" in log
        assert "Deep supervision weights" not in log
    print(f"{cls.__name__}: training {trained:.1f} s, with checks {time.perf_counter() - start:.1f} s")
