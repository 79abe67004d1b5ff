"""``nnyseg doctor``: what the stock nnU-Net commands need to find and run nnyseg, and what is missing."""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from nnyseg import TRAINER_DIR

PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
PTH_NAME = "nnyseg_nnunet_ext.pth"


@dataclass(frozen=True)
class Check:
    """One finding: ``status`` is "ok", "warn" or "fail"; ``fix`` says what to do about it."""

    name: str
    status: str
    detail: str
    fix: str = ""


def check_torch_stack() -> list[Check]:
    """torch, torchvision and timm must import together: nnU-Net's trainer lookup imports all three."""
    checks = []
    try:
        import torch

        checks.append(Check("torch", "ok", f"torch {torch.__version__}"))
    except Exception as e:
        return [Check("torch", "fail", f"import torch failed: {e}", "pip install torch==2.14.1 torchvision==0.29.1")]
    try:
        import torchvision

        torchvision.ops.nms  # noqa: B018 - touching the op loads torchvision's C++ extension
        checks.append(Check("torchvision", "ok", f"torchvision {torchvision.__version__} matches torch"))
    except Exception as e:
        checks.append(
            Check(
                "torchvision",
                "fail",
                f"torchvision does not work with torch {torch.__version__}: {e}. Every `nnUNetv2_train -tr` lookup "
                "imports timm and torchvision and will crash.",
                "install a matching pair, e.g. pip install torch==2.14.1 torchvision==0.29.1",
            )
        )
    try:
        importlib.import_module("timm")
        checks.append(Check("timm", "ok", f"timm {metadata.version('timm')}"))
    except Exception as e:
        checks.append(Check("timm", "fail", f"import timm failed: {e}", "pip install 'timm<1.0.23'"))
    return checks


def check_nnunet() -> Check:
    """nnyseg needs the nnunetv2 releases it was tested with (``nnyseg.nnunet_integration.TESTED_NNUNET``)."""
    from nnyseg.nnunet_integration import check_nnunet_version

    try:
        version = metadata.version("nnunetv2")
    except metadata.PackageNotFoundError:
        return Check("nnunetv2", "fail", "nnunetv2 is not installed", "pip install 'nnunetv2>=2.8.1,<2.9'")
    try:
        check_nnunet_version(version, environ={})
    except RuntimeError as err:
        return Check("nnunetv2", "fail", str(err), "pip install 'nnunetv2>=2.8.1,<2.9'")
    return Check("nnunetv2", "ok", f"nnunetv2 {version}")


def check_path_variables(environ: dict[str, str] | os._Environ) -> list[Check]:
    """nnU-Net's three folders must be set; the commands fail with a long message otherwise."""
    checks = []
    for name in PATH_VARIABLES:
        value = environ.get(name)
        if not value:
            checks.append(
                Check(name, "fail", "not set", f"export {name}=/path/to/{name} (any writable folder; see README)")
            )
        elif not Path(value).is_dir():
            checks.append(Check(name, "warn", f"{value} does not exist yet", f"mkdir -p {value}"))
        else:
            checks.append(Check(name, "ok", value))
    return checks


def check_trainer_folder(environ: dict[str, str] | os._Environ) -> Check:
    """Is nnyseg's trainer folder in nnUNet_extTrainer, and how did it get there."""
    folders = [p for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    visible = any(Path(p).resolve() == TRAINER_DIR for p in folders)
    pth = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    how = f"start-up hook {pth}" if pth.is_file() else "set by hand"
    manual = f"export nnUNet_extTrainer={TRAINER_DIR}"
    if visible:
        return Check("nnUNet_extTrainer", "ok", f"contains {TRAINER_DIR} ({how})")
    if environ.get("NNYSEG_NO_AUTO_EXT_TRAINER", "") not in ("", "0"):
        return Check(
            "nnUNet_extTrainer", "fail", "the start-up hook is switched off (NNYSEG_NO_AUTO_EXT_TRAINER)", manual
        )
    if sys.flags.no_site:
        return Check("nnUNet_extTrainer", "fail", "Python runs with -S, so the start-up hook did not run", manual)
    if not pth.is_file():
        return Check(
            "nnUNet_extTrainer",
            "fail",
            f"{TRAINER_DIR} is not in nnUNet_extTrainer and {pth} is missing (editable or unusual install?)",
            f"reinstall with `pip install .`, or {manual}",
        )
    return Check("nnUNet_extTrainer", "fail", f"{TRAINER_DIR} is not in nnUNet_extTrainer", manual)


def check_trainer_lookup(name: str = "nnysegTrainer") -> Check:
    """Run nnU-Net's own trainer lookup, exactly as ``nnUNetv2_train -tr`` does."""
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        import nnyseg.trainers

        found = recursive_find_trainer_class_by_name(name)
    except Exception as e:
        return Check("trainer lookup", "fail", f"nnU-Net's lookup of {name} failed: {type(e).__name__}: {e}")
    if found is not getattr(nnyseg.trainers, name):
        return Check("trainer lookup", "fail", f"nnU-Net found {found!r}, not nnyseg.trainers.{name}")
    return Check("trainer lookup", "ok", f"nnUNetv2_train -tr {name} resolves to nnyseg.trainers.{name}")


def check_device() -> Check:
    import torch

    if torch.cuda.is_available():
        return Check("device", "ok", f"CUDA: {torch.cuda.get_device_name(0)}")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return Check("device", "ok", "Apple MPS (pass -device mps)")
    return Check(
        "device", "warn", "no GPU: pass -device cpu to nnUNetv2_train/predict; only the tiny preset is practical"
    )


def run_checks(environ: dict[str, str] | os._Environ | None = None, *, lookup: bool = True) -> list[Check]:
    """All checks, in the order a user would fix them."""
    environ = os.environ if environ is None else environ
    checks = [*check_torch_stack(), check_nnunet(), *check_path_variables(environ), check_trainer_folder(environ)]
    if lookup and all(c.status != "fail" for c in checks if c.name in ("torch", "torchvision", "timm", "nnunetv2")):
        checks.append(check_trainer_lookup())
    checks.append(check_device())
    return checks


def main(lookup: bool = True) -> int:
    """Print the checks; return 1 if any failed."""
    import nnyseg

    print(f"nnyseg {nnyseg.__version__} ({Path(nnyseg.__file__).parent}), Python {sys.version.split()[0]}")
    checks = run_checks(lookup=lookup)
    for c in checks:
        mark = {"ok": "OK  ", "warn": "WARN", "fail": "FAIL"}[c.status]
        print(f"[{mark}] {c.name:18s} {c.detail}")
        if c.fix and c.status != "ok":
            print(f"       fix: {c.fix}")
    failed = [c for c in checks if c.status == "fail"]
    print("\nall good" if not failed else f"\n{len(failed)} problem(s) to fix")
    return 1 if failed else 0
