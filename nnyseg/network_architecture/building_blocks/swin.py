"""3D Swin Transformer building blocks.

Shifted-window self-attention after Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows" (ICCV 2021), in the 3D hierarchical form used by the SwinUNETR encoder (Hatamizadeh et al., "Swin UNETR",
BrainLes 2021): patch embedding with a stride-2 convolution, stages of (shifted-)window blocks each closed by a
2x2x2 patch merging, and one hidden state per resolution.

Conventions:
    * Inside the stages tokens are kept channels-last, ``(B, D, H, W, C)``. The encoder converts its hidden states
      back to channels-first ``(B, C, D, H, W)`` for the convolutional parts of a network.
    * A window that is larger than the feature map along an axis shrinks to the feature size there, and the shift
      along that axis is switched off (:func:`compute_window_and_shift`). Feature maps are padded at the end of each
      axis to a multiple of the (possibly shrunk) window and cropped back afterwards.
    * :class:`WindowAttention3d` accepts an ``extra_bias`` module or callable that maps the window tokens
      ``(B*nW, N, C)`` to an additive attention bias broadcastable to ``(B*nW, heads, N, N)``. Input-dependent biases
      (e.g. DynTransNet's dynamic key bias) plug in there; stages and the encoder take an ``extra_bias_factory``
      that is called once per block as ``factory(dim, num_heads)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "FIXED_STRIDES",
    "PatchEmbed3d",
    "PatchMerging3d",
    "SwinBlock3d",
    "SwinEncoder3d",
    "SwinStage3d",
    "SwinUNETREncoder",
    "WindowAttention3d",
    "compute_shift_mask",
    "compute_window_and_shift",
    "extra_bias_elements",
    "relative_position_index",
    "window_partition",
    "window_reverse",
]

Size3 = tuple[int, int, int]
ExtraBias = Callable[[torch.Tensor], torch.Tensor]
ExtraBiasFactory = Callable[[int, int], ExtraBias]
#: Strides of the six maps of :class:`SwinUNETREncoder`, each relative to the previous one.
FIXED_STRIDES: tuple[tuple[int, int, int], ...] = ((1, 1, 1),) + ((2, 2, 2),) * 5


def _triple(value: int | Sequence[int], name: str) -> Size3:
    """Turns an int or a length-3 sequence into a tuple of three ints."""
    if isinstance(value, int):
        return (value, value, value)
    out = tuple(int(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"{name} must be an int or a sequence of 3 ints, got {value!r}")
    return out  # type: ignore[return-value]


def compute_window_and_shift(
    feature_size: Sequence[int], window: int | Sequence[int], shift: int | Sequence[int]
) -> tuple[Size3, Size3]:
    """Effective window and shift for a feature map.

    Along every axis whose feature size is smaller than or equal to the window, the window shrinks to the feature size
    and the shift is switched off (a single window already covers that axis, so shifting would only wrap it around).

    Args:
        feature_size: Spatial size ``(D, H, W)`` of the token grid (before padding).
        window: Configured window size, an int or one value per axis.
        shift: Configured shift, an int or one value per axis.

    Returns:
        The effective ``(window, shift)`` as two tuples of three ints.
    """
    size = _triple(feature_size, "feature_size")
    win = _triple(window, "window")
    sh = _triple(shift, "shift")
    eff_window = tuple(s if s <= w else w for s, w in zip(size, win, strict=True))
    eff_shift = tuple(0 if s <= w else t for s, w, t in zip(size, win, sh, strict=True))
    return eff_window, eff_shift  # type: ignore[return-value]


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Splits a channels-last volume into non-overlapping windows.

    Args:
        x: Tensor of shape ``(B, D, H, W, C)``; each spatial size must be a multiple of the window.
        window: Window size ``(wd, wh, ww)``.

    Returns:
        Tensor of shape ``(B * nW, wd * wh * ww, C)``, windows ordered batch-major, then D, H, W.
    """
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    if d % wd or h % wh or w % ww:
        raise ValueError(f"spatial size {(d, h, w)} is not a multiple of the window {tuple(window)}")
    x = x.view(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, c)


