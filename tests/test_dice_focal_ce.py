"""DiceFocalCELoss against its formula (docs/losses.md), computed by hand in numpy on small tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnyseg.losses.dice_focal_ce import DiceFocalCELoss, binary_focal_loss_with_logits, softmax_focal_loss

SMOOTH = 1e-5

# Hand-made label-based example: batch 2, 3 classes, 2 x 3 voxels (2D keeps it readable; the loss is N-D).
LOGITS = np.array(
    [
        [
            [[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]],
            [[0.5, 1.5, 0.0], [1.0, -0.5, 0.3]],
            [[-1.0, 0.2, 2.0], [0.7, 0.1, 1.2]],
        ],
        [
            [[0.3, 0.3, -0.2], [1.1, 0.0, 0.4]],
            [[-0.8, 2.2, 0.9], [0.0, 0.6, -1.3]],
            [[1.4, -0.4, 0.1], [0.2, 1.7, 0.8]],
        ],
    ]
)  # (2, 3, 2, 3)
LABELS = np.array([[[0, 1, 2], [1, 1, 0]], [[2, 1, 0], [0, 2, 2]]])  # (2, 2, 3)

# Hand-made region-based example: batch 2, 2 regions, 2 x 2 voxels.
REGION_LOGITS = np.array(
    [[[[1.0, -2.0], [0.5, 0.0]], [[-1.5, 0.3], [2.0, -0.7]]], [[[0.2, 0.9], [-1.1, 1.6]], [[0.0, -0.4], [1.3, 0.8]]]]
)  # (2, 2, 2, 2)
REGIONS = np.array(
    [[[[1, 0], [1, 1]], [[0, 0], [1, 0]]], [[[0, 1], [0, 1]], [[0, 0], [1, 1]]]], dtype=bool
)  # (2, 2, 2, 2)


# ---------------------------------------------------------------------------------------------------- numpy reference
def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def np_dice_loss(p: np.ndarray, g: np.ndarray, batch_dice: bool, valid: np.ndarray | None = None) -> float:
    """nnU-Net's soft Dice loss: -mean_c (2 sum(p g) + s) / (sum(p) + sum(g) + s), per sample or per batch."""
    if valid is not None:
        p, g = p * valid, g * valid
    axes = (0, *range(2, p.ndim)) if batch_dice else tuple(range(2, p.ndim))
    dice = (2 * (p * g).sum(axes) + SMOOTH) / (p.sum(axes) + g.sum(axes) + SMOOTH)
    return -float(dice.mean())


def np_label_terms(logits, labels, gamma=2.0, alpha_per_class=None, batch_dice=False, ignore=None):
    """(dice, focal, ce) for the softmax form, by hand."""
    p = np_softmax(logits)
    valid = np.ones(labels.shape, bool) if ignore is None else labels != ignore
    clean = np.where(valid, labels, 0)
    onehot = np.stack([clean == c for c in range(logits.shape[1])], axis=1).astype(float)
    p_y = np.take_along_axis(p, clean[:, None], axis=1)[:, 0]
    ce = -np.log(p_y)[valid].mean()
    focal_v = -((1 - p_y) ** gamma) * np.log(p_y)
    if alpha_per_class is not None:
        focal_v = focal_v * np.asarray(alpha_per_class)[clean]
    focal = focal_v[valid].mean()
    dice = np_dice_loss(p[:, 1:], onehot[:, 1:], batch_dice, valid[:, None].astype(float))
    return dice, float(focal), float(ce)


def np_region_terms(logits, regions, gamma=2.0, alpha=None, batch_dice=False, valid=None):
    """(dice, focal, bce) for the sigmoid form, by hand; ``valid`` is (b, 1, ...) or None."""
    p = np_sigmoid(logits)
    g = regions.astype(float)
    p_t = np.where(regions, p, 1 - p)
    bce_v = -np.log(p_t)
    focal_v = (1 - p_t) ** gamma * bce_v
    if alpha is not None:
        focal_v = focal_v * np.where(regions, alpha, 1 - alpha)
    w = np.ones_like(bce_v) if valid is None else np.broadcast_to(valid, bce_v.shape).astype(float)
    bce = (bce_v * w).sum() / w.sum()
    focal = (focal_v * w).sum() / w.sum()
    dice = np_dice_loss(p, g, batch_dice, None if valid is None else valid.astype(float))
    return dice, float(focal), float(bce)


