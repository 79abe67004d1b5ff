"""``nnyseg predict``: ``nnUNetv2_predict`` that also hands each case's clinical features to nnY-Net.

nnU-Net's predictor calls ``network(x)`` only, so the stock command cannot pass per-case inputs besides the image.
nnY-Net in ``clinical`` cross-attention mode takes its features through ``SwinNeXtUNet.set_condition``; this module
runs nnU-Net's own ``predict_entry_point`` (same flags, same code, same outputs) with its predictor class replaced,
for the duration of the call, by :class:`ClinicalPredictor`, which sets a case's row of the clinical table on the
network right before nnU-Net predicts that case::

    nnyseg predict -i imagesTs -o predictions -d 500 -c 3d_fullres -tr nnYNetTrainer --clinical clinical_test.json

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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nnyseg.data.clinical import load_clinical_file
from nnyseg.nnunet_integration import (
    ALLOW_UNSAFE_CHECKPOINT_ENV,
    ALLOW_UNSAFE_CHECKPOINT_FLAG,
    check_nnunet_version,
    clinical_predictor_class,
    predictor_replaced,
    run_nnunet_entry_point,
    safe_predictor_class,
)

__all__ = ["ALLOW_UNSAFE_CHECKPOINT_FLAG", "CLINICAL_FLAG", "ClinicalPredictor", "main"]

#: The flag ``nnyseg predict`` adds to nnUNetv2_predict's for clinical features (the other is
#: :data:`ALLOW_UNSAFE_CHECKPOINT_FLAG`, which lets checkpoints that need more than nnU-Net's types be unpickled).
CLINICAL_FLAG = "--clinical"


#: nnU-Net's predictor that sets each case's clinical row before predicting it (made in nnyseg.nnunet_integration).
ClinicalPredictor = clinical_predictor_class()


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


def _split_switch(argv: Sequence[str], flag: str) -> tuple[bool, list[str]]:
    """``(whether the flag without value was given, the remaining flags)``."""
    argv = list(argv)
    return flag in argv, [a for a in argv if a != flag]


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``nnUNetv2_predict`` with ``argv`` (its own flags), feeding clinical features when ``--clinical`` is given.

    Checkpoints are loaded by :func:`nnyseg.nnunet_integration.safe_predictor_class`'s predictor: unpickled
    weights-only, with the types an nnU-Net checkpoint holds, unless ``--allow-unsafe-checkpoint`` is given (or
    ``NNYSEG_ALLOW_UNSAFE_CHECKPOINT=1`` is set), and checked against the network the model's ``plans.json`` builds.

    Before nnU-Net starts (and loads the model), every image of the ``-i`` folder is read to its end
    (:func:`nnyseg.data.validation.check_input_images`).

    Raises:
        ValueError: The table is malformed, or the model does not take clinical features with the table's schema.
        nnyseg.data.validation.InputImageError: (a ValueError) The ``-i`` folder does not exist, or images in it are
            truncated or corrupt or hold NaN or infinite voxels; every problem is listed, each naming its file.
        FileNotFoundError: The table does not exist.
        nnyseg.nnunet_integration.UnsafeCheckpointError: A checkpoint needs types that may run code when unpickled.
        nnyseg.nnunet_integration.ModelMismatchError: The model's ``plans.json`` builds a network that a checkpoint's
            weights do not fit (an edited ``plans.json``).
    """
    from nnunetv2.inference import predict_from_raw_data as nnunet_predict

    check_nnunet_version()
    table_path, nnunet_argv = _split_clinical_flag(sys.argv[1:] if argv is None else argv)
    allow_unsafe, nnunet_argv = _split_switch(nnunet_argv, ALLOW_UNSAFE_CHECKPOINT_FLAG)
    if "-h" in nnunet_argv or "--help" in nnunet_argv:
        print(
            f"nnyseg predict: nnUNetv2_predict's flags (below) plus {CLINICAL_FLAG} TABLE, the clinical features of "
            "the cases to predict (clinical.json, or clinical.csv with clinical_schema.json beside it), for nnY-Net "
            "models in 'clinical' cross-attention mode. Checkpoints are unpickled weights-only, with the types an "
            f"nnU-Net checkpoint holds; {ALLOW_UNSAFE_CHECKPOINT_FLAG} (or {ALLOW_UNSAFE_CHECKPOINT_ENV}=1) loads one "
            "that needs more, which may run code: only for models from a source you trust.\n"
        )
    # Never nnU-Net's own predictor: it unpickles checkpoints fully (a model folder from others could run code).
    predictor_class: Any = safe_predictor_class()
    if table_path is not None:
        predictor_class = functools.partial(ClinicalPredictor, clinical_table=load_clinical_file(Path(table_path)))
    if allow_unsafe:
        predictor_class = functools.partial(predictor_class, allow_unsafe_checkpoint=True)
    if "-h" not in nnunet_argv and "--help" not in nnunet_argv and "-i" in nnunet_argv:
        # Before nnU-Net loads the model: it would predict from a truncated file's zeros, or from 0 where a NIfTI
        # file holds NaN, without a word.
        from nnyseg.data.validation import check_input_images

        i = nnunet_argv.index("-i")
        if i + 1 < len(nnunet_argv) and not nnunet_argv[i + 1].startswith("-"):  # else nnU-Net's parser says what
            check_input_images(nnunet_argv[i + 1], progress="--disable_progress_bar" not in nnunet_argv)

    with predictor_replaced(predictor_class):
        run_nnunet_entry_point(nnunet_predict.predict_entry_point, "nnyseg predict", nnunet_argv)
