"""Shim that nnU-Net imports as a top-level module when it searches ``nnUNet_extTrainer`` for a trainer.

nnU-Net imports every module in this folder as a top-level name, so this folder holds this file only and it uses
absolute imports. The classes it exposes are the real ``nnyseg.trainers`` classes (nnU-Net checks ``issubclass``
and the checkpoint stores the bare class name).
"""

import nnyseg.trainers as _trainers

globals().update({_name: getattr(_trainers, _name) for _name in _trainers.__all__})
