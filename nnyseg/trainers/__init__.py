"""nnyseg trainers, found by ``nnUNetv2_train -tr NAME`` through nnU-Net's ``nnUNet_extTrainer`` lookup.

Every name in ``__all__`` is re-exported by the shim in :data:`nnyseg.TRAINER_DIR`. Names must not collide with
nnU-Net's own trainers: nnU-Net searches its package first and would return its own class. The method trainers and
their ``_tiny`` CPU variants are listed per model in :data:`nnyseg.registry.MODELS` (a test checks both lists agree).
"""

from nnyseg.trainers.base import nnysegTrainer
from nnyseg.trainers.dyntransnet import (
    DynTransNetTrainer,
    DynTransNetTrainer_nnUNet,
    DynTransNetTrainer_nnUNet_tiny,
    DynTransNetTrainer_tiny,
)
from nnyseg.trainers.elanres_msca import (
    ELANResMSCATrainer,
    ELANResMSCATrainer_nnUNet,
    ELANResMSCATrainer_nnUNet_tiny,
    ELANResMSCATrainer_tiny,
)
from nnyseg.trainers.nnynet import nnYNetTrainer, nnYNetTrainer_tiny

__all__ = [
    "DynTransNetTrainer",
    "DynTransNetTrainer_nnUNet",
    "DynTransNetTrainer_nnUNet_tiny",
    "DynTransNetTrainer_tiny",
    "ELANResMSCATrainer",
    "ELANResMSCATrainer_nnUNet",
    "ELANResMSCATrainer_nnUNet_tiny",
    "ELANResMSCATrainer_tiny",
    "nnYNetTrainer",
    "nnYNetTrainer_tiny",
    "nnysegTrainer",
]
