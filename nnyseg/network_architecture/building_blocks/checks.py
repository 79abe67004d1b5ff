"""Input checks shared by the networks: fail before any compute, with the shape and what would be valid."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def check_network_input(
    name: str, x: torch.Tensor, input_channels: int, check_patch_size: Callable[[Sequence[int]], None]
) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(B, input_channels, D, H, W)`` with a spatial size the network takes.

    Args:
        name: The network's name, for the message.
        x: The input batch.
        input_channels: Channels the network was built for.
        check_patch_size: The network's own spatial-size check (raises ``ValueError``).
    """
    if x.ndim != 5:
        raise ValueError(f"{name} expects a 5D input (B, C, D, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != input_channels:
        raise ValueError(f"{name} was built for {input_channels} input channels, got shape {tuple(x.shape)}")
    try:
        check_patch_size(x.shape[2:])
    except ValueError as err:
        raise ValueError(f"input shape {tuple(x.shape)}: {err}") from None
