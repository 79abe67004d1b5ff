"""A PNG a person can check at a glance: image, ground truth and prediction, axial and coronal.

The slices go through the centre of the largest ground-truth tumour (or of the liver when there is no tumour). CT
is shown in an abdominal window (W 400, L 50); liver is green and tumour red, as filled contours.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnyseg.data.validation import compare_geometry

COLOURS = {1: (0.1, 0.8, 0.2), 2: (0.95, 0.1, 0.1)}


def _centre(label: np.ndarray) -> tuple[int, int, int]:
    """Voxel (z, y, x) at the centre of the largest tumour, else of the liver, else of the volume."""
    for value in (2, 1):
        mask = label == value if value == 2 else label > 0
        if mask.any():
            components, n = ndimage.label(mask)
            sizes = ndimage.sum_labels(mask, components, index=np.arange(1, n + 1))
            largest = components == (int(np.argmax(sizes)) + 1)
            return tuple(round(c) for c in ndimage.center_of_mass(largest))
    return tuple(s // 2 for s in label.shape)


def _rgba(label2d: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    rgba = np.zeros((*label2d.shape, 4))
    for value, colour in COLOURS.items():
        rgba[label2d == value] = (*colour, alpha)
    return rgba


def save_overlay(
    image: str | Path, gt: str | Path, pred: str | Path, output: str | Path, title: str | None = None
) -> Path:
    """Write the overlay PNG atomically and return its path.

    Raises:
        ValueError: The three files do not share one grid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, gt, pred, output = Path(image), Path(gt), Path(pred), Path(output)
    problems = compare_geometry(image, gt) + compare_geometry(image, pred)
    if problems:
        raise ValueError(f"cannot overlay: {'; '.join(problems)}")
    img_sitk = sitk.ReadImage(str(image))
    sx, sy, sz = img_sitk.GetSpacing()
    img = sitk.GetArrayFromImage(img_sitk).astype(np.float32)
    labels = {
        "ground truth": sitk.GetArrayFromImage(sitk.ReadImage(str(gt))),
        "prediction": sitk.GetArrayFromImage(sitk.ReadImage(str(pred))),
    }
    z, y, _ = _centre(labels["ground truth"])
    views = {"axial": (lambda a: a[z], sy / sx), "coronal": (lambda a: a[:, y, :][::-1], sz / sx)}

    fig, axes = plt.subplots(2, 3, figsize=(12, 8.5))
    for row, (view, (cut, aspect)) in enumerate(views.items()):
        background = cut(img)
        for col, name in enumerate(["image", "ground truth", "prediction"]):
            ax = axes[row, col]
            ax.imshow(background, cmap="gray", vmin=-150, vmax=250, aspect=aspect, interpolation="nearest")
            if name != "image":
                ax.imshow(_rgba(cut(labels[name])), aspect=aspect, interpolation="nearest")
            ax.set_title(f"{name} ({view})", fontsize=10)
            ax.axis("off")
    fig.suptitle(title or f"{image.name}: liver green, tumour red", fontsize=12)
    fig.tight_layout()

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, output)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return output