def t(a: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(a, dtype=dtype)


def label_target(labels: np.ndarray) -> torch.Tensor:
    return t(labels[:, None].astype(float), torch.float32)  # nnU-Net's float (b, 1, ...) label maps


# ------------------------------------------------------------------------------------------------- label-based form
@pytest.mark.parametrize("batch_dice", [False, True])
def test_label_based_terms_and_total_match_the_formula(batch_dice):
    dice, focal, ce = np_label_terms(LOGITS, LABELS, batch_dice=batch_dice)
    x, y = t(LOGITS), label_target(LABELS)
    only = {
        "dice": dict(weight_dice=1, weight_focal=0, weight_ce=0),
        "focal": dict(weight_dice=0, weight_focal=1, weight_ce=0),
        "ce": dict(weight_dice=0, weight_focal=0, weight_ce=1),
    }
    for name, expected in (("dice", dice), ("focal", focal), ("ce", ce)):
        got = DiceFocalCELoss(batch_dice=batch_dice, **only[name])(x, y)
        np.testing.assert_allclose(got.item(), expected, rtol=1e-6, err_msg=name)
    total = DiceFocalCELoss(batch_dice=batch_dice)(x, y)
    np.testing.assert_allclose(total.item(), dice + focal + ce, rtol=1e-6)
    weighted = DiceFocalCELoss(batch_dice=batch_dice, weight_dice=0.5, weight_focal=2.0, weight_ce=0.25)(x, y)
    np.testing.assert_allclose(weighted.item(), 0.5 * dice + 2.0 * focal + 0.25 * ce, rtol=1e-6)


def test_label_based_focal_with_gamma_zero_is_cross_entropy():
    x, y = t(LOGITS), label_target(LABELS)
    focal0 = DiceFocalCELoss(weight_dice=0, weight_ce=0, gamma=0)(x, y)
    ce = DiceFocalCELoss(weight_dice=0, weight_focal=0)(x, y)
    torch.testing.assert_close(focal0, ce)
    torch.testing.assert_close(ce.double(), torch.nn.functional.cross_entropy(x, y[:, 0].long()))


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_label_based_focal_gamma(gamma):
    _, focal, _ = np_label_terms(LOGITS, LABELS, gamma=gamma)
    got = softmax_focal_loss(t(LOGITS), label_target(LABELS), gamma=gamma)
    np.testing.assert_allclose(got.item(), focal, rtol=1e-6)


def test_label_based_alpha_scalar_and_per_class():
    x, y = t(LOGITS), label_target(LABELS)
    # a scalar alpha a: background weighted 1 - a, every other class a
    _, focal, _ = np_label_terms(LOGITS, LABELS, alpha_per_class=[0.75, 0.25, 0.25])
    got = DiceFocalCELoss(weight_dice=0, weight_ce=0, alpha=0.25)(x, y)
    np.testing.assert_allclose(got.item(), focal, rtol=1e-6)
    _, focal, _ = np_label_terms(LOGITS, LABELS, alpha_per_class=[0.1, 0.3, 0.6])
    got = DiceFocalCELoss(weight_dice=0, weight_ce=0, alpha=[0.1, 0.3, 0.6])(x, y)
    np.testing.assert_allclose(got.item(), focal, rtol=1e-6)
    with pytest.raises(ValueError, match="3 channels"):
        DiceFocalCELoss(alpha=[0.5, 0.5])(x, y)


def test_label_based_ignore_label_counts_nowhere():
    labels = LABELS.copy()
    labels[0, 0, 1] = labels[1, 1, 2] = 3  # ignore label 3
    dice, focal, ce = np_label_terms(LOGITS, labels, ignore=3)
    got = DiceFocalCELoss(ignore_label=3)(t(LOGITS), label_target(labels))
    np.testing.assert_allclose(got.item(), dice + focal + ce, rtol=1e-6)
    # changing the logits of ignored voxels changes nothing
    logits = LOGITS.copy()
    logits[0, :, 0, 1] = [9.0, -9.0, 3.0]
    torch.testing.assert_close(DiceFocalCELoss(ignore_label=3)(t(logits), label_target(labels)), got)


def test_label_based_all_voxels_ignored_gives_finite_loss_and_zero_grad():
    x = t(LOGITS).requires_grad_()
    loss = DiceFocalCELoss(ignore_label=7)(x, label_target(np.full_like(LABELS, 7)))
    loss.backward()
    assert torch.isfinite(loss) and torch.count_nonzero(x.grad) == 0


def test_label_based_without_focal_equals_nnunets_dc_and_ce_loss():
    x, y = t(LOGITS, torch.float32), label_target(LABELS)
    ours = DiceFocalCELoss(batch_dice=True, weight_focal=0)(x, y)
    nnunet = DC_and_CE_loss(
        {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=None,
        dice_class=MemoryEfficientSoftDiceLoss,
    )(x, y)
    torch.testing.assert_close(ours, nnunet)


def test_label_based_3d_gradients_are_finite():
    x = torch.randn(2, 3, 4, 5, 6, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 4, 5, 6)).float()
    DiceFocalCELoss()(x, y).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ region-based form
@pytest.mark.parametrize("batch_dice", [False, True])
def test_region_based_terms_and_total_match_the_formula(batch_dice):
    dice, focal, bce = np_region_terms(REGION_LOGITS, REGIONS, batch_dice=batch_dice)
    x, y = t(REGION_LOGITS), torch.tensor(REGIONS)
    kw = dict(region_based=True, batch_dice=batch_dice)
    np.testing.assert_allclose(DiceFocalCELoss(**kw, weight_focal=0, weight_ce=0)(x, y).item(), dice, rtol=1e-6)
    np.testing.assert_allclose(DiceFocalCELoss(**kw, weight_dice=0, weight_ce=0)(x, y).item(), focal, rtol=1e-6)
    np.testing.assert_allclose(DiceFocalCELoss(**kw, weight_dice=0, weight_focal=0)(x, y).item(), bce, rtol=1e-6)
    np.testing.assert_allclose(DiceFocalCELoss(**kw)(x, y).item(), dice + focal + bce, rtol=1e-6)


def test_region_based_focal_with_gamma_zero_is_bce():
    x, y = t(REGION_LOGITS), torch.tensor(REGIONS)
    focal0 = binary_focal_loss_with_logits(x, y, gamma=0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y.double())
    torch.testing.assert_close(focal0.double(), bce)


def test_region_based_alpha():
    _, focal, _ = np_region_terms(REGION_LOGITS, REGIONS, alpha=0.25)
    got = DiceFocalCELoss(region_based=True, weight_dice=0, weight_ce=0, alpha=0.25)(
        t(REGION_LOGITS), torch.tensor(REGIONS)
    )
    np.testing.assert_allclose(got.item(), focal, rtol=1e-6)
    # one alpha per region
    per_region = binary_focal_loss_with_logits(t(REGION_LOGITS), torch.tensor(REGIONS), alpha=[0.25, 0.8])
    p_t = np.where(REGIONS, np_sigmoid(REGION_LOGITS), 1 - np_sigmoid(REGION_LOGITS))
    a = np.array([0.25, 0.8])[None, :, None, None]
    expected = (np.where(REGIONS, a, 1 - a) * -((1 - p_t) ** 2) * np.log(p_t)).mean()
    np.testing.assert_allclose(per_region.item(), expected, rtol=1e-6)


def test_region_based_ignore_channel_masks_voxels():
    ignore = np.zeros((2, 1, 2, 2), dtype=bool)
    ignore[0, 0, 0, 1] = ignore[1, 0, 1, 0] = True
    target = torch.tensor(np.concatenate([REGIONS, ignore], axis=1))
    dice, focal, bce = np_region_terms(REGION_LOGITS, REGIONS, valid=~ignore)
    got = DiceFocalCELoss(region_based=True, ignore_label=3)(t(REGION_LOGITS), target)
    np.testing.assert_allclose(got.item(), dice + focal + bce, rtol=1e-6)


def test_region_based_without_focal_equals_nnunets_dc_and_bce_loss():
    x, y = t(REGION_LOGITS, torch.float32), torch.tensor(REGIONS)
    ours = DiceFocalCELoss(region_based=True, batch_dice=True, weight_focal=0)(x, y)
    nnunet = DC_and_BCE_loss(
        {}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False}, dice_class=MemoryEfficientSoftDiceLoss
    )(x, y)
    torch.testing.assert_close(ours, nnunet)


