"""nnU-Net's deep-supervision output contract, written once for every nnyseg decoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def decode_with_deep_supervision(
    skips: Sequence[torch.Tensor],
    seg_layers: Sequence[nn.Module],
    deep_supervision: bool,
    run_stage: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor | list[torch.Tensor]:
    """Run the decoder stages from the bottleneck up and return logits as nnU-Net expects them.

    Args:
        skips: Encoder outputs, highest resolution first, the bottleneck last.
        seg_layers: One head per decoder stage (always built, so checkpoints load with deep supervision on or off).
        deep_supervision: True: a list of logits, highest resolution first (one per stage); False: only the
            full-resolution logits, and the lower heads are not run.
        run_stage: ``run_stage(s, x, skip)`` applies decoder stage ``s`` to ``x`` with its skip ``skips[-(s + 2)]``.
    """
    x = skips[-1]
    outputs = []
    last = len(seg_layers) - 1
    for s in range(len(seg_layers)):
        x = run_stage(s, x, skips[-(s + 2)])
        if deep_supervision or s == last:
            outputs.append(seg_layers[s](x))
    outputs = outputs[::-1]
    return outputs if deep_supervision else outputs[0]
