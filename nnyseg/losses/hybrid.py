"""The losses of ELANRes-MSCA-UNet: soft Dice, Tversky, (B)CE and their hybrids, plus its deep-supervision schedule.

Every loss takes raw logits ``net_output`` of shape ``(b, c, x, y(, z))`` and works in one of two modes, chosen
explicitly with ``use_sigmoid`` (never guessed from shapes):

* **region-based** (``use_sigmoid=True``): probabilities ``p = sigmoid(logits)``; the target is nnU-Net's region
  encoding, one binary channel per region, shape ``(b, c, x, y(, z))`` (bool, int or float). Every channel is a
  foreground region, so overlap terms average over all ``c`` channels. The paper's two binary stages (liver, then
  tumour) are this mode with one region, where BCE is exactly the paper's binary cross-entropy.
* **label-based** (``use_sigmoid=False``): probabilities ``p = softmax(logits)`` over the ``c >= 2`` classes; the
  target is an integer label map of shape ``(b, 1, x, y(, z))`` or ``(b, x, y(, z))``. Overlap terms skip the
  background channel 0 by default (nnU-Net's convention) and "BCE" is the categorical cross-entropy, the
  multi-class form of the binary cross-entropy.

With ``g`` the one-hot (label mode) or region (region mode) target, sums run over the spatial axes per sample and
channel, or also over the batch with ``batch_dice=True`` (nnU-Net's plans entry of the same name), and the loss is
the mean over the remaining (sample,) channel entries:

* soft Dice: ``L = 1 - (2 TP + s) / (sum(p) + sum(g) + s)`` with ``TP = sum(p g)``; with ``squared=True`` the
  denominator is ``sum(p^2) + sum(g^2) + s``.
* Tversky: ``L = 1 - (TP + s) / (TP + alpha FP + beta FN + s)`` with ``FP = sum(p (1 - g))`` and
  ``FN = sum((1 - p) g)``; ``alpha = 0.3`` weighs false positives, ``beta = 0.7`` false negatives (Salehi et al.
  2017). ``alpha = beta = 0.5`` gives the soft Dice.
* HybridLoss1 ``= w_dice L_Dice + w_bce L_BCE`` and HybridLoss2 ``= w_tversky L_Tversky + w_bce L_BCE``, both weights
  1 by default (the paper does not give its balancing weight).

The smoothing term ``s`` (default 1e-5, nnU-Net's) keeps the ratio defined for empty targets and predictions. With the
defaults, region-mode HybridLoss1 is nnU-Net's ``DC_and_BCE_loss`` plus 1 (nnU-Net returns ``-Dice`` instead of
``1 - Dice``; the gradients are identical). Ignore labels are not supported.

Deep supervision: ``L = L(y_0) + alpha_e (L(y_1) + ... + L(y_3))`` with ``alpha_e = 0.4 * 0.8 ** floor(e / 30)``;
output 0 is the full-resolution one (the paper's "loss3"). The weights are not normalised, as in the paper; see
:func:`decaying_deep_supervision_weights`.

Which of these defaults the paper states and where the others come from (the public pipeline
``lee-zq/3DUNet-Pytorch``, called "the reference pipeline" below): docs/losses.md and docs/elanres_msca.md.

References:
    Song Z., Wu W., Wu S., Sensors 25(6):1814, 2025 (section 2.3, Table 2). doi:10.3390/s25061814.
    Salehi S. S. M. et al., "Tversky loss function for image segmentation using 3D fully convolutional deep
    networks", MLMI 2017.
"""

from __future__ import annotations

import math

import torch
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
from nnunetv2.utilities.ddp_allgather import AllGatherGrad
from nnunetv2.utilities.helpers import softmax_helper_dim1
from torch import nn

__all__ = [
    "LOSS_NAMES",
    "BCELoss",
    "HybridLoss1",
    "HybridLoss2",
    "SoftDiceLoss",
    "TverskyLoss",
    "decaying_deep_supervision_weights",
    "make_loss",
]

#: Names accepted by :func:`make_loss`: the five losses compared in the paper's Table 2.
LOSS_NAMES = ("dice", "tversky", "bce", "hybrid1", "hybrid2")


