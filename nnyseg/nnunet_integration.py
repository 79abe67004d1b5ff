"""Everything nnyseg does to meet nnU-Net's internals, in one place.

nnU-Net 2.8 has no plug-in interface besides the ``nnUNet_extTrainer`` folder list, so nnyseg meets it here:

* :func:`register_trainer_folder`: the interpreter start-up hook (``nnyseg_nnunet_ext.pth`` in site-packages) that
  appends nnyseg's trainer folder to ``nnUNet_extTrainer``, so the stock ``nnUNetv2_train -tr nnYNetTrainer`` finds
  the trainer in a fresh shell;
* :func:`nnyseg_planners_visible`: the planner lookup of ``nnyseg plan_and_preprocess -pl NAME`` (nnU-Net finds
  planners only inside its own package);
* :func:`adapt_trainer_configuration`: the adaptation a method trainer applies to whatever plans it is given
  (``docs/stock-flow.md``), written into the plans nnU-Net saves to the results folder;
* :func:`conditioning_dataset_class`: the dataset class that feeds nnY-Net's clinical row during nnU-Net's final
  validation;
* :func:`predictor_replaced` and :func:`clinical_predictor_class`: the predictor hook of ``nnyseg predict``, which
  sets each case's clinical features right before nnU-Net predicts it;
* :func:`safe_predictor_class`, :func:`load_checkpoint` and :func:`check_weights_fit_network`: the predictor of
  ``nnyseg predict`` and ``nnyseg segment``, which unpickles checkpoints with torch's weights-only loader and the
  allow-list :data:`CHECKPOINT_TYPES` (a model folder from someone else cannot run code), and refuses a results-folder
  ``plans.json`` whose network does not fit the checkpoint's weights with one message (``docs/reliability.md``);
* :func:`check_nnunet_version`: the nnunetv2 versions this module was tested with.

This module is imported at interpreter start-up by the hook, so its top level imports nothing heavy: nnunetv2 and
torch are imported inside the functions, and the nnU-Net subclasses are made on first use.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from nnyseg import TRAINER_DIR

#: The nnunetv2 releases nnyseg was tested with: ``TESTED_NNUNET[0] <= version < TESTED_NNUNET[1]``.
TESTED_NNUNET = ((2, 8, 1), (2, 9, 0))
#: Set to 1 to run with an nnunetv2 outside :data:`TESTED_NNUNET` anyway.
ALLOW_UNTESTED_ENV = "NNYSEG_ALLOW_UNTESTED_NNUNET"
#: Set to 1 to switch the start-up hook off.
NO_HOOK_ENV = "NNYSEG_NO_AUTO_EXT_TRAINER"


# ----------------------------------------------------------------------------------------------------------------
# Version
# ----------------------------------------------------------------------------------------------------------------
def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for token in text.split(".")[:3]:
        digits = "".join(c for c in token if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_nnunet_version(version: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """Return the installed nnunetv2 version; raise unless it is in :data:`TESTED_NNUNET`.

    Raises:
        RuntimeError: nnunetv2 is outside the tested range (unless ``NNYSEG_ALLOW_UNTESTED_NNUNET=1``, which warns).
    """
    version = metadata.version("nnunetv2") if version is None else version
    low, high = TESTED_NNUNET
    if low <= _parse_version(version) < high:
        return version
    tested = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
    message = (
        f"nnyseg meets nnU-Net's internals (trainer lookup, plans layout, predictor) as nnunetv2 {tested} has them, "
        f"but nnunetv2 {version} is installed. Install a tested release (pip install 'nnunetv2{tested}'), or set "
        f"{ALLOW_UNTESTED_ENV}=1 to try this one anyway."
    )
    if environ.get(ALLOW_UNTESTED_ENV, "") not in ("", "0"):
        warnings.warn(message, stacklevel=2)
        return version
    raise RuntimeError(message)


# ----------------------------------------------------------------------------------------------------------------
# Start-up hook: nnUNet_extTrainer
# ----------------------------------------------------------------------------------------------------------------
def register_trainer_folder(environ: os._Environ[str] | dict[str, str] = os.environ) -> bool:
    """Add :data:`nnyseg.TRAINER_DIR` to ``environ['nnUNet_extTrainer']`` unless it is there or switched off.

    nnU-Net reads the variable once, when ``nnunetv2.paths`` is imported, so this runs at interpreter start-up; the
    folders the user listed are kept, in front.

    Returns:
        True if the variable was changed.
    """
    if environ.get(NO_HOOK_ENV, "") not in ("", "0"):
        return False
    folders = [p for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    target = str(TRAINER_DIR)
    if any(os.path.realpath(p) == os.path.realpath(target) for p in folders):
        return False
    environ["nnUNet_extTrainer"] = os.pathsep.join([*folders, target])
    return True


# ----------------------------------------------------------------------------------------------------------------
# Planner lookup
# ----------------------------------------------------------------------------------------------------------------
@contextmanager
def nnyseg_planners_visible(planners: Mapping[str, type]) -> Iterator[None]:
    """Let nnU-Net's planner lookup (``-pl NAME``) also answer for ``planners`` while the context is open."""
    from nnunetv2.experiment_planning import plan_and_preprocess_api as api

    original = api.recursive_find_python_class

    def find(folder: str, class_name: str, current_module: str, *args: Any, **kwargs: Any):
        if class_name in planners:
            return planners[class_name]
        return original(folder, class_name, current_module, *args, **kwargs)

    api.recursive_find_python_class = find
    try:
        yield
    finally:
        api.recursive_find_python_class = original


