"""The trainers every nnyseg method derives from.

nnU-Net identifies a trained model by ``<trainer>__<plans>__<configuration>``. nnyseg keeps one trainer class per
method and reads every hyperparameter from a settings dict instead of growing one subclass per value:

* the class attribute :attr:`nnysegTrainer.settings` holds the method's recipe (a subclass only sets this dict and
  overrides the hooks its method needs: loss, optimiser);
* a configuration in the plans may override entries under the key ``"nnyseg_trainer_settings"``. Because the
  configuration name is part of the results folder, every run stays identifiable, which is the reason nnU-Net gives
  for not reading hyperparameters from the command line.

:class:`nnysegTrainer` trains whatever network the plans name. :class:`nnysegMethodTrainer` trains its method's
network from any plans: :attr:`~nnysegMethodTrainer.model` names the registry entry and
:attr:`~nnysegMethodTrainer.preset` its size; a configuration that does not hold that network is adapted to it
(``nnyseg.nnunet_integration.adapt_trainer_configuration``, rule in ``docs/stock-flow.md``) before any data is
loaded. A ``_tiny`` variant only sets ``preset = "tiny"``: the CPU-sized network and its short schedule, for demos
and tests.

The network is built from the plans as in nnU-Net, and its patch size is checked against what the network can
take before any data is loaded, so a bad plans edit fails with a message naming the plans and configuration.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnyseg.nnunet_integration import adapt_trainer_configuration, check_nnunet_version
from nnyseg.registry import FULL, PLANS_SETTINGS_KEY, AdaptationError, get_model, model_for_network

check_nnunet_version()

#: nnU-Net's own recipe (``nnUNetTrainer.__init__`` and ``configure_optimizers`` in nnunetv2 2.8).
NNUNET_DEFAULT_SETTINGS: Mapping[str, Any] = MappingProxyType(
    {
        "num_epochs": 1000,
        "num_iterations_per_epoch": 250,
        "num_val_iterations_per_epoch": 50,
        "initial_lr": 1e-2,
        "weight_decay": 3e-5,
        "oversample_foreground_percent": 0.33,
        "enable_deep_supervision": True,
        "save_every": 50,
        "optimizer": "sgd",  # sgd (momentum 0.99, Nesterov) | adam | adamw
        "momentum": 0.99,
        "lr_schedule": "poly",  # poly (exponent 0.9) | constant | step
        "lr_step_size": 30,  # epochs between decays, for lr_schedule "step"
        "lr_step_gamma": 0.8,  # factor per decay, for lr_schedule "step"
        "seed": None,  # None: nnU-Net's unseeded behaviour; an int seeds python, numpy and torch at construction
    }
)

# Settings that map one to one onto nnUNetTrainer attributes of the same name.
_NNUNET_ATTRIBUTES = (
    "num_epochs",
    "num_iterations_per_epoch",
    "num_val_iterations_per_epoch",
    "initial_lr",
    "weight_decay",
    "oversample_foreground_percent",
    "enable_deep_supervision",
    "save_every",
)
_CHOICES = {"optimizer": ("sgd", "adam", "adamw"), "lr_schedule": ("poly", "constant", "step")}


def resolve_settings(
    defaults: Mapping[str, Any], overrides: Mapping[str, Any] | None, *, source: str = "plans"
) -> dict[str, Any]:
    """Merge ``overrides`` into ``defaults`` and validate the result.

    Args:
        defaults: The trainer class's settings.
        overrides: Entries from the plans configuration (may be None).
        source: Where the overrides come from, for error messages.

    Raises:
        ValueError: An override names an unknown setting, or a choice or number is out of range.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(
            f"{source}: unknown nnyseg trainer setting(s) {unknown}; known settings are {sorted(defaults)}"
        )
    settings = {**defaults, **overrides}
    for key, choices in _CHOICES.items():
        if settings[key] not in choices:
            raise ValueError(f"{source}: {key}={settings[key]!r} is not one of {choices}")
    for key in ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "save_every"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise ValueError(f"{source}: {key} must be a positive integer, got {settings[key]!r}")
    seed = settings.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"{source}: seed must be null or a non-negative integer, got {seed!r}")
    if not settings["initial_lr"] > 0:
        raise ValueError(f"{source}: initial_lr must be > 0, got {settings['initial_lr']!r}")
    return settings


