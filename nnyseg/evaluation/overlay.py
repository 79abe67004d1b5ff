"""A PNG a person can check at a glance: image, ground truth and prediction in axial, coronal and sagittal views.

Layout: one row per view (axial, coronal, sagittal), one column per layer (image, ground truth over the image,
prediction over the image). All three views cut through one voxel, the centre of the largest ground-truth tumour
component; without one, the largest predicted tumour, then the largest ground-truth liver, then the largest predicted
liver, then the centre of the volume.

Conventions:

* Labels follow LiTS: 0 background, 1 liver, 2 tumour. Liver is drawn blue and tumour orange (a pair that colour-blind
  readers can tell apart), both semi-transparent so the anatomy stays visible.
* Every volume is first reoriented to LPS with ``SimpleITK.DICOMOrient`` (a permutation and flip of the axes, no
  resampling), so numpy arrays are (z, y, x) = (inferior->superior, anterior->posterior, right->left) whatever the
  file's direction. Views are then shown in the radiological convention: axial with anterior up and the patient's
  right on the viewer's left, coronal and sagittal with the head up, sagittal with anterior on the left. Oblique
  images are shown along their nearest axes.
* Pixels are drawn with their physical aspect ratio (from the spacing), so anisotropic voxels do not squash anatomy.
* Intensity window: an image that looks like CT (minimum below -500, i.e. Hounsfield units with air in the field
  of view) gets the abdominal window [-150, 250] HU; any other image (MRI) its 1st-99th percentile.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np
import SimpleITK as sitk

from nnyseg.data.validation import compare_geometry
from nnyseg.io import atomic_file

LIVER, TUMOUR = 1, 2
COLOURS = {LIVER: "#0072B2", TUMOUR: "#E69F00"}  # Okabe-Ito blue and orange
LABEL_NAMES = {LIVER: "liver", TUMOUR: "tumour"}
ALPHA = 0.5
VIEWS = ("axial", "coronal", "sagittal")
LAYERS = ("image", "ground truth", "prediction")
CT_WINDOW = (-150.0, 250.0)
CT_MINIMUM_BELOW = -500.0
# Percentiles are estimated on at most this many voxels (a regular subsample): exact enough for a display window.
_PERCENTILE_SAMPLE = 1_000_000


@dataclass(frozen=True)
class Overlay:
    """A rendered overlay and how it was made.

    Attributes:
        png: The PNG file's bytes.
        centre: The voxel all views cut through, (z, y, x) in the LPS-reoriented arrays: the axial view is slice
            ``z``, the coronal view slice ``y``, the sagittal view slice ``x``.
        centre_source: What the centre is the centre of, e.g. ``"largest ground-truth tumour"``.
        views: The figure's rows, top to bottom.
        window: The intensity window (low, high) of the grey-scale image.
    """

    png: bytes
    centre: tuple[int, int, int]
    centre_source: str
    views: tuple[str, ...]
    window: tuple[float, float]


def to_lps(image: sitk.Image) -> sitk.Image:
    """``image`` with its axes permuted and flipped to LPS (no resampling): arrays become (I->S, A->P, R->L)."""
    return sitk.DICOMOrient(image, "LPS")


def largest_component_centre(mask: np.ndarray) -> tuple[int, int, int] | None:
    """Voxel nearest the centre of mass of the largest 26-connected component of ``mask``; None if it is empty.

    A connected component's projection on each axis has no gaps, so each rounded coordinate of its centre of mass
    names a slice that cuts through the component.
    """
    if not mask.any():
        return None
    components = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    coordinates = np.argwhere(components == int(np.argmax(sizes)))
    return tuple(int(c) for c in np.rint(coordinates.mean(axis=0)))  # type: ignore[return-value]


def overlay_centre(gt: np.ndarray, pred: np.ndarray) -> tuple[tuple[int, int, int], str]:
    """The voxel the views cut through and what it is the centre of (see the module docstring for the order)."""
    candidates = (
        (gt == TUMOUR, "largest ground-truth tumour"),
        (pred == TUMOUR, "largest predicted tumour"),
        (gt > 0, "largest ground-truth liver"),
        (pred > 0, "largest predicted liver"),
    )
    for mask, source in candidates:
        centre = largest_component_centre(mask)
        if centre is not None:
            return centre, source
    return tuple(s // 2 for s in gt.shape), "volume centre"  # type: ignore[return-value]


def intensity_window(volume: np.ndarray) -> tuple[float, float]:
    """Grey-scale window: [-150, 250] for CT in Hounsfield units, else the 1st-99th percentile."""
    if float(volume.min()) < CT_MINIMUM_BELOW:
        return CT_WINDOW
    sample = volume.ravel()[:: max(1, volume.size // _PERCENTILE_SAMPLE)]
    low, high = (float(v) for v in np.percentile(sample, [1, 99]))
    return (low, high) if high > low else (low, low + 1.0)


def view_slices(volume: np.ndarray, centre: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The axial, coronal and sagittal slices of an LPS (z, y, x) array through ``centre``, ready for ``imshow``.

    Row 0 is drawn at the top, so the coronal and sagittal slices are flipped to put the head (high z) up.
    """
    z, y, x = centre
    return {"axial": volume[z], "coronal": volume[::-1, y, :], "sagittal": volume[::-1, :, x]}