def _check_shapes(net_output: torch.Tensor, target: torch.Tensor, use_sigmoid: bool, name: str) -> None:
    """Raises a ValueError unless ``target`` fits ``net_output`` in the selected mode."""
    if net_output.ndim < 3:
        raise ValueError(f"{name}: net_output must be (b, c, x, y(, z)), got shape {tuple(net_output.shape)}")
    b, c, *spatial = net_output.shape
    if use_sigmoid:
        if tuple(target.shape) != tuple(net_output.shape):
            raise ValueError(
                f"{name} (region-based, sigmoid): target must be the one-hot region map of the output's shape "
                f"{tuple(net_output.shape)}, got {tuple(target.shape)}"
            )
        return
    if c < 2:
        raise ValueError(
            f"{name} (label-based, softmax) needs at least 2 output channels (background and foreground), got {c}; "
            "use use_sigmoid=True for a single region"
        )
    expected = ((b, 1, *spatial), (b, *spatial))
    if tuple(target.shape) not in expected:
        raise ValueError(
            f"{name} (label-based, softmax): target must be an integer label map of shape {expected[0]} or "
            f"{expected[1]}, got {tuple(target.shape)}"
        )


def _one_hot(net_output: torch.Tensor, target: torch.Tensor, use_sigmoid: bool) -> torch.Tensor:
    """The float target of the output's shape: the regions as given, or the one-hot encoding of a label map."""
    with torch.no_grad():
        if use_sigmoid:
            return target.to(torch.float32)
        labels = target.reshape(target.shape[0], 1, *target.shape[-(net_output.ndim - 2) :]).long()
        onehot = torch.zeros(net_output.shape, device=net_output.device, dtype=torch.float32)
        return onehot.scatter_(1, labels, 1)


