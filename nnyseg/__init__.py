"""nnyseg: liver and liver-tumour segmentation networks plugged into nnU-Net v2.

This module is imported at interpreter start-up by the trainer-folder hook, so it must stay free of heavy
imports (no torch, no nnunetv2).
"""

from pathlib import Path

__version__ = "0.1.0"

#: The folder nnU-Net searches for nnyseg trainers (``nnUNet_extTrainer``). It holds one shim module only.
TRAINER_DIR = Path(__file__).resolve().parent / "nnunet_ext"

__all__ = ["TRAINER_DIR", "__version__"]
