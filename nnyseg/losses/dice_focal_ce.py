"""DiceFocalCELoss: soft Dice + focal + cross-entropy, the training loss of nnY-Net.

Liu H, Tao Z, Dong W, Sun Q. "nnY-Net: Swin-NeXt with Cross-Attention for 3D Medical Images Segmentation",
arXiv:2501.01406 (2025), build a "DiceFocalCELoss" and give neither its weights nor the focal parameters. The form
below, and the defaults, are nnyseg's choice (reasons: docs/losses.md, "DiceFocalCELoss (nnY-Net)"):

    ``L = w_dice * L_Dice + w_focal * L_Focal + w_ce * L_CE``  (weights 1 / 1 / 1, focal gamma 2, no alpha)

* ``L_Dice`` is nnU-Net's :class:`~nnunetv2.training.loss.dice.MemoryEfficientSoftDiceLoss` (batch Dice as the plans
  say, smooth 1e-5; background excluded for labels, every region included for regions). Like all of nnU-Net's Dice
  losses it returns the *negative* soft Dice, ``-mean_c (2 sum(p g) + s) / (sum(p) + sum(g) + s)``, so it lies in
  ``[-1, 0]``; that is ``1 - Dice`` shifted by the constant -1, which changes no gradient.
* ``L_Focal`` (Lin et al., ICCV 2017) is the mean over voxels of ``-alpha_t (1 - p_t)^gamma log p_t``;
  with ``gamma = 0`` and no alpha it equals cross-entropy, so ``L_CE + L_Focal`` is CE with hard voxels up-weighted.
* ``L_CE`` is nnU-Net's :class:`~nnunetv2.training.loss.robust_ce_loss.RobustCrossEntropyLoss` for labels and
  ``BCEWithLogitsLoss`` for regions, as in nnU-Net's ``DC_and_CE_loss`` / ``DC_and_BCE_loss``.

Two forms, chosen like nnU-Net chooses between ``DC_and_CE_loss`` and ``DC_and_BCE_loss``:

* **label-based** (softmax): ``p_t = softmax(z)_y``, the probability of the voxel's true class;
* **region-based** (sigmoid per region, ``documentation/region_based_training.md``): every region channel is a
  binary problem, ``p_t = sigmoid(z)`` where the voxel is in the region and ``1 - sigmoid(z)`` elsewhere; focal and
  BCE are averaged over voxels and regions. (With an ignore label, nnU-Net's ``DC_and_BCE_loss`` sums its BCE over
  the regions and averages over the valid voxels; here the mean over valid voxels and regions is kept in every
  case, so the BCE term's scale does not depend on whether the dataset has an ignore label.)

The module is a plain ``nn.Module`` taking one output and one target; the trainer wraps it in nnU-Net's
``DeepSupervisionWrapper`` for the list of deep-supervision outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1
from torch import nn

__all__ = ["DiceFocalCELoss", "binary_focal_loss_with_logits", "softmax_focal_loss"]


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) are promoted; float64 stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _total(terms: list[torch.Tensor], net_output: torch.Tensor) -> torch.Tensor:
    """Sum of the weighted terms; a zero that keeps the graph if no term applies (e.g. every voxel ignored)."""
    return sum(terms[1:], terms[0]) if terms else net_output.sum() * 0


def _per_channel_alpha(alpha: float | Sequence[float], channels: int, ref: torch.Tensor) -> torch.Tensor | None:
    """One alpha per channel as a tensor, or None for a scalar alpha (whose meaning each form defines)."""
    if isinstance(alpha, (int, float)):
        return None
    weights = torch.as_tensor(list(alpha), dtype=ref.dtype, device=ref.device)
    if weights.numel() != channels:
        raise ValueError(f"focal alpha has {weights.numel()} entries but the network output has {channels} channels")
    return weights


def softmax_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-class focal loss on logits: mean over voxels of ``-alpha_y (1 - p_y)^gamma log p_y``.

    Args:
        logits: Network output ``(b, c, x, y(, z))``, no softmax applied.
        target: Label map ``(b, 1, x, y(, z))`` or ``(b, x, y(, z))`` holding class indices (any numeric dtype).
        gamma: Focusing parameter (>= 0); 0 gives cross-entropy.
        alpha: ``None`` (no weighting), a float ``a`` (weight ``1 - a`` for class 0, the background, and ``a`` for
            every other class, as MONAI's ``FocalLoss`` does with softmax) or one weight per class.
        mask: Optional ``(b, 1, x, y(, z))`` (or target-shaped) tensor, nonzero where a voxel counts; the mean is
            then taken over those voxels only (0 if there are none).

    Returns:
        A scalar tensor.
    """
    if target.ndim == logits.ndim:
        target = target[:, 0]
    target = target.long()
    log_p = torch.log_softmax(_at_least_float32(logits), dim=1)
    log_p_t = log_p.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = -((1 - log_p_t.exp()).clamp_min(0) ** gamma) * log_p_t
    if alpha is not None:
        weights = _per_channel_alpha(alpha, logits.shape[1], loss)
        if weights is None:
            weights = torch.full((logits.shape[1],), float(alpha), dtype=loss.dtype, device=loss.device)
            weights[0] = 1 - float(alpha)
        loss = loss * weights[target]
    if mask is None:
        return loss.mean()
    mask = (mask[:, 0] if mask.ndim == logits.ndim else mask).to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def binary_focal_loss_with_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary focal loss per channel on logits, averaged over voxels and channels.

    With ``p = sigmoid(z)``, ``p_t = p`` where the target is 1 and ``1 - p`` where it is 0; the voxel loss is
    ``-alpha_t (1 - p_t)^gamma log p_t`` with ``alpha_t = alpha`` on positives and ``1 - alpha`` on negatives.
    ``log p_t`` is computed as ``-BCEWithLogits(z, y)``, which is numerically stable.

    Args:
        logits: Network output ``(b, c, x, y(, z))``, no sigmoid applied.
        target: Binary targets of the same shape (bool or 0/1).
        gamma: Focusing parameter (>= 0); 0 gives binary cross-entropy.
        alpha: ``None``, a float in [0, 1] for every channel, or one float per channel.
        mask: Optional ``(b, 1, x, y(, z))`` tensor, nonzero where a voxel counts (broadcast over channels).

    Returns:
        A scalar tensor.
    """
    logits = _at_least_float32(logits)
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    loss = (1 - torch.exp(-bce)).clamp_min(0) ** gamma * bce
    if alpha is not None:
        weights = _per_channel_alpha(alpha, logits.shape[1], loss)
        a = torch.full_like(loss, float(alpha)) if weights is None else weights.view(1, -1, *([1] * (loss.ndim - 2)))
        loss = loss * (a * target + (1 - a) * (1 - target))
    if mask is None:
        return loss.mean()
    mask = mask.to(loss.dtype).expand_as(loss)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


class DiceFocalCELoss(nn.Module):
    """``w_dice * Dice + w_focal * Focal + w_ce * CE`` for one network output (see the module docstring).

    Shapes (``forward``):
        * ``net_output``: logits ``(b, c, x, y(, z))``, no nonlinearity applied.
        * label-based ``target``: ``(b, 1, x, y(, z))`` label map (nnU-Net's float label maps are accepted).
        * region-based ``target``: ``(b, c, x, y(, z))`` binary region maps, plus one extra last channel marking
          ignored voxels when ``ignore_label`` is set (nnU-Net's layout for region-based training with an ignore
          label).

    Args:
        region_based: Sigmoid per region (nnU-Net's ``label_manager.has_regions``) instead of softmax over labels.
        batch_dice: Dice over the whole batch instead of per sample (the plans' ``batch_dice``).
        weight_dice: Weight of the Dice term.
        weight_focal: Weight of the focal term.
        weight_ce: Weight of the (binary) cross-entropy term.
        gamma: Focal focusing parameter (>= 0).
        alpha: Focal class balance: ``None``, a float in [0, 1] or one weight per output channel. Labels: a float
            ``a`` weights the background class by ``1 - a`` and every other class by ``a``. Regions: ``a`` weights
            voxels inside a region by ``a`` and outside by ``1 - a`` (Lin et al.).
        smooth: Dice smoothing term.
        do_bg: Include the background channel in the Dice; ``None`` means nnU-Net's choice (False for labels, True
            for regions, where every channel is foreground).
        ignore_label: nnU-Net's ignore label (``label_manager.ignore_label``), or ``None``. Ignored voxels count in no
            term. For regions only its presence matters: the target then carries the ignore mask as last channel.
        ddp: Gather the Dice statistics across DDP workers when ``batch_dice`` is on (nnU-Net passes ``is_ddp``).

    Raises:
        ValueError: On negative weights or gamma, all weights zero, or alpha outside [0, 1].
    """

    def __init__(
        self,
        *,
        region_based: bool = False,
        batch_dice: bool = False,
        weight_dice: float = 1.0,
        weight_focal: float = 1.0,
        weight_ce: float = 1.0,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        smooth: float = 1e-5,
        do_bg: bool | None = None,
        ignore_label: int | None = None,
        ddp: bool = False,
    ) -> None:
        super().__init__()
        weights = {"weight_dice": weight_dice, "weight_focal": weight_focal, "weight_ce": weight_ce}
        for name, value in weights.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DiceFocalCELoss: {name} must be a number >= 0, got {value!r}")
        if not any(weights.values()):
            raise ValueError(f"DiceFocalCELoss: at least one of {sorted(weights)} must be > 0")
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or gamma < 0:
            raise ValueError(f"DiceFocalCELoss: focal gamma must be a number >= 0, got {gamma!r}")
        if alpha is not None:
            values = [alpha] if isinstance(alpha, (int, float)) else alpha
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
                raise ValueError(
                    f"DiceFocalCELoss: focal alpha must be None, a float or a list of floats, got {alpha!r}"
                )
            if any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in values):
                raise ValueError(f"DiceFocalCELoss: focal alpha values must lie in [0, 1], got {alpha!r}")
            alpha = float(alpha) if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
        self.region_based = region_based
        self.weight_dice = float(weight_dice)
        self.weight_focal = float(weight_focal)
        self.weight_ce = float(weight_ce)
        self.gamma = float(gamma)
        self.alpha = alpha
        self.ignore_label = ignore_label
        do_bg = region_based if do_bg is None else do_bg
        self.dc = MemoryEfficientSoftDiceLoss(
            apply_nonlin=torch.sigmoid if region_based else softmax_helper_dim1,
            batch_dice=batch_dice,
            do_bg=do_bg,
            smooth=smooth,
            ddp=ddp,
        )
        if region_based:
            self.ce = nn.BCEWithLogitsLoss(reduction="none")
        else:
            self.ce = RobustCrossEntropyLoss(ignore_index=-100 if ignore_label is None else ignore_label)

    def extra_repr(self) -> str:
        form = "region-based (sigmoid)" if self.region_based else "label-based (softmax)"
        return (
            f"{form}, weight_dice={self.weight_dice}, weight_focal={self.weight_focal}, weight_ce={self.weight_ce}, "
            f"gamma={self.gamma}, alpha={self.alpha}, ignore_label={self.ignore_label}"
        )

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Computes the loss of one output (shapes: see the class docstring)."""
        if self.region_based:
            return self._forward_regions(net_output, target)
        return self._forward_labels(net_output, target)

    def _forward_labels(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == net_output.ndim and target.shape[1] != 1:
            raise ValueError(
                f"label-based DiceFocalCELoss needs a label map target (b, 1, ...), got shape {tuple(target.shape)} "
                "(one-hot/region targets need region_based=True)"
            )
        if self.ignore_label is not None:
            mask = target != self.ignore_label
            target_clean = torch.where(mask, target, 0)  # any valid class; masked voxels count nowhere
            any_valid = bool(mask.any())
        else:
            mask, target_clean, any_valid = None, target, True
        terms = []
        if self.weight_dice:
            terms.append(self.weight_dice * self.dc(net_output, target_clean, loss_mask=mask))
        if self.weight_ce and any_valid:  # the CE skips the ignore label through its ignore_index
            terms.append(self.weight_ce * self.ce(net_output, target))
        if self.weight_focal and any_valid:
            focal = softmax_focal_loss(net_output, target_clean, gamma=self.gamma, alpha=self.alpha, mask=mask)
            terms.append(self.weight_focal * focal)
        return _total(terms, net_output)

    def _forward_regions(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.ignore_label is not None:
            mask = ~target[:, -1:].bool()
            target = target[:, :-1]
        else:
            mask = None
        if target.shape != net_output.shape:
            extra = " plus the ignore channel" if self.ignore_label is not None else ""
            raise ValueError(
                f"region-based DiceFocalCELoss needs one target channel per output channel{extra}: output "
                f"{tuple(net_output.shape)}, target (without ignore channel) {tuple(target.shape)}"
            )
        terms = []
        if self.weight_dice:
            terms.append(self.weight_dice * self.dc(net_output, target, loss_mask=mask))
        if self.weight_ce:
            logits = _at_least_float32(net_output)
            bce = self.ce(logits, target.to(logits.dtype))
            if mask is None:
                bce = bce.mean()
            else:
                m = mask.to(bce.dtype).expand_as(bce)
                bce = (bce * m).sum() / m.sum().clamp_min(1)
            terms.append(self.weight_ce * bce)
        if self.weight_focal:
            focal = binary_focal_loss_with_logits(net_output, target, gamma=self.gamma, alpha=self.alpha, mask=mask)
            terms.append(self.weight_focal * focal)
        return _total(terms, net_output)