def check_patch_size_for_network(
    network: nn.Module, patch_size: list[int] | tuple[int, ...], strides: list | None, *, where: str
) -> None:
    """Raise a ValueError if ``network`` cannot take ``patch_size``, before any compute.

    Networks that know their own constraint expose ``check_patch_size(patch_size[, strides])``; for the others
    (nnU-Net's PlainConvUNet and ResidualEncoderUNet) each axis must be divisible by the product of the strides.
    """
    checker = getattr(network, "check_patch_size", None)
    if callable(checker):
        patch = tuple(int(p) for p in patch_size)
        # Fixed-topology networks check the patch alone; plan-driven ones need the strides too.
        takes_strides = len(inspect.signature(checker).parameters) > 1
        try:
            checker(patch, strides) if takes_strides else checker(patch)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        return
    if strides:
        divisors = np.prod(np.asarray(strides, dtype=int), axis=0)
        bad = [i for i, (p, d) in enumerate(zip(patch_size, divisors, strict=False)) if p % d]
        if bad:
            nearest = [max(int(d), int(p / d + 0.5) * int(d)) for p, d in zip(patch_size, divisors, strict=False)]
            raise ValueError(
                f"{where}: patch size {list(patch_size)} cannot be processed by {type(network).__name__}: axis "
                f"{bad} not divisible by the total stride {divisors.tolist()}; nearest valid patch size: {nearest}"
            )


def freeze_unused_deep_supervision_heads(network: nn.Module) -> None:
    """Stop the heads that a network built without deep supervision never runs from asking for gradients.

    nnU-Net's and nnyseg's decoders build one head per stage (``decoder.seg_layers``, full resolution last) so that
    checkpoints load with deep supervision on or off; without it only the last head runs. The others never get a
    gradient, which single-process training does not notice but DDP does: nnU-Net wraps the network without
    ``find_unused_parameters``, so ``nnUNetv2_train -num_gpus 2`` of a recipe without deep supervision (DynTransNet's)
    failed in its second iteration ("Expected to have finished reduction in the prior iteration"). Training and
    prediction are otherwise unchanged: those heads were never updated, and ``requires_grad`` is not in checkpoints.
    """
    heads = getattr(getattr(network, "decoder", None), "seg_layers", None)
    if isinstance(heads, nn.ModuleList):
        for head in list(heads)[:-1]:
            head.requires_grad_(False)