def window_reverse(windows: torch.Tensor, window: Sequence[int], spatial_size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows: Tensor of shape ``(B * nW, wd * wh * ww, C)``.
        window: Window size ``(wd, wh, ww)``.
        spatial_size: Spatial size ``(D, H, W)`` of the volume the windows came from.

    Returns:
        Tensor of shape ``(B, D, H, W, C)``.
    """
    d, h, w = spatial_size
    wd, wh, ww = window
    nd, nh, nw = d // wd, h // wh, w // ww
    c = windows.shape[-1]
    b = windows.shape[0] // (nd * nh * nw)
    x = windows.view(b, nd, nh, nw, wd, wh, ww, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, c)


@functools.lru_cache(maxsize=64)
def _relative_position_index_cpu(window: Size3, table_window: Size3) -> torch.Tensor:
    # The cached tensor outlives the call: if the first call happened under torch.inference_mode(), an inference
    # tensor would be cached and every later training step would fail ("Inference tensors cannot be saved for
    # backward"), so it is always built as a normal tensor.
    with torch.inference_mode(False):
        coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")).flatten(1)  # (3, N)
        rel = coords[:, :, None] - coords[:, None, :]  # (3, N, N), values in [-(w - 1), w - 1]
        sizes = [2 * t - 1 for t in table_window]
        for axis in range(3):
            rel[axis] += table_window[axis] - 1
        return (rel[0] * sizes[1] + rel[1]) * sizes[2] + rel[2]


def relative_position_index(
    window: int | Sequence[int], table_window: int | Sequence[int] | None = None
) -> torch.Tensor:
    """Index into a relative-position-bias table for every (query, key) pair of a window.

    The table has ``prod(2 * table_window - 1)`` rows, one per relative offset of the configured (largest) window. A
    smaller runtime window (see :func:`compute_window_and_shift`) indexes the same table, so a shrunk window sees the
    same bias for the same geometric offset.

    Args:
        window: Runtime window size.
        table_window: Window size the table was built for; defaults to ``window``. Must be >= ``window`` per axis.

    Returns:
        Long tensor of shape ``(N, N)`` with ``N = prod(window)`` and values in ``[0, prod(2 * table_window - 1))``.
    """
    win = _triple(window, "window")
    table = win if table_window is None else _triple(table_window, "table_window")
    if any(w > t for w, t in zip(win, table, strict=True)):
        raise ValueError(f"window {win} is larger than the window {table} the bias table was built for")
    return _relative_position_index_cpu(win, table)


def compute_shift_mask(
    padded_size: Sequence[int], window: Sequence[int], shift: Sequence[int], *, device: torch.device | None = None
) -> torch.Tensor | None:
    """Additive attention mask for shifted windows (cyclic-shift formulation).

    After rolling the padded volume by ``-shift``, windows at the end of an axis contain tokens that were not
    neighbours before the roll. Every token gets a region id (three regions per shifted axis:
    ``[0, P - w)``, ``[P - w, P - s)``, ``[P - s, P)``), and attention between tokens of different regions is masked.

    Args:
        padded_size: Spatial size ``(D, H, W)`` after padding to window multiples.
        window: Effective window size.
        shift: Effective shift; ``None`` is returned if it is zero along every axis.
        device: Device of the returned mask.

    Returns:
        Float tensor of shape ``(nW, N, N)`` holding 0 where attention is allowed and ``-inf`` where it is blocked, or
        ``None`` for unshifted windows.
    """
    if not any(shift):
        return None
    region = torch.zeros((1, *padded_size, 1), device=device)
    axis_slices = []
    for w, s in zip(window, shift, strict=True):
        axis_slices.append((slice(0, -w), slice(-w, -s), slice(-s, None)) if s > 0 else (slice(None),))
    count = 0
    for sd in axis_slices[0]:
        for sh in axis_slices[1]:
            for sw in axis_slices[2]:
                region[:, sd, sh, sw, :] = count
                count += 1
    ids = window_partition(region, window).squeeze(-1)  # (nW, N)
    blocked = ids[:, :, None] != ids[:, None, :]
    return torch.zeros(blocked.shape, device=device).masked_fill_(blocked, float("-inf"))


class PatchEmbed3d(nn.Module):
    """Non-overlapping patch embedding: ``Conv3d(kernel=stride=patch_size)``, no normalisation.

    Args:
        input_channels: Channels of the input image.
        embed_dim: Channels of the embedding (the network's feature size F).
        patch_size: Kernel size and stride.
    """

    def __init__(self, input_channels: int, embed_dim: int, *, patch_size: int = 2) -> None:
        super().__init__()
        self.patch_size = _triple(patch_size, "patch_size")
        self.embed_dim = embed_dim
        self.proj = nn.Conv3d(input_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``(B, C_in, D, H, W)`` to ``(B, F, D / p, H / p, W / p)`` (channels-first)."""
        return self.proj(x)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Elements of the output feature map for one sample."""
        return self.embed_dim * math.prod(s // p for s, p in zip(input_size, self.patch_size, strict=True))


class WindowAttention3d(nn.Module):
    """Multi-head self-attention inside 3D windows with a relative position bias.

    The attention scores are ``q k^T / sqrt(d) + B_rel + mask + extra_bias(x)``; all additive terms are summed into
    one float mask and passed to :func:`torch.nn.functional.scaled_dot_product_attention`.

    Args:
        dim: Token channels C.
        num_heads: Number of heads; must divide ``dim``.
        window_size: Configured (largest) window; sets the size of the bias table.
        qkv_bias: Whether the qkv projection has a bias.
        attn_drop: Dropout on the attention weights (training only).
        proj_drop: Dropout after the output projection.
        rel_pos_bias: Whether to use the relative-position-bias table (``(2w-1)^3 x heads``, trunc-normal 0.02).
        extra_bias: Optional module or callable mapping the window tokens ``(B*nW, N, C)`` (the same normalised
            tokens that feed q, k and v) to an additive bias broadcastable to ``(B*nW, heads, N, N)``. A module is
            registered as a submodule.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | Sequence[int],
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rel_pos_bias: bool = True,
        extra_bias: ExtraBias | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must be positive and divide dim ({dim})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = _triple(window_size, "window_size")
        if rel_pos_bias:
            n_offsets = math.prod(2 * w - 1 for w in self.window_size)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(n_offsets, num_heads))
            trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.register_parameter("relative_position_bias_table", None)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.extra_bias = extra_bias

    def relative_position_bias(self, window: Sequence[int], *, device: torch.device | None = None) -> torch.Tensor:
        """Bias of shape ``(1, heads, N, N)`` for an effective window (<= the configured one)."""
        if self.relative_position_bias_table is None:
            raise RuntimeError("this WindowAttention3d was built with rel_pos_bias=False")
        index = relative_position_index(window, self.window_size).to(device or self.relative_position_bias_table.device)
        n = index.shape[0]
        bias = self.relative_position_bias_table[index.view(-1)].view(n, n, self.num_heads)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(
        self, x: torch.Tensor, *, window: Sequence[int] | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention within windows.

        Args:
            x: Window tokens ``(B*nW, N, C)`` as produced by :func:`window_partition`.
            window: Effective window size (``prod(window) == N``); defaults to the configured window.
            mask: Optional additive mask ``(nW, N, N)`` (see :func:`compute_shift_mask`).

        Returns:
            Tensor of shape ``(B*nW, N, C)``.
        """
        bw, n, c = x.shape
        window = self.window_size if window is None else _triple(window, "window")
        if math.prod(window) != n or c != self.dim:
            raise ValueError(f"expected tokens (B*nW, {math.prod(window)}, {self.dim}), got {tuple(x.shape)}")
        q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

        bias = None
        if self.relative_position_bias_table is not None:
            bias = self.relative_position_bias(window, device=x.device)  # (1, h, N, N)
        if mask is not None:
            n_windows = mask.shape[0]
            if bw % n_windows:
                raise ValueError(f"{bw} windows in the batch is not a multiple of the mask's {n_windows} windows")
            mask = mask.unsqueeze(1).to(x.dtype)  # (nW, 1, N, N)
            bias = mask if bias is None else bias + mask  # (nW, h or 1, N, N)
            if bw != n_windows:
                bias = bias.unsqueeze(0).expand(bw // n_windows, *bias.shape).reshape(bw, bias.shape[1], n, n)
        if self.extra_bias is not None:
            extra = self.extra_bias(x)
            bias = extra if bias is None else bias + extra
        if bias is not None:
            bias = bias.to(q.dtype)

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
        )  # (B*nW, h, N, hd)
        out = out.transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class SwinBlock3d(nn.Module):
    """Pre-LN Swin block: ``x + DropPath(W-MSA(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``.

    Args:
        dim: Token channels C.
        num_heads: Attention heads.
        window_size: Configured window size.
        shift_size: Cyclic shift (0 for W-MSA, ``window // 2`` for SW-MSA).
        mlp_ratio: Hidden width of the MLP relative to ``dim``.
        qkv_bias: Whether the qkv projection has a bias.
        drop: Dropout after the attention projection and in the MLP.
        attn_drop: Dropout on the attention weights.
        drop_path: Stochastic-depth rate of both residual branches.
        rel_pos_bias: Whether to use the relative position bias.
        extra_bias: Optional extra attention bias, see :class:`WindowAttention3d`.
        use_checkpoint: Recompute the block in the backward pass (``torch.utils.checkpoint``, non-reentrant).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int | Sequence[int] = 7,
        shift_size: int | Sequence[int] = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        rel_pos_bias: bool = True,
        extra_bias: ExtraBias | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = _triple(window_size, "window_size")
        self.shift_size = _triple(shift_size, "shift_size")
        if any(w < 1 for w in self.window_size) or any(
            not 0 <= s < w for s, w in zip(self.shift_size, self.window_size, strict=True)
        ):
            raise ValueError(f"need window >= 1 and 0 <= shift < window, got {self.window_size} / {self.shift_size}")
        self.mlp_ratio = mlp_ratio
        self.use_checkpoint = use_checkpoint
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3d(
            dim,
            num_heads,
            self.window_size,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            rel_pos_bias=rel_pos_bias,
            extra_bias=extra_bias,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def _attention_branch(self, x: torch.Tensor) -> torch.Tensor:
        _, d, h, w, _ = x.shape
        window, shift = compute_window_and_shift((d, h, w), self.window_size, self.shift_size)
        pads = [(-size) % win for size, win in zip((d, h, w), window, strict=True)]
        x = self.norm1(x)
        if any(pads):
            x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        padded = tuple(x.shape[1:4])
        mask = None
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
            mask = compute_shift_mask(padded, window, shift, device=x.device)
        windows = self.attn(window_partition(x, window), window=window, mask=mask)
        x = window_reverse(windows, window, padded)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        if any(pads):
            x = x[:, :d, :h, :w].contiguous()
        return x

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._attention_branch(x))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps channels-last tokens ``(B, D, H, W, C)`` to the same shape."""
        if x.ndim != 5 or x.shape[-1] != self.dim:
            raise ValueError(f"expected channels-last input (B, D, H, W, {self.dim}), got {tuple(x.shape)}")
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Memory-proportional element count for one sample on a token grid ``input_size``.

        Counts one C-sized tensor per token for each layer output (LN, qkv (3C), attention output, projection,
        LN, MLP hidden (twice: fc1 and GELU), fc2) plus the attention matrices ``tokens x window tokens x heads`` of
        the padded grid (twice for shifted windows, where the summed bias/mask is materialised too).
        """
        window, shift = compute_window_and_shift(input_size, self.window_size, self.shift_size)
        tokens = math.prod(input_size)
        padded_tokens = math.prod(math.ceil(s / w) * w for s, w in zip(input_size, window, strict=True))
        hidden = int(self.dim * self.mlp_ratio)
        per_token = self.dim * 8 + 2 * hidden
        attention = padded_tokens * math.prod(window) * self.num_heads * (2 if any(shift) else 1)
        return tokens * per_token + padded_tokens * self.dim * 4 + attention


class PatchMerging3d(nn.Module):
    """Concatenates each 2x2x2 neighbourhood (8C), then ``LayerNorm(8C)`` and ``Linear(8C -> 2C, bias=False)``.

    Odd spatial sizes are zero-padded at the end of the axis.

    Args:
        dim: Input channels C.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps channels-last ``(B, D, H, W, C)`` to ``(B, ceil(D/2), ceil(H/2), ceil(W/2), 2C)``."""
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dim=-1)
        return self.reduction(self.norm(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Elements of the concatenation, its normalisation and the reduced output for one sample."""
        tokens = math.prod(math.ceil(s / 2) for s in input_size)
        return tokens * (8 * self.dim * 2 + 2 * self.dim)


class SwinStage3d(nn.Module):
    """``depth`` Swin blocks alternating W-MSA and SW-MSA (shift ``window // 2``), optionally followed by merging.

    Args:
        dim: Token channels C of the blocks.
        depth: Number of blocks.
        num_heads: Attention heads; must divide ``dim``.
        window_size: Configured window size.
        mlp_ratio: MLP hidden width relative to ``dim``.
        qkv_bias: Whether the qkv projections have a bias.
        drop: Dropout rate.
        attn_drop: Attention dropout rate.
        drop_path: Stochastic-depth rate, one for all blocks or one per block.
        downsample: Whether to end with :class:`PatchMerging3d` (output channels 2C at half resolution).
        rel_pos_bias: Whether the blocks use the relative position bias.
        extra_bias_factory: Optional ``factory(dim, num_heads)`` building one extra attention bias per block.
        use_checkpoint: Gradient checkpointing per block.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float | Sequence[float] = 0.0,
        downsample: bool = True,
        rel_pos_bias: bool = True,
        extra_bias_factory: ExtraBiasFactory | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        rates = [float(drop_path)] * depth if isinstance(drop_path, (int, float)) else [float(r) for r in drop_path]
        if len(rates) != depth:
            raise ValueError(f"got {len(rates)} drop-path rates for {depth} blocks")
        window = _triple(window_size, "window_size")
        shift = tuple(w // 2 for w in window)
        self.dim = dim
        self.blocks = nn.ModuleList(
            SwinBlock3d(
                dim,
                num_heads,
                window_size=window,
                shift_size=(0, 0, 0) if i % 2 == 0 else shift,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=rates[i],
                rel_pos_bias=rel_pos_bias,
                extra_bias=None if extra_bias_factory is None else extra_bias_factory(dim, num_heads),
                use_checkpoint=use_checkpoint,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging3d(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last in and out; halves the resolution and doubles C if ``downsample``."""
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Sum over blocks and the merging layer for one sample."""
        total = sum(block.compute_conv_feature_map_size(input_size) for block in self.blocks)
        if self.downsample is not None:
            total += self.downsample.compute_conv_feature_map_size(input_size)
        return total


class SwinEncoder3d(nn.Module):
    """Hierarchical 3D Swin encoder (the SwinUNETR ``SwinTransformer``).

    Patch embedding (stride 2) followed by ``len(depths)`` stages, each ending in patch merging. ``forward`` returns
    the hidden states ``[x0, ..., xS]``; with the default four stages these are F@/2, 2F@/4, 4F@/8, 8F@/16 and
    16F@/32. With ``normalize`` each is passed through a parameter-free layer norm over channels.

    Encoder contract (read by decoders): ``output_channels`` lists the channels of the hidden states and ``strides``
    the stride of each one relative to the previous (the first relative to the input).

    Args:
        input_channels: Channels of the input image.
        feature_size: Embedding channels F.
        depths: Swin blocks per stage.
        num_heads: Heads per stage; ``num_heads[i]`` must divide ``F * 2**i``.
        window_size: Window size.
        patch_size: Patch-embedding kernel and stride.
        mlp_ratio: MLP hidden width relative to the stage width.
        qkv_bias: Whether the qkv projections have a bias.
        drop_rate: Dropout rate.
        attn_drop_rate: Attention dropout rate.
        drop_path_rate: Largest stochastic-depth rate; rates grow linearly over all blocks from 0.
        normalize: Apply a parameter-free layer norm to every hidden state.
        rel_pos_bias: Whether the blocks use the relative position bias.
        extra_bias_factory: Optional ``factory(dim, num_heads)`` building one extra attention bias per block.
        use_checkpoint: Gradient checkpointing per Swin block.
    """

    def __init__(
        self,
        input_channels: int,
        *,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        normalize: bool = True,
        rel_pos_bias: bool = True,
        extra_bias_factory: ExtraBiasFactory | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        depths = [int(d) for d in depths]
        num_heads = [int(h) for h in num_heads]
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {depths} and num_heads {num_heads} must be non-empty and of equal length")
        for i, heads in enumerate(num_heads):
            dim = feature_size * 2**i
            if heads < 1 or dim % heads:
                raise ValueError(
                    f"num_heads[{i}] = {heads} must divide the stage-{i} width feature_size * 2**{i} = {dim}"
                )
        for name, rate in (
            ("drop_rate", drop_rate),
            ("attn_drop_rate", attn_drop_rate),
            ("drop_path_rate", drop_path_rate),
        ):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        self.feature_size = feature_size
        self.normalize = normalize
        self.patch_embed = PatchEmbed3d(input_channels, feature_size, patch_size=patch_size)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            start = sum(depths[:i])
            self.stages.append(
                SwinStage3d(
                    feature_size * 2**i,
                    depth,
                    heads,
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[start : start + depth],
                    downsample=True,
                    rel_pos_bias=rel_pos_bias,
                    extra_bias_factory=extra_bias_factory,
                    use_checkpoint=use_checkpoint,
                )
            )
        self.output_channels = [feature_size * 2**i for i in range(len(depths) + 1)]
        self.strides = [list(self.patch_embed.patch_size)] + [[2, 2, 2] for _ in depths]
        self.conv_op = nn.Conv3d

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Maps ``(B, C_in, D, H, W)`` to the list of channels-first hidden states."""
        x = self.pos_drop(self.patch_embed(x)).permute(0, 2, 3, 4, 1)  # channels-last
        hidden = [self._to_output(x)]
        for stage in self.stages:
            x = stage(x.contiguous())
            hidden.append(self._to_output(x))
        return hidden

    def _to_output(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = F.layer_norm(x, (x.shape[-1],))
        return x.permute(0, 4, 1, 2, 3).contiguous()

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Memory-proportional element count of the encoder for one sample and patch ``input_size``."""
        total = self.patch_embed.compute_conv_feature_map_size(input_size)
        size = [s // p for s, p in zip(input_size, self.patch_embed.patch_size, strict=True)]
        total += self.output_channels[0] * math.prod(size)  # hidden state x0
        for channels, stage in zip(self.output_channels[1:], self.stages, strict=True):
            total += stage.compute_conv_feature_map_size(size)
            total += sum(extra_bias_elements(block, size) for block in stage.blocks)
            size = [math.ceil(s / 2) for s in size]
            total += channels * math.prod(size)  # hidden state
        return total


def extra_bias_elements(block: SwinBlock3d, grid: Sequence[int]) -> int:
    """Elements a block's extra attention bias materialises on a token grid (0 without one, or if it cannot say)."""
    count = getattr(block.attn.extra_bias, "extra_bias_elements", None)
    if count is None:
        return 0
    window, _ = compute_window_and_shift(grid, block.window_size, block.shift_size)
    padded = math.prod(math.ceil(s / w) * w for s, w in zip(grid, window, strict=True))
    return int(count(padded, math.prod(window)))


def _block_feature_map_size(module: nn.Module, size: Sequence[int]) -> int:
    if isinstance(module, nn.Identity):
        return 0
    if isinstance(module, nn.Sequential):
        return sum(_block_feature_map_size(m, size) for m in module)
    return int(module.compute_conv_feature_map_size(size))


def _maybe_checkpoint(module: nn.Module, x: torch.Tensor, enabled: bool) -> torch.Tensor:
    if enabled and torch.is_grad_enabled() and not isinstance(module, nn.Identity):
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class SwinUNETREncoder(nn.Module):
    """The SwinUNETR-style encoder of nnY-Net and DynTransNet: a 4-stage :class:`SwinEncoder3d` plus conv blocks.

    ``forward`` returns six maps, highest resolution first: ``input_block(x)`` F@/1, ``skip_block(h0)`` F@/2,
    ``skip_block(h1)`` 2F@/4, ``skip_block(h2)`` 4F@/8, ``h3`` 8F@/16 (used as is) and the bottleneck
    ``bottleneck_block(h4)`` 16F@/32, where ``h0 ... h4`` are the layer-normalised hidden states of the Swin encoder.
    The networks differ only in the blocks they pass in (nnY-Net: residual conv blocks; DynTransNet: its Residual
    Modules) and in the attention bias (DynTransNet's D-MSA through ``extra_bias_factory``).

    Encoder contract: ``output_channels = [F, F, 2F, 4F, 8F, 16F]``, ``strides = [[1,1,1]] + 5 x [[2,2,2]]`` (each
    relative to the previous map), ``conv_op = nn.Conv3d``.

    Args:
        input_channels: Channels of the input image.
        input_block: ``factory(in_channels, F)``: the full-resolution skip block on the image.
        skip_block: ``factory(channels)``: the block on ``h0``, ``h1``, ``h2`` (channel-preserving).
        bottleneck_block: ``factory(16F)``: the block on ``h4``.
        feature_size: Feature size F.
        depths: Swin blocks per stage (4 stages).
        num_heads: Attention heads per stage; ``num_heads[i]`` must divide ``F * 2**i``.
        window_size: Swin window size.
        mlp_ratio: MLP ratio of the Swin blocks.
        drop_path_rate: Largest stochastic-depth rate of the Swin blocks.
        rel_pos_bias: Whether the window attention uses Swin's relative-position bias.
        extra_bias_factory: Optional ``factory(dim, num_heads)``: one extra attention bias per Swin block.
        use_checkpoint: Gradient checkpointing for every Swin block and every conv block.
    """

    def __init__(
        self,
        input_channels: int,
        *,
        input_block: Callable[[int, int], nn.Module],
        skip_block: Callable[[int], nn.Module],
        bottleneck_block: Callable[[int], nn.Module],
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        rel_pos_bias: bool = True,
        extra_bias_factory: ExtraBiasFactory | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(
                f"the Swin encoder has exactly 4 stages; got depths={list(depths)}, num_heads={list(num_heads)}"
            )
        f = feature_size
        self.use_checkpoint = use_checkpoint
        self.swin = SwinEncoder3d(
            input_channels,
            feature_size=f,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            patch_size=2,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            normalize=True,
            rel_pos_bias=rel_pos_bias,
            extra_bias_factory=extra_bias_factory,
            use_checkpoint=use_checkpoint,
        )
        self.skip_blocks = nn.ModuleList([input_block(input_channels, f), *(skip_block(c) for c in (f, 2 * f, 4 * f))])
        self.bottleneck = bottleneck_block(16 * f)
        self.output_channels = [f, f, 2 * f, 4 * f, 8 * f, 16 * f]
        self.strides = [list(s) for s in FIXED_STRIDES]
        self.conv_op = nn.Conv3d

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Maps ``(B, C_in, D, H, W)`` to the six skip/bottleneck maps (see the class docstring)."""
        hidden = self.swin(x)
        ckpt = self.use_checkpoint
        skips = [_maybe_checkpoint(self.skip_blocks[0], x, ckpt)]
        skips += [_maybe_checkpoint(block, h, ckpt) for block, h in zip(self.skip_blocks[1:], hidden[:3], strict=True)]
        skips += [hidden[3], _maybe_checkpoint(self.bottleneck, hidden[4], ckpt)]
        return skips

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Memory-proportional element count for one sample: the Swin encoder (attention and extra biases included)
        and the conv blocks."""
        total = self.swin.compute_conv_feature_map_size(input_size)
        size = [int(s) for s in input_size]
        for block in self.skip_blocks:
            total += _block_feature_map_size(block, size)
            size = [math.ceil(s / 2) for s in size]
        size = [math.ceil(s / 4) for s in size]  # /8 -> /32
        return total + _block_feature_map_size(self.bottleneck, size)