def nnunet_planner_class(name: str) -> type | None:
    """nnU-Net's own planner class called ``name`` (searched in its package, as ``-pl`` does), or None."""
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folder = os.path.join(nnunetv2.__path__[0], "experiment_planning")
    return recursive_find_python_class(folder, name, current_module="nnunetv2.experiment_planning")


#: What nnU-Net's planners use to size a batch, set in their ``__init__`` (which needs a dataset on disk, so the values
#: are listed here; a test checks them against nnU-Net's instances): ``(UNet_reference_val_3d scaled to the default GPU
#: target, UNet_reference_val_corresp_bs_3d, max_dataset_covered)``.
PLANNER_BATCH_RULES: Mapping[str, tuple[float, int, float]] = {
    "ExperimentPlanner": (560e6, 2, 0.05),
    "nnUNetPlannerResEncM": (680e6, 2, 1.0),
    "nnUNetPlannerResEncL": (2100e6, 2, 1.0),
    "nnUNetPlannerResEncXL": (3600e6, 2, 1.0),
}


def planner_batch_rule(plans: Mapping[str, Any]) -> tuple[float | None, float]:
    """``(memory reference x reference batch, max_dataset_covered)`` of the planner that wrote ``plans``.

    nnyseg's own planners plan as nnU-Net's ``ExperimentPlanner``. For an unknown planner the reference is None (the
    budget is then what its network spends) and the batch cap nnU-Net's default.
    """
    from nnyseg.planning.planners import PLANNERS
    from nnyseg.registry import DEFAULT_MAX_DATASET_COVERED

    name = str(plans.get("experiment_planner_used", ""))
    if name in PLANNERS:
        name = "ExperimentPlanner"
    if name not in PLANNER_BATCH_RULES:
        return None, DEFAULT_MAX_DATASET_COVERED
    reference, batch, covered = PLANNER_BATCH_RULES[name]
    return reference * batch, covered


