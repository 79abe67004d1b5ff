"""Tests of DynTransNet (D-MSA biases, fusion and residual modules, the network, its planner) on tiny CPU configs."""

from __future__ import annotations

import inspect
import itertools
import json
import math
from typing import Any

import numpy as np
import pytest
import torch

from nnyseg.network_architecture.building_blocks.dmsa import (
    DenseSynthesizerBias,
    KeySaliencyBias,
    make_dmsa_bias_factory,
)
from nnyseg.network_architecture.building_blocks.fusion import (
    ConcatFusion,
    FeatureMixModule,
    ResidualModule,
    WeightedSumFusion,
    make_fusion,
)
from nnyseg.network_architecture.building_blocks.swin import WindowAttention3d
from nnyseg.network_architecture.dyntransnet import PAPER_ABLATIONS, DynTransNet, vit_strides
from nnyseg.planning.planners import PLANNERS, DynTransNetPlanner
from nnyseg.registry import get_model
from nnyseg.trainers.base import check_patch_size_for_network

#: Smallest Swin configuration (window 2, so the dense bias works at 32^3).
MICRO: dict[str, Any] = {"feature_size": 6, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4), "window_size": 2}
#: The planner's tiny preset.
TINY: dict[str, Any] = {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "window_size": 4}
VIT_TINY: dict[str, Any] = {
    "encoder": "vit",
    "feature_size": 6,
    "vit_patch_size": 16,
    "vit_dim": 48,
    "vit_depth": 4,
    "vit_heads": 2,
    "vit_img_size": (32, 32, 32),
}
STRIDES = [[1, 1, 1]] + 5 * [[2, 2, 2]]


def make_net(*, deep_supervision: bool = True, seed: int = 0, init: bool = True, **kwargs: Any) -> DynTransNet:
    torch.manual_seed(seed)
    net = DynTransNet(1, 2, deep_supervision, **{**MICRO, **kwargs})
    if init:
        net.apply(net.initialize)
    return net


