"""DynTransNet trainers: the paper's recipe and nnU-Net's native recipe (docs/dyntransnet.md).

Zheng et al., "DynTransNet: Dynamic Transformer Network with multi-scale attention for liver cancer segmentation",
Front. Oncol. 15:1569083 (2025). Table 1 of the paper gives the whole training recipe: Adam, learning rate 1e-4,
DiceLoss, 300 epochs, batch size 2; the output is a 1x1x1 convolution followed by a sigmoid. Neither a learning-rate
schedule, weight decay nor deep supervision is mentioned.

:class:`DynTransNetTrainer` maps that recipe onto nnU-Net (and, like every method trainer, trains DynTransNet from any
plans, docs/stock-flow.md; the ``_tiny`` variants train the CPU preset):

* Adam (``torch.optim.Adam``), lr 1e-4, weight decay 0 (PyTorch's default; the paper names none), constant learning
  rate (``lr_schedule="constant"``);
* Dice loss only, on sigmoid outputs through nnU-Net's region-based training (regions liver = (1, 2), tumour = (2,)):
  :func:`build_dice_loss`, nnU-Net's ``MemoryEfficientSoftDiceLoss`` as ``nnUNetTrainerDiceLoss`` configures it
  (``do_bg=True`` for regions, ``smooth=1e-5``, ``batch_dice`` from the plans). On a label-based dataset the trainer
  warns and uses softmax Dice without the background channel (``do_bg=False``), nnUNetTrainerDiceLoss's choice;
* deep supervision off: the network is built with ``deep_supervision=False`` and returns one full-resolution logit
  map, nnU-Net then skips the down-sampled targets, and the loss is not wrapped in ``DeepSupervisionWrapper``;
* 300 epochs, batch size from the plans (2 in the tiny preset; nnU-Net's planning gives at least 2).

An nnU-Net epoch is ``num_iterations_per_epoch`` (250) iterations, while the paper's epoch is presumably one pass over
its training cases. The two budgets therefore differ; the trainer writes both totals to the training log at the start
of training (:func:`iteration_budget`).

:class:`DynTransNetTrainer_nnUNet` is nnU-Net's native recipe for the same network: AdamW lr 1e-4 with nnU-Net's
poly schedule and weight decay, nnU-Net's own DC + CE (labels) or DC + BCE (regions) loss, deep supervision on, 1000
epochs. It only sets the settings dict.

Both read every hyperparameter from :attr:`settings`, which a plans configuration may override under
``nnyseg_trainer_settings`` (see :mod:`nnyseg.trainers.base`). ``"loss"`` is this module's extra setting: ``"dice"``
(the paper's Dice-only loss) or ``"nnunet"`` (nnU-Net's compound loss).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1
from torch import nn

from nnyseg.registry import TINY
from nnyseg.trainers.base import NNUNET_DEFAULT_SETTINGS, nnysegMethodTrainer

__all__ = [
    "LOSSES",
    "PAPER_BATCH_SIZE",
    "PAPER_EPOCHS",
    "DynTransNetTrainer",
    "DynTransNetTrainer_nnUNet",
    "DynTransNetTrainer_nnUNet_tiny",
    "DynTransNetTrainer_tiny",
    "build_dice_loss",
    "deep_supervision_weights",
    "iteration_budget",
]

#: Values of the ``"loss"`` setting: the paper's Dice-only loss, or nnU-Net's DC + CE / DC + BCE.
LOSSES: tuple[str, ...] = ("dice", "nnunet")
#: Table 1 of the paper.
PAPER_EPOCHS = 300
PAPER_BATCH_SIZE = 2
PAPER_LR = 1e-4
#: Smoothing of nnU-Net's soft Dice (``nnUNetTrainerDiceLoss``).
DICE_SMOOTH = 1e-5

_LABEL_BASED_WARNING = (
    "{trainer}: the dataset is label-based (dataset.json defines no regions), but DynTransNet's paper trains sigmoid "
    "outputs with a Dice loss. Training softmax Dice without the background channel (do_bg=False) instead; for the "
    "paper's setting define the regions liver = [1, 2] and tumour = 2 with regions_class_order [1, 2] in dataset.json."
)


def deep_supervision_weights(num_outputs: int, *, ddp: bool = False) -> np.ndarray:
    """nnU-Net's deep-supervision weights: ``1 / 2**i`` per output, the lowest resolution ignored, sum 1.

    Args:
        num_outputs: Number of network outputs (deep-supervision scales), highest resolution first.
        ddp: Give the lowest output a weight of 1e-6 instead of 0, as nnU-Net does under DDP (a zero weight leaves
            parameters without gradient, which DDP rejects).

    Raises:
        ValueError: ``num_outputs`` is smaller than 2.
    """
    if num_outputs < 2:
        raise ValueError(f"deep supervision needs at least 2 outputs, got {num_outputs}")
    weights = np.array([1 / 2**i for i in range(num_outputs)])
    weights[-1] = 1e-6 if ddp else 0.0
    return weights / weights.sum()


def build_dice_loss(
    *,
    regions: bool,
    batch_dice: bool,
    deep_supervision_scales: Sequence[Sequence[float]] | None = None,
    ddp: bool = False,
    smooth: float = DICE_SMOOTH,
) -> nn.Module:
    """The paper's Dice-only loss, built as nnU-Net's ``nnUNetTrainerDiceLoss`` builds it.

    The loss takes logits ``x`` of shape ``(b, c, x, y, z)`` and a target ``y`` that is either a label map
    ``(b, 1, x, y, z)`` or, for regions, the one-hot region masks ``(b, c, x, y, z)``; it returns the scalar

    ``-mean_k (2 * sum_v p_kv * g_kv + smooth) / (sum_v p_kv + sum_v g_kv + smooth)``

    with ``p = sigmoid(x)`` for regions (every region channel ``k``) and ``p = softmax(x, dim=1)`` for labels (the
    background channel left out). ``v`` runs over the voxels of one sample, or of the whole batch if ``batch_dice``;
    ``k`` over the channels (and the samples, without ``batch_dice``). The value is the negative soft Dice, as in
    nnU-Net: it differs from ``1 - Dice`` by a constant only, so the gradients are identical.

    Args:
        regions: Region-based training (sigmoid outputs, all channels are foreground regions).
        batch_dice: Sum over the batch before the ratio (the plans' ``batch_dice``).
        deep_supervision_scales: nnU-Net's deep-supervision scales; if given the loss is wrapped in
            ``DeepSupervisionWrapper`` with :func:`deep_supervision_weights` and takes lists of outputs and targets.
        ddp: Training under DDP (the Dice sums are then gathered over the workers, as in nnU-Net).
        smooth: Added to numerator and denominator.

    Raises:
        ValueError: ``smooth`` is negative.
    """
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")
    loss: nn.Module = MemoryEfficientSoftDiceLoss(
        apply_nonlin=torch.sigmoid if regions else softmax_helper_dim1,
        batch_dice=batch_dice,
        do_bg=regions,
        smooth=smooth,
        ddp=ddp,
    )
    if deep_supervision_scales is not None:
        loss = DeepSupervisionWrapper(loss, deep_supervision_weights(len(deep_supervision_scales), ddp=ddp))
    return loss


def iteration_budget(
    *,
    num_epochs: int,
    iterations_per_epoch: int,
    batch_size: int,
    num_training_cases: int,
    paper_epochs: int = PAPER_EPOCHS,
    paper_batch_size: int = PAPER_BATCH_SIZE,
) -> dict[str, int]:
    """This run's total iterations and patches next to the paper's, if its epoch is one pass over the cases.

    nnU-Net's epoch is a fixed number of iterations, the paper's (presumably) one pass over its training cases, i.e.
    ``ceil(num_training_cases / paper_batch_size)`` iterations.

    Returns:
        ``iterations`` and ``patches`` of this run, ``paper_iterations`` and ``paper_patches`` of the paper's recipe
        on the same training cases.

    Raises:
        ValueError: A count is not positive.
    """
    counts = {
        "num_epochs": num_epochs,
        "iterations_per_epoch": iterations_per_epoch,
        "batch_size": batch_size,
        "num_training_cases": num_training_cases,
        "paper_epochs": paper_epochs,
        "paper_batch_size": paper_batch_size,
    }
    bad = {k: v for k, v in counts.items() if not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"iteration_budget needs positive integers, got {bad}")
    paper_iterations = paper_epochs * math.ceil(num_training_cases / paper_batch_size)
    return {
        "iterations": num_epochs * iterations_per_epoch,
        "patches": num_epochs * iterations_per_epoch * batch_size,
        "paper_iterations": paper_iterations,
        "paper_patches": paper_epochs * num_training_cases,
    }


class DynTransNetTrainer(nnysegMethodTrainer):
    """DynTransNet's paper recipe (Table 1) in nnU-Net: Adam 1e-4, constant lr, Dice loss on sigmoid regions, no DS.

    See the module docstring for the mapping and :attr:`settings` for the values. The extra setting ``"loss"``
    selects ``"dice"`` (this recipe) or ``"nnunet"`` (nnU-Net's DC + CE / DC + BCE, :class:`DynTransNetTrainer_nnUNet`).
    """

    model = "dyntransnet"
    settings: Mapping[str, Any] = MappingProxyType(
        {
            **NNUNET_DEFAULT_SETTINGS,
            "num_epochs": PAPER_EPOCHS,
            "initial_lr": PAPER_LR,
            "weight_decay": 0.0,
            "optimizer": "adam",
            "lr_schedule": "constant",
            "enable_deep_supervision": False,
            "loss": "dice",
        }
    )

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any], source: str) -> None:
        if settings["loss"] not in LOSSES:
            raise ValueError(f"{source}: loss={settings['loss']!r} is not one of {LOSSES}")

    def _build_loss(self) -> nn.Module:
        if self.resolved_settings["loss"] == "nnunet":
            return super()._build_loss()
        if self.label_manager.has_ignore_label:
            raise ValueError(
                f"{type(self).__name__}: the Dice-only loss does not support an ignore label (dataset.json label "
                f"'ignore' = {self.label_manager.ignore_label}); use loss 'nnunet' (DynTransNetTrainer_nnUNet), "
                "whose DC + CE / DC + BCE loss masks ignored voxels"
            )
        regions = self.label_manager.has_regions
        if not regions:
            message = _LABEL_BASED_WARNING.format(trainer=type(self).__name__)
            warnings.warn(message, UserWarning, stacklevel=2)
            self.print_to_log_file(f"WARNING: {message}")
        return build_dice_loss(
            regions=regions,
            batch_dice=self.configuration_manager.batch_dice,
            deep_supervision_scales=self._get_deep_supervision_scales() if self.enable_deep_supervision else None,
            ddp=self.is_ddp,
        )

    def on_train_start(self) -> None:
        super().on_train_start()
        self._log_iteration_budget()

    def _log_iteration_budget(self) -> None:
        """Write this run's total iterations next to the paper's to the training log."""
        train_keys, _ = self.do_split()
        budget = iteration_budget(
            num_epochs=self.num_epochs,
            iterations_per_epoch=self.num_iterations_per_epoch,
            batch_size=self.batch_size,
            num_training_cases=len(train_keys),
        )
        self.print_to_log_file(
            f"Iteration budget: {self.num_epochs} epochs x {self.num_iterations_per_epoch} iterations = "
            f"{budget['iterations']} total iterations of batch {self.batch_size} ({budget['patches']} patches). "
            f"The paper's {PAPER_EPOCHS} epochs are passes over its training cases: on these {len(train_keys)} "
            f"training cases at batch {PAPER_BATCH_SIZE} that would be {budget['paper_iterations']} total iterations "
            f"({budget['paper_patches']} patches)."
        )
        if self.batch_size != PAPER_BATCH_SIZE:
            self.print_to_log_file(
                f"Note: batch size {self.batch_size} comes from the plans; the paper used {PAPER_BATCH_SIZE}."
            )


class DynTransNetTrainer_nnUNet(DynTransNetTrainer):
    """nnU-Net's native recipe for DynTransNet: AdamW 1e-4, poly lr, DC + CE / DC + BCE, deep supervision, 1000 epochs.

    Weight decay (3e-5), poly exponent (0.9), iterations per epoch and foreground oversampling are nnU-Net's.
    """

    settings: Mapping[str, Any] = MappingProxyType(
        {
            **NNUNET_DEFAULT_SETTINGS,
            "initial_lr": PAPER_LR,
            "optimizer": "adamw",
            "lr_schedule": "poly",
            "enable_deep_supervision": True,
            "loss": "nnunet",
        }
    )


class DynTransNetTrainer_tiny(DynTransNetTrainer):
    """CPU demo/test variant: the CPU-sized DynTransNet and a short schedule (never for real data)."""

    preset = TINY


class DynTransNetTrainer_nnUNet_tiny(DynTransNetTrainer_nnUNet):
    """CPU demo/test variant of :class:`DynTransNetTrainer_nnUNet` (never for real data)."""

    preset = TINY