# ----------------------------------------------------------------------------------------------------------------
# Method trainers: any plans -> the method's configuration
# ----------------------------------------------------------------------------------------------------------------
def adapt_trainer_configuration(trainer: Any, model: str, preset: str) -> str | None:
    """Make ``trainer``'s configuration hold ``model``'s network (call at the end of the trainer's ``__init__``).

    A configuration that already holds the model in ``preset`` is used as it is. Otherwise the configuration is
    derived with :func:`nnyseg.registry.adapt_configuration`, with the model's dataset-dependent settings (nnY-Net:
    clinical mode when ``$nnUNet_raw/<dataset>`` has a clinical table), and written, resolved, into the trainer's
    plans dict, which nnU-Net saves as the results folder's ``plans.json`` in ``on_train_start``;
    ``nnUNetv2_predict``, ``--val``, ``--c``, ``nnUNetv2_find_best_configuration`` and the model export all read that
    file and so rebuild the same network. Spacing, normalisation and the preprocessed data (``data_identifier``) are
    never changed.

    Returns:
        The one-line description of the change (also written to the training log), or None if nothing changed.

    Raises:
        nnyseg.registry.AdaptationError: For a 2D configuration or a patch that cannot fit (before any data is loaded).
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnyseg.registry import adapt_configuration, configuration_is_model, describe_change, get_model

    spec = get_model(model)
    arch_overrides = spec.arch_kwargs_for_dataset(raw_dataset_folder(trainer.plans_manager.dataset_name))
    name = trainer.configuration_name
    plans = trainer.plans_manager.plans
    configuration = trainer.configuration_manager.configuration
    source = (
        f"{type(trainer).__name__}: plans '{trainer.plans_manager.plans_name}', configuration '{name}'"
        f" (dataset {trainer.plans_manager.dataset_name})"
    )
    reference, covered = planner_batch_rule(plans)
    if configuration_is_model(spec, configuration, preset):
        trainer.print_to_log_file(f"{source}: already holds {spec.network_class.__name__} ({preset}), used as is")
        return None
    adapted = adapt_configuration(
        spec,
        configuration,
        input_channels=determine_num_input_channels(
            trainer.plans_manager, trainer.configuration_manager, trainer.dataset_json
        ),
        num_classes=trainer.label_manager.num_segmentation_heads,
        num_training_cases=int(trainer.dataset_json.get("numTraining", 1)),
        preset=preset,
        max_dataset_covered=covered,
        planner_reference=reference,
        arch_overrides=arch_overrides,
        source=source,
    )
    plans["configurations"][name] = adapted
    trainer.plans_manager = PlansManager(plans)
    trainer.configuration_manager = trainer.plans_manager.get_configuration(name)
    change = f"{source}: {describe_change(adapted)}"
    trainer.print_to_log_file(change)
    return change


def json_round_trip(plans: Mapping[str, Any]) -> dict[str, Any]:
    """``plans`` as nnU-Net writes and reads them (numpy values made plain, tuples made lists), on a copy."""
    import json
    from copy import deepcopy

    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    plans = deepcopy(dict(plans))
    recursive_fix_for_json_export(plans)
    return json.loads(json.dumps(plans))


def raw_dataset_folder(dataset_name: str) -> Path | None:
    """``$nnUNet_raw/<dataset_name>`` if ``nnUNet_raw`` is set and the folder exists."""
    raw = os.environ.get("nnUNet_raw")
    folder = Path(raw) / dataset_name if raw else None
    return folder if folder is not None and folder.is_dir() else None


# ----------------------------------------------------------------------------------------------------------------
# Model folders from others: checkpoints unpickled safely, plans checked against the weights
# ----------------------------------------------------------------------------------------------------------------
#: Set to 1 to let ``nnyseg predict`` / ``nnyseg segment`` unpickle checkpoints that need types outside
#: :data:`CHECKPOINT_TYPES` (as nnU-Net's own ``nnUNetv2_predict`` does with every checkpoint).
ALLOW_UNSAFE_CHECKPOINT_ENV = "NNYSEG_ALLOW_UNSAFE_CHECKPOINT"
#: The command-line flag of ``nnyseg predict`` / ``nnyseg segment`` that does the same for one command.
ALLOW_UNSAFE_CHECKPOINT_FLAG = "--allow-unsafe-checkpoint"
#: What an nnU-Net 2.8 checkpoint (``nnUNetTrainer.save_checkpoint``) pickles beyond the types torch's weights-only
#: unpickler accepts by itself (tensors, ``torch.device``, ``OrderedDict``, builtin containers, numbers, strings), as
#: the pickle names them: the numpy float scalars of the training log (``logging``'s losses and pseudo Dice,
#: ``_best_ema``: ``scalar(dtype, bytes)``, under numpy 2's module name and numpy 1's) and the dtype classes those
#: scalars' dtypes are (numpy 2 names; numpy 1's dtype classes are allowed as objects). None can run code.
CHECKPOINT_TYPES: tuple[str, ...] = (
    "numpy.dtype",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray.scalar",
    "numpy.dtypes.Float16DType",
    "numpy.dtypes.Float32DType",
    "numpy.dtypes.Float64DType",
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint needs types outside :data:`CHECKPOINT_TYPES` to be unpickled, so loading it may run code."""