def assert_ds_shapes(outputs: Any, patch: tuple[int, ...], n: int = 5, batch: int = 1) -> None:
    assert isinstance(outputs, list) and len(outputs) == n
    for level, out in enumerate(outputs):
        assert out.shape == (batch, 2, *(p // 2**level for p in patch))
        assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- D-MSA biases
class _RowBias(torch.nn.Module):
    """Reading R1 (rejected by the spec): the key-saliency values indexed by the *query*, constant along each row."""

    def __init__(self, key_bias: KeySaliencyBias) -> None:
        super().__init__()
        self.key_bias = key_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_bias(x).transpose(-1, -2)  # (B', heads, N, 1): Delta[i, j] = ReLU(x_i^T w + b)


def test_key_bias_changes_attention_but_a_row_constant_bias_would_not() -> None:
    torch.manual_seed(0)
    b, heads, n, dim = 2, 2, 8, 6
    tokens = torch.randn(b, n, dim)
    key_bias = KeySaliencyBias(dim, heads)
    with torch.no_grad():
        key_bias.weight.normal_(0.0, 1.0)  # a trained-size bias; at init (std 0.02) the effect is just small
        delta = key_bias(tokens)
    assert delta.shape == (b, heads, 1, n)
    assert (delta >= 0).all() and (delta > 0.5).any()
    expected = torch.relu(tokens @ key_bias.weight.T + key_bias.bias).transpose(1, 2)  # (b, heads, n) by key j
    torch.testing.assert_close(delta[:, :, 0, :], expected)

    # softmax over the keys j: a per-key bias changes the weights, a per-query (row) constant cannot
    scores = torch.randn(b, heads, n, n)
    base = scores.softmax(-1)
    torch.testing.assert_close((scores + delta.transpose(-1, -2)).softmax(-1), base)
    assert not torch.allclose((scores + delta).softmax(-1), base, atol=1e-3)

    # the same through the attention hook: the row reading is a no-op, the key reading matches a manual computation
    attn = WindowAttention3d(dim, heads, 2, rel_pos_bias=False)
    with torch.no_grad():
        plain = attn(tokens, window=(2, 2, 2))
        attn.extra_bias = _RowBias(key_bias)
        row = attn(tokens, window=(2, 2, 2))
        attn.extra_bias = key_bias
        keyed = attn(tokens, window=(2, 2, 2))
        q, k, v = attn.qkv(tokens).view(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-1, -2) / math.sqrt(dim // heads) + delta).softmax(-1)
        manual = attn.proj((weights @ v).transpose(1, 2).reshape(b, n, dim))
    torch.testing.assert_close(row, plain)
    assert not torch.allclose(keyed, plain, atol=1e-4)
    torch.testing.assert_close(keyed, manual)


def test_key_bias_initialisation_is_small_normal_not_zero() -> None:
    torch.manual_seed(0)
    bias = KeySaliencyBias(64, 8)
    assert 0.015 < bias.weight.std().item() < 0.025
    assert not bias.bias.any()
    x = torch.randn(3, 10, 64, requires_grad=True)
    bias(x).sum().backward()
    assert bias.weight.grad.abs().sum() > 0  # a zero W_d would block every gradient behind the ReLU


def test_dense_bias_is_the_literal_n_by_n_form_and_rejects_another_token_count() -> None:
    torch.manual_seed(0)
    dim, heads, n = 5, 2, 8
    dense = DenseSynthesizerBias(dim, heads, num_tokens=n)
    with torch.no_grad():
        dense.weight.normal_(0.0, 1.0)
        dense.bias.normal_(0.0, 0.1)
        x = torch.randn(3, n, dim)
        delta = dense(x)
    assert delta.shape == (3, heads, n, n) and (delta >= 0).all()
    for bi, h, i, j in [(0, 0, 0, 0), (1, 1, 3, 5), (2, 0, 7, 2)]:
        row = h * n + j
        value = torch.relu(x[bi, i] @ dense.weight[row] + dense.bias[row])
        torch.testing.assert_close(delta[bi, h, i, j], value)
    assert dense.weight.numel() == dim * heads * n
    with pytest.raises(ValueError, match="exactly 8 tokens"):
        dense(torch.randn(1, 27, dim))
    # in an attention block: a window that shrinks on a small feature map has fewer tokens -> clear error
    attn = WindowAttention3d(dim * 2, heads, 2, extra_bias=DenseSynthesizerBias(dim * 2, heads, num_tokens=8))
    attn(torch.randn(2, 8, dim * 2), window=(2, 2, 2))
    with pytest.raises(ValueError, match=r"dmsa_bias='dense'.*exactly 8 tokens.*got 4"):
        attn(torch.randn(2, 4, dim * 2), window=(1, 2, 2))


def test_bias_factory_modes() -> None:
    assert make_dmsa_bias_factory("none") is None
    assert isinstance(make_dmsa_bias_factory("key")(12, 3), KeySaliencyBias)
    dense = make_dmsa_bias_factory("dense", window_tokens=343)(12, 3)
    assert isinstance(dense, DenseSynthesizerBias) and dense.num_tokens == 343
    with pytest.raises(ValueError, match="fixed number of tokens"):
        make_dmsa_bias_factory("dense")
    with pytest.raises(ValueError, match="must be one of"):
        make_dmsa_bias_factory("row")


# ---------------------------------------------------------------------------------------------- fusion and RM
def test_feature_mix_module_gate_and_output() -> None:
    torch.manual_seed(0)
    d, e = torch.randn(2, 8, 4, 6, 6), torch.randn(2, 8, 4, 6, 6)
    fmm = FeatureMixModule(8, 8)
    assert fmm.inter_channels == 4 and fmm.w_psi.out_channels == 1
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in fmm.modules())  # no norms
    fmm.record_gate = True
    with torch.no_grad():
        out = fmm(d, e)
        psi = fmm.gate(d, e)
        expected = fmm.w_f(torch.cat((d, psi * e), dim=1))
    assert out.shape == (2, 8, 4, 6, 6)
    torch.testing.assert_close(out, expected)
    assert fmm.last_gate.shape == (2, 1, 4, 6, 6) and not fmm.last_gate.requires_grad
    assert (fmm.last_gate >= 0).all() and (fmm.last_gate <= 1).all()
    torch.testing.assert_close(fmm.last_gate, psi)
    # a gate saturated open is plain concatenation with the same W_f
    concat = ConcatFusion(8, 8)
    with torch.no_grad():
        fmm.w_psi.bias.fill_(100.0)
        concat.w_f.load_state_dict(fmm.w_f.state_dict())
        torch.testing.assert_close(fmm(d, e), concat(d, e))
    # C_d != C_e != C
    assert FeatureMixModule(8, 4, 6)(torch.randn(1, 8, 2, 2, 2), torch.randn(1, 4, 2, 2, 2)).shape == (1, 6, 2, 2, 2)
    with pytest.raises(ValueError, match="same size"):
        fmm(d, e[:, :, :2])


def test_concat_and_weighted_sum_give_the_shapes_the_decoder_expects() -> None:
    torch.manual_seed(0)
    d, e = torch.randn(2, 8, 4, 6, 6), torch.randn(2, 8, 4, 6, 6)
    for mode in ("fmm", "concat", "weighted_sum"):
        assert make_fusion(mode, 8, 8, 8)(d, e).shape == d.shape
    ws = WeightedSumFusion(8, 8)
    assert sum(p.numel() for p in ws.parameters()) == 2  # equal channels: just the two logits
    torch.testing.assert_close(ws.weights.sum(), torch.tensor(1.0))
    torch.testing.assert_close(ws(d, e), (d + e) / 2)  # logits start at 0: the mean
    mixed = WeightedSumFusion(8, 4, 6)
    assert mixed.proj_d is not None and mixed.proj_e is not None
    assert mixed(d, torch.randn(2, 4, 4, 6, 6)).shape == (2, 6, 4, 6, 6)
    assert ConcatFusion(8, 4, 6)(d, torch.randn(2, 4, 4, 6, 6)).shape == (2, 6, 4, 6, 6)
    with pytest.raises(ValueError, match="must be one of"):
        make_fusion("add", 8, 8, 8)


def test_residual_module_shape_and_exact_identity_when_convs_are_zero() -> None:
    torch.manual_seed(0)
    rm = ResidualModule(4).train()
    x = torch.randn(2, 4, 5, 6, 7)
    out = rm(x)
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert rm.act.negative_slope == 0.01 and rm.norm1.affine and rm.conv1.bias is not None
    with torch.no_grad():
        for conv in (rm.conv1, rm.conv2):
            conv.weight.zero_()
            conv.bias.zero_()
        assert torch.equal(rm(x), x)  # IN(0) = 0, LReLU(0) = 0: F = X exactly
    assert rm(torch.randn(2, 4, 1, 1, 1)).shape == (2, 4, 1, 1, 1)  # single voxel (the /32 bottleneck of 32^3)
    with pytest.raises(ValueError, match="ResidualModule expects"):
        rm(torch.randn(1, 3, 4, 4, 4))


# ---------------------------------------------------------------------------------------------- the network
@pytest.mark.parametrize("patch", [(32, 32, 32), (32, 64, 64), (64, 32, 32)])
def test_output_shapes_with_and_without_deep_supervision(patch: tuple[int, int, int]) -> None:
    net = make_net().eval()
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        outputs = net(x)
        assert_ds_shapes(outputs, patch)
        net.decoder.deep_supervision = False
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (1, 2, *patch)
    torch.testing.assert_close(single, outputs[0])
    assert len(net.decoder.seg_layers) == 5  # heads always built


def test_every_ablation_combination_builds_and_runs() -> None:
    x = torch.randn(1, 1, 32, 32, 32)
    combos = list(itertools.product(("key", "dense", "none"), ("fmm", "concat", "weighted_sum"), (True, False)))
    for dmsa_bias, fusion, residual_module in combos:
        net = make_net(dmsa_bias=dmsa_bias, fusion=fusion, residual_module=residual_module).eval()
        has_rm = any(isinstance(m, ResidualModule) for m in net.modules())
        assert has_rm == residual_module
        n_bias = sum(isinstance(m, (KeySaliencyBias, DenseSynthesizerBias)) for m in net.modules())
        assert n_bias == (0 if dmsa_bias == "none" else 4)
        with torch.no_grad():
            assert_ds_shapes(net(x), (32, 32, 32))
    # every row of the paper's Tables 2 and 3 is one of these settings; "full" is the default
    assert {(r["dmsa_bias"], r["fusion"], r["residual_module"]) for r in PAPER_ABLATIONS.values()} <= set(combos)
    defaults = inspect.signature(DynTransNet).parameters
    assert all(defaults[k].default == v for k, v in PAPER_ABLATIONS["full"].items())
    without_rel = make_net(rel_pos_bias=False, dmsa_bias="none").eval()
    with torch.no_grad():
        assert_ds_shapes(without_rel(x), (32, 32, 32))


def test_every_parameter_gets_a_finite_gradient() -> None:
    net = make_net(dmsa_bias="key", fusion="fmm").train()
    outputs = net(torch.randn(1, 1, 32, 32, 32))
    sum(out.mean() for out in outputs).backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    key_biases = [m for m in net.modules() if isinstance(m, KeySaliencyBias)]
    assert len(key_biases) == 4 and all(m.weight.grad.abs().sum() > 0 for m in key_biases)
    assert all(m.w_psi.weight.grad.abs().sum() > 0 for m in net.modules() if isinstance(m, FeatureMixModule))


def test_gradient_checkpointing_gives_same_outputs_and_grads() -> None:
    reference = make_net().train()
    checkpointed = make_net(use_checkpoint=True, seed=3).train()
    checkpointed.load_state_dict(reference.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    results = []
    for net in (reference, checkpointed):
        outputs = net(x)
        sum(out.mean() for out in outputs).backward()
        results.append((outputs, {n: p.grad for n, p in net.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    for a, b in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(a, b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_built_by_nnunet_get_network_from_plans() -> None:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch_kwargs = json.loads(
        json.dumps(
            {
                "strides": STRIDES,
                "encoder": "swin",
                **TINY,
                "dmsa_bias": "key",
                "rel_pos_bias": True,
                "fusion": "fmm",
                "residual_module": True,
            }
        )
    )
    torch.manual_seed(0)
    net = get_network_from_plans(
        "nnyseg.network_architecture.dyntransnet.DynTransNet",
        arch_kwargs,
        [],
        input_channels=1,
        output_channels=2,
        allow_init=True,
        deep_supervision=True,
    )
    assert isinstance(net, DynTransNet)
    for bias in (m for m in net.modules() if isinstance(m, KeySaliencyBias)):  # initialize() kept W_d ~ N(0, 0.02^2)
        assert 0.005 < bias.weight.std().item() < 0.05 and not bias.bias.any()
    scales = np.cumprod(np.vstack(arch_kwargs["strides"]), axis=0)[:-1]  # nnU-Net's deep-supervision scales
    patch = (32, 64, 32)
    net.eval()
    with torch.no_grad():
        outputs = net(torch.randn(1, 1, *patch))
        assert len(outputs) == len(scales)
        for out, scale in zip(outputs, scales, strict=True):
            assert out.shape[2:] == tuple(int(p // s) for p, s in zip(patch, scale, strict=True))
        net.decoder.deep_supervision = False
        single = net(torch.randn(1, 1, *patch))
    assert isinstance(single, torch.Tensor) and single.shape == (1, 2, *patch)


@pytest.mark.parametrize("shape", [(1, 1, 40, 40, 40), (1, 1, 32, 32, 48), (1, 1, 16, 32, 32)])
def test_bad_patch_size_raises_before_any_compute(shape: tuple[int, ...]) -> None:
    net = make_net(init=False)
    calls = []
    net.encoder.register_forward_pre_hook(lambda *_: calls.append("encoder"))
    net.decoder.register_forward_pre_hook(lambda *_: calls.append("decoder"))
    with pytest.raises(ValueError, match="divisible by 32") as err:
        net(torch.randn(*shape))
    assert str(shape) in str(err.value) and "nearest valid sizes" in str(err.value)
    assert not calls
    with pytest.raises(ValueError, match="divisible by 32"):
        DynTransNet.check_patch_size(shape[2:])


def test_instance_constraints_raise_before_any_compute() -> None:
    dense = make_net(dmsa_bias="dense", window_size=4, init=False)  # windows of 4^3 need every axis >= 64
    vit = DynTransNet(1, 2, True, **VIT_TINY)
    for net, shape, match in (
        (dense, (1, 1, 32, 64, 64), r"dmsa_bias='dense'.*>= 16 x 4 = 64"),
        (vit, (1, 1, 48, 48, 48), r"exactly vit_img_size \(32, 32, 32\)"),
        (vit, (1, 1, 40, 32, 32), "divisible by 16"),
    ):
        calls = []
        net.encoder.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        with pytest.raises(ValueError, match=match) as err:
            net(torch.randn(*shape))
        assert str(shape) in str(err.value) and not calls
    DynTransNet.check_patch_size((32, 64, 64))  # the static (Swin) check knows nothing of the dense constraint
    with pytest.raises(ValueError, match="dense"):
        dense.check_patch_size((32, 64, 64))  # the instance's check does
    dense.check_patch_size((64, 64, 96))


def test_trainer_patch_check_uses_the_instance_configuration() -> None:
    swin, vit = make_net(init=False), DynTransNet(1, 2, True, **VIT_TINY)
    check_patch_size_for_network(swin, [32, 64, 64], STRIDES, where="plans X")
    check_patch_size_for_network(vit, [32, 32, 32], vit_strides(16), where="plans X")
    with pytest.raises(ValueError, match=r"plans X: .*vit_img_size"):
        check_patch_size_for_network(vit, [64, 64, 64], vit_strides(16), where="plans X")
    with pytest.raises(ValueError, match=r"plans X: .*needs strides"):
        check_patch_size_for_network(swin, [32, 64, 64], STRIDES[:-1], where="plans X")


def test_check_patch_size_names_nearest_valid_sizes() -> None:
    with pytest.raises(ValueError, match=r"40 -> 32 or 64, 16 -> 32, 64"):
        DynTransNet.check_patch_size((40, 16, 64))
    DynTransNet.check_patch_size([32, 64, 96])
    DynTransNet.check_patch_size(np.array([128, 128, 128]))
    DynTransNet.check_patch_size((48, 32, 32), encoder="vit", vit_patch_size=16)
    with pytest.raises(ValueError, match="3D patch size"):
        DynTransNet.check_patch_size((64, 64))


def test_bad_input_dims_and_channels() -> None:
    net = make_net(init=False)
    with pytest.raises(ValueError, match="5D input"):
        net(torch.randn(1, 32, 32, 32))
    with pytest.raises(ValueError, match="1 input channels"):
        net(torch.randn(1, 2, 32, 32, 32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strides": [[1, 1, 1]] + 4 * [[2, 2, 2]]}, "fixed topology"),
        ({"strides": [[1, 1, 1], [1, 2, 2]] + 4 * [[2, 2, 2]]}, "fixed topology"),
        ({"encoder": "cnn"}, "encoder must be one of"),
        ({"dmsa_bias": "row"}, "dmsa_bias must be one of"),
        ({"fusion": "add"}, "fusion must be one of"),
        ({"num_heads": (5, 2, 2, 4)}, "must divide the width of Swin stage 0"),
        ({"depths": (1, 1, 1)}, "4 entries"),
        ({"window_size": [2, 2, 2]}, "positive int"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"encoder": "vit"}, "needs vit_img_size"),
        ({**VIT_TINY, "vit_img_size": (40, 32, 32)}, "multiple of vit_patch_size"),
        ({**VIT_TINY, "vit_patch_size": 12}, "power of two"),
        ({**VIT_TINY, "vit_heads": 5}, "divide vit_dim"),
        ({**VIT_TINY, "strides": STRIDES}, "fixed topology"),
    ],
)
def test_invalid_constructor_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DynTransNet(1, 2, **{**MICRO, **kwargs})


def test_compute_conv_feature_map_size_is_monotonic() -> None:
    sizes = [(32, 32, 32), (32, 32, 64), (32, 64, 64), (64, 64, 64), (64, 64, 96), (96, 96, 96), (128, 128, 128)]
    _, full = get_model("dyntransnet").architecture([1.0, 1.0, 1.0], [128, 128, 128])
    for kwargs in (MICRO, TINY, full["arch_kwargs"]):  # built like the planner does (no init)
        net = DynTransNet(1, 3, True, **kwargs)
        values = [net.compute_conv_feature_map_size(s) for s in sizes]
        assert all(isinstance(v, int) and v > 0 for v in values)
        assert all(b > a for a, b in itertools.pairwise(values)), values
        for axis in range(3):  # growing a single axis never decreases the estimate
            grown = [
                net.compute_conv_feature_map_size(tuple(s if i != axis else s + 32 for i, s in enumerate(p)))
                for p in sizes
            ]
            assert all(g > v for g, v in zip(grown, values, strict=True))
        assert net.compute_conv_feature_map_size(np.array([64, 64, 64])) == values[3]
    # attention terms count: larger windows and the dense N x N bias cost more
    size = (128, 128, 128)
    small, large = DynTransNet(1, 2, **{**TINY, "window_size": 2}), DynTransNet(1, 2, **TINY)
    assert large.compute_conv_feature_map_size(size) > small.compute_conv_feature_map_size(size)
    dense = DynTransNet(1, 2, **{**TINY, "dmsa_bias": "dense"})
    none = DynTransNet(1, 2, **{**TINY, "dmsa_bias": "none"})
    assert dense.compute_conv_feature_map_size(size) > large.compute_conv_feature_map_size(size)
    assert large.compute_conv_feature_map_size(size) > none.compute_conv_feature_map_size(size)
    vit = DynTransNet(1, 2, **VIT_TINY)
    vit_values = [vit.compute_conv_feature_map_size(s) for s in sizes]
    assert all(b > a for a, b in itertools.pairwise(vit_values)), vit_values


def test_vit_option_tiny_shapes_and_gradients() -> None:
    torch.manual_seed(0)
    net = DynTransNet(1, 2, True, **VIT_TINY)
    net.apply(net.initialize)
    assert net.strides == vit_strides(16) == [[1, 1, 1]] + 4 * [[2, 2, 2]]
    assert net.encoder.output_channels == [6, 12, 24, 48, 48] and net.encoder.skip_layers == [1, 2, 3]
    assert net.encoder.num_tokens == 8
    outputs = net.train()(torch.randn(1, 1, 32, 32, 32))
    assert_ds_shapes(outputs, (32, 32, 32), n=4)  # UNETR levels /1, /2, /4, /8; bottleneck at /16
    sum(out.mean() for out in outputs).backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert all(m.weight.grad.abs().sum() > 0 for m in net.modules() if isinstance(m, KeySaliencyBias))
    net.decoder.deep_supervision = False
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def test_vit_option_with_dense_bias() -> None:
    # the token count is fixed by vit_img_size / vit_patch_size, so the literal N x N bias is well defined
    net = DynTransNet(1, 2, False, **{**VIT_TINY, "dmsa_bias": "dense"}).eval()
    dense = [m for m in net.modules() if isinstance(m, DenseSynthesizerBias)]
    assert len(dense) == 4 and all(m.num_tokens == 8 for m in dense)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def test_vit_default_skips_are_unetr_layers() -> None:
    net = DynTransNet(1, 2, encoder="vit", vit_img_size=(64, 64, 64), vit_dim=48, vit_heads=4)
    assert net.encoder.skip_layers == [3, 6, 9] and len(net.encoder.blocks) == 12
    assert [len(up) for up in net.encoder.skip_ups] == [5, 3, 1]  # ConvT + 2 x (ConvT, RM); ConvT + (ConvT, RM); ConvT


# ---------------------------------------------------------------------------------------------- planner
def test_registry_topology_and_planner() -> None:
    assert PLANNERS["DynTransNetPlanner"] is DynTransNetPlanner
    assert DynTransNetPlanner.default_plans_name() == "DynTransNetPlans"
    patch, arch = get_model("dyntransnet").architecture([3.0, 0.75, 0.75], [50, 190, 170])
    assert patch == [64, 192, 160] and all(p % 32 == 0 for p in patch)
    assert arch["network_class_name"] == "nnyseg.network_architecture.dyntransnet.DynTransNet"
    kwargs = arch["arch_kwargs"]
    assert kwargs["strides"] == STRIDES and kwargs["feature_size"] == 48 and kwargs["window_size"] == 7
    assert (kwargs["dmsa_bias"], kwargs["fusion"], kwargs["residual_module"]) == ("key", "fmm", True)
    _, tiny = get_model("dyntransnet").architecture([1.0, 1.0, 1.0], [32, 64, 64], "tiny")
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    assert {k: tiny["arch_kwargs"][k] for k in TINY} == expected
    json.dumps(arch)  # plain JSON


def test_registry_tiny_network_builds_and_runs() -> None:
    net, patch, _ = get_model("dyntransnet").build([32, 64, 64], preset="tiny")
    assert isinstance(net, DynTransNet) and patch == [32, 64, 64]
    assert sum(p.numel() for p in net.parameters()) < 5e6
    with torch.no_grad():
        assert_ds_shapes(net.eval()(torch.randn(1, 1, *patch)), tuple(patch))
    net, patch, _ = get_model("dyntransnet").build([40, 64, 70], preset="tiny")
    assert patch == [32, 64, 64]
