"""Bottleneck cross-attention between clinical tokens and image tokens (the "Y" branch of nnY-Net).

Queries are one token per clinical field (an FT-Transformer-style feature tokenizer, Gorishniy et al., "Revisiting
Deep Learning Models for Tabular Data", NeurIPS 2021) plus a few learned latent tokens; keys and values are the
layer-normalised voxels of the bottleneck feature map. One pre-LN transformer-decoder layer without self-attention
updates the queries, their mean is mapped to a FiLM modulation (Perez et al., "FiLM", AAAI 2018) of the bottleneck
and, optionally, of the output of every decoder level. Every FiLM layer is zero-initialised, so at initialisation the
branch is the identity. Design and modes: docs/nnynet.md, "Cross-attention (the Y branch)".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import nn

__all__ = [
    "CROSS_ATTENTION_MODES",
    "BottleneckCrossAttention",
    "ClinicalTokenizer",
    "ZeroInitLinear",
    "apply_film",
]

CROSS_ATTENTION_MODES = ("off", "latent", "clinical")
ClinicalInput = tuple[torch.Tensor, torch.Tensor | None]


class ZeroInitLinear(nn.Linear):
    """``nn.Linear`` whose weight and bias are initialised (and re-initialised) to zero.

    Network-wide initialisers should call :meth:`reset_parameters` on it instead of their generic Linear init.
    """

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def apply_film(x: torch.Tensor, film: nn.Linear, summary: torch.Tensor) -> torch.Tensor:
    """``x * (1 + gamma) + beta`` with ``(gamma, beta) = film(summary)`` broadcast over the spatial axes of ``x``."""
    gamma, beta = film(summary).chunk(2, dim=-1)
    shape = tuple(x.shape[:2]) + (1,) * (x.ndim - 2)
    return x * (1 + gamma.view(shape).to(x.dtype)) + beta.view(shape).to(x.dtype)


def parse_clinical_schema(schema: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validates a clinical schema and returns normalised field descriptions.

    Args:
        schema: One mapping per field, in the column order of the values tensor. Keys: ``name`` (str), ``type``
            (``"numeric"`` or ``"categorical"``) and, for categorical fields, ``categories`` (non-empty list). Other
            keys (e.g. normalisation statistics) are ignored here.

    Returns:
        A list of ``{"name", "type", "n_categories"}`` dicts (``n_categories`` is 0 for numeric fields).
    """
    if isinstance(schema, (str, bytes)) or not isinstance(schema, Sequence):
        raise ValueError(f"clinical_schema must be a list of field mappings, got {type(schema).__name__}")
    fields: list[dict[str, Any]] = []
    seen: set[str] = set()
    for j, entry in enumerate(schema):
        if not isinstance(entry, Mapping) or "name" not in entry or "type" not in entry:
            raise ValueError(f"clinical_schema[{j}] must be a mapping with 'name' and 'type', got {entry!r}")
        name, kind = str(entry["name"]), entry["type"]
        if name in seen:
            raise ValueError(f"clinical_schema has the field name {name!r} twice")
        seen.add(name)
        if kind == "numeric":
            fields.append({"name": name, "type": kind, "n_categories": 0})
        elif kind == "categorical":
            categories = entry.get("categories")
            if isinstance(categories, (str, bytes)) or not isinstance(categories, Sequence) or len(categories) == 0:
                raise ValueError(f"categorical field {name!r} needs a non-empty 'categories' list, got {categories!r}")
            fields.append({"name": name, "type": kind, "n_categories": len(categories)})
        else:
            raise ValueError(f"field {name!r} has type {kind!r}; expected 'numeric' or 'categorical'")
    return fields


