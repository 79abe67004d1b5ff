"""nnYNetTrainer: the training recipe of nnY-Net and the clinical-feature plumbing of its cross-attention branch.

Liu H, Tao Z, Dong W, Sun Q. "nnY-Net: Swin-NeXt with Cross-Attention for 3D Medical Images Segmentation",
arXiv:2501.01406 (2025). The paper's recipe is not readable; this is the proposal of ``design/architectures.md``:

* section 2.6: AdamW, lr 1e-4, weight decay 1e-5, PolyLR (exponent 0.9), nnU-Net's 1000 epochs x 250 iterations,
  the batch size of the plans (2 for the nnYNetPlans 3d_fullres configuration), nnU-Net's augmentation;
* section 2.5: :class:`~nnyseg.losses.dice_focal_ce.DiceFocalCELoss` (Dice + focal + CE, weights 1/1/1, gamma 2,
  no alpha) inside nnU-Net's ``DeepSupervisionWrapper`` with nnU-Net's deep-supervision weights;
* section 2.4: clinical features as the queries of the bottleneck cross-attention.

Every number above is an entry of :attr:`nnYNetTrainer.settings` and can be overridden per plans configuration under
``"nnyseg_trainer_settings"`` (e.g. ``{"initial_lr": 1e-3}`` for the recommended 1e-4 vs 1e-3 sweep, or
``{"focal_gamma": 1.0, "loss_weight_ce": 0.5}``).

Cross-attention modes
---------------------
The mode is a property of the network, so it comes from the plans (``arch_kwargs["cross_attention"]``), not from the
trainer: ``"off"`` (plain Swin-NeXt U-Net), ``"latent"`` (the default of nnYNetPlans: learned latent queries only, for
datasets without clinical data such as LiTS and ATLAS) or ``"clinical"``.

**Switching a plans configuration to clinical mode.** Put a clinical table beside ``dataset.json`` in the raw dataset
(format: :mod:`nnyseg.data.clinical`), then add a configuration to ``nnYNetPlans.json`` whose architecture block is a
complete copy of the base configuration's block (nnU-Net's ``inherits_from`` replaces top-level entries whole) with
``"cross_attention": "clinical"`` and the table's schema copied into ``arch_kwargs["clinical_schema"]``. The schema
must be in the plans because the network is built from the plans alone at prediction time, without the table.
:func:`add_clinical_configuration` does this edit::

    plans = json.load(open(".../nnUNet_preprocessed/Dataset500_X/nnYNetPlans.json"))
    add_clinical_configuration(plans, load_clinical_table(".../nnUNet_raw/Dataset500_X").schema)
    json.dump(plans, open(".../nnYNetPlans.json", "w"), indent=2)
    # nnUNetv2_train 500 3d_fullres_clinical 0 -tr nnYNetTrainer -p nnYNetPlans

The resulting JSON looks like::

    "3d_fullres_clinical": {
      "inherits_from": "3d_fullres",
      "architecture": {
        "network_class_name": "nnyseg.network_architecture.swin_next.SwinNeXtUNet",
        "arch_kwargs": {... as in 3d_fullres ..., "cross_attention": "clinical",
                        "clinical_schema": [{"name": "age", "type": "numeric"}, ...]},
        "_kw_requires_import": []
      }
    }

**What the trainer does in clinical mode.** In :meth:`~nnYNetTrainer.initialize` it loads the raw dataset's table
(a clear ``ValueError`` if there is none, or if its schema differs from the plans'), fits the z-score statistics on
this fold's training cases only (nnU-Net's ``do_split``) and writes them into the network's tokenizer, whose buffers
are saved in every checkpoint (so each fold of an ensemble carries its own statistics), and for people to read into
``fold_X/clinical_normalisation.json``. ``train_step`` and ``validation_step`` hand the raw rows of ``batch["keys"]``
to the network through ``SwinNeXtUNet.set_condition`` and then run nnU-Net's own steps unchanged; the final
validation (``perform_actual_validation``) sets each validation case's row before nnU-Net's sliding-window
prediction. Random field dropout during training is done by the network's tokenizer in train mode. Prediction of new
cases with their features: ``nnyseg predict --clinical TABLE`` (:mod:`nnyseg.prediction`); the stock
``nnUNetv2_predict`` works too, but has no way to pass the features: the network warns once and uses its learned
missing-value tokens.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnyseg.data.clinical import (
    ClinicalNormalisation,
    ClinicalTable,
    find_clinical_table,
    fit_normalisation,
    load_clinical_table,
    normalise_schema,
)
from nnyseg.losses.dice_focal_ce import DiceFocalCELoss
from nnyseg.trainers.base import NNUNET_DEFAULT_SETTINGS, nnysegTrainer

__all__ = [
    "CLINICAL_NORMALISATION_FILE",
    "NNYNET_SETTINGS",
    "add_clinical_configuration",
    "nnYNetTrainer",
]

#: File in ``fold_X`` holding the clinical normalisation of that fold, for people to read (the network's tokenizer
#: buffers, saved in the checkpoint, are what the model uses).
CLINICAL_NORMALISATION_FILE = "clinical_normalisation.json"

#: The recipe of architectures.md sections 2.5 and 2.6.
NNYNET_SETTINGS: Mapping[str, Any] = MappingProxyType(
    {
        **NNUNET_DEFAULT_SETTINGS,
        "num_epochs": 1000,
        "optimizer": "adamw",
        "initial_lr": 1e-4,
        "weight_decay": 1e-5,
        "lr_schedule": "poly",
        "loss_weight_dice": 1.0,
        "loss_weight_focal": 1.0,
        "loss_weight_ce": 1.0,
        "focal_gamma": 2.0,
        "focal_alpha": None,  # None, a float in [0, 1] or one weight per output channel (see DiceFocalCELoss)
    }
)


def add_clinical_configuration(
    plans: dict,
    schema: Sequence[Mapping[str, Any]],
    *,
    base_configuration: str = "3d_fullres",
    name: str | None = None,
) -> str:
    """Adds a clinical-mode copy of a SwinNeXtUNet configuration to ``plans`` (in place) and returns its name.

    The new configuration inherits ``base_configuration`` and carries a complete architecture block with
    ``cross_attention = "clinical"`` and ``clinical_schema = schema``.

    Args:
        plans: An nnU-Net plans dict (e.g. loaded from ``nnYNetPlans.json``).
        schema: The clinical table's schema (``ClinicalTable.schema``).
        base_configuration: The configuration to copy (its architecture must be SwinNeXtUNet).
        name: Name of the new configuration; default ``<base_configuration>_clinical``.

    Raises:
        ValueError: If the base configuration does not exist or has no SwinNeXtUNet architecture, or the schema is
            invalid or empty.
    """
    configurations = plans.get("configurations", {})
    if base_configuration not in configurations:
        raise ValueError(f"plans have no configuration {base_configuration!r}; available: {sorted(configurations)}")
    architecture = _resolved_entry(configurations, base_configuration, "architecture")
    if architecture is None or not str(architecture.get("network_class_name", "")).endswith("SwinNeXtUNet"):
        raise ValueError(
            f"configuration {base_configuration!r} does not build SwinNeXtUNet (architecture: {architecture!r})"
        )
    fields = normalise_schema(schema)
    if not fields:
        raise ValueError("clinical mode needs at least one clinical field in the schema")
    architecture = deepcopy(architecture)
    architecture["arch_kwargs"]["cross_attention"] = "clinical"
    architecture["arch_kwargs"]["clinical_schema"] = fields
    name = name or f"{base_configuration}_clinical"
    configurations[name] = {"inherits_from": base_configuration, "architecture": architecture}
    return name


def _resolved_entry(configurations: Mapping[str, Any], configuration: str, key: str) -> Any:
    """``configurations[configuration][key]`` following ``inherits_from`` as nnU-Net does."""
    seen = set()
    while configuration not in seen:
        seen.add(configuration)
        entry = configurations.get(configuration, {})
        if key in entry:
            return entry[key]
        configuration = entry.get("inherits_from")
        if configuration is None:
            return None
    return None


def _conditioning_dataset_class(base: type, on_load: Callable[[str], None]) -> type:
    """A subclass of nnU-Net dataset class ``base`` whose ``load_case(k)`` calls ``on_load(k)`` first."""

    class _ClinicalConditioningDataset(base):
        def load_case(self, identifier):
            on_load(identifier)
            return super().load_case(identifier)

    _ClinicalConditioningDataset.__name__ = f"{base.__name__}WithClinicalCondition"
    return _ClinicalConditioningDataset


class nnYNetTrainer(nnysegTrainer):
    """nnY-Net's recipe (AdamW 1e-4 / wd 1e-5, PolyLR, DiceFocalCE + deep supervision) and clinical plumbing.

    Train with ``nnUNetv2_train ID 3d_fullres FOLD -tr nnYNetTrainer -p nnYNetPlans``. See the module docstring for
    the clinical mode.
    """

    settings: Mapping[str, Any] = NNYNET_SETTINGS

    #: Set in :meth:`initialize` when the network is in clinical mode, else None.
    clinical_table: ClinicalTable | None = None
    clinical_normalisation: ClinicalNormalisation | None = None

    # ------------------------------------------------------------------------------------------------------ loss
    def _build_loss(self) -> nn.Module:
        """DiceFocalCELoss in nnU-Net's DeepSupervisionWrapper.

        nnU-Net's own ``_build_loss`` runs first so the deep-supervision weights are exactly nnU-Net's (1/2^i,
        lowest resolution 0, normalised to sum 1); only the wrapped loss is replaced.
        """
        s = self.resolved_settings
        try:
            loss = DiceFocalCELoss(
                region_based=self.label_manager.has_regions,
                batch_dice=self.configuration_manager.batch_dice,
                weight_dice=s["loss_weight_dice"],
                weight_focal=s["loss_weight_focal"],
                weight_ce=s["loss_weight_ce"],
                gamma=s["focal_gamma"],
                alpha=s["focal_alpha"],
                smooth=1e-5,
                ignore_label=self.label_manager.ignore_label,
                ddp=self.is_ddp,
            )
        except ValueError as err:
            raise ValueError(f"{self._where()}: {err}") from err
        if self._do_i_compile():
            loss.dc = torch.compile(loss.dc)
        nnunet_loss = super()._build_loss()
        if isinstance(nnunet_loss, DeepSupervisionWrapper):
            nnunet_loss.loss = loss
            return nnunet_loss
        return loss

    # ------------------------------------------------------------------------------------------------ clinical
    def _bare_network(self) -> nn.Module:
        network = self.network
        if isinstance(network, DistributedDataParallel):
            network = network.module
        if isinstance(network, OptimizedModule):
            network = network._orig_mod
        return network

    @property
    def cross_attention_mode(self) -> str | None:
        """The network's cross-attention mode (``"off"``, ``"latent"``, ``"clinical"``), None for other networks."""
        if self.network is None:
            return None
        return getattr(getattr(self._bare_network(), "cross_attention", None), "mode", None)

    def initialize(self) -> None:
        super().initialize()
        if self.cross_attention_mode == "clinical":
            self._setup_clinical()
        else:
            self.print_to_log_file(f"nnY-Net cross-attention mode: {self.cross_attention_mode!r} (no clinical input)")

    def _where(self) -> str:
        return f"plans '{self.plans_manager.plans_name}', configuration '{self.configuration_name}'"

    def _setup_clinical(self) -> None:
        schema = self.configuration_manager.network_arch_init_kwargs.get("clinical_schema")
        raw = os.environ.get("nnUNet_raw")
        if not raw:
            raise ValueError(
                f"{self._where()}: the network is in 'clinical' cross-attention mode, which reads the clinical table "
                "from the raw dataset folder, but nnUNet_raw is not set"
            )
        folder = Path(raw) / self.plans_manager.dataset_name
        if find_clinical_table(folder) is None:
            raise ValueError(
                f"{self._where()}: the network is in 'clinical' cross-attention mode but the raw dataset {folder} has "
                "no clinical table (clinical.json, or clinical.csv + clinical_schema.json; see nnyseg.data.clinical). "
                "Add the table, or train a configuration with cross_attention 'latent'."
            )
        table = load_clinical_table(folder)
        table.check_schema(schema or [], where=f"{self._where()} (arch_kwargs['clinical_schema'])")
        tr_keys, _ = self.do_split()
        self.clinical_table = table
        self._use_normalisation(fit_normalisation(table, tr_keys))
        self.print_to_log_file(
            f"nnY-Net clinical mode: table {table.source}, fields {table.field_names}; z-score statistics fitted on "
            f"the {len(tr_keys)} training cases of fold {self.fold}: {self.clinical_normalisation.to_dict()['numeric']}"
        )

    def _use_normalisation(self, normalisation: ClinicalNormalisation) -> None:
        """Makes ``normalisation`` current: writes it into the network's tokenizer and the fold's JSON."""
        table = self.clinical_table
        assert table is not None
        self.clinical_normalisation = normalisation
        normalisation.apply_to(self._bare_network())
        ids = table.case_ids
        self._clinical_index = {case_id: i for i, case_id in enumerate(ids)}
        self._clinical_values, self._clinical_missing = table.network_input(ids)
        if self.local_rank == 0 and self.output_folder is not None:
            os.makedirs(self.output_folder, exist_ok=True)
            normalisation.save(os.path.join(self.output_folder, CLINICAL_NORMALISATION_FILE))

    def clinical_batch(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's clinical input for a batch: raw ``(values, missing)`` of shape ``(len(keys), M)``, row i for
        ``keys[i]``, on the trainer's device.

        Raises:
            RuntimeError: If the trainer is not in clinical mode.
            KeyError: If a key has no row in the clinical table.
        """
        if self.clinical_normalisation is None:
            raise RuntimeError("clinical_batch needs a network in 'clinical' cross-attention mode (after initialize)")
        try:
            rows = torch.tensor([self._clinical_index[str(k)] for k in keys], dtype=torch.long)
        except KeyError as err:
            raise KeyError(
                f"case {err.args[0]!r} has no row in the clinical table {self.clinical_table.source}"
            ) from None
        values = self._clinical_values.index_select(0, rows).to(self.device, non_blocking=True)
        missing = self._clinical_missing.index_select(0, rows).to(self.device, non_blocking=True)
        return values, missing

    @contextlib.contextmanager
    def _clinical_condition(self, keys: Sequence[str]) -> Iterator[None]:
        """Sets the rows of ``keys`` as the network's condition for the duration of the block (clinical mode only)."""
        if self.clinical_normalisation is None:
            yield
            return
        network = self._bare_network()
        network.set_condition(self.clinical_batch(keys))
        try:
            yield
        finally:
            network.clear_condition()

    def train_step(self, batch: dict) -> dict:
        with self._clinical_condition(batch["keys"]):
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with self._clinical_condition(batch["keys"]):
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        if self.clinical_normalisation is None:
            return super().perform_actual_validation(save_probabilities)
        network = self._bare_network()
        original = self.dataset_class
        # nnU-Net loads each validation case with dataset_class.load_case right before its sliding-window prediction,
        # which calls network(x) only: set the case's clinical row there.
        self.dataset_class = _conditioning_dataset_class(
            original, lambda key: network.set_condition(self.clinical_batch([key]))
        )
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class = original
            network.clear_condition()

    # ------------------------------------------------------------------------------------------------ checkpoints
    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        if self.clinical_normalisation is None:
            return
        # The checkpoint's tokenizer buffers are now in the network; they win over the statistics fitted in
        # initialize() (the table may have changed since training). Keep the readable record in step with them.
        tokenizer = self._bare_network().cross_attention.tokenizer
        names = tokenizer.numeric_field_names
        mean = dict(zip(names, tokenizer.numeric_mean.tolist(), strict=True))
        std = dict(zip(names, tokenizer.numeric_std.tolist(), strict=True))
        fitted = self.clinical_normalisation
        if any(abs(mean[n] - fitted.mean[n]) > 1e-6 * max(1.0, abs(fitted.mean[n])) for n in names) or any(
            abs(std[n] - fitted.std[n]) > 1e-6 * max(1.0, fitted.std[n]) for n in names
        ):
            self.print_to_log_file(
                "WARNING: the clinical table gives other normalisation statistics than the checkpoint was trained "
                "with; using the checkpoint's"
            )
            self.clinical_normalisation = ClinicalNormalisation(
                schema=fitted.schema, mean=mean, std=std, n_cases={}, fitted_on=[]
            )
