"""The console script: every subcommand answers --help, and --version works (as installed, in a subprocess)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import nnyseg
from nnyseg.cli import build_parser

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def _nnyseg(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("nnyseg") or sys.executable
    cmd = [exe, *args] if exe != sys.executable else [exe, "-m", "nnyseg.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", timeout=120)


def test_version():
    result = _nnyseg("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"nnyseg {nnyseg.__version__}"


def test_expected_subcommands_exist():
    for name in ("phantom", "plan_and_preprocess", "check-dataset", "doctor", "trainer-dir", "evaluate", "demo"):
        assert name in SUBCOMMANDS


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_subcommand_has_help(subcommand):
    result = _nnyseg(subcommand, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_plan_and_preprocess_help_is_nnunets_with_its_flags():
    out = _nnyseg("plan_and_preprocess", "--help").stdout
    for flag in ("-pl", "-npfp", "--verify_dataset_integrity", "-overwrite_plans_name", "-c", "-np"):
        assert flag in out


def test_trainer_dir():
    result = _nnyseg("trainer-dir")
    assert result.stdout.strip() == str(nnyseg.TRAINER_DIR)


def test_phantom_command_writes_once_and_refuses_to_overwrite(tmp_path, capsys):
    from nnyseg.cli import main

    args = ["phantom", "-d", "5", "-o", str(tmp_path), "--preset", "micro", "--num-training", "2", "--num-test", "1"]
    assert main(args) == 0
    folder = tmp_path / "Dataset005_LiverPhantom"
    assert (folder / "dataset.json").is_file() and len(list((folder / "labelsTr").iterdir())) == 2
    before = (folder / "labelsTr" / "case_0000.nii.gz").read_bytes()
    assert main([*args, "--seed", "7"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (folder / "labelsTr" / "case_0000.nii.gz").read_bytes() == before
