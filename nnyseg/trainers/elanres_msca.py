"""Trainers of ELANRes-MSCA-UNet: the paper's recipe and nnU-Net's native recipe (docs/elanres_msca.md).

:class:`ELANResMSCATrainer` trains the paper's recipe (where the paper is silent, docs/elanres_msca.md says what was
chosen and why): Adam at
lr 1e-4 reduced by 20 % every 30 epochs, HybridLoss1 (soft Dice + BCE, 1:1), deep supervision with the full-resolution
output at weight 1 and the next three at ``alpha_e = 0.4 * 0.8 ** floor(e / 30)``, 300 epochs of 250 iterations,
the batch size from the plans. Like every method trainer it trains ELANRes-MSCA-UNet from any plans
(docs/stock-flow.md); the ``_tiny`` variants train the CPU preset. :class:`ELANResMSCATrainer_nnUNet` trains the
same network with nnU-Net's own recipe (SGD + poly, nnU-Net's Dice + CE or Dice + BCE, nnU-Net's deep-supervision
weights, 1000 epochs).

Both build the network switched to its fused inference form whenever nnU-Net asks for it without deep supervision,
which is what ``nnUNetPredictor`` does before loading each fold's weights: prediction with a trained model runs the
re-parameterised (fused) RepConvs automatically, with the same checkpoints. Training, and nnU-Net's validation at the
end of training (which toggles deep supervision off on the *training* network), use the unfused branches.

Extra settings (besides :data:`~nnyseg.trainers.base.NNUNET_DEFAULT_SETTINGS`); a plans configuration may override
them under ``nnyseg_trainer_settings`` like every other setting (e.g. ``{"loss": "hybrid2"}`` for the paper's loss
comparison):

* ``loss``: ``"hybrid1"``, ``"hybrid2"``, ``"dice"``, ``"tversky"``, ``"bce"`` (:func:`nnyseg.losses.hybrid.make_loss`)
  or ``"nnunet"`` (nnU-Net's ``_build_loss``);
* ``loss_bce_weight``, ``loss_smooth``, ``dice_squared``, ``tversky_alpha``, ``tversky_beta``: loss parameters;
* ``ds_weights``: ``"decay"`` (the paper's schedule, updated every epoch) or ``"nnunet"`` (nnU-Net's fixed weights);
* ``ds_alpha``, ``ds_alpha_decay``, ``ds_alpha_every``, ``ds_num_supervised``: the decay schedule
  (:func:`nnyseg.losses.hybrid.decaying_deep_supervision_weights`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnyseg.losses.hybrid import LOSS_NAMES, decaying_deep_supervision_weights, make_loss
from nnyseg.registry import TINY
from nnyseg.trainers.base import NNUNET_DEFAULT_SETTINGS, nnysegMethodTrainer

__all__ = [
    "ELANRES_PAPER_SETTINGS",
    "ELANResMSCATrainer",
    "ELANResMSCATrainer_nnUNet",
    "ELANResMSCATrainer_nnUNet_tiny",
    "ELANResMSCATrainer_tiny",
]

#: The paper's recipe (docs/elanres_msca.md, "Training recipe"); keys after ``lr_step_gamma`` are this trainer's own.
ELANRES_PAPER_SETTINGS: Mapping[str, Any] = MappingProxyType(
    {
        **NNUNET_DEFAULT_SETTINGS,
        "num_epochs": 300,  # the paper gives none; the reference pipeline trains 200
        "optimizer": "adam",
        "initial_lr": 1e-4,
        "weight_decay": 0.0,  # the paper names none; the reference pipeline uses Adam's default (none)
        "lr_schedule": "step",  # "reduced by 20 % every 30 epochs"
        "lr_step_size": 30,
        "lr_step_gamma": 0.8,
        "loss": "hybrid1",  # the paper's selected loss (Table 2)
        "loss_bce_weight": 1.0,  # the paper's balancing weight is not given; the lineage code uses 1
        "loss_smooth": 1e-5,  # nnU-Net's Dice smoothing; the lineage code uses 1
        "dice_squared": False,
        "tversky_alpha": 0.3,  # false positives
        "tversky_beta": 0.7,  # false negatives
        "ds_weights": "decay",
        "ds_alpha": 0.4,
        "ds_alpha_decay": 0.8,
        "ds_alpha_every": 30,
        "ds_num_supervised": 4,  # the paper's four outputs; lower resolutions get weight 0
    }
)

_LOSS_CHOICES = ("nnunet", *LOSS_NAMES)
_DS_CHOICES = ("decay", "nnunet")


def _unwrap(network: nn.Module) -> nn.Module:
    """The plain network inside DDP and ``torch.compile`` wrappers."""
    if isinstance(network, DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


class ELANResMSCATrainer(nnysegMethodTrainer):
    """ELANRes-MSCA-UNet with the paper's recipe; prediction runs the fused (re-parameterised) network.

    Recipe (:data:`ELANRES_PAPER_SETTINGS`): Adam, lr 1e-4, no weight decay, lr x 0.8 every 30 epochs, 300 epochs x
    250 iterations, HybridLoss1 (Dice + BCE for region-based plans, Dice + CE for label-based plans), deep-supervision
    weights ``(1, a, a, a, 0, ...)`` with ``a = 0.4 * 0.8 ** floor(epoch / 30)``, not normalised; batch and patch size
    from the plans. nnU-Net's gradient clipping (norm 12) and augmentation are kept.
    """

    model = "elanres_msca"
    settings: Mapping[str, Any] = ELANRES_PAPER_SETTINGS

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any], source: str) -> None:
        """Checks this trainer's own settings (the base class checks nnU-Net's)."""
        if settings["loss"] not in _LOSS_CHOICES:
            raise ValueError(f"{source}: loss={settings['loss']!r} is not one of {_LOSS_CHOICES}")
        if settings["ds_weights"] not in _DS_CHOICES:
            raise ValueError(f"{source}: ds_weights={settings['ds_weights']!r} is not one of {_DS_CHOICES}")
        for key in ("loss_bce_weight", "loss_smooth", "tversky_alpha", "tversky_beta", "ds_alpha"):
            if not isinstance(settings[key], (int, float)) or settings[key] < 0:
                raise ValueError(f"{source}: {key} must be a number >= 0, got {settings[key]!r}")
        if not isinstance(settings["ds_alpha_decay"], (int, float)) or not 0 < settings["ds_alpha_decay"] <= 1:
            raise ValueError(f"{source}: ds_alpha_decay must be in (0, 1], got {settings['ds_alpha_decay']!r}")
        if not isinstance(settings["ds_alpha_every"], int) or settings["ds_alpha_every"] < 1:
            raise ValueError(f"{source}: ds_alpha_every must be a positive integer, got {settings['ds_alpha_every']!r}")
        n = settings["ds_num_supervised"]
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"{source}: ds_num_supervised must be a positive integer or None, got {n!r}")
        if not isinstance(settings["dice_squared"], bool):
            raise ValueError(f"{source}: dice_squared must be true or false, got {settings['dice_squared']!r}")

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """Builds the network from the plans; without deep supervision (nnU-Net's predictor) in its fused form.

        nnU-Net's predictor calls this with ``enable_deep_supervision=False`` and then loads each fold's checkpoint
        into the returned network; a deployed ELANRes-MSCA-UNet re-fuses on every ``load_state_dict``, so every fold
        is predicted fused. :meth:`initialize` switches a training network back to its branches.
        """
        network = super().build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision
        )
        deploy = getattr(network, "switch_to_deploy", None)
        if not enable_deep_supervision and callable(deploy):
            network.eval()
            deploy()
        return network

    def initialize(self) -> None:
        super().initialize()
        network = _unwrap(self.network)
        # Training without deep supervision builds the network as the predictor does: train the branches instead.
        if getattr(network, "deployed", False) and callable(getattr(network, "switch_to_train", None)):
            network.switch_to_train()
            network.train()

    # ----------------------------------------------------------------------------------------------------------
    # Loss and deep supervision
    # ----------------------------------------------------------------------------------------------------------
    def deep_supervision_weights(self, epoch: int) -> tuple[float, ...]:
        """The decaying deep-supervision weights for ``epoch`` (one per output of the network)."""
        s = self.resolved_settings
        weights = decaying_deep_supervision_weights(
            len(self._get_deep_supervision_scales()),
            epoch,
            alpha=s["ds_alpha"],
            decay=s["ds_alpha_decay"],
            every=s["ds_alpha_every"],
            num_supervised=s["ds_num_supervised"],
        )
        if self.is_ddp and not self._do_i_compile():
            # As nnU-Net: DDP without compile rejects parameters that get no gradient (heads weighted 0).
            weights = tuple(w if w != 0 else 1e-6 for w in weights)
        return weights

    def _build_loss(self) -> nn.Module:
        s = self.resolved_settings
        if s["loss"] == "nnunet":
            loss = super()._build_loss()  # nnU-Net's Dice + CE / Dice + BCE, with nnU-Net's DS weights
        else:
            if self.label_manager.ignore_label is not None:
                raise ValueError(
                    f"{type(self).__name__}: loss {s['loss']!r} does not support ignore labels; use loss 'nnunet'"
                )
            loss = make_loss(
                s["loss"],
                regions=self.label_manager.has_regions,
                batch_dice=self.configuration_manager.batch_dice,
                weight_bce=s["loss_bce_weight"],
                smooth=s["loss_smooth"],
                squared_dice=s["dice_squared"],
                tversky_alpha=s["tversky_alpha"],
                tversky_beta=s["tversky_beta"],
                ddp=self.is_ddp,
            )
            if self.enable_deep_supervision:
                loss = DeepSupervisionWrapper(loss, self.deep_supervision_weights(self.current_epoch))
        if s["ds_weights"] == "decay" and isinstance(loss, DeepSupervisionWrapper):
            loss.weight_factors = self.deep_supervision_weights(self.current_epoch)
        return loss

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.resolved_settings["ds_weights"] == "decay" and isinstance(self.loss, DeepSupervisionWrapper):
            self.loss.weight_factors = self.deep_supervision_weights(self.current_epoch)
            self.print_to_log_file(f"Deep supervision weights: {[round(w, 6) for w in self.loss.weight_factors]}")


class ELANResMSCATrainer_nnUNet(ELANResMSCATrainer):
    """ELANRes-MSCA-UNet with nnU-Net's native recipe: SGD + poly, nnU-Net's loss and deep-supervision weights.

    Only the settings differ from :class:`ELANResMSCATrainer` (``loss`` and ``ds_weights`` set to ``"nnunet"``);
    prediction also runs the fused network.
    """

    settings: Mapping[str, Any] = MappingProxyType(
        {**ELANRES_PAPER_SETTINGS, **NNUNET_DEFAULT_SETTINGS, "loss": "nnunet", "ds_weights": "nnunet"}
    )


class ELANResMSCATrainer_tiny(ELANResMSCATrainer):
    """CPU demo/test variant: the CPU-sized ELANRes-MSCA-UNet and a short schedule (never for real data)."""

    preset = TINY


class ELANResMSCATrainer_nnUNet_tiny(ELANResMSCATrainer_nnUNet):
    """CPU demo/test variant of :class:`ELANResMSCATrainer_nnUNet` (never for real data)."""

    preset = TINY
