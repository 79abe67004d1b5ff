"""Model folders from others: checkpoints unpickled weights-only, and a results-folder plans.json checked against them.

The module fixture plans a micro phantom with nnYNetPlanner and trains fold 0 of a derived configuration (the tiny
preset, 1 epoch x 2 iterations) once, through nnU-Net's own ``run_training``: its ``checkpoint_final.pth`` is what
nnU-Net 2.8's trainer writes, so it holds every type an nnU-Net checkpoint holds (training log included). Each test
copies the results folder and edits the copy: a checkpoint that would run code, an edited ``plans.json``, a fold whose
weights do not fit.
"""

from __future__ import annotations

import builtins
import json
import shutil
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch

from nnyseg import nnunet_integration as integration
from nnyseg.nnunet_integration import (
    ALLOW_UNSAFE_CHECKPOINT_ENV,
    ALLOW_UNSAFE_CHECKPOINT_FLAG,
    CHECKPOINT_TYPES,
    ModelMismatchError,
    UnsafeCheckpointError,
    checkpoint_types_allowed,
    load_checkpoint,
    safe_predictor_class,
)
from nnyseg.planning.planners import TINY_CONFIGURATION, nnYNetPlanner
from tests.conftest import plan_micro_phantom

DATASET_ID = 961
PLANS = "nnYNetPlans"
QUICK = "3d_fullres_tiny_1epoch"
TRAINER = "nnYNetTrainer"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Micro phantom -> nnYNetPlans -> fold 0 of the quick configuration trained for 1 epoch x 2 iterations."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    from nnyseg.trainers.nnynet import nnYNetTrainer

    root = tmp_path_factory.mktemp("model_loading")
    mp = pytest.MonkeyPatch()
    mp.setenv("nnUNet_n_proc_DA", "1")  # the planner sets torch's thread count from it
    raw, preprocessed, plans = plan_micro_phantom(
        root, mp, DATASET_ID, nnYNetPlanner, name="LoadingPhantom", num_test=1, quick_configuration=QUICK
    )
    mp.setenv("nnUNet_n_proc_DA", "0")  # single-threaded augmentation: tiny inputs, 2 CPU cores
    mp.setattr(trainer_module, "default_num_processes", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dataset_json = json.loads((preprocessed / "dataset.json").read_text(encoding="utf-8"))
    run_plans = deepcopy(plans)
    run_plans["continue_training"] = False  # what nnU-Net's run_training adds; the trainer pops it
    trainer = nnYNetTrainer(run_plans, QUICK, 0, dataset_json, device=torch.device("cpu"))
    trainer.run_training()
    model = Path(trainer.output_folder).parent
    inputs = root / "inputs"
    inputs.mkdir()
    (case,) = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    shutil.copy(case, inputs / case.name)
    yield {"root": root, "plans": plans, "dataset_json": dataset_json, "model": model, "inputs": inputs}
    torch.set_num_threads(threads)
    mp.undo()


def _copy_model(trained: dict, tmp_path: Path) -> Path:
    """A copy of the trained results folder under its own nnUNet_results (``-d`` finds it there)."""
    results = tmp_path / "nnUNet_results"
    model = results / trained["model"].parent.name / trained["model"].name
    shutil.copytree(trained["model"], model)
    return model


def _predict_argv(results: Path, inputs: Path, output: Path, *extra: str) -> list[str]:
    return [
        "-i", str(inputs), "-o", str(output), "-d", str(DATASET_ID), "-c", QUICK, "-tr", TRAINER, "-p", PLANS,
        "-f", "0", "-npp", "0", "-nps", "0", "-device", "cpu", "--disable_tta", "--disable_progress_bar", *extra,
    ]  # fmt: skip


def _checkpoint(model: Path, fold: int = 0) -> Path:
    return model / f"fold_{fold}" / "checkpoint_final.pth"


class _RunsCode:
    """Unpickles as a call of ``exec``: what a malicious checkpoint does (here, it writes a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


# ------------------------------------------------------------------------------------------------------- allow-list
def test_the_allow_list_is_what_nnunets_trainer_writes(trained, tmp_path):
    checkpoint = _checkpoint(trained["model"])
    # beyond torch's own weights-only types, a trained checkpoint needs exactly numpy's scalar and dtype ...
    needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(checkpoint)))
    assert needed and needed <= set(CHECKPOINT_TYPES)
    assert {name.rsplit(".", 1)[-1] for name in needed} == {"dtype", "scalar"}
    with checkpoint_types_allowed():
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(checkpoint)) == []
    assert not any(name in str(g) for g in torch.serialization.get_safe_globals() for name in ("scalar", "dtype"))

    # ... and the safe loader gives what full unpickling gives
    safe = load_checkpoint(checkpoint, allow_unsafe=False)
    full = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert safe.keys() == full.keys() and safe["logging"] == full["logging"] and safe["init_args"] == full["init_args"]
    assert type(safe["_best_ema"]) is type(full["_best_ema"]) and safe["_best_ema"] == full["_best_ema"]
    assert all(torch.equal(safe["network_weights"][k], v) for k, v in full["network_weights"].items())

    # numpy float scalars of any width load (numpy 1 makes the EMA float64); anything else, e.g. an array, does not
    torch.save({"log": [np.float16(1), np.float32(2), np.float64(3)]}, tmp_path / "floats.pth")
    assert load_checkpoint(tmp_path / "floats.pth") == {"log": [1.0, 2.0, 3.0]}
    torch.save({"log": np.arange(3)}, tmp_path / "array.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"needs numpy\.(_core|core)\.multiarray\._reconstruct"):
        load_checkpoint(tmp_path / "array.pth", allow_unsafe=False)

    # a trainer whose plans nnyseg adapted (nnYNetTrainer_tiny on the full-size configuration) writes no other type
    from nnyseg.trainers.nnynet import nnYNetTrainer_tiny

    plans = deepcopy(trained["plans"])
    plans["continue_training"] = False
    trainer = nnYNetTrainer_tiny(plans, "3d_fullres", 0, trained["dataset_json"], device=torch.device("cpu"))
    trainer.initialize()
    trainer.save_checkpoint(str(tmp_path / "adapted.pth"))
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "adapted.pth"))) <= needed
    assert load_checkpoint(tmp_path / "adapted.pth")["init_args"]["plans"]["configurations"]["3d_fullres"]


# ------------------------------------------------------------------------------------------------------- prediction
def test_nnyseg_predict_loads_a_real_checkpoint_weights_only(trained, tmp_path, monkeypatch):
    from nnyseg.prediction import main

    results = _copy_model(trained, tmp_path).parents[1]
    monkeypatch.setenv("nnUNet_results", str(results))
    calls = []
    original = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    main(_predict_argv(results, trained["inputs"], tmp_path / "out"))
    assert calls == [True]  # one fold, unpickled weights-only (nnUNetv2_predict passes weights_only=False)
    (case,) = trained["inputs"].iterdir()
    assert (tmp_path / "out" / case.name.replace("_0000", "")).is_file()


def test_a_checkpoint_that_would_run_code_is_refused(trained, tmp_path, monkeypatch, capsys):
    from nnyseg.cli import main as cli_main
    from nnyseg.prediction import ClinicalPredictor, main

    model = _copy_model(trained, tmp_path)
    results = model.parents[1]
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.delenv(ALLOW_UNSAFE_CHECKPOINT_ENV, raising=False)
    marker = tmp_path / "code_ran"
    checkpoint = torch.load(_checkpoint(model), map_location="cpu", weights_only=False)
    checkpoint["payload"] = _RunsCode(marker)  # otherwise the valid checkpoint: it would predict once loaded
    torch.save(checkpoint, _checkpoint(model))

    with pytest.raises(UnsafeCheckpointError) as refused:
        main(_predict_argv(results, trained["inputs"], tmp_path / "out"))
    message = str(refused.value)
    assert str(_checkpoint(model)) in message and "builtins.exec" in message and "may run code" in message
    assert ALLOW_UNSAFE_CHECKPOINT_FLAG in message and ALLOW_UNSAFE_CHECKPOINT_ENV in message
    assert not marker.exists() and not list((tmp_path / "out").iterdir())  # nnU-Net makes the folder first

    # the command prints that one message, no traceback
    assert cli_main(["predict", *_predict_argv(results, trained["inputs"], tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nnyseg predict: error: refused to load the checkpoint" in err and "Traceback" not in err
    assert not marker.exists()

    # torch's legacy (non-zip) format too: what the unpickler met is named
    torch.save(checkpoint, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=r"legacy\.pth: torch's weights-only .*GLOBAL (builtins\.)?exec"):
        load_checkpoint(tmp_path / "legacy.pth")
    assert not marker.exists()

    # the clinical predictor loads the same way
    predictor = ClinicalPredictor(clinical_table=None, device=torch.device("cpu"))
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.exec"):
        predictor.initialize_from_trained_model_folder(str(model), (0,))
    assert not marker.exists()

    # the override is meaningful: with it, the checkpoint is fully unpickled (its code runs) and the model predicts
    with pytest.warns(UserWarning, match=r"needs builtins\.exec.*loading it with full unpickling"):
        main(_predict_argv(results, trained["inputs"], tmp_path / "out", ALLOW_UNSAFE_CHECKPOINT_FLAG))
    assert marker.read_text() == "ran" and len(list((tmp_path / "out").glob("*.nii.gz"))) == 1
    marker.unlink()
    monkeypatch.setenv(ALLOW_UNSAFE_CHECKPOINT_ENV, "1")
    with pytest.warns(UserWarning, match="full unpickling"):
        assert load_checkpoint(_checkpoint(model))["payload"] is None  # exec's return value
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------- edited plans
def _edit_feature_size(model: Path, feature_size: int) -> Path:
    """Change ``feature_size`` of the configuration the quick one inherits its architecture from."""
    plans_file = model / "plans.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    assert plans["configurations"][QUICK]["inherits_from"] == TINY_CONFIGURATION
    arch_kwargs = plans["configurations"][TINY_CONFIGURATION]["architecture"]["arch_kwargs"]
    assert arch_kwargs["feature_size"] != feature_size
    arch_kwargs["feature_size"] = feature_size
    plans_file.write_text(json.dumps(plans, indent=2), encoding="utf-8")
    return plans_file


def test_an_edited_plans_json_is_one_message_naming_plans_and_checkpoint(trained, tmp_path, monkeypatch, capsys):
    from nnyseg.cli import main as cli_main
    from nnyseg.prediction import main

    model = _copy_model(trained, tmp_path)
    results = model.parents[1]
    monkeypatch.setenv("nnUNet_results", str(results))
    plans_file = _edit_feature_size(model, 24)

    with pytest.raises(ModelMismatchError) as mismatch:
        main(_predict_argv(results, trained["inputs"], tmp_path / "out"))
    message = str(mismatch.value)
    assert message.startswith(f"{plans_file} builds a SwinNeXtUNet (configuration '{QUICK}')")
    assert f"the weights in {_checkpoint(model)} do not fit" in message
    assert "parameter(s) of another shape" in message and "in the checkpoint" in message
    assert "arch_kwargs.feature_size: plans.json 24, trained with 12" in message
    assert "Was plans.json edited after training?" in message

    assert cli_main(["predict", *_predict_argv(results, trained["inputs"], tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nnyseg predict: error:" in err and str(plans_file) in err
    assert "Traceback" not in err and "Error(s) in loading state_dict" not in err


def test_every_folds_weights_are_checked_at_initialisation(trained, tmp_path):
    model = _copy_model(trained, tmp_path)
    weights = load_checkpoint(_checkpoint(model))
    key = next(k for k, v in weights["network_weights"].items() if v.ndim > 1)
    weights["network_weights"].pop(key)  # fold 1: one parameter fewer (a checkpoint of another network)
    _checkpoint(model, 1).parent.mkdir()
    torch.save(weights, _checkpoint(model, 1))

    predictor = safe_predictor_class()(device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(str(model), (0,))  # fold 0 alone fits
    with pytest.raises(FileNotFoundError, match=r"no fold_\*/checkpoint_none\.pth"):
        predictor.initialize_from_trained_model_folder(str(model), None, "checkpoint_none.pth")
    with pytest.raises(ModelMismatchError, match=rf"{_checkpoint(model, 1)} do not fit: 0 .* 1 missing") as mismatch:
        predictor.initialize_from_trained_model_folder(str(model), (0, 1))
    assert f"{key} missing from the checkpoint" in str(mismatch.value)
    assert "plans.json differs" not in str(mismatch.value)  # the plans are the trained ones


# ------------------------------------------------------------------------------------------------------ the classes
def test_safe_predictor_classes():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    safe = safe_predictor_class()
    assert issubclass(safe, nnUNetPredictor) and safe.loads_checkpoints_safely
    assert safe_predictor_class() is safe and safe_predictor_class(nnUNetPredictor) is safe
    assert safe_predictor_class(safe) is safe  # already safe: returned as it is
    clinical = integration.clinical_predictor_class()
    assert issubclass(clinical, safe) and safe_predictor_class(clinical) is clinical

    class Custom(nnUNetPredictor):
        pass

    custom = safe_predictor_class(Custom)
    assert issubclass(custom, Custom) and custom.__name__ == "SafeCustom" and custom.loads_checkpoints_safely
    predictor = custom(device=torch.device("cpu"), allow_unsafe_checkpoint=True)
    assert predictor.allow_unsafe_checkpoint is True
    assert safe(device=torch.device("cpu")).allow_unsafe_checkpoint is None  # None: the environment decides


def test_unsafe_checkpoint_switch_reads_the_environment():
    assert not integration.unsafe_checkpoint_allowed({})
    assert not integration.unsafe_checkpoint_allowed({ALLOW_UNSAFE_CHECKPOINT_ENV: "0"})
    assert integration.unsafe_checkpoint_allowed({ALLOW_UNSAFE_CHECKPOINT_ENV: "1"})
