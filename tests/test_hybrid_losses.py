"""ELANRes-MSCA-UNet losses against their formulas, computed by hand in numpy on small hand-made tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1

from nnyseg.losses.hybrid import (
    LOSS_NAMES,
    BCELoss,
    HybridLoss1,
    HybridLoss2,
    SoftDiceLoss,
    TverskyLoss,
    decaying_deep_supervision_weights,
    make_loss,
)

RTOL = 1e-5


# --------------------------------------------------------------------------------------------------------------
# Hand-made inputs and the formulas in numpy
# --------------------------------------------------------------------------------------------------------------
def region_case() -> tuple[np.ndarray, np.ndarray]:
    """Logits (b=2, c=2 regions, 2x3) and the binary region maps (region 1 inside region 0, like liver/tumour)."""
    logits = np.array(
        [
            [[[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], [[-1.5, 1.0, 0.2], [-3.0, 0.7, -0.4]]],
            [[[-0.5, 0.3, 1.2], [2.2, -2.5, 0.1]], [[0.9, -0.2, -1.1], [1.6, -0.8, 0.0]]],
        ]
    )
    regions = np.array(
        [
            [[[1, 0, 1], [0, 1, 0]], [[0, 0, 1], [0, 1, 0]]],
            [[[0, 1, 1], [1, 0, 0]], [[0, 0, 0], [1, 0, 0]]],
        ],
        dtype=float,
    )
    return logits, regions


def label_case() -> tuple[np.ndarray, np.ndarray]:
    """Logits (b=2, c=3 classes, 2x3) and the integer label map (b, 1, 2x3)."""
    logits = np.array(
        [
            [
                [[1.0, 0.2, -0.3], [0.0, 2.0, 0.5]],
                [[-0.5, 1.5, 0.3], [1.1, -1.0, 0.0]],
                [[0.3, -0.7, 2.1], [-0.4, 0.6, 0.9]],
            ],
            [
                [[0.4, -1.2, 0.8], [1.7, 0.1, -0.6]],
                [[1.3, 0.5, -0.2], [0.0, 0.9, 0.4]],
                [[-0.8, 0.2, 0.6], [0.3, -0.1, 1.5]],
            ],
        ]
    )
    labels = np.array([[[[0, 1, 2], [1, 0, 2]]], [[[1, 1, 0], [0, 2, 2]]]])
    return logits, labels


def np_sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_one_hot(labels: np.ndarray, c: int) -> np.ndarray:
    return np.concatenate([(labels == k).astype(float) for k in range(c)], axis=1)


def np_sums(p: np.ndarray, g: np.ndarray, batch: bool) -> tuple[np.ndarray, ...]:
    """TP, FP, FN, sum(p), sum(g), sum(p^2) per (sample, channel), or per channel for batch Dice."""
    axes = (0, 2, 3) if batch else (2, 3)
    return tuple(
        x.sum(axis=axes) for x in (p * g, p * (1 - g), (1 - p) * g, p, g, p * p)
    )  # fmt: skip


def np_dice(p, g, s, batch=False, squared=False) -> float:
    tp, _, _, sp, sg, sp2 = np_sums(p, g, batch)
    denominator = (sp2 + g.sum(axis=(0, 2, 3) if batch else (2, 3))) if squared else (sp + sg)
    return float(1 - np.mean((2 * tp + s) / (denominator + s)))


def np_tversky(p, g, s, alpha=0.3, beta=0.7, batch=False) -> float:
    tp, fp, fn, *_ = np_sums(p, g, batch)
    return float(1 - np.mean((tp + s) / (tp + alpha * fp + beta * fn + s)))


def np_bce(p, g) -> float:
    return float(-np.mean(g * np.log(p) + (1 - g) * np.log(1 - p)))


def np_ce(q, labels) -> float:
    picked = np.take_along_axis(q, labels, axis=1)
    return float(-np.mean(np.log(picked)))


def t(x: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# A case small enough to do with pencil and paper
# --------------------------------------------------------------------------------------------------------------
def test_pencil_and_paper_case():
    """logits 0 -> p = 0.5 everywhere; g = [1, 0, 0, 0]: TP = 0.5, sum(p) = 2, sum(g) = 1, FP = 1.5, FN = 0.5."""
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert SoftDiceLoss(use_sigmoid=True, smooth=0)(logits, target).item() == pytest.approx(1 - 1 / 3)
    # squared: sum(p^2) = 1, sum(g^2) = 1 -> 1 - 1 / 2
    assert SoftDiceLoss(use_sigmoid=True, smooth=0, squared=True)(logits, target).item() == pytest.approx(0.5)
    # Tversky: 0.5 / (0.5 + 0.3 * 1.5 + 0.7 * 0.5) = 0.5 / 1.3
    assert TverskyLoss(use_sigmoid=True, smooth=0)(logits, target).item() == pytest.approx(1 - 0.5 / 1.3)
    assert BCELoss(use_sigmoid=True)(logits, target).item() == pytest.approx(math.log(2))
    assert HybridLoss1(use_sigmoid=True, smooth=0)(logits, target).item() == pytest.approx(2 / 3 + math.log(2))
    assert HybridLoss2(use_sigmoid=True, smooth=0)(logits, target).item() == pytest.approx(0.8 / 1.3 + math.log(2))
    # The smooth term: (2 TP + s) / (sum(p) + sum(g) + s) with s = 1 -> 2 / 4
    assert SoftDiceLoss(use_sigmoid=True, smooth=1.0)(logits, target).item() == pytest.approx(0.5)
    assert TverskyLoss(use_sigmoid=True, smooth=1.0)(logits, target).item() == pytest.approx(1 - 1.5 / 2.3)


# --------------------------------------------------------------------------------------------------------------
# Region-based (sigmoid)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("smooth", [0.0, 1e-5, 1.0])
def test_region_losses_match_formulas(batch_dice, smooth):
    z, g = region_case()
    p = np_sigmoid(z)
    x, y = t(z), t(g, torch.bool)  # nnU-Net's region targets may be bool
    kw = dict(use_sigmoid=True, batch_dice=batch_dice, smooth=smooth)
    dice = np_dice(p, g, smooth, batch_dice)
    tversky = np_tversky(p, g, smooth, batch=batch_dice)
    bce = np_bce(p, g)
    assert SoftDiceLoss(**kw)(x, y).item() == pytest.approx(dice, rel=RTOL)
    assert SoftDiceLoss(**kw, squared=True)(x, y).item() == pytest.approx(
        np_dice(p, g, smooth, batch_dice, squared=True), rel=RTOL
    )
    assert TverskyLoss(**kw)(x, y).item() == pytest.approx(tversky, rel=RTOL)
    assert TverskyLoss(**kw, alpha=0.6, beta=0.1)(x, y).item() == pytest.approx(
        np_tversky(p, g, smooth, 0.6, 0.1, batch_dice), rel=RTOL
    )
    assert BCELoss(use_sigmoid=True)(x, y).item() == pytest.approx(bce, rel=RTOL)
    assert HybridLoss1(**kw)(x, y).item() == pytest.approx(dice + bce, rel=RTOL)
    assert HybridLoss2(**kw)(x, y).item() == pytest.approx(tversky + bce, rel=RTOL)
    assert HybridLoss1(**kw, weight_dice=0.5, weight_bce=2.0)(x, y).item() == pytest.approx(
        0.5 * dice + 2 * bce, rel=RTOL
    )
    assert HybridLoss2(**kw, weight_tversky=3.0, weight_bce=0.25)(x, y).item() == pytest.approx(
        3 * tversky + 0.25 * bce, rel=RTOL
    )


def test_region_hybrid1_is_nnunets_dice_and_bce_plus_one():
    """With nnU-Net's settings (smooth 1e-5, all region channels) HybridLoss1 = DC_and_BCE_loss + 1 (which is -Dice)."""
    z, g = region_case()
    x, y = t(z), t(g)
    for batch_dice in (False, True):
        kwargs = {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False}
        nnunet = DC_and_BCE_loss({}, kwargs, dice_class=MemoryEfficientSoftDiceLoss)
        ours = HybridLoss1(use_sigmoid=True, batch_dice=batch_dice)
        assert ours(x, y).item() == pytest.approx(nnunet(x, y).item() + 1, rel=RTOL)