def test_region_based_target_shape_is_checked():
    with pytest.raises(ValueError, match="one target channel per output channel"):
        DiceFocalCELoss(region_based=True)(t(REGION_LOGITS), torch.tensor(REGIONS[:, :1]))
    with pytest.raises(ValueError, match="region_based=True"):
        DiceFocalCELoss()(t(REGION_LOGITS), torch.tensor(REGIONS))


# ---------------------------------------------------------------------------------------------- deep supervision, API
def test_inside_nnunets_deep_supervision_wrapper():
    weights = np.array([1, 0.5, 0.25, 0.0]) / 1.75  # nnU-Net's weights for 4 outputs
    loss = DeepSupervisionWrapper(DiceFocalCELoss(), weights)
    rng = np.random.default_rng(0)
    outputs = [t(rng.normal(size=(2, 3, s, s))) for s in (8, 4, 2, 1)]
    targets = [label_target(rng.integers(0, 3, size=(2, s, s))) for s in (8, 4, 2, 1)]
    expected = sum(
        w * sum(np_label_terms(o.numpy(), tg[:, 0].long().numpy()))
        for w, o, tg in zip(weights, outputs, targets, strict=True)
    )
    np.testing.assert_allclose(loss(outputs, targets).item(), expected, rtol=1e-6)


def test_defaults_follow_the_spec():
    loss = DiceFocalCELoss()
    assert (loss.weight_dice, loss.weight_focal, loss.weight_ce, loss.gamma, loss.alpha) == (1, 1, 1, 2, None)
    assert isinstance(loss.dc, MemoryEfficientSoftDiceLoss)
    assert loss.dc.smooth == 1e-5 and loss.dc.do_bg is False
    assert DiceFocalCELoss(region_based=True).dc.do_bg is True


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_dice": -1}, "weight_dice"),
        ({"weight_dice": 0, "weight_focal": 0, "weight_ce": 0}, "at least one"),
        ({"gamma": -0.5}, "gamma"),
        ({"alpha": 1.5}, r"\[0, 1\]"),
        ({"alpha": "0.5"}, "alpha"),
        ({"alpha": []}, "alpha"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiceFocalCELoss(**kwargs)
