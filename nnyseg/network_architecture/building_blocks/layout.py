"""Memory layout for the depthwise-convolution blocks (MedNeXt, MSCA) on the CPU.

PyTorch's CPU kernels for depthwise and 1x1x1 3D convolutions, and above all their backward passes, are faster on
channels-last tensors (``torch.channels_last_3d``, NDHWC in memory) than on the default NCDHW layout (measurement:
docs/README.md, "Implementation notes").

The blocks therefore switch their input to channels-last on the CPU; the convolutions and element-wise operations
that follow keep that layout, so the copy happens once per run of consecutive blocks. The values are unchanged:
only the order of the elements in memory differs. On CUDA and MPS the layout is left to the caller.
"""

from __future__ import annotations

import torch

__all__ = ["channels_last_on_cpu"]


def channels_last_on_cpu(x: torch.Tensor) -> torch.Tensor:
    """``x`` in ``torch.channels_last_3d`` layout if it is a 5-D CPU tensor (no copy if it already is), else ``x``."""
    if x.ndim == 5 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x
