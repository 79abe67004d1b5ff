"""Conv-norm-act units and structurally re-parameterised convolutions (RepVGG style, any spatial dimension).

``RepConv`` trains with three parallel branches and folds them into one convolution for inference:

- a k-sized convolution with its norm,
- a 1x1(x1) convolution with its norm, zero-padded to k at the kernel centre when fused,
- an identity branch (a norm only, folded as a centred one-hot kernel) when C_in == C_out and the stride is 1.

With BatchNorm every branch carries its own BN and the fusion is exact in eval mode (BN with running statistics is
an affine map per channel). Norms that use per-sample statistics (InstanceNorm, GroupNorm) cannot be folded; for
them the branches are plain biased convolutions and a single norm follows their sum, which still fuses exactly but
keeps the norm at inference.

Fusion never changes the state dict. The training-time branches are the only persistent state; the fused kernel and
bias live in non-persistent buffers that :meth:`RepConv.switch_to_deploy` computes and ``forward`` then uses. A
deployed block re-fuses after every ``load_state_dict`` (a load post-hook), so a network switched to deploy mode
*before* its weights are loaded, as nnU-Net's predictor does (build, then ``load_state_dict`` once per fold into the
same network), always runs the fused form of the weights it holds. :meth:`RepConv.switch_to_train` drops the fused
buffers again.

References:
    Ding X. et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021 (``RepVGGBlock``).
    Wang C.-Y. et al., "YOLOv7", CVPR 2023 (``RepConv``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "ConvNormAct",
    "RepConv",
    "conv_dim",
    "count_inference_parameters",
    "fuse_reparam_modules",
    "to_tuple",
    "unfuse_reparam_modules",
]


def conv_dim(conv_op: type[nn.Module]) -> int:
    """Returns the number of spatial dimensions of a convolution class.

    Args:
        conv_op: ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (or a subclass).

    Raises:
        ValueError: If ``conv_op`` is not one of these.
    """
    for dim, op in ((3, nn.Conv3d), (2, nn.Conv2d), (1, nn.Conv1d)):
        if isinstance(conv_op, type) and issubclass(conv_op, op):
            return dim
    raise ValueError(f"conv_op must be nn.Conv1d, nn.Conv2d or nn.Conv3d, got {conv_op!r}")


def to_tuple(value: int | Sequence[int], dim: int, name: str) -> tuple[int, ...]:
    """Broadcasts an int to ``dim`` entries, or converts a sequence of ``dim`` entries to a tuple of ints.

    Args:
        value: An int or a sequence (list, tuple) of ints, e.g. one kernel-size entry of nnU-Net plans.
        dim: Number of spatial dimensions.
        name: Argument name used in the error message.

    Raises:
        ValueError: If the length is not ``dim`` or an entry is smaller than 1.
    """
    out = (int(value),) * dim if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != dim or any(v < 1 for v in out):
        raise ValueError(f"{name} must be a positive int or {dim} positive ints, got {value!r}")
    return out


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _numel(channels: int, size: Sequence[int]) -> int:
    return int(channels) * math.prod(int(s) for s in size)


class ConvNormAct(nn.Module):
    """Convolution with "same" padding, then an optional norm, then an optional nonlinearity.

    Unlike DNA's ``ConvDropoutNormReLU`` every submodule is registered under exactly one name.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size, an int or one entry per spatial axis. Padding is ``(k - 1) // 2`` per axis.
        conv_op: Convolution class; it fixes the spatial dimension.
        stride: Stride, an int or one entry per spatial axis.
        groups: Convolution groups.
        conv_bias: Whether the convolution has a bias.
        norm_op: Norm class called as ``norm_op(out_channels, **norm_op_kwargs)``; ``None`` for no norm.
        norm_op_kwargs: Keyword arguments of ``norm_op``.
        nonlin: Nonlinearity class; ``None`` for no nonlinearity.
        nonlin_kwargs: Keyword arguments of ``nonlin``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        *,
        conv_op: type[_ConvNd] = nn.Conv3d,
        stride: int | Sequence[int] = 1,
        groups: int = 1,
        conv_bias: bool = False,
        norm_op: type[nn.Module] | None = nn.BatchNorm3d,
        norm_op_kwargs: dict | None = None,
        nonlin: type[nn.Module] | None = nn.LeakyReLU,
        nonlin_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        dim = conv_dim(conv_op)
        kernel_size = to_tuple(kernel_size, dim, "kernel_size")
        self.stride = to_tuple(stride, dim, "stride")
        self.out_channels = out_channels
        self.conv = conv_op(
            in_channels,
            out_channels,
            kernel_size,
            stride=self.stride,
            padding=[(k - 1) // 2 for k in kernel_size],
            groups=groups,
            bias=conv_bias,
        )
        self.norm = None if norm_op is None else norm_op(out_channels, **(norm_op_kwargs or {}))
        self.nonlin = None if nonlin is None else nonlin(**(nonlin_kwargs or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.nonlin is not None:
            x = self.nonlin(x)
        return x

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements of the output (one map per convolution, as in DNA)."""
        return _numel(self.out_channels, [i // s for i, s in zip(input_size, self.stride, strict=True)])


def _fold_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, norm: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Folds an eval-mode BatchNorm into a preceding kernel; computed in float64.

    Args:
        weight: Kernel of shape ``(C_out, C_in / groups, *k)``.
        bias: Convolution bias or ``None``.
        norm: A ``_BatchNorm`` with running statistics, or ``None`` (nothing to fold).

    Returns:
        The folded kernel and bias (float64).
    """
    weight = weight.detach().double()
    bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device) if bias is None else bias
    bias = bias.detach().double()
    if norm is None:
        return weight, bias
    if not isinstance(norm, _BatchNorm) or norm.running_mean is None or norm.running_var is None:
        raise ValueError(f"only BatchNorm with running statistics can be folded into a conv, got {norm!r}")
    scale = torch.rsqrt(norm.running_var.detach().double() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach().double()
    shift = -norm.running_mean.detach().double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().double()
    view = (-1,) + (1,) * (weight.ndim - 1)
    return weight * scale.view(view), bias * scale + shift


class RepConv(nn.Module):
    """Re-parameterisable convolution: ``act(N_k(Conv_k(x)) + N_1(Conv_1(x)) [+ N_id(x)])``.

    After :meth:`switch_to_deploy` the block computes ``act(Conv_k'(x))`` with one biased convolution whose output
    equals the eval-mode output of the branched block. Fusion uses the BN running statistics and is for inference
    only: a deployed block raises in training mode. The branches stay registered (``state_dict()`` keys and values
    never change); the fused kernel and bias are the non-persistent buffers ``fused_weight`` and ``fused_bias``,
    recomputed after every ``load_state_dict`` while the block is deployed.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size; every entry must be odd (e.g. ``3`` or ``(1, 3, 3)``).
        conv_op: Convolution class; it fixes the spatial dimension.
        stride: Stride of both conv branches.
        groups: Convolution groups of all branches.
        use_identity: Whether to add the identity branch. ``None`` adds it when ``in_channels == out_channels`` and
            the stride is 1; ``True`` under other conditions raises ``ValueError``.
        norm_op: Norm class. A BatchNorm class gives one norm per branch (all folded at deploy time); any other class
            gives biased branch convolutions and one norm after their sum (kept at deploy time); ``None`` no norm.
        norm_op_kwargs: Keyword arguments of ``norm_op``.
        nonlin: Nonlinearity applied after the sum; ``None`` for none.
        nonlin_kwargs: Keyword arguments of ``nonlin``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        *,
        conv_op: type[_ConvNd] = nn.Conv3d,
        stride: int | Sequence[int] = 1,
        groups: int = 1,
        use_identity: bool | None = None,
        norm_op: type[nn.Module] | None = nn.BatchNorm3d,
        norm_op_kwargs: dict | None = None,
        nonlin: type[nn.Module] | None = nn.LeakyReLU,
        nonlin_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        dim = conv_dim(conv_op)
        self.conv_op = conv_op
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = to_tuple(kernel_size, dim, "kernel_size")
        self.stride = to_tuple(stride, dim, "stride")
        self.groups = groups
        if any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"RepConv needs odd kernel sizes for centred padding, got {self.kernel_size}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels ({in_channels}, {out_channels}) must be divisible by groups={groups}")
        identity_possible = in_channels == out_channels and all(s == 1 for s in self.stride)
        if use_identity is None:
            use_identity = identity_possible
        elif use_identity and not identity_possible:
            raise ValueError(
                "the identity branch needs in_channels == out_channels and stride 1, got "
                f"{in_channels} -> {out_channels}, stride {self.stride}"
            )

        # BN is affine at inference and folds into each branch; other norms stay after the sum.
        per_branch_norm = norm_op is not None and issubclass(norm_op, _BatchNorm)
        branch_kwargs = dict(
            conv_op=conv_op,
            stride=self.stride,
            groups=groups,
            conv_bias=not per_branch_norm,
            norm_op=norm_op if per_branch_norm else None,
            norm_op_kwargs=norm_op_kwargs,
            nonlin=None,
        )
        self.dense = ConvNormAct(in_channels, out_channels, self.kernel_size, **branch_kwargs)
        self.pointwise = ConvNormAct(in_channels, out_channels, 1, **branch_kwargs)
        if not use_identity:
            self.identity = None
        elif per_branch_norm:
            self.identity = norm_op(out_channels, **(norm_op_kwargs or {}))
        else:
            self.identity = nn.Identity()
        self.post_norm = None
        if norm_op is not None and not per_branch_norm:
            self.post_norm = norm_op(out_channels, **(norm_op_kwargs or {}))
        self.nonlin = nn.Identity() if nonlin is None else nonlin(**(nonlin_kwargs or {}))
        # Derived state only: never saved, so fusing does not change the checkpoint format.
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)
        self.register_load_state_dict_post_hook(_refresh_fused_after_load)

    @property
    def deployed(self) -> bool:
        """Whether ``forward`` uses the fused kernel (``fused_weight``, ``fused_bias``) instead of the branches."""
        return self.fused_weight is not None

    @property
    def num_branches(self) -> int:
        """Parallel branches at train time (2 or 3); 1 once deployed."""
        if self.deployed:
            return 1
        return 2 + (self.identity is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_weight is not None:
            if self.training:
                raise RuntimeError(
                    "a deployed RepConv is for inference only (its fused kernel holds the BN running statistics and "
                    "receives no gradients): call eval() for inference or switch_to_train() to train"
                )
            padding = [k // 2 for k in self.kernel_size]
            out = _CONV_FN[len(self.kernel_size)](
                x, self.fused_weight, self.fused_bias, self.stride, padding, 1, self.groups
            )
        else:
            out = self.dense(x) + self.pointwise(x)
            if self.identity is not None:
                out = out + self.identity(x)
        if self.post_norm is not None:
            out = self.post_norm(out)
        return self.nonlin(out)

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the kernel and bias of the single convolution equivalent to all branches (float64).

        Raises:
            ValueError: If a branch norm cannot be folded.
        """
        kernel, bias = _fold_norm(self.dense.conv.weight, self.dense.conv.bias, self.dense.norm)
        kernel_1, bias_1 = _fold_norm(self.pointwise.conv.weight, self.pointwise.conv.bias, self.pointwise.norm)
        pad = []
        for k in reversed(self.kernel_size):  # F.pad lists the last axis first
            pad += [k // 2, k // 2]
        kernel = kernel + F.pad(kernel_1, pad)
        bias = bias + bias_1
        if self.identity is not None:
            in_per_group = self.in_channels // self.groups
            eye = torch.zeros_like(kernel)
            centre = tuple(k // 2 for k in self.kernel_size)
            for c in range(self.out_channels):
                eye[(c, c % in_per_group, *centre)] = 1.0
            norm = self.identity if isinstance(self.identity, _BatchNorm) else None
            kernel_id, bias_id = _fold_norm(eye, None, norm)
            kernel = kernel + kernel_id
            bias = bias + bias_id
        return kernel, bias

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Folds all branches into one biased convolution that ``forward`` then uses.

        Idempotent. The branches and the state dict are unchanged; while deployed, the fused kernel is recomputed
        after every ``load_state_dict``. Call :meth:`refresh_fused` after changing weights in place by other means.
        """
        if not self.deployed:
            self.refresh_fused()

    @torch.no_grad()
    def refresh_fused(self) -> None:
        """(Re)computes the fused kernel and bias from the current branch weights and BN statistics."""
        reference = self.dense.conv.weight
        kernel, bias = self.get_equivalent_kernel_bias()
        kernel = kernel.to(device=reference.device, dtype=reference.dtype)
        bias = bias.to(device=reference.device, dtype=reference.dtype)
        old = self.fused_weight
        in_place = old is not None and old.dtype == kernel.dtype and old.device == kernel.device
        if in_place and not (old.is_inference() and not torch.is_inference_mode_enabled()):
            # In place, so that compiled graphs and other holders of the buffers see the new values.
            self.fused_weight.copy_(kernel)
            self.fused_bias.copy_(bias)
        else:
            self.fused_weight = kernel
            self.fused_bias = bias

    def switch_to_train(self) -> None:
        """Drops the fused kernel so that ``forward`` runs (and trains) the branches again; idempotent."""
        self.fused_weight = None
        self.fused_bias = None

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements: one output map per train-time branch (one once deployed)."""
        size = [i // s for i, s in zip(input_size, self.stride, strict=True)]
        return self.num_branches * _numel(self.out_channels, size)


def _refresh_fused_after_load(module: nn.Module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook of ``RepConv``: keeps a deployed block's fused kernel in step with its weights."""
    if module.deployed:
        module.refresh_fused()


def fuse_reparam_modules(model: nn.Module) -> int:
    """Calls :meth:`RepConv.switch_to_deploy` on every not yet deployed ``RepConv`` inside ``model``.

    Idempotent: a second call finds nothing left to fuse. The state dict of ``model`` is unchanged.

    Args:
        model: Any module.

    Returns:
        How many ``RepConv`` modules this call fused.
    """
    pending = [m for m in model.modules() if isinstance(m, RepConv) and not m.deployed]
    for module in pending:
        module.switch_to_deploy()
    return len(pending)


def unfuse_reparam_modules(model: nn.Module) -> int:
    """Calls :meth:`RepConv.switch_to_train` on every deployed ``RepConv`` inside ``model``.

    Args:
        model: Any module.

    Returns:
        How many ``RepConv`` modules this call switched back to their branches.
    """
    deployed = [m for m in model.modules() if isinstance(m, RepConv) and m.deployed]
    for module in deployed:
        module.switch_to_train()
    return len(deployed)


def count_inference_parameters(model: nn.Module) -> int:
    """Parameter count of the computation ``model`` runs now: a deployed ``RepConv`` counts its fused kernel and bias
    instead of its (kept, but unused) branches.

    Args:
        model: Any module.
    """
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, RepConv) and m.deployed:
            post_norm = 0 if m.post_norm is None else sum(p.numel() for p in m.post_norm.parameters())
            own = sum(p.numel() for p in m.parameters()) - post_norm - sum(p.numel() for p in m.nonlin.parameters())
            total += m.fused_weight.numel() + m.fused_bias.numel() - own
    return total
