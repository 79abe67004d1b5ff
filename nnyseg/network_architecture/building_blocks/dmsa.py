"""Dynamic attention biases of DynTransNet's D-MSA (dynamic multi-head self-attention).

Zheng S, Sagar ASMS, Chen Y, Yu Z, Ying S, Zeng Y. "DynTransNet: Dynamic Transformer Network with multi-scale
attention for liver cancer segmentation", Front. Oncol. 15:1569083 (2025), section 3.1.1:

    A_h = Softmax(Q_h K_h^T / sqrt(d_h) + Delta_h) V_h,    Delta_h = ReLU(X_l W_d^h + b_d^h)

The paper gives neither the width of ``W_d^h`` nor how ``X_l W_d^h`` (N rows) becomes an N x N bias. The softmax runs
over the keys j, so a bias that is constant along a row (one value per query i) cancels out:
``softmax_j(s_ij + c_i) = softmax_j(s_ij)``. nnyseg keeps the two readings that do change the attention, selected by
``dmsa_bias`` (docs/dyntransnet.md, "The dynamic bias"):

* ``"key"`` (default): :class:`KeySaliencyBias`, ``Delta_h[i, j] = ReLU(x_j^T w_d^h + b_d^h)``, one
  saliency value per *key* token j and head, broadcast over the queries. ``W_d`` is ``C x heads``; works for any
  token count.
* ``"dense"``: :class:`DenseSynthesizerBias`, ``Delta_h[i, j] = ReLU(x_i^T w_{d,j}^h + b_{d,j}^h)``, the
  literal N x N form (the first layer of Tay et al.'s Dense Synthesizer). ``W_d`` is ``C x (heads * N)``, so it is only
  defined for one fixed token count N (a full Swin window, or the token grid of a fixed-size ViT input).
* ``"none"``: no dynamic bias (the ablation).

Both modules map the layer-normalised tokens that also feed q, k and v, ``(B', N, C)``, to an additive bias that
broadcasts to the attention scores ``(B', heads, N, N)``; this is the ``extra_bias`` hook of
:class:`~nnyseg.network_architecture.building_blocks.swin.WindowAttention3d`. The bias is added to Swin's
relative-position bias, not used in its place.

Initialisation: ``W_d ~ N(0, 0.02^2)``, ``b_d = 0``. ``W_d`` must not be zero-initialised: with a ReLU,
zero weights and zero bias give a zero output and zero gradients for ever.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DMSA_MODES",
    "DenseSynthesizerBias",
    "KeySaliencyBias",
    "make_dmsa_bias_factory",
]

#: Accepted values of ``dmsa_bias``.
DMSA_MODES: tuple[str, ...] = ("key", "dense", "none")
#: Standard deviation of the normal initialisation of ``W_d``.
DMSA_INIT_STD = 0.02


def _check_tokens(x: torch.Tensor, dim: int, name: str) -> None:
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} expects tokens of shape (B, N, {dim}), got {tuple(x.shape)}")


class KeySaliencyBias(nn.Module):
    """D-MSA bias from the key tokens: ``Delta_h[i, j] = ReLU(x_j^T w_d^h + b_d^h)`` (``dmsa_bias="key"``, the default).

    Every key token j gets one non-negative saliency per head, which raises the attention paid to it by every query
    of the window. It works for any token count (windows that shrink on small feature maps included) and costs
    ``C * heads + heads`` parameters.

    Args:
        dim: Token channels C.
        num_heads: Attention heads.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim < 1 or num_heads < 1:
            raise ValueError(f"dim and num_heads must be positive, got {dim} and {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.weight = nn.Parameter(torch.empty(num_heads, dim))  # W_d^T, one row per head
        self.bias = nn.Parameter(torch.empty(num_heads))  # b_d
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``W_d ~ N(0, 0.02^2)``, ``b_d = 0`` (never zero weights: the ReLU would block every gradient)."""
        nn.init.normal_(self.weight, std=DMSA_INIT_STD)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps tokens ``(B', N, C)`` to the bias ``(B', heads, 1, N)`` (broadcast over the queries)."""
        _check_tokens(x, self.dim, type(self).__name__)
        saliency = F.relu(F.linear(x, self.weight, self.bias))  # (B', N, heads)
        return saliency.transpose(1, 2).unsqueeze(2)

    def extra_bias_elements(self, tokens: int, window_tokens: int) -> int:
        """Elements this bias materialises for ``tokens`` tokens in windows of ``window_tokens`` (memory estimate)."""
        del window_tokens  # one value per key token, whatever the window
        return 2 * tokens * self.num_heads  # linear output and its ReLU

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


class DenseSynthesizerBias(nn.Module):
    """D-MSA bias in the literal N x N form: ``Delta_h[i, j] = ReLU(x_i^T w_{d,j}^h + b_{d,j}^h)`` (``"dense"``).

    Each query token i predicts one bias per key position j and head, as in the first layer of a Dense Synthesizer.
    ``W_d`` has ``heads * N`` columns, so the module is tied to one token count N: a full window (``window ** 3``) in
    a Swin stage, or the whole token grid of a ViT at a fixed input size. Any other N raises ``ValueError``.

    Args:
        dim: Token channels C.
        num_heads: Attention heads.
        num_tokens: The token count N every input must have.
    """

    def __init__(self, dim: int, num_heads: int, *, num_tokens: int) -> None:
        super().__init__()
        if dim < 1 or num_heads < 1 or num_tokens < 1:
            raise ValueError(f"dim, num_heads and num_tokens must be positive, got {dim}, {num_heads}, {num_tokens}")
        self.dim = dim
        self.num_heads = num_heads
        self.num_tokens = num_tokens
        self.weight = nn.Parameter(torch.empty(num_heads * num_tokens, dim))  # W_d^T: row (h, j)
        self.bias = nn.Parameter(torch.empty(num_heads * num_tokens))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``W_d ~ N(0, 0.02^2)``, ``b_d = 0``."""
        nn.init.normal_(self.weight, std=DMSA_INIT_STD)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps tokens ``(B', N, C)`` to the bias ``(B', heads, N, N)`` (queries i, keys j).

        Raises:
            ValueError: If N is not the token count the module was built for.
        """
        _check_tokens(x, self.dim, type(self).__name__)
        b, n, _ = x.shape
        if n != self.num_tokens:
            raise ValueError(
                f"dmsa_bias='dense' was built for exactly {self.num_tokens} tokens per attention window but got {n} "
                f"(tokens of shape {tuple(x.shape)}); the dense N x N bias needs a fixed token count: full Swin "
                f"windows (every feature map at least as large as the window) or the ViT's fixed input size. "
                f"Use dmsa_bias='key' for variable token counts"
            )
        delta = F.relu(F.linear(x, self.weight, self.bias))  # (B', N_q, heads * N_k)
        return delta.view(b, n, self.num_heads, n).transpose(1, 2)  # (B', heads, N_q, N_k)

    def extra_bias_elements(self, tokens: int, window_tokens: int) -> int:
        """Elements this bias materialises for ``tokens`` tokens in windows of ``window_tokens`` (memory estimate)."""
        return 2 * tokens * window_tokens * self.num_heads

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_tokens={self.num_tokens}"


def make_dmsa_bias_factory(mode: str, *, window_tokens: int | None = None) -> Callable[[int, int], nn.Module] | None:
    """The ``extra_bias_factory(dim, num_heads)`` for the Swin encoder (and the ViT blocks) for one D-MSA mode.

    Args:
        mode: ``"key"``, ``"dense"`` or ``"none"``.
        window_tokens: Tokens per attention window; required for ``"dense"`` (``window ** 3`` for Swin, the token
            grid size for a ViT), ignored otherwise.

    Returns:
        A factory building one bias module per attention block, or ``None`` for ``"none"``.

    Raises:
        ValueError: For an unknown mode, or ``"dense"`` without a positive ``window_tokens``.
    """
    if mode not in DMSA_MODES:
        raise ValueError(f"dmsa_bias must be one of {DMSA_MODES}, got {mode!r}")
    if mode == "none":
        return None
    if mode == "key":
        return KeySaliencyBias
    if window_tokens is None or int(window_tokens) < 1:
        raise ValueError(f"dmsa_bias='dense' needs the fixed number of tokens per window, got {window_tokens!r}")
    tokens = int(window_tokens)

    def dense_factory(dim: int, num_heads: int) -> nn.Module:
        return DenseSynthesizerBias(dim, num_heads, num_tokens=tokens)

    return dense_factory