class ModelMismatchError(ValueError):
    """A results folder's ``plans.json`` builds a network that the checkpoint's weights do not fit."""


def unsafe_checkpoint_allowed(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``NNYSEG_ALLOW_UNSAFE_CHECKPOINT`` is set (to anything but empty or 0)."""
    return environ.get(ALLOW_UNSAFE_CHECKPOINT_ENV, "") not in ("", "0")


def _checkpoint_safe_globals() -> list[tuple[Any, str]]:
    """:data:`CHECKPOINT_TYPES` as ``torch.serialization.safe_globals`` takes them: ``(object, name in the pickle)``."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    objects = {"numpy.dtype": np.dtype, "numpy._core.multiarray.scalar": scalar, "numpy.core.multiarray.scalar": scalar}
    # Unpickling a dtype sets its state, which torch allows for the allow-listed classes only (checked by object).
    objects.update(
        {f"numpy.dtypes.{t.__name__.title()}DType": type(np.dtype(t)) for t in (np.float16, np.float32, np.float64)}
    )
    return [(objects[name], name) for name in CHECKPOINT_TYPES]


@contextmanager
def checkpoint_types_allowed() -> Iterator[None]:
    """Let torch's weights-only unpickler accept :data:`CHECKPOINT_TYPES` while the context is open."""
    import torch

    # Only what is not trusted already: on exit, torch forgets what the context added, even if it was there before.
    trusted = torch.serialization.get_safe_globals()
    with torch.serialization.safe_globals([g for g in _checkpoint_safe_globals() if g not in trusted]):
        yield


def _refusal_reason(error: Exception) -> str:
    """The part of torch's weights-only error that says what it met (without its advice to pass weights_only=False)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    return text.strip().split("\n", 1)[0].split(" Please use", 1)[0].strip()


def load_checkpoint(path: str | os.PathLike[str], *, allow_unsafe: bool | None = None) -> dict[str, Any]:
    """A checkpoint, unpickled by ``torch.load(weights_only=True)`` with :data:`CHECKPOINT_TYPES` allowed, on the CPU.

    Args:
        path: The ``.pth`` file.
        allow_unsafe: What to do with a checkpoint that needs other types: False refuses it, True loads it with full
            unpickling (what ``nnUNetv2_predict`` does), with a warning naming the types; None (default) reads
            ``NNYSEG_ALLOW_UNSAFE_CHECKPOINT``. A checkpoint within the allow-list is never fully unpickled.

    Raises:
        UnsafeCheckpointError: The checkpoint needs other types and unsafe loading is not allowed. The message names
            the file and the types, and how to allow it.
    """
    import pickle

    import torch

    path = os.fspath(path)
    with checkpoint_types_allowed():
        try:
            return torch.load(path, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as error:
            reason = _refusal_reason(error)
            try:
                needed = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            except Exception:  # a legacy (non-zip) file or unreadable pickle: torch's reason says what it met
                needed = []
    why = (
        f"it needs {', '.join(needed)}, outside the types an nnU-Net checkpoint holds, and unpickling it may run code"
        if needed
        else f"torch's weights-only unpickler, given the types an nnU-Net checkpoint holds, cannot read it ({reason}), "
        "and unpickling it fully may run code"
    )
    if allow_unsafe is None:
        allow_unsafe = unsafe_checkpoint_allowed()
    if not allow_unsafe:
        raise UnsafeCheckpointError(
            f"refused to load the checkpoint {path}: {why}. If you trust where the model comes from, pass "
            f"{ALLOW_UNSAFE_CHECKPOINT_FLAG} (or set {ALLOW_UNSAFE_CHECKPOINT_ENV}=1) to load it with full unpickling"
        )
    warnings.warn(
        f"the checkpoint {path}: {why}; loading it with full unpickling, as {ALLOW_UNSAFE_CHECKPOINT_FLAG} / "
        f"{ALLOW_UNSAFE_CHECKPOINT_ENV} allows",
        stacklevel=2,
    )
    return torch.load(path, map_location=torch.device("cpu"), weights_only=False)


def _architecture_changes(plans: Mapping[str, Any], trained_plans: Any, configuration: str) -> list[str]:
    """``"arch_kwargs.KEY: plans.json A, trained with B"`` for each architecture setting that differs."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if not isinstance(trained_plans, dict):
        return []
    now, then = (
        PlansManager(p).get_configuration(configuration).configuration.get("architecture", {})
        for p in (dict(plans), trained_plans)
    )
    settings_now = {"network_class_name": now.get("network_class_name")}
    settings_then = {"network_class_name": then.get("network_class_name")}
    settings_now.update({f"arch_kwargs.{k}": v for k, v in now.get("arch_kwargs", {}).items()})
    settings_then.update({f"arch_kwargs.{k}": v for k, v in then.get("arch_kwargs", {}).items()})
    return [
        f"{key}: plans.json {settings_now.get(key)!r}, trained with {settings_then.get(key)!r}"
        for key in sorted(set(settings_now) | set(settings_then), key=lambda k: (k != "network_class_name", k))
        if settings_now.get(key) != settings_then.get(key)
    ]


def check_weights_fit_network(
    network: Any,
    weights: Mapping[str, Any],
    *,
    checkpoint: str,
    plans_file: str,
    configuration: str,
    plans: Mapping[str, Any] | None = None,
    trained_plans: Any = None,
) -> None:
    """Raise :class:`ModelMismatchError` unless ``weights`` load into ``network`` as ``load_state_dict`` wants them.

    Args:
        network: The network built from ``plans_file``'s configuration ``configuration``.
        weights: A checkpoint's ``network_weights``.
        checkpoint: The checkpoint's path, for the message.
        plans_file: The ``plans.json`` path, for the message.
        configuration: The configuration the checkpoint was trained with.
        plans: The plans read from ``plans_file``; with ``trained_plans`` (the checkpoint's ``init_args['plans']``,
            the plans it was trained with), the message also lists the architecture settings that differ.

    Raises:
        ModelMismatchError: One message naming ``plans_file``, the network class, ``checkpoint``, the number of
            missing, unexpected and reshaped parameters with a few examples (instead of PyTorch's traceback).
    """
    expected = network.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = []
    for key, value in expected.items():
        shape, trained = getattr(value, "shape", None), getattr(weights.get(key), "shape", None)
        if shape is not None and trained is not None and tuple(shape) != tuple(trained):
            reshaped.append(f"{key} {tuple(trained)} in the checkpoint, {tuple(shape)} in the network")
    if not (missing or unexpected or reshaped):
        return
    examples = (
        reshaped[:3]
        + [f"{k} missing from the checkpoint" for k in missing[:2]]
        + [f"{k} not in the network" for k in unexpected[:2]]
    )
    try:
        changes = _architecture_changes(plans, trained_plans, configuration) if plans is not None else []
    except Exception:  # a hint only: it must not hide the mismatch itself
        changes = []
    raise ModelMismatchError(
        f"{plans_file} builds a {type(network).__name__} (configuration '{configuration}') that the weights in "
        f"{checkpoint} do not fit: {len(reshaped)} parameter(s) of another shape, {len(missing)} missing from the "
        f"checkpoint, {len(unexpected)} not in the network (e.g. {'; '.join(examples)})."
        + (
            f" plans.json differs from the plans the checkpoint was trained with: {'; '.join(changes[:5])}."
            if changes
            else ""
        )
        + " Was plans.json edited after training? Restore the plans.json the model was trained with."
    )


def _build_inference_network(
    trainer_class: type, plans_manager: Any, configuration_manager: Any, num_input_channels: int, num_outputs: int
) -> Any:
    """The network as nnU-Net 2.8's predictor builds it (both ``build_network_architecture`` signatures)."""
    import inspect

    if "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
        return trainer_class.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_outputs, enable_deep_supervision=False
        )
    warnings.warn(
        f"Trainer {trainer_class.__name__} uses the old build_network_architecture signature (nnU-Net deprecates it)",
        DeprecationWarning,
        stacklevel=3,
    )
    return trainer_class.build_network_architecture(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels,
        num_outputs,
        enable_deep_supervision=False,
    )


