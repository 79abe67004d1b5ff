"""RepConv structural re-parameterisation: fused == unfused in eval mode, for single blocks and the whole network."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nnyseg.network_architecture.building_blocks.elan import ELANResBlock
from nnyseg.network_architecture.building_blocks.reparam import (
    RepConv,
    count_inference_parameters,
    fuse_reparam_modules,
    unfuse_reparam_modules,
)
from nnyseg.network_architecture.elanres_msca_unet import ELANResMSCAUNet

TOL = 1e-4


def _randomize_norms(module: nn.Module, seed: int = 0) -> None:
    """Gives every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, _BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) - 0.5)


def _full_residual_branches(net: nn.Module) -> None:
    """Unit aggregation norms: the ELANRes blocks start as their shortcut (zero-init), which would hide their RepConv
    chains from a fusion test."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ELANResBlock):
                m.fuse.norm.weight.fill_(1.0)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _branch_calls(module: nn.Module, x: torch.Tensor) -> int:
    """Runs ``module(x)`` and counts the calls of the submodules of every RepConv's training-time branches."""
    calls = []
    handles = [
        sub.register_forward_hook(lambda *_: calls.append(1))
        for m in module.modules()
        if isinstance(m, RepConv)
        for branch in (m.dense, m.pointwise, m.identity)
        if branch is not None
        for sub in branch.modules()
    ]
    try:
        module(x)
    finally:
        for h in handles:
            h.remove()
    return len(calls)


@pytest.mark.parametrize("kernel_size", [3, (1, 3, 3)])
@pytest.mark.parametrize(("in_ch", "out_ch"), [(6, 6), (4, 6)], ids=["identity", "no_identity"])
def test_repconv_fused_equals_unfused(kernel_size, in_ch, out_ch):
    torch.manual_seed(0)
    block = RepConv(in_ch, out_ch, kernel_size)
    assert (block.identity is not None) == (in_ch == out_ch)
    _randomize_norms(block)
    block.eval()
    x = torch.randn(2, in_ch, 5, 7, 6)
    with torch.no_grad():
        reference = block(x)
        n_before = _n_params(block)
        block.switch_to_deploy()
        fused = block(x)
    assert block.deployed
    assert fused.shape == reference.shape
    assert (fused - reference).abs().max().item() < TOL
    # The branches stay (the state dict is the checkpoint format) but are no longer run: one biased k-sized conv.
    assert _n_params(block) == n_before
    assert tuple(block.fused_weight.shape) == (out_ch, in_ch, *block.kernel_size)
    assert tuple(block.fused_bias.shape) == (out_ch,)
    assert count_inference_parameters(block) == block.fused_weight.numel() + out_ch < n_before
    assert _branch_calls(block, x) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2),
        dict(in_channels=6, out_channels=6, kernel_size=(1, 3, 3), groups=2),
        dict(in_channels=6, out_channels=6, kernel_size=3, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}),
    ],
    ids=["stride2", "groups2", "instance_norm_after_sum"],
)
def test_repconv_fused_equals_unfused_variants(kwargs):
    torch.manual_seed(1)
    block = RepConv(**kwargs)
    _randomize_norms(block)
    with torch.no_grad():
        for p in block.parameters():  # non-zero conv biases and norm affines where present
            p.add_(0.1 * torch.randn_like(p))
    block.eval()
    x = torch.randn(2, kwargs["in_channels"], 6, 8, 8)
    with torch.no_grad():
        reference = block(x)
        block.switch_to_deploy()
        assert (block(x) - reference).abs().max().item() < TOL


def test_repconv_switch_is_idempotent_and_counted():
    torch.manual_seed(2)
    model = nn.Sequential(RepConv(4, 4, 3), RepConv(4, 8, (1, 3, 3)), nn.Conv3d(8, 2, 1))
    _randomize_norms(model)
    model.eval()
    x = torch.randn(1, 4, 4, 6, 6)
    with torch.no_grad():
        reference = model(x)
        assert fuse_reparam_modules(model) == 2
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert fuse_reparam_modules(model) == 0
        model[0].switch_to_deploy()
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert (model(x) - reference).abs().max().item() < TOL


def test_repconv_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="odd"):
        RepConv(4, 4, (2, 3, 3))
    with pytest.raises(ValueError, match="identity"):
        RepConv(4, 6, 3, use_identity=True)
    with pytest.raises(ValueError, match="identity"):
        RepConv(4, 4, 3, stride=2, use_identity=True)


def test_elanres_block_fuses_exactly():
    torch.manual_seed(3)
    block = ELANResBlock(6, 8, (1, 3, 3), repconv_depth=4)
    _randomize_norms(block)
    block.eval()
    x = torch.randn(2, 6, 4, 8, 8)
    with torch.no_grad():
        reference = block(x)
        assert fuse_reparam_modules(block) == 4
        assert (block(x) - reference).abs().max().item() < TOL