class nnysegTrainer(nnUNetTrainer):
    """nnU-Net's trainer with settings from a dict and plans, a patch-size check, and a choice of optimisers.

    With its default settings it trains exactly nnU-Net's recipe, so it is also the trainer for the PlainConvUNet
    baseline plans (``nnysegBaselinePlans``).
    """

    settings: Mapping[str, Any] = NNUNET_DEFAULT_SETTINGS

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 - the signature must match nnUNetTrainer's
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.adapt_plans()
        overrides = self.configuration_manager.configuration.get(PLANS_SETTINGS_KEY)
        source = f"plans '{self.plans_manager.plans_name}', configuration '{configuration}'"
        self.resolved_settings = resolve_settings(self.default_settings(), overrides, source=source)
        type(self).check_settings(self.resolved_settings, source)
        for name in _NNUNET_ATTRIBUTES:
            setattr(self, name, self.resolved_settings[name])
        if self.resolved_settings["seed"] is not None:
            # Before initialize() builds the network and the data loaders: same seed, same weights and batches
            # (with nnUNet_n_proc_DA=0; augmentation workers draw their own seeds).
            seed = self.resolved_settings["seed"]
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        self.print_to_log_file(f"nnyseg trainer settings ({type(self).__name__}): {self.resolved_settings}")

    def adapt_plans(self) -> None:
        """Hook run right after nnU-Net's ``__init__``, before the settings are read: the plans are used as given."""

    @classmethod
    def default_settings(cls) -> dict[str, Any]:
        """The settings before the plans' overrides: the class's :attr:`settings`."""
        return dict(cls.settings)

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any], source: str) -> None:
        """Validate the settings a subclass adds (the base checks nnU-Net's); called once, at construction.

        Args:
            settings: The merged settings.
            source: Where overrides came from (plans and configuration), to start error messages with.

        Raises:
            ValueError: A setting has a value the trainer cannot use.
        """

    @staticmethod
    def build_network_architecture(
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        network = nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision
        )
        where = f"plans '{plans_manager.plans_name}' ({configuration_manager.network_arch_class_name})"
        check_patch_size_for_network(
            network, configuration_manager.patch_size, configuration_manager.pool_op_kernel_sizes, where=where
        )
        if not enable_deep_supervision:
            freeze_unused_deep_supervision_heads(network)
        return network

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """Never switch deep supervision on when the recipe has it off.

        nnU-Net switches it on unconditionally at the end of ``perform_actual_validation``; with deep supervision off
        the network must keep returning one tensor, which is what the loss and ``validation_step`` then expect.
        """
        super().set_deep_supervision_enabled(enabled and self.enable_deep_supervision)

    def optimizer_parameter_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups: one group of every parameter by default. A group may carry
        ``lr_scale``, a factor on ``initial_lr`` that the learning-rate schedule keeps (group 0 is nnU-Net's logged
        learning rate)."""
        return [{"params": list(self.network.parameters())}]

    def configure_optimizers(self):
        s = self.resolved_settings
        params = [
            {**group, "lr": s["initial_lr"] * group.get("lr_scale", 1.0)} for group in self.optimizer_parameter_groups()
        ]
        if s["optimizer"] == "sgd":
            optimizer = torch.optim.SGD(
                params, s["initial_lr"], weight_decay=s["weight_decay"], momentum=s["momentum"], nesterov=True
            )
        elif s["optimizer"] == "adamw":
            optimizer = torch.optim.AdamW(params, s["initial_lr"], weight_decay=s["weight_decay"])
        else:
            optimizer = torch.optim.Adam(params, s["initial_lr"], weight_decay=s["weight_decay"])

        if s["lr_schedule"] == "poly":
            scheduler = _GroupPolyLR(optimizer, s["initial_lr"], self.num_epochs)
        elif s["lr_schedule"] == "step":
            scheduler = _EpochStepLR(optimizer, s["lr_step_size"], s["lr_step_gamma"])
        else:
            scheduler = _EpochStepLR(optimizer, step_size=self.num_epochs + 1, gamma=1.0)
        return optimizer, scheduler


class nnysegMethodTrainer(nnysegTrainer):
    """A trainer that always trains its method's network, from whatever plans it is given.

    Subclasses set :attr:`model` (a key of :data:`nnyseg.registry.MODELS`) and the recipe in :attr:`settings`; the
    ``_tiny`` variants set :attr:`preset` only. Given nnU-Net's default plans, a ResEnc preset or nnyseg's own plans,
    the trainer derives its configuration (see :func:`nnyseg.nnunet_integration.adapt_trainer_configuration`), logs
    the change in one line and writes it into the plans nnU-Net saves with the model. A 2D configuration, or one whose
    memory budget no patch of the network fits, stops here with one message naming plans, configuration and the way
    out, before any data is loaded.
    """

    #: Registry key of the method's network.
    model: ClassVar[str] = ""
    #: Registry preset: ``"full"`` (the method's size) or ``"tiny"`` (CPU-sized, for demos and tests only).
    preset: ClassVar[str] = FULL

    def adapt_plans(self) -> None:
        try:
            adapt_trainer_configuration(self, self.model, self.preset)
        except AdaptationError as err:
            # The trainer is built by nnUNetv2_train: one message, not a traceback.
            raise SystemExit(f"nnyseg: {err}") from err

    @classmethod
    def default_settings(cls) -> dict[str, Any]:
        """The recipe, with the preset's schedule (the CPU preset's short run) on top."""
        return {**cls.settings, **get_model(cls.model).preset(cls.preset).trainer_settings}

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """Build the network the plans name, which must be the method's (the trainer wrote it there when adapting).

        Raises:
            ValueError: The plans name another network (for example a hand-edited results-folder ``plans.json``).
        """
        spec = get_model(cls.model)
        named = configuration_manager.network_arch_class_name
        if model_for_network(named) is not spec:
            raise ValueError(
                f"{cls.__name__} trains {spec.network_class.__name__}, but plans '{plans_manager.plans_name}' name "
                f"{named} for this configuration; train with {cls.__name__} (which adapts any plans), or predict "
                "with the trainer that made this model"
            )
        return super().build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision
        )


class _GroupPolyLR(PolyLRScheduler):
    """nnU-Net's PolyLR applied to each parameter group's own initial learning rate (nnU-Net's sets one learning rate
    for every group); identical to nnU-Net's for a single group."""

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        factor = (1 - current_step / self.max_steps) ** self.exponent
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class _EpochStepLR(torch.optim.lr_scheduler.StepLR):
    """StepLR that accepts nnU-Net's ``step(current_epoch)`` call (nnU-Net passes the epoch explicitly)."""

    def step(self, current_step: int | None = None) -> None:
        if current_step is None:
            super().step()
            return
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=False):
            group["lr"] = base_lr * self.gamma ** (current_step // self.step_size)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