class ClinicalTokenizer(nn.Module):
    """Turns a row of clinical fields into one D-dimensional token per field.

    * numeric field j: ``z_j * w_j + e_j`` with ``z_j = (x_j - mean_j) / std_j``. The statistics are persistent
      buffers (:meth:`set_normalisation`; mean 0, SD 1 until set), so they travel in the state dict: each fold of an
      ensemble carries the statistics of its own training cases and callers pass raw values;
    * categorical field j: row ``c_j`` of a learned table with ``n_categories + 1`` rows, the last one meaning
      "unknown" (used for indices outside ``[0, n_categories)``);
    * a field marked missing (or holding a non-finite value) is replaced by its learned missing token ``m_j``.

    During training each field is additionally marked missing with probability ``field_dropout``.

    Args:
        schema: Field descriptions, see :func:`parse_clinical_schema`.
        dim: Token dimension D.
        field_dropout: Probability of dropping a field during training.
        token_std: Standard deviation of the trunc-normal initialisation of every tokenizer parameter.
    """

    def __init__(
        self, schema: Sequence[Mapping[str, Any]], dim: int, *, field_dropout: float = 0.15, token_std: float = 0.3
    ) -> None:
        super().__init__()
        if not 0.0 <= field_dropout < 1.0:
            raise ValueError(f"field_dropout must be in [0, 1), got {field_dropout}")
        if not token_std > 0:
            raise ValueError(f"token_std must be > 0, got {token_std}")
        self.token_std = float(token_std)
        fields = parse_clinical_schema(schema)
        self.field_names = [f["name"] for f in fields]
        self.num_fields = len(fields)
        self.dim = dim
        self.field_dropout = field_dropout
        numeric = [j for j, f in enumerate(fields) if f["type"] == "numeric"]
        categorical = [j for j, f in enumerate(fields) if f["type"] == "categorical"]
        counts = [fields[j]["n_categories"] for j in categorical]
        offsets = [sum(c + 1 for c in counts[:i]) for i in range(len(counts))]
        # Tokens are computed grouped by type; `order` maps them back to the schema's field order.
        grouped = numeric + categorical
        order = [grouped.index(j) for j in range(self.num_fields)]
        self.register_buffer("numeric_index", torch.tensor(numeric, dtype=torch.long), persistent=False)
        self.register_buffer("categorical_index", torch.tensor(categorical, dtype=torch.long), persistent=False)
        self.register_buffer("category_counts", torch.tensor(counts, dtype=torch.long), persistent=False)
        self.register_buffer("category_offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("field_order", torch.tensor(order, dtype=torch.long), persistent=False)
        self.register_buffer("numeric_mean", torch.zeros(len(numeric)))
        self.register_buffer("numeric_std", torch.ones(len(numeric)))
        self.numeric_weight = nn.Parameter(torch.zeros(len(numeric), dim))
        self.numeric_bias = nn.Parameter(torch.zeros(len(numeric), dim))
        self.category_embedding = nn.Embedding(sum(c + 1 for c in counts), dim) if counts else None
        self.missing_tokens = nn.Parameter(torch.zeros(self.num_fields, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Trunc-normal (std ``token_std``, cut at +-2) initialisation of all tokenizer parameters."""
        for param in (self.numeric_weight, self.numeric_bias, self.missing_tokens):
            trunc_normal_(param, std=self.token_std)
        if self.category_embedding is not None:
            trunc_normal_(self.category_embedding.weight, std=self.token_std)

    @property
    def numeric_field_names(self) -> list[str]:
        """Names of the numeric fields, in the order of :attr:`numeric_mean` / :attr:`numeric_std`."""
        return [self.field_names[j] for j in self.numeric_index.tolist()]

    def set_normalisation(self, mean: Mapping[str, float], std: Mapping[str, float]) -> None:
        """Sets the z-score statistics of the numeric fields (field name -> value; every numeric field, SD > 0)."""
        names = self.numeric_field_names
        absent = [n for n in names if n not in mean or n not in std]
        if absent:
            raise ValueError(f"no mean/std for numeric field(s) {absent}")
        sd = torch.tensor([float(std[n]) for n in names], dtype=self.numeric_std.dtype)
        if not bool(torch.all(torch.isfinite(sd) & (sd > 0))):
            got = dict(zip(names, sd.tolist(), strict=True))
            raise ValueError(f"standard deviations must be finite and > 0, got {got}")
        self.numeric_mean.copy_(torch.tensor([float(mean[n]) for n in names], dtype=self.numeric_mean.dtype))
        self.numeric_std.copy_(sd)

    def all_missing(self, batch_size: int) -> torch.Tensor:
        """Tokens for ``batch_size`` rows in which every field is missing, shape ``(B, M, D)``."""
        return self.missing_tokens.unsqueeze(0).expand(batch_size, -1, -1)

    def forward(self, values: torch.Tensor, missing: torch.Tensor | None = None) -> torch.Tensor:
        """Tokenises a batch of clinical rows.

        Args:
            values: Float tensor ``(B, M)`` of raw values (not z-scored); categorical fields hold the category index
                as a float.
            missing: Bool tensor ``(B, M)``, True where a field is missing; ``None`` means only non-finite values
                are missing.

        Returns:
            Tokens of shape ``(B, M, D)`` in schema order.
        """
        if values.ndim != 2 or values.shape[1] != self.num_fields:
            raise ValueError(f"expected clinical values of shape (B, {self.num_fields}), got {tuple(values.shape)}")
        device = self.missing_tokens.device
        values = values.to(device=device, dtype=self.missing_tokens.dtype)
        missing_mask = ~torch.isfinite(values)
        if missing is not None:
            if missing.shape != values.shape:
                raise ValueError(f"missing mask shape {tuple(missing.shape)} != values shape {tuple(values.shape)}")
            missing_mask = missing_mask | missing.to(device=device, dtype=torch.bool)
        if self.training and self.field_dropout > 0:
            missing_mask = missing_mask | (torch.rand(values.shape, device=device) < self.field_dropout)
        values = torch.where(missing_mask, torch.zeros_like(values), values)

        parts = []
        if self.numeric_index.numel():
            z = (values[:, self.numeric_index] - self.numeric_mean) / self.numeric_std
            parts.append(z.unsqueeze(-1) * self.numeric_weight + self.numeric_bias)
        if self.category_embedding is not None:
            index = values[:, self.categorical_index].round().long()
            unknown = (index < 0) | (index >= self.category_counts)
            index = torch.where(unknown, self.category_counts.expand_as(index), index)
            parts.append(self.category_embedding(index + self.category_offsets))
        if not parts:
            return values.new_zeros(values.shape[0], 0, self.dim)
        tokens = torch.cat(parts, dim=1)[:, self.field_order]
        return torch.where(missing_mask.unsqueeze(-1), self.missing_tokens.unsqueeze(0), tokens)

    def extra_repr(self) -> str:
        return (
            f"fields={self.field_names}, dim={self.dim}, field_dropout={self.field_dropout}, token_std={self.token_std}"
        )


class BottleneckCrossAttention(nn.Module):
    """FiLM-conditioning of a bottleneck feature map by cross-attention from query tokens.

    With tokens ``T = LN(flatten(b))`` (``(B, N, C)``) and queries ``Q`` (clinical tokens and/or latent tokens):

        ``O = Q + MHA(LN(Q), T, T)``; ``o = mean_tokens(O + MLP(LN(O)))``; ``(gamma, beta) = Linear(o)``;
        ``b' = b * (1 + gamma) + beta``.

    With ``level_channels`` the summary ``o`` also modulates the output of each decoder level ``s`` through its own
    FiLM layer (:meth:`modulate_level`); the caller applies those. A level's output reaches its segmentation head and
    the next level without a normalisation in between, whereas a per-channel-normalising decoder (MedNeXt's GroupNorm
    with one group per channel) largely cancels a FiLM of the bottleneck alone. Background and measurements:
    docs/nnynet.md, "Where the Y branch acts".

    Every FiLM Linear is a :class:`ZeroInitLinear`, so the branch is the identity at initialisation.

    Modes:
        * ``"off"``: no parameters; ``forward`` returns ``b`` unchanged.
        * ``"latent"``: only the ``n_latent`` learned latent queries (a learned global-context block).
        * ``"clinical"``: one token per clinical field plus the latent queries.

    Args:
        channels: Channels C of the bottleneck map; also the token dimension.
        mode: One of ``"off"``, ``"latent"``, ``"clinical"``.
        clinical_schema: Field descriptions (required, non-empty, for ``"clinical"``; ignored otherwise).
        n_latent: Number of learned latent query tokens (>= 1 for ``"latent"``).
        num_heads: Attention heads; must divide ``channels``.
        mlp_ratio: Hidden width of the MLP relative to ``channels``.
        field_dropout: Training-time probability of dropping a clinical field.
        token_std: Initial scale of the clinical tokens (:class:`ClinicalTokenizer`).
        attn_drop: Dropout on the attention weights (training only).
        level_channels: Channels of each decoder level's output, deepest first; one FiLM layer per level (empty: the
            bottleneck only).
    """

    def __init__(
        self,
        channels: int,
        *,
        mode: str = "latent",
        clinical_schema: Sequence[Mapping[str, Any]] | None = None,
        n_latent: int = 4,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        field_dropout: float = 0.15,
        token_std: float = 0.3,
        attn_drop: float = 0.0,
        level_channels: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if mode not in CROSS_ATTENTION_MODES:
            raise ValueError(f"cross-attention mode must be one of {CROSS_ATTENTION_MODES}, got {mode!r}")
        self.mode = mode
        self.channels = channels
        if mode == "off":
            return
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"cross-attention heads ({num_heads}) must divide the bottleneck channels ({channels})")
        if n_latent < 0 or (mode == "latent" and n_latent < 1):
            raise ValueError(f"n_latent must be >= 1 in 'latent' mode and >= 0 otherwise, got {n_latent}")
        if mode == "clinical":
            if not clinical_schema:
                raise ValueError("cross-attention mode 'clinical' needs a non-empty clinical_schema; use 'latent'")
            self.tokenizer = ClinicalTokenizer(
                clinical_schema, channels, field_dropout=field_dropout, token_std=token_std
            )
        else:
            self.tokenizer = None
        self.num_heads = num_heads
        self.n_latent = n_latent
        self.attn_drop = attn_drop
        self.latent_tokens = nn.Parameter(torch.zeros(n_latent, channels)) if n_latent else None
        if self.latent_tokens is not None:
            trunc_normal_(self.latent_tokens, std=0.02)
        self.kv_norm = nn.LayerNorm(channels)
        self.q_norm = nn.LayerNorm(channels)
        self.q_proj = nn.Linear(channels, channels)
        self.kv_proj = nn.Linear(channels, 2 * channels)
        self.out_proj = nn.Linear(channels, channels)
        self.mlp_norm = nn.LayerNorm(channels)
        self.mlp = Mlp(channels, hidden_features=int(channels * mlp_ratio), act_layer=nn.GELU)
        self.film = ZeroInitLinear(channels, 2 * channels)
        self.level_films = nn.ModuleList(ZeroInitLinear(channels, 2 * int(c)) for c in level_channels)

    @property
    def num_queries(self) -> int:
        """Number of query tokens (clinical fields plus latent tokens); 0 when off."""
        if self.mode == "off":
            return 0
        return (self.tokenizer.num_fields if self.tokenizer is not None else 0) + self.n_latent

    def _queries(self, batch_size: int, clinical: ClinicalInput | None) -> torch.Tensor:
        parts = []
        if self.tokenizer is not None:
            if clinical is None:
                parts.append(self.tokenizer.all_missing(batch_size))
            else:
                values, missing = clinical
                if values.ndim == 2 and values.shape[0] == 1 and batch_size > 1:
                    values = values.expand(batch_size, -1)
                    missing = None if missing is None else missing.expand(batch_size, -1)
                if values.shape[0] != batch_size:
                    raise ValueError(
                        f"clinical values have batch size {values.shape[0]}, image batch has {batch_size} "
                        "(give one row per image or a single row for all)"
                    )
                parts.append(self.tokenizer(values, missing))
        if self.latent_tokens is not None:
            parts.append(self.latent_tokens.unsqueeze(0).expand(batch_size, -1, -1))
        return torch.cat(parts, dim=1)

    def forward(self, b: torch.Tensor, clinical: ClinicalInput | None = None) -> torch.Tensor:
        """Modulates the bottleneck map (the decoder levels are modulated by the caller, see :meth:`modulate_level`).

        Args:
            b: Bottleneck map ``(B, C, *spatial)``.
            clinical: ``(values, missing)`` for ``"clinical"`` mode (see :class:`ClinicalTokenizer`); ``None`` means
                every field is missing. Ignored in the other modes.

        Returns:
            ``b'`` with the shape of ``b``.
        """
        if self.mode == "off":
            return b
        return apply_film(b, self.film, self.summarise(b, clinical))

    def modulate_level(self, level: int, x: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        """FiLM of decoder level ``level``'s output ``x`` by ``summary`` (from :meth:`summarise`)."""
        return apply_film(x, self.level_films[level], summary)

    def summarise(self, b: torch.Tensor, clinical: ClinicalInput | None = None) -> torch.Tensor:
        """The branch's summary vector ``o`` (``(B, C)``): the mean of the updated query tokens.

        Args:
            b: Bottleneck map ``(B, C, *spatial)``; its voxels are the keys and values.
            clinical: As in :meth:`forward`.
        """
        if self.mode == "off":
            raise RuntimeError("the cross-attention branch is off; there is no summary")
        if b.ndim < 3 or b.shape[1] != self.channels:
            raise ValueError(f"expected a bottleneck map (B, {self.channels}, ...), got {tuple(b.shape)}")
        batch, channels = b.shape[:2]
        heads, head_dim = self.num_heads, channels // self.num_heads
        queries = self._queries(batch, clinical).to(b.dtype)
        tokens = self.kv_norm(b.flatten(2).transpose(1, 2))  # (B, N, C)
        n_tokens, n_queries = tokens.shape[1], queries.shape[1]
        k, v = self.kv_proj(tokens).view(batch, n_tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.q_proj(self.q_norm(queries)).view(batch, n_queries, heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = queries + self.out_proj(attended.transpose(1, 2).reshape(batch, n_queries, channels))
        out = out + self.mlp(self.mlp_norm(out))
        return out.mean(dim=1)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Memory-proportional element count for one sample with a bottleneck of spatial size ``input_size``."""
        if self.mode == "off":
            return 0
        n_tokens = math.prod(int(s) for s in input_size)
        c = self.channels
        return n_tokens * (3 * c + 2 * c) + self.num_queries * (n_tokens * self.num_heads + 8 * c)