# --------------------------------------------------------------------------------------------------------------
# Label-based (softmax + CE)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("target_has_channel_axis", [True, False])
def test_label_losses_match_formulas(batch_dice, target_has_channel_axis):
    z, labels = label_case()
    q = np_softmax(z)
    g = np_one_hot(labels, 3)
    fg_q, fg_g = q[:, 1:], g[:, 1:]  # background excluded from the overlap terms (nnU-Net's label convention)
    s = 1e-5
    x = t(z)
    y = torch.tensor(labels, dtype=torch.int16)  # nnU-Net's segmentation dtype
    if not target_has_channel_axis:
        y = y[:, 0]
    kw = dict(use_sigmoid=False, batch_dice=batch_dice)
    dice = np_dice(fg_q, fg_g, s, batch_dice)
    tversky = np_tversky(fg_q, fg_g, s, batch=batch_dice)
    ce = np_ce(q, labels)
    assert SoftDiceLoss(**kw)(x, y).item() == pytest.approx(dice, rel=RTOL)
    assert SoftDiceLoss(**kw, squared=True)(x, y).item() == pytest.approx(
        np_dice(fg_q, fg_g, s, batch_dice, squared=True), rel=RTOL
    )
    assert SoftDiceLoss(**kw, do_bg=True)(x, y).item() == pytest.approx(np_dice(q, g, s, batch_dice), rel=RTOL)
    assert TverskyLoss(**kw)(x, y).item() == pytest.approx(tversky, rel=RTOL)
    assert BCELoss(use_sigmoid=False)(x, y).item() == pytest.approx(ce, rel=RTOL)
    assert HybridLoss1(**kw)(x, y).item() == pytest.approx(dice + ce, rel=RTOL)
    assert HybridLoss2(**kw)(x, y).item() == pytest.approx(tversky + ce, rel=RTOL)


