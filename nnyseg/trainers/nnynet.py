"""nnYNetTrainer: the training recipe of nnY-Net and the clinical-feature plumbing of its cross-attention branch.

Liu H, Tao Z, Dong W, Sun Q. "nnY-Net: Swin-NeXt with Cross-Attention for 3D Medical Images Segmentation",
arXiv:2501.01406 (2025). What the paper states and what nnyseg chose is in ``docs/nnynet.md``; the recipe here:
AdamW, lr 1e-4, weight decay 1e-5, PolyLR (exponent 0.9), nnU-Net's 1000 epochs x 250 iterations,
:class:`~nnyseg.losses.dice_focal_ce.DiceFocalCELoss` (Dice + focal + CE, weights 1/1/1, gamma 2, no alpha) inside
nnU-Net's ``DeepSupervisionWrapper``; the cross-attention branch trains at 5x the learning rate
(``ybranch_lr_scale``; docs/nnynet.md, "Why the Y branch was fragile"). Every number is an entry of
:attr:`nnYNetTrainer.settings` and can be overridden per plans configuration under ``"nnyseg_trainer_settings"``.

``nnUNetv2_train ID 3d_fullres FOLD -tr nnYNetTrainer`` trains nnY-Net from nnU-Net's default plans (or any other
plans; see :class:`~nnyseg.trainers.base.nnysegMethodTrainer`); ``nnYNetTrainer_tiny`` trains the CPU-sized network.

Clinical features
-----------------
The cross-attention mode is a property of the network (``arch_kwargs["cross_attention"]``: ``"off"``, ``"latent"``
or ``"clinical"``). When the trainer derives its configuration and the raw dataset has a clinical table beside
``dataset.json`` (format: :mod:`nnyseg.data.clinical`), the network is built in ``clinical`` mode with the table's
schema, written into the plans saved with the model (prediction rebuilds the network from the plans alone);
without a table, in ``latent`` mode. Plans that already name SwinNeXtUNet are used as they are.

In clinical mode, :meth:`~nnYNetTrainer.initialize` loads the table (a clear ``ValueError`` if there is none, or if
its schema differs from the plans'), fits the z-score statistics on this fold's training cases only and writes them
into the network's tokenizer, whose buffers are saved in every checkpoint (each fold of an ensemble carries its own
statistics), and for people to read into ``fold_X/clinical_normalisation.json``. ``train_step`` and
``validation_step`` hand the rows of ``batch["keys"]`` to the network through ``SwinNeXtUNet.set_condition``; the
final validation sets each validation case's row before nnU-Net's sliding-window prediction. Prediction of new cases
with their features: ``nnyseg predict --clinical TABLE``; the stock ``nnUNetv2_predict`` works too, but cannot pass
the features: the network warns once and uses its learned missing-value tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
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
)
from nnyseg.losses.dice_focal_ce import DiceFocalCELoss
from nnyseg.nnunet_integration import conditioning_dataset_class
from nnyseg.registry import TINY
from nnyseg.trainers.base import NNUNET_DEFAULT_SETTINGS, nnysegMethodTrainer

__all__ = [
    "CLINICAL_NORMALISATION_FILE",
    "NNYNET_SETTINGS",
    "YBRANCH_TRACE_FILE",
    "nnYNetTrainer",
    "nnYNetTrainer_tiny",
]

#: File in ``fold_X`` holding the clinical normalisation of that fold, for people to read (the network's tokenizer
#: buffers, saved in the checkpoint, are what the model uses).
CLINICAL_NORMALISATION_FILE = "clinical_normalisation.json"

#: nnY-Net's recipe (docs/nnynet.md, "Loss and training").
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
        "ybranch_trace": False,  # clinical mode: write fold_X/ybranch_trace.json, one record per epoch
        "ybranch_lr_scale": 5.0,  # learning rate of the cross-attention branch relative to initial_lr (issue #15)
    }
)

#: File in ``fold_X`` with the Y branch's per-epoch trace (setting ``ybranch_trace``; docs/nnynet.md).
YBRANCH_TRACE_FILE = "ybranch_trace.json"


class nnYNetTrainer(nnysegMethodTrainer):
    """nnY-Net's recipe (AdamW 1e-4 / wd 1e-5, PolyLR, DiceFocalCE + deep supervision) and clinical plumbing.

    Train with ``nnUNetv2_train ID 3d_fullres FOLD -tr nnYNetTrainer`` on any plans. See the module docstring for
    the clinical mode.
    """

    model = "nnynet"
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
        self._trace_grad_sums: dict[str, float] = {}
        self._trace_steps = 0
        self._trace_batch: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None
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
            result = super().train_step(batch)
        if self._tracing():
            self._trace_step(batch)
        return result

    def optimizer_parameter_groups(self) -> list[dict[str, Any]]:
        """With ``ybranch_lr_scale`` != 1, the cross-attention branch's parameters form a second group with that
        factor on the learning rate."""
        scale = float(self.resolved_settings["ybranch_lr_scale"])
        if not scale > 0:
            raise ValueError(f"{self._where()}: ybranch_lr_scale must be > 0, got {scale!r}")
        branch = getattr(self._bare_network(), "cross_attention", None)
        branch_params = list(branch.parameters()) if branch is not None else []
        if scale == 1.0 or not branch_params:
            return super().optimizer_parameter_groups()
        in_branch = {id(p) for p in branch_params}
        rest = [p for p in self.network.parameters() if id(p) not in in_branch]
        return [{"params": rest}, {"params": branch_params, "lr_scale": scale}]

    # ------------------------------------------------------------------------------------------------ Y-branch trace
    def _tracing(self) -> bool:
        return bool(self.resolved_settings["ybranch_trace"]) and self.clinical_normalisation is not None

    def _film_layers(self) -> dict[str, nn.Linear]:
        branch = self._bare_network().cross_attention
        return {"bottleneck": branch.film, **{f"level_{i}": film for i, film in enumerate(branch.level_films)}}

    def _trace_step(self, batch: dict) -> None:
        """Accumulates the FiLM layers' gradient norms (nnU-Net leaves the last step's gradients in place) and keeps
        the batch for the epoch's flip measurement."""
        for name, film in self._film_layers().items():
            grad = film.weight.grad
            if grad is not None:
                self._trace_grad_sums[name] = self._trace_grad_sums.get(name, 0.0) + float(grad.detach().norm())
        self._trace_steps += 1
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        self._trace_batch = (batch["data"], target, list(batch["keys"]))

    @torch.no_grad()
    def _flip_effects(self) -> dict[str, float]:
        """Per categorical field: the mean total-variation distance between the softmax outputs with every row set to
        one category and to another (mean over category pairs and over the foreground voxels of the last batch)."""
        data, target, keys = self._trace_batch
        network = self._bare_network()
        tokenizer = network.cross_attention.tokenizer
        values, missing = self.clinical_batch(keys)
        foreground = (target[:, 0] > 0).to(self.device)
        was_training = network.training
        network.eval()
        effects = {}
        try:
            fields = zip(tokenizer.categorical_index.tolist(), tokenizer.category_counts.tolist(), strict=True)
            for j, n_categories in fields:
                probs = []
                for category in range(n_categories):
                    forced = values.clone()
                    forced[:, j] = category
                    forced_missing = missing.clone()
                    forced_missing[:, j] = False
                    output = network(data.to(self.device), (forced, forced_missing))
                    output = output[0] if isinstance(output, (list, tuple)) else output
                    probs.append(torch.softmax(output.float(), 1))
                distances = [
                    0.5 * (probs[a] - probs[b]).abs().sum(1)[foreground].mean().item()
                    for a in range(n_categories)
                    for b in range(a + 1, n_categories)
                    if foreground.any()
                ]
                effects[tokenizer.field_names[j]] = sum(distances) / len(distances) if distances else 0.0
        finally:
            network.train(was_training)
        return effects

    def _write_trace(self) -> None:
        from nnyseg.io import write_json_atomic

        steps = max(self._trace_steps, 1)
        tokenizer = self._bare_network().cross_attention.tokenizer
        record = {
            "epoch": self.current_epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "film_weight_norm": {n: float(f.weight.detach().norm()) for n, f in self._film_layers().items()},
            "film_grad_norm": {n: v / steps for n, v in self._trace_grad_sums.items()},
            "flip_effect": self._flip_effects(),
        }
        if tokenizer.category_embedding is not None:
            table = tokenizer.category_embedding.weight.detach()
            record["category_token_norm"] = float(table.norm(dim=1).mean())
        path = os.path.join(self.output_folder, YBRANCH_TRACE_FILE)
        history = []
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                history = [r for r in json.load(handle) if r["epoch"] < self.current_epoch]  # a resumed run
        write_json_atomic(path, [*history, record])
        self._trace_grad_sums, self._trace_steps = {}, 0

    def on_epoch_end(self) -> None:
        if self._tracing() and self.local_rank == 0 and self._trace_batch is not None:
            self._write_trace()
        super().on_epoch_end()

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
        self.dataset_class = conditioning_dataset_class(
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


class nnYNetTrainer_tiny(nnYNetTrainer):
    """CPU demo/test variant: the CPU-sized nnY-Net and a short schedule (never for real data)."""

    preset = TINY
