"""nnyseg trainers, found by ``nnUNetv2_train -tr NAME`` through nnU-Net's ``nnUNet_extTrainer`` lookup.

Every name in ``__all__`` is re-exported by the shim in :data:`nnyseg.TRAINER_DIR`. Names must not collide with
nnU-Net's own trainers: nnU-Net searches its package first and would return its own class.
"""

from nnyseg.trainers.base import nnysegTrainer
from nnyseg.trainers.dyntransnet import DynTransNetTrainer, DynTransNetTrainer_nnUNet
from nnyseg.trainers.elanres_msca import ELANResMSCATrainer, ELANResMSCATrainer_nnUNet
from nnyseg.trainers.nnynet import nnYNetTrainer

__all__ = [
    "DynTransNetTrainer",
    "DynTransNetTrainer_nnUNet",
    "ELANResMSCATrainer",
    "ELANResMSCATrainer_nnUNet",
    "nnYNetTrainer",
    "nnysegTrainer",
]