class _OverlapLoss(nn.Module):
    """Shared set-up of the overlap losses (Dice, Tversky): mode, reduction axes, background handling."""

    def __init__(
        self, *, use_sigmoid: bool, batch_dice: bool, do_bg: bool | None, smooth: float, ddp: bool, name: str
    ) -> None:
        super().__init__()
        if smooth < 0:
            raise ValueError(f"{name}: smooth must be >= 0, got {smooth}")
        self.use_sigmoid = bool(use_sigmoid)
        self.batch_dice = bool(batch_dice)
        # Region channels are all foreground; label channel 0 is the background.
        self.do_bg = self.use_sigmoid if do_bg is None else bool(do_bg)
        self.smooth = float(smooth)
        self.ddp = bool(ddp)
        self._name = name

    def _probabilities(self, net_output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(net_output) if self.use_sigmoid else softmax_helper_dim1(net_output)

    def _sums(self, net_output: torch.Tensor, target: torch.Tensor, squared: bool = False) -> tuple[torch.Tensor, ...]:
        """``(sum(p g), sum(p), sum(g))`` (or of squares) per sample and channel, or per channel for batch Dice."""
        _check_shapes(net_output, target, self.use_sigmoid, self._name)
        p = self._probabilities(net_output)
        g = _one_hot(net_output, target, self.use_sigmoid)
        if not self.do_bg:
            p, g = p[:, 1:], g[:, 1:]
        axes = tuple(range(2, p.ndim))
        tp = (p * g).sum(axes, dtype=torch.float32)
        sum_p = (p * p if squared else p).sum(axes, dtype=torch.float32)
        sum_g = g.sum(axes, dtype=torch.float32)  # g is binary: g^2 == g
        sums = (tp, sum_p, sum_g)
        if self.batch_dice:
            if self.ddp:
                sums = tuple(AllGatherGrad.apply(s).sum(0, dtype=torch.float32) for s in sums)
            sums = tuple(s.sum(0, dtype=torch.float32) for s in sums)
        return sums


class SoftDiceLoss(_OverlapLoss):
    """Soft Dice loss ``1 - (2 TP + s) / (sum(p) + sum(g) + s)``, averaged over channels (and samples).

    The plain form is nnU-Net's ``MemoryEfficientSoftDiceLoss`` shifted by 1; ``squared=True`` uses
    ``sum(p^2) + sum(g^2)`` in the denominator, as the reference pipeline does.

    Args:
        use_sigmoid: True for region-based outputs (sigmoid; target one binary map per channel), False for
            label-based outputs (softmax; integer label-map target).
        batch_dice: Sum over the batch too (one Dice per channel) instead of one Dice per sample and channel.
        do_bg: Include channel 0. ``None``: True for regions (all foreground), False for labels (background).
        smooth: The smoothing term ``s`` added to numerator and denominator.
        squared: Square ``p`` (and ``g``) in the denominator.
        ddp: Gather the batch-Dice sums across DDP workers (nnU-Net passes ``self.is_ddp``).

    Shapes:
        ``net_output``: logits ``(b, c, x, y(, z))``. ``target``: ``(b, c, ...)`` regions or ``(b, 1, ...)`` labels.
        Returns a scalar in ``[0, 1]``.

    Raises:
        ValueError: For a negative ``smooth`` here, and in ``forward`` for a target that does not fit the mode.
    """

    def __init__(
        self,
        *,
        use_sigmoid: bool,
        batch_dice: bool = False,
        do_bg: bool | None = None,
        smooth: float = 1e-5,
        squared: bool = False,
        ddp: bool = False,
    ) -> None:
        super().__init__(
            use_sigmoid=use_sigmoid, batch_dice=batch_dice, do_bg=do_bg, smooth=smooth, ddp=ddp, name="SoftDiceLoss"
        )
        self.squared = bool(squared)
        self.nnunet_dice = (
            None
            if self.squared
            else MemoryEfficientSoftDiceLoss(
                apply_nonlin=torch.sigmoid if self.use_sigmoid else softmax_helper_dim1,
                batch_dice=batch_dice,
                do_bg=self.do_bg,
                smooth=smooth,
                ddp=ddp,
            )
        )

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.nnunet_dice is not None:
            _check_shapes(net_output, target, self.use_sigmoid, self._name)
            if not self.use_sigmoid and target.ndim != net_output.ndim:
                target = target.unsqueeze(1)
            return 1 + self.nnunet_dice(net_output, target)  # nnU-Net returns -Dice
        tp, sum_p, sum_g = self._sums(net_output, target, squared=True)
        dice = (2 * tp + self.smooth) / (sum_p + sum_g + self.smooth).clamp_min(1e-8)
        return 1 - dice.mean()


class TverskyLoss(_OverlapLoss):
    """Tversky loss ``1 - (TP + s) / (TP + alpha FP + beta FN + s)``, averaged over channels (and samples).

    ``TP = sum(p g)``, ``FP = sum(p (1 - g)) = sum(p) - TP`` and ``FN = sum((1 - p) g) = sum(g) - TP``. With
    ``alpha = 0.3 < beta = 0.7`` a missed voxel costs more than a false alarm, which favours recall on small
    targets. ``alpha = beta = 0.5`` and ``s = 0`` give the soft Dice.

    Args:
        use_sigmoid: True for region-based outputs (sigmoid), False for label-based outputs (softmax).
        alpha: Weight of the false positives.
        beta: Weight of the false negatives.
        batch_dice: Sum over the batch too (one index per channel).
        do_bg: Include channel 0. ``None``: True for regions, False for labels.
        smooth: The smoothing term ``s`` added to numerator and denominator.
        ddp: Gather the batch sums across DDP workers.

    Shapes:
        As :class:`SoftDiceLoss`. Returns a scalar in ``[0, 1]``.

    Raises:
        ValueError: For negative weights or ``smooth``, or (in ``forward``) a target that does not fit the mode.
    """

    def __init__(
        self,
        *,
        use_sigmoid: bool,
        alpha: float = 0.3,
        beta: float = 0.7,
        batch_dice: bool = False,
        do_bg: bool | None = None,
        smooth: float = 1e-5,
        ddp: bool = False,
    ) -> None:
        super().__init__(
            use_sigmoid=use_sigmoid, batch_dice=batch_dice, do_bg=do_bg, smooth=smooth, ddp=ddp, name="TverskyLoss"
        )
        if alpha < 0 or beta < 0 or alpha + beta == 0:
            raise ValueError(f"TverskyLoss: alpha and beta must be >= 0 and not both 0, got {alpha}, {beta}")
        self.alpha = float(alpha)
        self.beta = float(beta)

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tp, sum_p, sum_g = self._sums(net_output, target)
        fp, fn = sum_p - tp, sum_g - tp
        index = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth).clamp_min(1e-8)
        return 1 - index.mean()