def view_aspects(spacing: tuple[float, float, float]) -> dict[str, float]:
    """``imshow`` aspect (row spacing / column spacing) of each view, from an LPS image's (x, y, z) spacing."""
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}


def _label_rgba(labels: np.ndarray) -> np.ndarray:
    """Semi-transparent colours for liver and tumour, fully transparent elsewhere."""
    from matplotlib.colors import to_rgba

    rgba = np.zeros((*labels.shape, 4))
    for value, colour in COLOURS.items():
        rgba[labels == value] = to_rgba(colour, ALPHA)
    return rgba


def render_overlay(
    image: str | Path, gt: str | Path, pred: str | Path, title: str | None = None, *, dpi: int = 80
) -> Overlay:
    """Draw the 3 x 3 overlay of one case (first image channel) and return it as PNG bytes with its metadata.

    Raises:
        ValueError: The three files do not share one grid.
    """
    from matplotlib.figure import Figure  # without pyplot: no global figure state, no GUI backend
    from matplotlib.patches import Patch

    image, gt, pred = Path(image), Path(gt), Path(pred)
    problems = compare_geometry(image, gt) + compare_geometry(image, pred)
    if problems:
        raise ValueError(f"cannot overlay: {'; '.join(problems)}")
    image_lps = to_lps(sitk.ReadImage(str(image)))
    volume = sitk.GetArrayFromImage(image_lps).astype(np.float32)
    labels = {
        "ground truth": sitk.GetArrayFromImage(to_lps(sitk.ReadImage(str(gt)))),
        "prediction": sitk.GetArrayFromImage(to_lps(sitk.ReadImage(str(pred)))),
    }
    centre, centre_source = overlay_centre(labels["ground truth"], labels["prediction"])
    window = intensity_window(volume)
    aspects = view_aspects(image_lps.GetSpacing())
    backgrounds = view_slices(volume, centre)
    label_slices = {layer: view_slices(array, centre) for layer, array in labels.items()}

    fig = Figure(figsize=(9.0, 9.6))
    axes = fig.subplots(len(VIEWS), len(LAYERS))
    for row, view in enumerate(VIEWS):
        for col, layer in enumerate(LAYERS):
            ax = axes[row, col]
            low, high = window
            ax.imshow(backgrounds[view], cmap="gray", vmin=low, vmax=high, aspect=aspects[view], interpolation="none")
            if layer in label_slices:
                ax.imshow(_label_rgba(label_slices[layer][view]), aspect=aspects[view], interpolation="none")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(layer, fontsize=11)
            if col == 0:
                ax.set_ylabel(view, fontsize=11)
    handles = [Patch(facecolor=COLOURS[v], alpha=ALPHA, label=LABEL_NAMES[v]) for v in (LIVER, TUMOUR)]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=10)
    fig.suptitle(f"{title or image.name}\nviews through the {centre_source}", fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return Overlay(buffer.getvalue(), centre, centre_source, VIEWS, window)


def save_overlay(
    image: str | Path, gt: str | Path, pred: str | Path, output: str | Path, title: str | None = None
) -> Path:
    """Write the overlay PNG of one case atomically and return its path.

    Raises:
        ValueError: The three files do not share one grid.
    """
    overlay = render_overlay(image, gt, pred, title)
    with atomic_file(output) as tmp:
        tmp.write_bytes(overlay.png)
    return Path(output)
