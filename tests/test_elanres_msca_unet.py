"""ELANRes-MSCA-UNet: nnU-Net contract, ablation switches, MSCA modes, gradients and input validation (tiny, CPU)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from nnyseg.network_architecture.building_blocks.elan import ELANResBlock
from nnyseg.network_architecture.building_blocks.msca import MSCABlock, MSCAttention
from nnyseg.network_architecture.building_blocks.reparam import RepConv
from nnyseg.network_architecture.elanres_msca_unet import ELANResMSCAUNet, PlainConvBlock
from nnyseg.registry import get_model

FEATURES = (4, 8, 16)
ISO = {"kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]]}
ANISO = {"kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]]}
ABLATIONS = [(False, False), (False, True), (True, False), (True, True)]


def make_net(topology: dict = ISO, num_classes: int = 3, deep_supervision: bool = True, **kwargs) -> ELANResMSCAUNet:
    torch.manual_seed(0)
    net = ELANResMSCAUNet(
        input_channels=1,
        n_stages=3,
        features_per_stage=FEATURES,
        conv_op=nn.Conv3d,
        num_classes=num_classes,
        deep_supervision=deep_supervision,
        **topology,
        **kwargs,
    )
    net.apply(net.initialize)
    return net


def expected_shapes(patch: tuple[int, ...], strides: list[list[int]], num_classes: int) -> list[tuple[int, ...]]:
    """Deep-supervision output shapes (batch 1), highest resolution first, one per decoder stage."""
    shapes, size = [], list(patch)
    for stride in strides[:-1]:
        size = [s // st for s, st in zip(size, stride, strict=True)]
        shapes.append((1, num_classes, *size))
    return shapes


@pytest.mark.parametrize(
    ("topology", "patch"),
    [(ISO, (16, 16, 16)), (ISO, (8, 16, 24)), (ANISO, (8, 32, 32)), (ANISO, (4, 16, 24))],
    ids=["iso16", "iso_rect", "aniso8x32x32", "aniso_rect"],
)
def test_output_shapes_with_and_without_deep_supervision(topology, patch):
    net = make_net(topology).eval()
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        outputs = net(x)
        assert isinstance(outputs, list) and len(outputs) == 2  # n_stages - 1
        assert [tuple(o.shape) for o in outputs] == expected_shapes(patch, topology["strides"], 3)
        net.decoder.deep_supervision = False
        single = net(x)
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == (1, 3, *patch)
    assert torch.equal(single, outputs[0])  # no softmax, same head


def test_upsampled_deep_supervision_is_full_resolution():
    net = make_net(ANISO, ds_mode="upsample").eval()
    with torch.no_grad():
        outputs = net(torch.randn(1, 1, 8, 32, 32))
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 8, 32, 32)] * 2


def test_state_dict_keys_do_not_depend_on_deep_supervision():
    with_ds, without_ds = make_net(deep_supervision=True), make_net(deep_supervision=False)
    assert with_ds.state_dict().keys() == without_ds.state_dict().keys()
    assert len(with_ds.decoder.seg_layers) == 2
    without_ds.load_state_dict(with_ds.state_dict())
    # every module is registered under exactly one name (no DNA-style aliases, no decoder.encoder copy)
    all_names = list(with_ds.named_modules(remove_duplicate=False))
    assert len(all_names) == len(list(with_ds.named_modules()))


@pytest.mark.parametrize(("use_elanres", "use_msca"), ABLATIONS, ids=["unet", "msca", "elanres", "full"])
def test_every_ablation_builds_runs_and_trains(use_elanres, use_msca):
    net = make_net(ANISO, use_elanres=use_elanres, use_msca=use_msca).train()
    modules = list(net.modules())
    assert any(isinstance(m, ELANResBlock) for m in modules) == use_elanres
    assert any(isinstance(m, RepConv) for m in modules) == use_elanres
    assert any(isinstance(m, PlainConvBlock) for m in modules) == (not use_elanres)
    n_msca = sum(isinstance(m, MSCABlock) for m in modules)
    assert n_msca == (2 if use_msca else 0)  # stages 1 and 2 (msca_min_stage=1)
    assert not hasattr(net.encoder.stages[0], "msca")

    outputs = net(torch.randn(2, 1, 8, 32, 32))  # batch 2 for BN
    loss = sum(o.float().square().mean() for o in outputs)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize(
    "kwargs",
    [
        {"msca_mode": "strip3d", "drop_path_rate": 0.1},
        {"norm": "instance", "repconv_depth": 4, "msca_min_stage": 0},
        {"ds_mode": "upsample", "nonlin_negative_slope": 0.1},
    ],
    ids=["strip3d_droppath", "instance_depth4", "upsample"],
)
def test_options_get_finite_gradients_everywhere(kwargs):
    net = make_net(ISO, **kwargs).train()
    outputs = net(torch.randn(2, 1, 16, 16, 16))
    sum(o.mean() for o in outputs).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("mode", ["slice2d", "strip3d"])
def test_msca_modes(mode):
    net = make_net(ANISO, msca_mode=mode).eval()
    attention = [m for m in net.modules() if isinstance(m, MSCAttention)]
    assert len(attention) == 2 and all(a.mode == mode for a in attention)
    kernels = {
        tuple(c.kernel_size) for a in attention for c in a.modules() if isinstance(c, nn.Conv3d) and c.groups > 1
    }
    if mode == "slice2d":  # per-slice in-plane kernels only
        assert kernels == {(1, 5, 5), (1, 1, 7), (1, 7, 1), (1, 1, 11), (1, 11, 1), (1, 1, 21), (1, 21, 1)}
    else:
        assert {(5, 5, 5), (7, 1, 1), (11, 1, 1), (21, 1, 1), (1, 1, 21)} <= kernels
    with torch.no_grad():
        assert tuple(net(torch.randn(1, 1, 8, 32, 32))[0].shape) == (1, 3, 8, 32, 32)


def test_msca_slice2d_acts_per_slice():
    """In slice2d mode the attention of one slice does not depend on the other slices."""
    torch.manual_seed(0)
    attention = MSCAttention(3, mode="slice2d").eval()
    x = torch.randn(1, 3, 4, 12, 12)
    y = x.clone()
    y[:, :, 1:] = torch.randn_like(y[:, :, 1:])
    with torch.no_grad():
        assert torch.allclose(attention(x)[:, :, 0], attention(y)[:, :, 0])


def test_msca_block_layer_scale_init():
    block = MSCABlock(8, layer_scale_init=1e-2)
    assert torch.all(block.layer_scale1 == 1e-2) and torch.all(block.layer_scale2 == 1e-2)
    with pytest.raises(ValueError):
        MSCAttention(8, mode="volumetric")


def test_conv_feature_map_size_grows_with_patch_size():
    for topology in (ISO, ANISO):
        net = make_net(topology)
        sizes = [(8, 16, 16), (8, 32, 32), (16, 32, 32), (16, 64, 64), (32, 64, 64)]
        counts = [int(net.compute_conv_feature_map_size(s)) for s in sizes]
        assert all(a < b for a, b in itertools.pairwise(counts)), counts
    fused = make_net(ISO)
    before = fused.compute_conv_feature_map_size((16, 16, 16))
    fused.switch_to_deploy()
    assert 0 < fused.compute_conv_feature_map_size((16, 16, 16)) < before


def test_bad_patch_size_raises_before_compute():
    net = make_net(ANISO)

    def fail(*_):
        raise AssertionError("the encoder ran before the input was validated")

    net.encoder.register_forward_pre_hook(fail)
    with pytest.raises(ValueError, match=r"\(7, 32, 30\)") as info:
        net(torch.randn(1, 1, 7, 32, 30))
    message = str(info.value)
    assert "(2, 4, 4)" in message  # required divisors
    assert "6 or 8" in message and "28 or 32" in message  # nearest valid sizes
    with pytest.raises(ValueError, match="5D"):
        net(torch.randn(1, 8, 32, 32))
    with pytest.raises(ValueError, match="input channels"):
        net(torch.randn(1, 2, 8, 32, 32))


def test_check_patch_size_without_building():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert ELANResMSCAUNet.check_patch_size((8, 64, 64), strides) == (4, 8, 8)
    assert ELANResMSCAUNet.check_patch_size([8, 64, 64], tuple(map(tuple, strides))) == (4, 8, 8)
    with pytest.raises(ValueError, match=r"\(10, 64, 60\)"):
        ELANResMSCAUNet.check_patch_size((10, 64, 60), strides)
    with pytest.raises(ValueError, match=r"nearest valid 4$"):
        ELANResMSCAUNet.check_patch_size((2, 64, 64), strides)


@pytest.mark.parametrize(
    "override",
    [
        {"norm": "group"},
        {"msca_mode": "volumetric"},
        {"ds_mode": "average"},
        {"n_stages": 4},
        {"kernel_sizes": [[3, 3, 3], [2, 3, 3], [3, 3, 3]]},
        {"strides": [[1, 1], [2, 2], [2, 2]]},
        {"conv_op": nn.Conv2d},
        {"repconv_depth": 0},
        {"msca_min_stage": -1},
    ],
)
def test_invalid_arguments_raise_value_error(override):
    kwargs = dict(
        input_channels=1,
        n_stages=3,
        features_per_stage=FEATURES,
        conv_op=nn.Conv3d,
        num_classes=2,
        **ISO,
    )
    kwargs.update(override)
    with pytest.raises(ValueError):
        ELANResMSCAUNet(**kwargs)


def test_tuples_and_lists_are_equivalent():
    as_lists = make_net({"kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]]})
    as_tuples = make_net({"kernel_sizes": ((3, 3, 3),) * 3, "strides": ((1, 1, 1), (2, 2, 2), (2, 2, 2))})
    assert as_lists.encoder.strides == as_tuples.encoder.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    assert {k: v.shape for k, v in as_lists.state_dict().items()} == {
        k: v.shape for k, v in as_tuples.state_dict().items()
    }


def test_encoder_exposes_dna_contract():
    encoder = make_net(ANISO).encoder
    assert encoder.output_channels == list(FEATURES)
    assert encoder.strides == ANISO["strides"] and encoder.kernel_sizes == ANISO["kernel_sizes"]
    assert encoder.conv_op is nn.Conv3d and encoder.conv_bias is False
    assert encoder.norm_op is nn.BatchNorm3d and encoder.norm_op_kwargs["affine"] is True
    assert encoder.nonlin is nn.LeakyReLU and encoder.nonlin_kwargs["negative_slope"] == 0.01
    assert encoder.dropout_op is None and encoder.dropout_op_kwargs is None
    assert encoder.return_skips is True
    skips = encoder(torch.randn(2, 1, 8, 32, 32))
    assert [tuple(s.shape[1:]) for s in skips] == [(4, 8, 32, 32), (8, 8, 16, 16), (16, 4, 8, 8)]


def test_initialize_follows_nnunet():
    net = make_net(ISO)
    aggregation_norms = {id(m.fuse.norm) for m in net.modules() if isinstance(m, ELANResBlock)}
    assert aggregation_norms
    for m in net.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) and m.bias is not None:
            assert torch.all(m.bias == 0)
        if isinstance(m, nn.BatchNorm3d):
            expected = 0.0 if id(m) in aggregation_norms else 1.0  # zero-init residual branches
            assert torch.all(m.weight == expected) and torch.all(m.bias == 0)
    stem = net.get_submodule(net.keys_to_in_proj[0])
    fan_in = math.prod(stem.weight.shape[1:])
    assert abs(stem.weight.std().item() - math.sqrt(2 / (1 + 1e-4) / fan_in)) < 0.5 * math.sqrt(2 / fan_in)
    assert net.get_submodule(net.key_to_encoder) is net.encoder.stages


def test_build_from_plans_like_nnunet():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch_kwargs = json.loads(
        json.dumps(
            {
                "n_stages": 3,
                "features_per_stage": list(FEATURES),
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": ANISO["kernel_sizes"],
                "strides": ANISO["strides"],
                "use_msca": True,
                "msca_mode": "slice2d",
            }
        )
    )
    net = get_network_from_plans(
        "nnyseg.network_architecture.elanres_msca_unet.ELANResMSCAUNet",
        arch_kwargs,
        ["conv_op"],
        input_channels=1,
        output_channels=3,
        allow_init=True,
        deep_supervision=True,
    )
    assert isinstance(net, ELANResMSCAUNet) and net.encoder.conv_op is nn.Conv3d
    assert arch_kwargs["conv_op"] == "torch.nn.modules.conv.Conv3d"  # caller's dict untouched
    net.eval()
    x = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        outputs = net(x)
        assert isinstance(outputs, list) and len(outputs) == 2
        net.decoder.deep_supervision = False  # what nnUNetTrainer.set_deep_supervision_enabled does
        single = net(x)
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == (1, 3, 8, 32, 32)
    assert net.compute_conv_feature_map_size((8, 32, 32)) > 0


@pytest.mark.parametrize("in_channels", [8, 6], ids=["identity_shortcut", "projection_shortcut"])
def test_fresh_elanres_block_is_its_shortcut(in_channels):
    torch.manual_seed(0)
    block = ELANResBlock(in_channels, 8, 3).eval()
    x = torch.randn(2, in_channels, 6, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), block.shortcut(x), rtol=0, atol=0)
    assert not torch.equal(ELANResBlock(in_channels, 8, 3, zero_init_residual=False).eval()(x), block.shortcut(x))


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_briefly_trained_network_keeps_finite_half_precision_logits(norm):
    """nnU-Net's predictor accumulates logits x Gaussian (peak 10) in float16: an under-trained BatchNorm network
    whose residual branches start at full weight reached |logit| ~1e4 in eval mode and aborted prediction."""
    torch.manual_seed(0)
    net, patch, _ = get_model("elanres_msca").build(
        [24, 40, 48], spacing=[8.0, 6.0, 6.0], preset="tiny", num_classes=3, overrides={"norm": norm}
    )  # the end-to-end tests' phantom configuration
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.randn(2, 1, *patch)
    for _ in range(2):  # the end-to-end tests' schedule: running statistics far from converged
        optimizer.zero_grad()
        sum(o.float().mean() for o in net.train()(x)).backward()
        optimizer.step()
    net.eval().decoder.deep_supervision = False
    with torch.no_grad():
        logits = net(x)
    assert logits.abs().max() * 10 < torch.finfo(torch.half).max / 10  # a tenfold margin below overflow


def test_zero_initialised_residual_branch_learns():
    net = make_net(ISO).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)  # nnU-Net's optimiser
    x, target = torch.randn(2, 1, 8, 32, 32), torch.randn(2, 3, 8, 32, 32)
    block = net.encoder.stages[1].block
    before = [p.detach().clone() for p in block.chain.parameters()]
    for _ in range(3):
        optimizer.zero_grad()
        (net(x)[0] - target).square().mean().backward()
        optimizer.step()
    assert block.fuse.norm.weight.abs().max() > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, block.chain.parameters(), strict=True))