class BCELoss(nn.Module):
    """Voxel-wise cross-entropy on logits, averaged over all voxels (and channels).

    Region-based: binary cross-entropy ``-mean(g log p + (1 - g) log(1 - p))`` with ``p = sigmoid(logits)``
    (``nn.BCEWithLogitsLoss``). Label-based: categorical cross-entropy ``-mean(log softmax(logits)[label])``
    (nnU-Net's ``RobustCrossEntropyLoss``), which for two classes is the binary cross-entropy of the logit difference.

    Args:
        use_sigmoid: True for region-based outputs (sigmoid, BCE), False for label-based outputs (softmax, CE).

    Shapes:
        As :class:`SoftDiceLoss`. Returns a non-negative scalar.

    Raises:
        ValueError: In ``forward``, for a target that does not fit the mode.
    """

    def __init__(self, *, use_sigmoid: bool) -> None:
        super().__init__()
        self.use_sigmoid = bool(use_sigmoid)
        self.loss = nn.BCEWithLogitsLoss() if self.use_sigmoid else RobustCrossEntropyLoss()

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(net_output, target, self.use_sigmoid, "BCELoss")
        if self.use_sigmoid:
            return self.loss(net_output, target.float())
        if target.ndim != net_output.ndim:
            target = target.unsqueeze(1)
        return self.loss(net_output, target)


class _HybridLoss(nn.Module):
    """``weight_overlap * overlap + weight_bce * BCE``; a term with weight 0 is not computed."""

    def __init__(self, overlap: nn.Module, bce: BCELoss, weight_overlap: float, weight_bce: float, name: str) -> None:
        super().__init__()
        if weight_overlap < 0 or weight_bce < 0 or weight_overlap + weight_bce == 0:
            raise ValueError(f"{name}: weights must be >= 0 and not both 0, got {weight_overlap}, {weight_bce}")
        self.overlap = overlap
        self.bce = bce
        self.weight_overlap = float(weight_overlap)
        self.weight_bce = float(weight_bce)

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = 0.0
        if self.weight_overlap:
            total = total + self.weight_overlap * self.overlap(net_output, target)
        if self.weight_bce:
            total = total + self.weight_bce * self.bce(net_output, target)
        return total


class HybridLoss1(_HybridLoss):
    """HybridLoss1 = ``weight_dice * L_Dice + weight_bce * L_BCE`` (the paper's choice for both stages).

    Args:
        use_sigmoid: True for region-based outputs (sigmoid, BCE), False for label-based outputs (softmax, CE).
        batch_dice: Batch Dice (see :class:`SoftDiceLoss`).
        weight_dice: Weight of the Dice term.
        weight_bce: Weight of the cross-entropy term (the paper's balancing weight; 1 in the reference pipeline).
        smooth: Dice smoothing term.
        squared: Squared Dice denominator.
        do_bg: Include channel 0 in the Dice. ``None``: True for regions, False for labels.
        ddp: Gather the batch-Dice sums across DDP workers.

    Shapes:
        As :class:`SoftDiceLoss`.

    Raises:
        ValueError: For negative weights (or both 0), or a bad target in ``forward``.
    """

    def __init__(
        self,
        *,
        use_sigmoid: bool,
        batch_dice: bool = False,
        weight_dice: float = 1.0,
        weight_bce: float = 1.0,
        smooth: float = 1e-5,
        squared: bool = False,
        do_bg: bool | None = None,
        ddp: bool = False,
    ) -> None:
        dice = SoftDiceLoss(
            use_sigmoid=use_sigmoid, batch_dice=batch_dice, do_bg=do_bg, smooth=smooth, squared=squared, ddp=ddp
        )
        super().__init__(dice, BCELoss(use_sigmoid=use_sigmoid), weight_dice, weight_bce, "HybridLoss1")


class HybridLoss2(_HybridLoss):
    """HybridLoss2 = ``weight_tversky * L_Tversky + weight_bce * L_BCE``.

    Args:
        use_sigmoid: True for region-based outputs (sigmoid, BCE), False for label-based outputs (softmax, CE).
        batch_dice: Sum the Tversky terms over the batch too.
        alpha: Tversky weight of the false positives.
        beta: Tversky weight of the false negatives.
        weight_tversky: Weight of the Tversky term.
        weight_bce: Weight of the cross-entropy term.
        smooth: Tversky smoothing term.
        do_bg: Include channel 0 in the Tversky term. ``None``: True for regions, False for labels.
        ddp: Gather the batch sums across DDP workers.

    Shapes:
        As :class:`SoftDiceLoss`.

    Raises:
        ValueError: For negative weights, or a bad target in ``forward``.
    """

    def __init__(
        self,
        *,
        use_sigmoid: bool,
        batch_dice: bool = False,
        alpha: float = 0.3,
        beta: float = 0.7,
        weight_tversky: float = 1.0,
        weight_bce: float = 1.0,
        smooth: float = 1e-5,
        do_bg: bool | None = None,
        ddp: bool = False,
    ) -> None:
        tversky = TverskyLoss(
            use_sigmoid=use_sigmoid, alpha=alpha, beta=beta, batch_dice=batch_dice, do_bg=do_bg, smooth=smooth, ddp=ddp
        )
        super().__init__(tversky, BCELoss(use_sigmoid=use_sigmoid), weight_tversky, weight_bce, "HybridLoss2")


