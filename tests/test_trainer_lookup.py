"""The stock nnU-Net lookup finds nnyseg's trainers, in a fresh process with only nnU-Net's path variables set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import nnyseg
import nnyseg.trainers
from nnyseg._startup.register_trainer_dir import register

LOOKUP = """
import sys
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
import nnyseg.trainers
for name in nnyseg.trainers.__all__:
    found = recursive_find_trainer_class_by_name(name)
    assert found is getattr(nnyseg.trainers, name), (name, found)
    print("FOUND", name, found.__module__)
"""


def _clean_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet", "NNYSEG"))}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(tmp_path / var)
    return env


def test_fresh_process_finds_every_trainer(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", LOOKUP],
        env=_clean_env(tmp_path),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in nnyseg.trainers.__all__:
        assert f"FOUND {name} nnyseg.trainers" in result.stdout


def test_switching_the_hook_off_makes_lookup_fail(tmp_path):
    env = _clean_env(tmp_path) | {"NNYSEG_NO_AUTO_EXT_TRAINER": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOOKUP], env=env, capture_output=True, text=True, encoding="utf-8", timeout=300
    )
    assert result.returncode != 0
    assert "Could not find requested nnunet trainer" in result.stderr


@pytest.mark.parametrize(
    ("before", "expected"),
    [
        ({}, [str(nnyseg.TRAINER_DIR)]),
        ({"nnUNet_extTrainer": "/other"}, ["/other", str(nnyseg.TRAINER_DIR)]),
        ({"nnUNet_extTrainer": str(nnyseg.TRAINER_DIR)}, [str(nnyseg.TRAINER_DIR)]),
    ],
)
def test_register_appends_once_and_keeps_user_folders(before, expected):
    env = dict(before)
    register(env)
    register(env)
    assert env["nnUNet_extTrainer"].split(os.pathsep) == expected


def test_register_respects_opt_out():
    env = {"NNYSEG_NO_AUTO_EXT_TRAINER": "1"}
    assert register(env) is False
    assert "nnUNet_extTrainer" not in env


def test_trainer_folder_holds_only_the_shim():
    # nnU-Net imports every module in the folder as a top-level module: anything else there would leak.
    modules = sorted(p.name for p in nnyseg.TRAINER_DIR.iterdir() if p.suffix == ".py")
    assert modules == ["nnyseg_trainers.py"]