def safe_predictor_class(base: type | None = None) -> type:
    """nnU-Net's predictor class (or its subclass ``base``) that loads a model folder without trusting it.

    Its ``initialize_from_trained_model_folder`` does what nnU-Net 2.8's does, except that

    * every fold's checkpoint is loaded by :func:`load_checkpoint` (weights-only unpickling, :data:`CHECKPOINT_TYPES`)
      instead of ``torch.load(weights_only=False)``, so a checkpoint that would run code is refused
      (:class:`UnsafeCheckpointError`);
    * every fold's weights are checked against the network the folder's ``plans.json`` builds, before any is loaded
      (:func:`check_weights_fit_network`, :class:`ModelMismatchError`).

    The class takes ``allow_unsafe_checkpoint`` (``bool | None``, default None: read ``NNYSEG_ALLOW_UNSAFE_CHECKPOINT``)
    besides the base's arguments, and has ``loads_checkpoints_safely = True``. Made on first use (this module must stay
    light at start-up), one class per base; a base that already loads safely is returned as it is.
    """
    if base is None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        base = nnUNetPredictor
    if getattr(base, "loads_checkpoints_safely", False):
        return base
    return _safe_predictor_class(base)


@functools.cache
def _safe_predictor_class(base: type) -> type:
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    class SafePredictor(base):
        loads_checkpoints_safely = True

        def __init__(self, *args: Any, allow_unsafe_checkpoint: bool | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.allow_unsafe_checkpoint = allow_unsafe_checkpoint

        def initialize_from_trained_model_folder(
            self, model_training_output_dir: str, use_folds: Any, checkpoint_name: str = "checkpoint_final.pth"
        ) -> None:
            # nnU-Net 2.8.1's method, step by step, with the checkpoints loaded safely and checked before use.
            folder = str(model_training_output_dir)
            if use_folds is None:
                use_folds = self.auto_detect_available_folds(folder, checkpoint_name)
            if isinstance(use_folds, str):
                use_folds = [use_folds]
            if not use_folds:  # nnU-Net would fail on a variable never set
                raise FileNotFoundError(f"{folder}: no fold_*/{checkpoint_name} to predict with")
            dataset_json = load_json(join(folder, "dataset.json"))
            plans_file = join(folder, "plans.json")
            plans = load_json(plans_file)
            plans_manager = PlansManager(plans)

            files, parameters = [], []
            for i, fold in enumerate(use_folds):
                fold = int(fold) if fold != "all" else fold
                files.append(join(folder, f"fold_{fold}", checkpoint_name))
                checkpoint = load_checkpoint(files[-1], allow_unsafe=self.allow_unsafe_checkpoint)
                if i == 0:
                    trainer_name = checkpoint["trainer_name"]
                    configuration_name = checkpoint["init_args"]["configuration"]
                    trained_plans = checkpoint["init_args"].get("plans")
                    mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes")
                parameters.append(checkpoint["network_weights"])  # the rest (optimizer state, ...) is dropped here

            configuration_manager = plans_manager.get_configuration(configuration_name)
            network = _build_inference_network(
                recursive_find_trainer_class_by_name(trainer_name),
                plans_manager,
                configuration_manager,
                determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
                plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
            )
            for file, weights in zip(files, parameters, strict=True):
                check_weights_fit_network(
                    network,
                    weights,
                    checkpoint=file,
                    plans_file=plans_file,
                    configuration=configuration_name,
                    plans=plans,
                    trained_plans=trained_plans,
                )
            network.load_state_dict(parameters[0])  # as nnU-Net: the first fold's weights, see nnU-Net issue #2520
            # nnU-Net's own initialisation from here (attributes, label manager, torch.compile when nnUNet_compile).
            self.manual_initialization(
                network,
                plans_manager,
                configuration_manager,
                parameters,
                dataset_json,
                trainer_name,
                mirroring_axes,
            )

    SafePredictor.__module__ = __name__
    if base.__name__ != "nnUNetPredictor":
        SafePredictor.__name__ = f"Safe{base.__name__}"
    SafePredictor.__qualname__ = SafePredictor.__name__
    return SafePredictor


# ----------------------------------------------------------------------------------------------------------------
# Clinical conditioning: final validation and prediction
# ----------------------------------------------------------------------------------------------------------------
def conditioning_dataset_class(base: type, on_load: Callable[[str], None]) -> type:
    """A subclass of nnU-Net dataset class ``base`` whose ``load_case(k)`` calls ``on_load(k)`` first.

    nnU-Net's ``perform_actual_validation`` loads each validation case with ``dataset_class.load_case`` right before
    its sliding-window prediction, which calls ``network(x)`` only: this is where a case's clinical row is set.
    """

    class _ClinicalConditioningDataset(base):
        def load_case(self, identifier):
            on_load(identifier)
            return super().load_case(identifier)

    _ClinicalConditioningDataset.__name__ = f"{base.__name__}WithClinicalCondition"
    return _ClinicalConditioningDataset


@contextmanager
def predictor_replaced(predictor_class: Callable[..., Any]) -> Iterator[None]:
    """Make ``nnUNetv2_predict``'s entry point build ``predictor_class`` instead of ``nnUNetPredictor``."""
    from nnunetv2.inference import predict_from_raw_data as nnunet_predict

    original = nnunet_predict.nnUNetPredictor
    nnunet_predict.nnUNetPredictor = predictor_class
    try:
        yield
    finally:
        nnunet_predict.nnUNetPredictor = original


def run_nnunet_entry_point(entry_point: Callable[[], Any], program: str, argv: Sequence[str]) -> Any:
    """Run one of nnU-Net's console entry points in-process with ``argv`` as its command line."""
    old_argv = sys.argv
    sys.argv = [program, *argv]
    try:
        return entry_point()
    finally:
        sys.argv = old_argv


@functools.cache
def clinical_predictor_class() -> type:
    """nnU-Net's predictor that sets each case's clinical features on an nnY-Net before predicting the case.

    Made on first use (this module must stay light at start-up), on :func:`safe_predictor_class` (checkpoints are
    unpickled weights-only and checked against ``plans.json``). The class takes ``clinical_table`` (a
    :class:`nnyseg.data.clinical.ClinicalTable` of raw values keyed by case identifier) besides nnU-Net's arguments.
    Both of nnU-Net's prediction paths are covered: the multi-process one (``predict_from_data_iterator``: the
    condition is set as each preprocessed case comes out of the iterator, right before nnU-Net predicts it) and the
    sequential one of ``-npp 0 -nps 0``.
    """
    import torch
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
    from torch._dynamo import OptimizedModule

    # Safe loading first: the model folder's checkpoints are unpickled weights-only and checked against plans.json.
    class ClinicalPredictor(safe_predictor_class()):
        def __init__(self, *args: Any, clinical_table: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.clinical_table = clinical_table

        def initialize_from_trained_model_folder(
            self, model_training_output_dir: str, use_folds: Any, checkpoint_name: str = "checkpoint_final.pth"
        ) -> None:
            super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
            self.check_model(where=f"the model in {model_training_output_dir}")

        def _bare_network(self) -> Any:
            return self.network._orig_mod if isinstance(self.network, OptimizedModule) else self.network

        def check_model(self, *, where: str) -> None:
            """Raises ``ValueError`` unless the network takes clinical features with the table's schema."""
            network = self._bare_network()
            mode = getattr(getattr(network, "cross_attention", None), "mode", None)
            if mode != "clinical":
                raise ValueError(
                    f"{where} does not take clinical features (its network is {type(network).__name__}"
                    + (f" in cross-attention mode {mode!r}" if mode else "")
                    + "); drop --clinical, or train nnYNetTrainer on a dataset with a clinical table"
                )
            schema = self.configuration_manager.network_arch_init_kwargs.get("clinical_schema") or []
            self.clinical_table.check_schema(schema, where=f"{where} (plans arch_kwargs['clinical_schema'])")

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

    ClinicalPredictor.__module__ = __name__
    ClinicalPredictor.__qualname__ = "ClinicalPredictor"
    return ClinicalPredictor
