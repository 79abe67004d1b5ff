"""``nnyseg predict``: ``nnUNetv2_predict`` that also hands each case's clinical features to nnY-Net.

nnU-Net's predictor calls ``network(x)`` only, so the stock command cannot pass per-case inputs besides the image.
nnY-Net in ``clinical`` cross-attention mode takes its features through ``SwinNeXtUNet.set_condition``; this module
runs nnU-Net's own ``predict_entry_point`` (same flags, same code, same outputs) with its predictor class replaced,
for the duration of the call, by :class:`ClinicalPredictor`, which sets a case's row of the clinical table on the
network right before nnU-Net predicts that case::

    nnyseg predict -i imagesTs -o predictions -d 500 -c 3d_fullres_clinical -tr nnYNetTrainer -p nnYNetPlans \\
        --clinical clinical_test.json

* The table has the training table's format (``clinical.json``, or ``clinical.csv`` with ``clinical_schema.json``
  beside it; see :mod:`nnyseg.data.clinical`), keyed by the case identifiers of the input folder, and the schema of
  the model's plans.
* Values are raw: every fold's network holds the z-score statistics of its own training cases in its tokenizer's
  buffers, so an ensemble of folds needs nothing else.
* A case without a row in the table is predicted with all its fields missing (the learned missing-value tokens), with
  a warning naming it. A clinical model run through the stock ``nnUNetv2_predict`` (or ``nnyseg predict`` without
  ``--clinical``) does the same for every case and warns once.

Both of nnU-Net's prediction paths are covered: the multi-process one (``predict_from_data_iterator``, where the
condition is set as each preprocessed case comes out of the iterator, right before nnU-Net predicts it) and the
sequential one of ``-npp 0 -nps 0`` (one case at a time).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
from torch import nn
from torch._dynamo import OptimizedModule

from nnyseg.data.clinical import ClinicalTable, load_clinical_file

__all__ = ["CLINICAL_FLAG", "ClinicalPredictor", "main"]

#: The one flag ``nnyseg predict`` adds to nnUNetv2_predict's.
CLINICAL_FLAG = "--clinical"


class ClinicalPredictor(nnUNetPredictor):
    """nnU-Net's predictor that sets each case's clinical features on an nnY-Net before predicting the case.

    Args:
        clinical_table: The features of the cases to predict (raw values, keyed by case identifier).
        *args, **kwargs: Those of :class:`nnUNetPredictor`.
    """

    def __init__(self, *args: Any, clinical_table: ClinicalTable, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clinical_table = clinical_table

    # ------------------------------------------------------------------------------------------------- the model
    def initialize_from_trained_model_folder(
        self, model_training_output_dir: str, use_folds: Any, checkpoint_name: str = "checkpoint_final.pth"
    ) -> None:
        super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        self.check_model(where=f"the model in {model_training_output_dir}")

    def _bare_network(self) -> nn.Module:
        return self.network._orig_mod if isinstance(self.network, OptimizedModule) else self.network

    def check_model(self, *, where: str) -> None:
        """Raises ``ValueError`` unless the network takes clinical features with the table's schema."""
        mode = getattr(getattr(self._bare_network(), "cross_attention", None), "mode", None)
        if mode != "clinical":
            raise ValueError(
                f"{where} does not take clinical features (its network is {type(self._bare_network()).__name__}"
                + (f" in cross-attention mode {mode!r}" if mode else "")
                + f"); drop {CLINICAL_FLAG}, or use a configuration with cross_attention 'clinical'"
            )
        schema = self.configuration_manager.network_arch_init_kwargs.get("clinical_schema") or []
        self.clinical_table.check_schema(schema, where=f"{where} (plans arch_kwargs['clinical_schema'])")

    # ---------------------------------------------------------------------------------------------- the features
    def set_case(self, case_id: str) -> None:
        """Makes ``case_id``'s row the network's condition (all fields missing when the table has no row)."""
        table = self.clinical_table
        if case_id in table.rows:
            values, missing = table.network_input([case_id])
        else:
            values = torch.zeros(1, len(table.schema))
            missing = torch.ones(1, len(table.schema), dtype=torch.bool)
        self._bare_network().set_condition((values.to(self.device), missing.to(self.device)))

    def _warn_about_cases_without_rows(self, case_ids: Iterable[str]) -> None:
        absent = sorted(c for c in case_ids if c not in self.clinical_table.rows)
        if absent:
            warnings.warn(
                f"{self.clinical_table.source}: no row for {len(absent)} case(s) {absent[:10]}"
                + (" ..." if len(absent) > 10 else "")
                + "; their clinical fields are treated as missing",
                stacklevel=3,
            )

    def _case_ids(self, list_of_lists_or_source_folder: str | list[list[str]]) -> list[str]:
        ending = self.dataset_json["file_ending"]
        lists = list_of_lists_or_source_folder
        if isinstance(lists, str):
            lists = create_lists_from_splitted_dataset_folder(lists, ending)
        return [os.path.basename(files[0])[: -(len(ending) + 5)] for files in lists]  # strip _0000 + ending

    @contextmanager
    def _condition_cleared_afterwards(self) -> Iterator[None]:
        try:
            yield
        finally:
            self._bare_network().clear_condition()

    # ------------------------------------------------------------------------------- nnU-Net's prediction paths
    # nnU-Net records the arguments of predict_from_files* by introspecting their signatures: keep them identical.
    def predict_from_files(
        self,
        list_of_lists_or_source_folder: str | list[list[str]],
        output_folder_or_list_of_truncated_output_files: str | list[str] | None,
        save_probabilities: bool = False,
        overwrite: bool = True,
        num_processes_preprocessing: int = default_num_processes,
        num_processes_segmentation_export: int = default_num_processes,
        folder_with_segs_from_prev_stage: str | None = None,
        num_parts: int = 1,
        part_id: int = 0,
    ):
        self._warn_about_cases_without_rows(self._case_ids(list_of_lists_or_source_folder))
        return super().predict_from_files(
            list_of_lists_or_source_folder,
            output_folder_or_list_of_truncated_output_files,
            save_probabilities,
            overwrite,
            num_processes_preprocessing,
            num_processes_segmentation_export,
            folder_with_segs_from_prev_stage,
            num_parts,
            part_id,
        )

    def predict_from_data_iterator(self, data_iterator: Iterable[dict], *args: Any, **kwargs: Any):
        # nnU-Net predicts each case as soon as the iterator yields it, so setting the condition at the yield is
        # setting it for that case's sliding-window prediction (and for every fold of the ensemble).
        def conditioned() -> Iterator[dict]:
            for item in data_iterator:
                if item.get("ofile") is None:
                    raise ValueError("nnyseg predict needs output files to know which case is which")
                self.set_case(os.path.basename(item["ofile"]))
                yield item

        with self._condition_cleared_afterwards():
            return super().predict_from_data_iterator(conditioned(), *args, **kwargs)

    def predict_from_files_sequential(
        self,
        list_of_lists_or_source_folder: str | list[list[str]],
        output_folder_or_list_of_truncated_output_files: str | list[str] | None,
        save_probabilities: bool = False,
        overwrite: bool = True,
        folder_with_segs_from_prev_stage: str | None = None,
    ):
        if output_folder_or_list_of_truncated_output_files is None:
            raise ValueError("nnyseg predict needs output files to know which case is which")
        lists, outputs, _ = self._manage_input_and_output_lists(
            list_of_lists_or_source_folder,
            output_folder_or_list_of_truncated_output_files,
            folder_with_segs_from_prev_stage,
            overwrite,
            0,
            1,
            save_probabilities,
        )
        self._warn_about_cases_without_rows(os.path.basename(o) for o in outputs)
        with self._condition_cleared_afterwards():
            for files, output in zip(lists, outputs, strict=True):
                self.set_case(os.path.basename(output))
                super().predict_from_files_sequential(
                    [files], [output], save_probabilities, True, folder_with_segs_from_prev_stage
                )