def test_label_hybrid1_is_nnunets_dice_and_ce_plus_one():
    z, labels = label_case()
    x, y = t(z), torch.tensor(labels)
    kwargs = {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}
    nnunet = DC_and_CE_loss(kwargs, {}, weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    assert HybridLoss1(use_sigmoid=False)(x, y).item() == pytest.approx(nnunet(x, y).item() + 1, rel=RTOL)


def test_two_class_softmax_ce_is_bce_of_the_logit_difference():
    """Label mode with background + one class is the binary case: CE(softmax) == BCE(sigmoid(z1 - z0))."""
    z, _ = label_case()
    z = z[:, :2]
    labels = (np.arange(12).reshape(2, 1, 2, 3) % 3 == 0).astype(np.int64)
    ce = BCELoss(use_sigmoid=False)(t(z), torch.tensor(labels)).item()
    bce = BCELoss(use_sigmoid=True)(t(z[:, 1:] - z[:, :1]), t(labels.astype(float))).item()
    assert ce == pytest.approx(bce, rel=RTOL)


def test_three_dimensional_inputs_and_batch_sums():
    """5D tensors (b, c, x, y, z): per-sample Dice averages per-sample ratios, batch Dice pools the sums."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 2, 3, 4)
    y = (torch.rand(2, 1, 2, 3, 4) > 0.6).float()
    p, g = torch.sigmoid(x).double(), y.double()
    per_sample = [(2 * (p[i] * g[i]).sum() + 1e-5) / (p[i].sum() + g[i].sum() + 1e-5) for i in range(2)]
    pooled = (2 * (p * g).sum() + 1e-5) / (p.sum() + g.sum() + 1e-5)
    assert SoftDiceLoss(use_sigmoid=True)(x, y).item() == pytest.approx(1 - float(sum(per_sample) / 2), rel=RTOL)
    assert SoftDiceLoss(use_sigmoid=True, batch_dice=True)(x, y).item() == pytest.approx(1 - float(pooled), rel=RTOL)


def test_tversky_with_equal_weights_is_dice_and_nnunet_dice_is_wrapped():
    z, g = region_case()
    x, y = t(z), t(g)
    assert TverskyLoss(use_sigmoid=True, alpha=0.5, beta=0.5, smooth=0)(x, y).item() == pytest.approx(
        SoftDiceLoss(use_sigmoid=True, smooth=0)(x, y).item(), rel=RTOL
    )
    ours = SoftDiceLoss(use_sigmoid=True, batch_dice=True)
    assert isinstance(ours.nnunet_dice, MemoryEfficientSoftDiceLoss)
    nnunet = MemoryEfficientSoftDiceLoss(
        apply_nonlin=torch.sigmoid, batch_dice=True, do_bg=True, smooth=1e-5, ddp=False
    )
    assert ours(x, y).item() == pytest.approx(1 + nnunet(x, y).item(), rel=RTOL)
    z, labels = label_case()
    nnunet = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, do_bg=False, smooth=1e-5, ddp=False)
    assert SoftDiceLoss(use_sigmoid=False)(t(z), torch.tensor(labels)).item() == pytest.approx(
        1 + nnunet(t(z), torch.tensor(labels)).item(), rel=RTOL
    )


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("regions", [True, False])
def test_make_loss_builds_each_loss_with_finite_gradients(name, regions):
    z, target = region_case() if regions else label_case()
    x = t(z).requires_grad_(True)
    y = t(target) if regions else torch.tensor(target)
    loss = make_loss(name, regions=regions, batch_dice=False)
    expected = {
        "dice": SoftDiceLoss,
        "tversky": TverskyLoss,
        "bce": BCELoss,
        "hybrid1": HybridLoss1,
        "hybrid2": HybridLoss2,
    }[name]
    assert type(loss) is expected
    assert loss.use_sigmoid == regions if hasattr(loss, "use_sigmoid") else loss.bce.use_sigmoid == regions
    value = loss(x, y)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_make_loss_passes_its_parameters():
    z, g = region_case()
    p = np_sigmoid(z)
    x, y = t(z), t(g)
    loss = make_loss("hybrid2", regions=True, batch_dice=True, weight_bce=0.5, tversky_alpha=0.2, tversky_beta=0.8)
    expected = np_tversky(p, g, 1e-5, 0.2, 0.8, batch=True) + 0.5 * np_bce(p, g)
    assert loss(x, y).item() == pytest.approx(expected, rel=RTOL)
    loss = make_loss("dice", regions=True, batch_dice=False, smooth=1.0, squared_dice=True)
    assert loss(x, y).item() == pytest.approx(np_dice(p, g, 1.0, squared=True), rel=RTOL)


def test_invalid_arguments_and_targets_raise_value_error():
    z, g = region_case()
    with pytest.raises(ValueError, match=r"unknown loss 'focal'.*hybrid1"):
        make_loss("focal", regions=True, batch_dice=False)
    with pytest.raises(ValueError, match="smooth"):
        SoftDiceLoss(use_sigmoid=True, smooth=-1)
    with pytest.raises(ValueError, match="alpha and beta"):
        TverskyLoss(use_sigmoid=True, alpha=-0.1)
    with pytest.raises(ValueError, match="weights"):
        HybridLoss1(use_sigmoid=True, weight_dice=0, weight_bce=0)
    with pytest.raises(TypeError):
        SoftDiceLoss()  # the mode is explicit, never guessed
    # Region mode needs the one-hot region map of the output's shape...
    with pytest.raises(ValueError, match="region-based"):
        HybridLoss1(use_sigmoid=True)(t(z), t(g[:, :1]))
    # ...label mode an integer map with one channel, and at least background + one class.
    z, labels = label_case()
    with pytest.raises(ValueError, match="label-based"):
        HybridLoss1(use_sigmoid=False)(t(z), t(np_one_hot(labels, 3)))
    with pytest.raises(ValueError, match="at least 2 output channels"):
        SoftDiceLoss(use_sigmoid=False)(t(z[:, :1]), torch.tensor(labels))


# --------------------------------------------------------------------------------------------------------------
# Deep supervision schedule
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("epoch", "alpha"), [(0, 0.4), (29, 0.4), (30, 0.32), (61, 0.256), (299, 0.4 * 0.8**9)])
def test_decaying_deep_supervision_weights(epoch, alpha):
    # Five outputs (nnU-Net's 6-stage 3d_fullres): the paper's four are supervised, the lowest resolution is not.
    weights = decaying_deep_supervision_weights(5, epoch)
    assert weights == pytest.approx((1.0, alpha, alpha, alpha, 0.0), rel=1e-12)
    assert sum(weights) == pytest.approx(1 + 3 * alpha)  # not normalised: the full-resolution weight stays 1
    assert decaying_deep_supervision_weights(3, epoch) == pytest.approx((1.0, alpha, alpha), rel=1e-12)
    assert decaying_deep_supervision_weights(5, epoch, num_supervised=None) == pytest.approx(
        (1.0,) + (alpha,) * 4, rel=1e-12
    )


def test_deep_supervision_wrapper_applies_the_weights():
    torch.manual_seed(1)
    outputs = [torch.randn(2, 1, 8, 8), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 2, 2)]
    targets = [(torch.rand_like(o) > 0.5).float() for o in outputs]
    base = HybridLoss1(use_sigmoid=True)
    weights = decaying_deep_supervision_weights(3, 61)
    wrapped = DeepSupervisionWrapper(base, weights)
    expected = base(outputs[0], targets[0]) + 0.256 * (base(outputs[1], targets[1]) + base(outputs[2], targets[2]))
    assert wrapped(outputs, targets).item() == pytest.approx(expected.item(), rel=RTOL)


def test_decaying_weights_reject_bad_arguments():
    for kwargs in ({"num_outputs": 0}, {"epoch": -1}, {"every": 0}, {"decay": 0.0}, {"num_supervised": 0}):
        args = {"num_outputs": 4, "epoch": 0, **kwargs}
        with pytest.raises(ValueError):
            decaying_deep_supervision_weights(args.pop("num_outputs"), args.pop("epoch"), **args)
