"""Trainer settings: defaults equal nnU-Net's, plans overrides are validated, schedules and patch checks work."""

from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnyseg.trainers.base import (
    NNUNET_DEFAULT_SETTINGS,
    _EpochStepLR,
    check_patch_size_for_network,
    resolve_settings,
)


def test_overrides_merge_and_validate():
    s = resolve_settings(NNUNET_DEFAULT_SETTINGS, {"num_epochs": 3, "optimizer": "adamw"})
    assert s["num_epochs"] == 3 and s["optimizer"] == "adamw" and s["initial_lr"] == 1e-2
    with pytest.raises(ValueError, match=r"plans 'P'.*unknown nnyseg trainer setting\(s\) \['num_epoch'\]"):
        resolve_settings(NNUNET_DEFAULT_SETTINGS, {"num_epoch": 3}, source="plans 'P'")
    with pytest.raises(ValueError, match="optimizer='rmsprop' is not one of"):
        resolve_settings(NNUNET_DEFAULT_SETTINGS, {"optimizer": "rmsprop"})
    with pytest.raises(ValueError, match="num_iterations_per_epoch must be a positive integer"):
        resolve_settings(NNUNET_DEFAULT_SETTINGS, {"num_iterations_per_epoch": 0})
    assert resolve_settings(NNUNET_DEFAULT_SETTINGS, {})["seed"] is None  # nnU-Net's default: unseeded
    for bad in (-1, 1.5, True, "0"):
        with pytest.raises(ValueError, match="seed must be null or a non-negative integer"):
            resolve_settings(NNUNET_DEFAULT_SETTINGS, {"seed": bad})


def test_step_schedule_follows_nnunets_epoch_calls():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = _EpochStepLR(opt, step_size=30, gamma=0.8)
    for epoch, expected in [(0, 1e-4), (29, 1e-4), (30, 0.8e-4), (61, 0.64e-4)]:
        sched.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected)


def _plain_net():
    return PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)), 1, 2, 1)


def test_patch_check_for_conv_unet():
    net = _plain_net()
    check_patch_size_for_network(net, [16, 32, 32], [[1, 1, 1], [2, 2, 2], [2, 2, 2]], where="plans X")
    with pytest.raises(
        ValueError, match=r"plans X: patch size \[18, 32, 32\].*nearest valid patch size: \[20, 32, 32\]"
    ):
        check_patch_size_for_network(net, [18, 32, 32], [[1, 1, 1], [2, 2, 2], [2, 2, 2]], where="plans X")


def test_trainer_rejects_a_plans_patch_the_network_cannot_take():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnyseg.registry import get_model
    from nnyseg.trainers.base import nnysegTrainer

    patch, architecture = get_model("nnynet").architecture([1.0, 1.0, 1.0], [32, 64, 64], "tiny")
    configuration = {"patch_size": patch, "architecture": architecture, "batch_size": 2, "spacing": [1, 1, 1]}
    plans = {"plans_name": "nnYNetPlans", "configurations": {"3d_fullres_tiny": configuration}}
    cm = PlansManager(plans).get_configuration("3d_fullres_tiny")
    net = nnysegTrainer.build_network_architecture(PlansManager(plans), cm, 1, 2, True)
    assert net.decoder.deep_supervision is True

    configuration["patch_size"] = [40, 64, 64]  # a hand-edited plans file: 40 is not a multiple of 32
    cm = PlansManager(plans).get_configuration("3d_fullres_tiny")
    with pytest.raises(ValueError, match=r"plans 'nnYNetPlans'.*SwinNeXtUNet.*divisible by 32.*40 -> 32 or 64"):
        nnysegTrainer.build_network_architecture(PlansManager(plans), cm, 1, 2, True)