def make_loss(
    name: str,
    *,
    regions: bool,
    batch_dice: bool,
    weight_bce: float = 1.0,
    smooth: float = 1e-5,
    squared_dice: bool = False,
    tversky_alpha: float = 0.3,
    tversky_beta: float = 0.7,
    ddp: bool = False,
) -> nn.Module:
    """Builds one of the paper's five losses (Table 2) for region-based or label-based training.

    Args:
        name: ``"dice"``, ``"tversky"``, ``"bce"``, ``"hybrid1"`` (Dice + BCE) or ``"hybrid2"`` (Tversky + BCE).
        regions: True for nnU-Net region-based training (sigmoid outputs), False for label-based (softmax).
        batch_dice: nnU-Net's ``batch_dice`` of the configuration.
        weight_bce: Weight of the cross-entropy term of the hybrids (the overlap term has weight 1).
        smooth: Smoothing term of the Dice and Tversky terms.
        squared_dice: Squared Dice denominator.
        tversky_alpha: Tversky weight of the false positives.
        tversky_beta: Tversky weight of the false negatives.
        ddp: Gather batch sums across DDP workers.

    Returns:
        The loss module (not wrapped for deep supervision).

    Raises:
        ValueError: For an unknown name or invalid weights.
    """
    dice_kwargs = dict(use_sigmoid=regions, batch_dice=batch_dice, smooth=smooth, squared=squared_dice, ddp=ddp)
    tversky_kwargs = dict(
        use_sigmoid=regions, batch_dice=batch_dice, alpha=tversky_alpha, beta=tversky_beta, smooth=smooth, ddp=ddp
    )
    if name == "dice":
        return SoftDiceLoss(**dice_kwargs)
    if name == "tversky":
        return TverskyLoss(**tversky_kwargs)
    if name == "bce":
        return BCELoss(use_sigmoid=regions)
    if name == "hybrid1":
        return HybridLoss1(weight_bce=weight_bce, **dice_kwargs)
    if name == "hybrid2":
        return HybridLoss2(weight_bce=weight_bce, **tversky_kwargs)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSS_NAMES}")


def decaying_deep_supervision_weights(
    num_outputs: int,
    epoch: int,
    *,
    alpha: float = 0.4,
    decay: float = 0.8,
    every: int = 30,
    num_supervised: int | None = 4,
) -> tuple[float, ...]:
    """The paper's deep-supervision weights ``(1, a, ..., a[, 0, ...])``, ``a = alpha * decay ** (epoch // every)``.

    Output 0 is the full-resolution output (nnU-Net's order, highest resolution first; the paper's "loss3"). The
    weights are deliberately *not* normalised: the paper's loss is ``loss3 + a (loss0 + loss1 + loss2)``, so the
    full-resolution term keeps weight 1 and the total shrinks as ``a`` decays (docs/losses.md, "Decaying deep
    supervision").

    Args:
        num_outputs: Number of deep-supervision outputs of the network.
        epoch: Current epoch, counted from 0 (the reference pipeline's ``alpha *= 0.8`` after every 30th of its 1-based
            epochs gives the same values).
        alpha: ``a`` at epoch 0.
        decay: Factor applied every ``every`` epochs.
        every: Epochs between decays.
        num_supervised: Outputs that get a non-zero weight (the paper has four: ``1 + 3 a``); lower-resolution outputs
            beyond them get 0. ``None`` supervises all outputs.

    Raises:
        ValueError: For out-of-range arguments.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    if epoch < 0 or every < 1:
        raise ValueError(f"epoch must be >= 0 and every >= 1, got epoch={epoch}, every={every}")
    if alpha < 0 or not 0 < decay <= 1:
        raise ValueError(f"alpha must be >= 0 and decay in (0, 1], got alpha={alpha}, decay={decay}")
    if num_supervised is not None and num_supervised < 1:
        raise ValueError(f"num_supervised must be >= 1 or None, got {num_supervised}")
    a = alpha * decay ** math.floor(epoch / every)
    supervised = num_outputs if num_supervised is None else min(num_outputs, num_supervised)
    return (1.0,) + (a,) * (supervised - 1) + (0.0,) * (num_outputs - supervised)
