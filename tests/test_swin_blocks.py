"""Unit tests of the Swin, MedNeXt, norm and clinical-tokenizer building blocks (tiny CPU inputs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnyseg.network_architecture.building_blocks.cross_attention import (
    BottleneckCrossAttention,
    ClinicalTokenizer,
    parse_clinical_schema,
)
from nnyseg.network_architecture.building_blocks.mednext import ConvResBlock, MedNeXtBlock, MedNeXtUpBlock
from nnyseg.network_architecture.building_blocks.norms import LayerNormNd
from nnyseg.network_architecture.building_blocks.swin import (
    PatchMerging3d,
    SwinBlock3d,
    SwinEncoder3d,
    WindowAttention3d,
    compute_shift_mask,
    compute_window_and_shift,
    relative_position_index,
    window_partition,
    window_reverse,
)

SCHEMA = [
    {"name": "age", "type": "numeric"},
    {"name": "diagnosis", "type": "categorical", "categories": ["benign", "malignant"]},
    {"name": "afp", "type": "numeric", "mean": 3.0, "std": 2.0},
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("window", [(4, 3, 2), (2, 2, 2), (8, 6, 4)])
def test_window_partition_roundtrip(window: tuple[int, int, int]) -> None:
    x = torch.randn(2, 8, 6, 4, 5)
    windows = window_partition(x, window)
    n_windows = math.prod(s // w for s, w in zip((8, 6, 4), window, strict=True))
    assert windows.shape == (2 * n_windows, math.prod(window), 5)
    # the first window is the corner block of the first sample, flattened in D, H, W order
    wd, wh, ww = window
    assert torch.equal(windows[0], x[0, :wd, :wh, :ww].reshape(-1, 5))
    assert torch.equal(window_reverse(windows, window, (8, 6, 4)), x)


def test_window_partition_rejects_non_multiple() -> None:
    with pytest.raises(ValueError, match="multiple of the window"):
        window_partition(torch.zeros(1, 5, 4, 4, 2), (2, 2, 2))


def test_window_shrink_rules() -> None:
    assert compute_window_and_shift((4, 8, 16), 7, 3) == ((4, 7, 7), (0, 3, 3))
    assert compute_window_and_shift((7, 7, 7), 7, 3) == ((7, 7, 7), (0, 0, 0))  # size == window: no shift
    assert compute_window_and_shift((8, 2, 64), (4, 4, 4), (2, 2, 2)) == ((4, 2, 4), (2, 0, 2))
    assert compute_window_and_shift((32, 32, 32), 7, 0) == ((7, 7, 7), (0, 0, 0))


def test_shift_mask_blocks_exactly_the_wrapped_pairs() -> None:
    size, window, shift = (8, 8, 12), (4, 4, 4), (2, 2, 2)
    mask = compute_shift_mask(size, window, shift)
    assert mask.shape == (2 * 2 * 3, 64, 64)
    assert set(mask.unique().tolist()) <= {0.0, float("-inf")}
    # Original coordinates of the rolled tokens: a pair must be blocked iff along some axis the two tokens come from
    # opposite ends of the volume (distance >= window), i.e. they were never neighbours before the cyclic shift.
    grid = torch.stack(torch.meshgrid(*(torch.arange(s) for s in size), indexing="ij"), dim=-1).float()
    rolled = torch.roll(grid, shifts=tuple(-s for s in shift), dims=(0, 1, 2)).unsqueeze(0)
    coords = window_partition(rolled, window)  # (nW, N, 3)
    far = ((coords[:, :, None, :] - coords[:, None, :, :]).abs() >= torch.tensor(window)).any(-1)
    assert torch.equal(torch.isinf(mask), far)
    assert far.any() and not far[0].any()  # interior windows are unmasked
    assert compute_shift_mask(size, window, (0, 0, 0)) is None


def test_shifted_attention_ignores_other_regions() -> None:
    size, window, shift = (8, 8, 8), (4, 4, 4), (2, 2, 2)
    attn = WindowAttention3d(8, 2, window).eval()
    mask = compute_shift_mask(size, window, shift)
    tokens = torch.randn(mask.shape[0], 64, 8)
    out = attn(tokens, window=window, mask=mask)
    last = mask.shape[0] - 1  # the corner window holds 8 regions
    first_region = torch.isfinite(mask[last, 0])  # tokens in the same region as token 0
    assert 0 < first_region.sum() < 64
    changed = tokens.clone()
    changed[last, ~first_region] += 10.0 * torch.randn_like(changed[last, ~first_region])
    out2 = attn(changed, window=window, mask=mask)
    torch.testing.assert_close(out2[last, first_region], out[last, first_region])
    assert not torch.allclose(out2[last, ~first_region], out[last, ~first_region])


@pytest.mark.parametrize(("window", "table"), [((7, 7, 7), None), ((2, 3, 4), (7, 7, 7)), ((4, 4, 4), (4, 4, 4))])
def test_relative_position_index(window: tuple[int, ...], table: tuple[int, ...] | None) -> None:
    index = relative_position_index(window, table)
    n = math.prod(window)
    table = table or window
    n_rows = math.prod(2 * t - 1 for t in table)
    assert index.shape == (n, n) and index.dtype == torch.long
    assert index.min() >= 0 and index.max() < n_rows
    center = n_rows // 2  # offset (0, 0, 0)
    assert torch.all(index.diagonal() == center)
    assert torch.all(index + index.T == 2 * center)  # offset(i, j) == -offset(j, i)
    if window == table:
        assert index.unique().numel() == n_rows  # every offset is used
    with pytest.raises(ValueError):
        relative_position_index((8, 8, 8), (7, 7, 7))


def test_window_attention_rel_bias_and_extra_bias_hook() -> None:
    attn = WindowAttention3d(8, 2, 4)
    assert attn.relative_position_bias_table.shape == (7**3, 2)
    assert attn.relative_position_bias((2, 2, 4)).shape == (1, 2, 16, 16)
    tokens = torch.randn(3, 64, 8)
    reference = attn(tokens)

    calls = []

    class KeyBias(nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 2)
            self.scale = scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(x.shape))
            return self.scale * self.proj(x).transpose(1, 2).unsqueeze(2)  # (B*nW, heads, 1, N): per-key bias

    attn.extra_bias = KeyBias(0.0)
    torch.testing.assert_close(attn(tokens), reference)
    assert calls == [(3, 64, 8)]
    assert "extra_bias.proj.weight" in attn.state_dict()
    attn.extra_bias = KeyBias(5.0)
    assert not torch.allclose(attn(tokens), reference)
    no_rpb = WindowAttention3d(8, 2, 4, rel_pos_bias=False)
    assert no_rpb.relative_position_bias_table is None and no_rpb(tokens).shape == tokens.shape


@pytest.mark.parametrize("shift", [0, 2])
def test_swin_block_pads_and_keeps_shape(shift: int) -> None:
    block = SwinBlock3d(8, 2, window_size=4, shift_size=shift)
    x = torch.randn(2, 6, 5, 9, 8, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert block.compute_conv_feature_map_size((6, 5, 9)) > 0


def test_patch_merging_and_encoder_contract() -> None:
    merge = PatchMerging3d(4)
    assert merge(torch.randn(1, 4, 6, 2, 4)).shape == (1, 2, 3, 1, 8)
    assert merge.reduction.bias is None and merge.reduction.in_features == 32
    enc = SwinEncoder3d(2, feature_size=6, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 3), window_size=4)
    assert enc.output_channels == [6, 12, 24, 48, 96]
    assert enc.strides == [[2, 2, 2]] * 5
    hidden = enc(torch.randn(1, 2, 32, 32, 64))
    assert [tuple(h.shape) for h in hidden] == [
        (1, 6, 16, 16, 32),
        (1, 12, 8, 8, 16),
        (1, 24, 4, 4, 8),
        (1, 48, 2, 2, 4),
        (1, 96, 1, 1, 2),
    ]
    # hidden states are layer-normalised over channels without affine parameters
    torch.testing.assert_close(hidden[2].mean(1), torch.zeros_like(hidden[2].mean(1)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="must divide"):
        SwinEncoder3d(1, feature_size=6, depths=(1, 1), num_heads=(4, 4))


# ----------------------------------------------------------------------------- conv blocks and norms


def test_mednext_up_block_doubles_size() -> None:
    up = MedNeXtUpBlock(8, 4, exp_r=2)
    assert up(torch.randn(2, 8, 3, 4, 5)).shape == (2, 4, 6, 8, 10)
    assert MedNeXtUpBlock(4, 4, kernel_size=5, do_res=False)(torch.randn(1, 4, 2, 2, 2)).shape == (1, 4, 4, 4, 4)


def test_mednext_block_and_conv_res_block() -> None:
    block = MedNeXtBlock(4, 6, exp_r=3)
    assert block(torch.randn(1, 4, 5, 5, 5)).shape == (1, 6, 5, 5, 5)
    assert block.res_conv is not None and MedNeXtBlock(4, 4).res_conv is None
    assert block.norm.num_groups == 4
    res = ConvResBlock(3, 5)
    assert res(torch.randn(2, 3, 4, 4, 4)).shape == (2, 5, 4, 4, 4)
    # a single-voxel map (bottleneck of a 32^3 patch) works in training mode
    single = ConvResBlock(4, 4).train()
    x = torch.randn(2, 4, 1, 1, 1, requires_grad=True)
    single(x).sum().backward()
    assert all(p.grad is not None for p in single.parameters())


def test_layer_norm_nd_matches_functional_layer_norm() -> None:
    norm = LayerNormNd(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = 3 * torch.randn(2, 6, 3, 4, 5) + 1
    expected = F.layer_norm(x.movedim(1, -1), (6,), norm.weight, norm.bias, eps=1e-5).movedim(-1, 1)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
    plain = LayerNormNd(6, affine=False)
    torch.testing.assert_close(
        plain(x[:, :, 0]), F.layer_norm(x[:, :, 0].movedim(1, -1), (6,), eps=1e-6).movedim(-1, 1)
    )


# ----------------------------------------------------------------------------- clinical tokenizer


def test_clinical_tokenizer_tokens_missing_and_unknown() -> None:
    tok = ClinicalTokenizer(SCHEMA, 8, field_dropout=0.15).eval()
    values = torch.tensor([[0.5, 1.0, -1.0], [float("nan"), 7.0, 2.0]])
    missing = torch.tensor([[False, False, True], [False, False, False]])
    out = tok(values, missing)
    assert out.shape == (2, 3, 8)
    # numeric field 0 of row 0: z * w + e (numeric fields are parameter rows 0 and 1)
    torch.testing.assert_close(out[0, 0], 0.5 * tok.numeric_weight[0] + tok.numeric_bias[0])
    # field 2 of row 0 marked missing; NaN in field 0 of row 1 counts as missing
    torch.testing.assert_close(out[0, 2], tok.missing_tokens[2])
    torch.testing.assert_close(out[1, 0], tok.missing_tokens[0])
    torch.testing.assert_close(out[1, 2], 2.0 * tok.numeric_weight[1] + tok.numeric_bias[1])
    # category 1 -> row 1; out-of-range category 7 -> the extra "unknown" row 2
    torch.testing.assert_close(out[0, 1], tok.category_embedding.weight[1])
    torch.testing.assert_close(out[1, 1], tok.category_embedding.weight[2])
    assert tok.category_embedding.num_embeddings == 3


def test_clinical_tokenizer_field_dropout_only_in_training() -> None:
    tok = ClinicalTokenizer(SCHEMA, 4, field_dropout=0.5)
    values = torch.zeros(256, 3)
    tok.eval()
    assert not torch.isclose(tok(values), tok.missing_tokens.expand(256, -1, -1)).all(-1).any()
    tok.train()
    dropped = torch.isclose(tok(values), tok.missing_tokens.expand(256, -1, -1)).all(-1).float().mean()
    assert 0.35 < dropped < 0.65


@pytest.mark.parametrize("std", [0.02, 1.0])
def test_clinical_tokenizer_token_std_sets_the_initial_scale(std: float) -> None:
    torch.manual_seed(0)
    tok = ClinicalTokenizer(SCHEMA, 256, token_std=std)
    expected = 0.880 if std == 1.0 else std  # trunc-normal cut at +-2: 2 SD for std 1 (SD 0.880), none for 0.02
    for param in (tok.numeric_weight, tok.numeric_bias, tok.missing_tokens, tok.category_embedding.weight):
        assert param.detach().std().item() == pytest.approx(expected, rel=0.1)
    assert "token_std=" in repr(tok)
    with pytest.raises(ValueError, match="token_std"):
        ClinicalTokenizer(SCHEMA, 4, token_std=0.0)


def test_schema_validation() -> None:
    assert [f["n_categories"] for f in parse_clinical_schema(SCHEMA)] == [0, 2, 0]
    bad_schemas = [
        [{"name": "a", "type": "text"}],
        [{"name": "a", "type": "categorical"}],
        [{"name": "a", "type": "numeric"}, {"name": "a", "type": "numeric"}],
        [{"type": "numeric"}],
        "age",
    ]
    for schema in bad_schemas:
        with pytest.raises(ValueError):
            parse_clinical_schema(schema)
    with pytest.raises(ValueError, match="clinical values of shape"):
        ClinicalTokenizer(SCHEMA, 4)(torch.zeros(2, 2))


def test_bottleneck_cross_attention_modes() -> None:
    b = torch.randn(2, 8, 2, 2, 3)
    off = BottleneckCrossAttention(8, mode="off")
    assert off(b) is b and not list(off.parameters())
    latent = BottleneckCrossAttention(8, mode="latent", num_heads=2)
    assert latent.num_queries == 4 and latent.tokenizer is None
    torch.testing.assert_close(latent(b), b)  # zero-initialised FiLM
    clinical = BottleneckCrossAttention(8, mode="clinical", clinical_schema=SCHEMA, num_heads=2, n_latent=2).eval()
    assert clinical.num_queries == 5
    with torch.no_grad():
        clinical.film.weight.normal_()
    values = torch.tensor([[0.1, 0.0, 1.0]])
    one_row = clinical(b, (values, None))  # a single row is broadcast over the batch
    torch.testing.assert_close(one_row, clinical(b, (values.expand(2, -1), None)))
    assert not torch.allclose(one_row, clinical(b, (values + 1, None)))
    with pytest.raises(ValueError, match="batch size"):
        clinical(b, (torch.zeros(3, 3), None))
    for kwargs in ({"mode": "clinical"}, {"mode": "both"}, {"num_heads": 3}, {"n_latent": 0}):
        with pytest.raises(ValueError):
            BottleneckCrossAttention(8, **kwargs)
