"""`nnyseg doctor` finds what is missing: unset path variables, the trainer folder, a broken torch stack."""

from __future__ import annotations

import nnyseg
from nnyseg import doctor


def _status(checks, name):
    return next(c for c in checks if c.name == name).status


def test_path_variables(tmp_path):
    env = {"nnUNet_raw": str(tmp_path), "nnUNet_preprocessed": str(tmp_path / "missing")}
    checks = {c.name: c for c in doctor.check_path_variables(env)}
    assert checks["nnUNet_raw"].status == "ok"
    assert checks["nnUNet_preprocessed"].status == "warn"
    assert checks["nnUNet_results"].status == "fail"
    assert "export nnUNet_results=" in checks["nnUNet_results"].fix


def test_trainer_folder_visible_or_not():
    assert doctor.check_trainer_folder({"nnUNet_extTrainer": str(nnyseg.TRAINER_DIR)}).status == "ok"
    missing = doctor.check_trainer_folder({})
    assert missing.status == "fail"
    assert str(nnyseg.TRAINER_DIR) in missing.fix
    off = doctor.check_trainer_folder({"NNYSEG_NO_AUTO_EXT_TRAINER": "1"})
    assert off.status == "fail" and "switched off" in off.detail


def test_torch_stack_and_nnunet_ok_here():
    checks = [*doctor.check_torch_stack(), doctor.check_nnunet()]
    assert all(c.status == "ok" for c in checks), checks


def test_torchvision_mismatch_is_reported(monkeypatch):
    import torchvision

    class Broken:
        @property
        def nms(self):
            raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(torchvision, "ops", Broken())
    checks = doctor.check_torch_stack()
    assert _status(checks, "torchvision") == "fail"
    assert "torchvision::nms" in next(c for c in checks if c.name == "torchvision").detail


def test_main_exit_code(monkeypatch, tmp_path, capsys):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    assert doctor.main(lookup=False) == 1
    assert "nnUNet_raw" in capsys.readouterr().out
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("nnUNet_extTrainer", str(nnyseg.TRAINER_DIR))
    assert doctor.main(lookup=False) == 0