def _warm_up_statistics(net: nn.Module, shape: tuple[int, ...], seed: int) -> None:
    """Fills the BN running statistics with realistic values, then perturbs the affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            m.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(shape, generator=gen))
        for m in net.modules():
            if isinstance(m, _BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_mean.add_(0.1 * torch.randn(m.num_features, generator=gen))


@pytest.mark.parametrize(
    ("patch", "kernels", "strides", "msca_mode"),
    [
        ((16, 16, 16), [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "slice2d"),
        ((8, 32, 32), [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], "strip3d"),
    ],
    ids=["isotropic", "anisotropic"],
)
def test_network_fused_equals_unfused(patch, kernels, strides, msca_mode):
    torch.manual_seed(4)
    net = ELANResMSCAUNet(1, 3, (4, 8, 16), nn.Conv3d, kernels, strides, 3, deep_supervision=True, msca_mode=msca_mode)
    net.apply(net.initialize)
    _full_residual_branches(net)
    _warm_up_statistics(net, (2, 1, *patch), seed=5)
    net.eval()
    x = torch.randn(1, 1, *patch)
    n_repconv = sum(isinstance(m, RepConv) for m in net.modules())
    n_params = _n_params(net)
    with torch.no_grad():
        reference = net(x)
        assert not net.deployed
        assert net.switch_to_deploy() == n_repconv > 0
        assert net.deployed
        fused = net(x)
        state = {k: v.clone() for k, v in net.state_dict().items()}
        assert net.switch_to_deploy() == 0
        assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
        again = net(x)
    assert len(fused) == len(reference) == 2
    for a, b, c in zip(reference, fused, again, strict=True):
        assert (a - b).abs().max().item() < TOL
        assert torch.equal(b, c)
    assert _n_params(net) == n_params
    assert count_inference_parameters(net) < n_params
    with torch.no_grad():
        assert _branch_calls(net, x) == 0  # no branch conv or BN of any RepConv runs once deployed


def _warmed_net(seed: int) -> ELANResMSCAUNet:
    """A small network whose weights and BN statistics depend on ``seed`` (as two folds of one model would)."""
    torch.manual_seed(seed)
    kernels, strides = [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    net = ELANResMSCAUNet(1, 3, (4, 8, 16), nn.Conv3d, kernels, strides, 2, deep_supervision=False)
    net.apply(net.initialize)
    _full_residual_branches(net)
    _warm_up_statistics(net, (2, 1, 8, 16, 16), seed=seed + 100)
    return net.eval()


def test_fusion_keeps_the_state_dict():
    """Fusing is not a checkpoint format: same keys and values before and after, nothing fused is saved."""
    net = _warmed_net(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert net.switch_to_deploy() > 0
    after = net.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("fused" in k for k in after)
    assert all(m.fused_weight is not None for m in net.modules() if isinstance(m, RepConv))
    # A deployed network loads an unfused checkpoint strictly, and vice versa.
    _warmed_net(1).load_state_dict(after)
    net.load_state_dict(before)


def test_loading_weights_into_a_deployed_network_refuses_them():
    """nnU-Net's predictor: build (deployed), then load fold after fold into the same network."""
    x = torch.randn(1, 1, 8, 16, 16)
    net = _warmed_net(0)
    net.switch_to_deploy()
    for seed in (1, 2):  # two "folds" with different weights and BN statistics
        fold = _warmed_net(seed)
        with torch.no_grad():
            unfused = fold(x)
        fresh = _warmed_net(0)
        fresh.load_state_dict(fold.state_dict())
        fresh.switch_to_deploy()
        net.load_state_dict(fold.state_dict())
        assert net.deployed
        with torch.no_grad():
            loaded, fresh_out = net(x), fresh(x)
            assert _branch_calls(net, x) == 0
        assert torch.equal(loaded, fresh_out)
        assert (loaded - unfused).abs().max().item() < TOL
    # A stale fused kernel would give fold 1's output: make sure the folds really differ.
    with torch.no_grad():
        assert (_warmed_net(1)(x) - loaded).abs().max().item() > 100 * TOL


def test_deployed_repconv_is_inference_only_and_switches_back():
    torch.manual_seed(5)
    block = RepConv(4, 4, 3)
    _randomize_norms(block)
    block.eval()
    x = torch.randn(2, 4, 4, 6, 6)
    with torch.no_grad():
        reference = block(x)
    block.switch_to_deploy()
    block.train()
    with pytest.raises(RuntimeError, match="inference only"):
        block(x)
    assert unfuse_reparam_modules(block) == 1 and not block.deployed
    assert unfuse_reparam_modules(block) == 0
    assert block.fused_weight is None and block.fused_bias is None
    block(x).sum().backward()  # the branches train again
    assert all(p.grad is not None for p in block.parameters())
    block.eval()
    with torch.no_grad():
        unfused = block(x)  # the training step moved the BN statistics
        assert not torch.equal(unfused, reference)
        block.switch_to_deploy()
        assert (block(x) - unfused).abs().max().item() < TOL


def test_fused_buffers_follow_dtype_and_refresh_on_request():
    torch.manual_seed(6)
    block = RepConv(3, 5, (1, 3, 3))
    _randomize_norms(block)
    block.eval().switch_to_deploy()
    block.double()
    assert block.fused_weight.dtype == torch.float64
    x = torch.randn(1, 3, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        block.dense.conv.weight.mul_(2)  # an in-place edit is not a load: refresh by hand
        block.refresh_fused()
        fused = block(x)
        block.switch_to_train()
        assert (block(x) - fused).abs().max().item() < 1e-10


def test_fusion_under_inference_mode_then_loading_outside_it():
    """nnU-Net predicts under torch.inference_mode(); buffers made there must not break a later load outside it."""
    net = _warmed_net(0)
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.inference_mode():
        net.switch_to_deploy()
        net(x)
    fold = _warmed_net(1)
    net.load_state_dict(fold.state_dict())
    with torch.no_grad():
        assert (net(x) - fold(x)).abs().max().item() < TOL
    with torch.inference_mode():
        net.load_state_dict(_warmed_net(2).state_dict())
        assert (net(x) - _warmed_net(2)(x)).abs().max().item() < TOL