def _split_clinical_flag(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(table path or None, the remaining nnUNetv2_predict flags)``."""
    argv = list(argv)
    if CLINICAL_FLAG not in argv:
        return None, argv
    i = argv.index(CLINICAL_FLAG)
    if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
        raise ValueError(f"{CLINICAL_FLAG} needs a table file (clinical.json, or clinical.csv with its schema)")
    if CLINICAL_FLAG in argv[i + 2 :]:
        raise ValueError(f"{CLINICAL_FLAG} given twice")
    return argv[i + 1], argv[:i] + argv[i + 2 :]


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``nnUNetv2_predict`` with ``argv`` (its own flags), feeding clinical features when ``--clinical`` is given.

    Raises:
        ValueError: The table is malformed, or the model does not take clinical features with the table's schema.
        FileNotFoundError: The table does not exist.
    """
    from nnunetv2.inference import predict_from_raw_data as nnunet_predict

    table_path, nnunet_argv = _split_clinical_flag(sys.argv[1:] if argv is None else argv)
    if "-h" in nnunet_argv or "--help" in nnunet_argv:
        print(
            f"nnyseg predict: nnUNetv2_predict's flags (below) plus {CLINICAL_FLAG} TABLE, the clinical features of "
            "the cases to predict (clinical.json, or clinical.csv with clinical_schema.json beside it), for nnY-Net "
            "models in 'clinical' cross-attention mode.\n"
        )
    predictor_class: Any = nnunet_predict.nnUNetPredictor
    if table_path is not None:
        predictor_class = functools.partial(ClinicalPredictor, clinical_table=load_clinical_file(Path(table_path)))

    old_argv, original = sys.argv, nnunet_predict.nnUNetPredictor
    sys.argv = ["nnyseg predict", *nnunet_argv]
    nnunet_predict.nnUNetPredictor = predictor_class
    try:
        nnunet_predict.predict_entry_point()
    finally:
        sys.argv, nnunet_predict.nnUNetPredictor = old_argv, original
