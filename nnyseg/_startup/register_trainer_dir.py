"""Append nnyseg's trainer folder to ``nnUNet_extTrainer`` (runs at interpreter start-up; keep it tiny)."""

import os

from nnyseg import TRAINER_DIR


def register(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> bool:
    """Add :data:`nnyseg.TRAINER_DIR` to ``environ['nnUNet_extTrainer']`` unless it is there or switched off.

    Returns:
        True if the variable was changed.
    """
    if environ.get("NNYSEG_NO_AUTO_EXT_TRAINER", "") not in ("", "0"):
        return False
    folders = [p for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    target = str(TRAINER_DIR)
    if any(os.path.realpath(p) == os.path.realpath(target) for p in folders):
        return False
    environ["nnUNet_extTrainer"] = os.pathsep.join([*folders, target])
    return True


register()
