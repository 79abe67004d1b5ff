"""RepConv structural re-parameterisation: fused == unfused in eval mode, for single blocks and the whole network."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nnyseg.network_architecture.building_blocks.elan import ELANResBlock
from nnyseg.network_architecture.building_blocks.reparam import RepConv, fuse_reparam_modules
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


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
    assert _n_params(block) < n_before
    assert not any(isinstance(m, _BatchNorm) for m in block.modules())
    assert block.fused.bias is not None and tuple(block.fused.kernel_size) == block.kernel_size


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
    assert _n_params(net) < n_params
    for m in net.modules():
        if isinstance(m, RepConv):
            assert not any(isinstance(sub, _BatchNorm) for sub in m.modules())
