"""Tumour burden of a liver/tumour mask, without ground truth: volumes, lesion count and per-lesion measurements.

:func:`measure_burden` measures one mask (optionally with its CT image, for mean HU); :func:`write_stats_folder` is
``nnyseg stats``; ``nnyseg segment`` writes the same numbers into each case's ``stats.json``, and the QC report
(``nnyseg report``) shows them for each prediction. Every definition is listed in :data:`CONVENTIONS`, which is also
written into each ``stats.json``, so the file explains itself:

* Labels follow LiTS: 0 background, 1 liver, 2 tumour. **Liver** means labels 1 and 2 together (the whole organ,
  tumours included, as nnU-Net's "liver" region), **tumour** label 2.
* **Volumes** are voxel counts times the voxel volume (the product of the spacing; ``|det|`` of the direction times
  it for a non-orthonormal direction), in mL (1 mL = 1000 mm³). **Tumour burden** is 100 x tumour volume / liver
  volume, in %; undefined (None) when the mask has no liver.
* **Lesions** are the 26-connected components of the tumour mask (voxels touching by a face, an edge or a corner
  belong to one lesion, so two lesions that touch are counted as one). Components smaller than ``min_lesion_mm3``
  are not counted as lesions (their number and volume are reported apart); the total tumour volume and the burden
  always count every tumour voxel. Lesions are numbered 1, 2, ... by decreasing volume.
* **Axial** is the image's slice plane most perpendicular to the patient's head-foot axis: the voxel axis whose
  direction cosine has the largest absolute z component is the slice axis. For a gantry-tilted or oblique image the
  measurement plane is that slice plane (tilted from the true axial plane by the angle stated in ``axial_tilt_deg``).
* **Longest axial diameter**: in each axial slice that cuts the lesion, the longest distance between the centres of
  two of the lesion's voxels in that slice, in mm from the spacing and direction; the largest over the slices. It
  is measured between voxel *centres*, so it is at most the true edge-to-edge extent and at most about one in-plane
  voxel diagonal shorter at each end (a lesion one voxel across measures 0 mm).
* **Perpendicular diameter**: in the same slice, the longest chord perpendicular to the longest diameter of the
  convex hull of those voxel centres (for a convex lesion, RECIST's short axis; across a concave lesion it spans the
  concavity).
* **Centroid**: the mean of the lesion's voxel-centre positions in patient coordinates, mm, as ITK (and DICOM) give
  them: LPS, x towards the patient's left, y towards the back, z towards the head (NIfTI viewers show RAS, with x
  and y negated).
* **Mean HU**: the mean image value over the lesion's voxels (the image must share the mask's grid); None without
  an image.
* The **liver segment** (Couinaud) of a lesion is not reported: it needs the hepatic and portal veins, which the mask
  does not have.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

import nnyseg
from nnyseg.io import atomic_file, atomic_folder, write_json_atomic

__all__ = [
    "CONVENTIONS",
    "DEFAULT_MIN_LESION_MM3",
    "LESION_COLUMNS",
    "Burden",
    "Lesion",
    "axial_axis",
    "axial_diameters",
    "lesions_csv",
    "measure_burden",
    "write_stats_folder",
]

LIVER, TUMOUR = 1, 2
LABEL_VALUES = (0, LIVER, TUMOUR)
#: Components of the tumour mask smaller than this (mm³) are not counted as lesions; 0 counts every component.
DEFAULT_MIN_LESION_MM3 = 0.0
MASK_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
_ITK_TO_NUMPY = (2, 1, 0)  # ITK index axis (i, j, k) -> numpy array axis of GetArrayFromImage's (k, j, i)

#: The definitions behind every number, written into each stats.json (see the module docstring).
CONVENTIONS = {
    "labels": "LiTS labels: 0 background, 1 liver, 2 tumour; liver = labels 1 and 2 (tumours included), tumour = 2",
    "volume": "voxel count x voxel volume, mL (1 mL = 1000 mm^3)",
    "tumour_burden_percent": "100 x tumour volume / liver volume (liver including tumours); null without liver",
    "lesions": "26-connected components of the tumour mask (touching lesions count as one), numbered by decreasing "
    "volume; components below min_lesion_mm3 are not counted but reported as excluded_components; the total tumour "
    "volume counts every tumour voxel",
    "axial": "the image's slice plane most perpendicular to the patient's z axis (largest |z| direction cosine); "
    "axial_tilt_deg is its angle to the true axial plane",
    "longest_axial_diameter_mm": "largest over axial slices of the longest distance between two lesion voxel centres "
    "in the slice (centre to centre: up to about one voxel diagonal shorter than the edge-to-edge extent at each end)",
    "perpendicular_diameter_mm": "in the slice of the longest diameter, the longest chord perpendicular to it of the "
    "convex hull of the lesion's voxel centres",
    "axial_slice": "index (0-based, in the file's voxel order) of that slice along the slice axis",
    "centroid_mm": "mean voxel-centre position in patient coordinates, LPS (x to the patient's left, y posterior, "
    "z superior), mm",
    "mean_hu": "mean image value over the lesion's voxels; null without an image",
    "liver_segment": "not reported: the Couinaud segment needs the hepatic and portal veins, which the mask lacks",
}

#: Columns of the per-lesion CSV, in order.
LESION_COLUMNS = (
    "case",
    "lesion",
    "voxels",
    "volume_ml",
    "longest_axial_diameter_mm",
    "perpendicular_diameter_mm",
    "axial_slice",
    "centroid_x_mm",
    "centroid_y_mm",
    "centroid_z_mm",
    "mean_hu",
)
#: Columns of the per-case CSV, in order.
CASE_COLUMNS = (
    "case",
    "liver_volume_ml",
    "tumour_volume_ml",
    "tumour_burden_percent",
    "lesion_count",
    "excluded_components",
    "excluded_volume_ml",
)


@dataclass(frozen=True)
class Lesion:
    """One lesion (a counted 26-connected tumour component); see the module docstring for the definitions.

    Attributes:
        lesion: Its number, 1 for the largest.
        voxels: Its voxel count.
        volume_ml: Its volume.
        longest_axial_diameter_mm: The longest axial diameter, voxel centre to voxel centre.
        perpendicular_diameter_mm: The longest chord perpendicular to it, in the same slice.
        axial_slice: The slice (index along the slice axis) of these two diameters.
        centroid_mm: The centroid in patient coordinates (LPS), mm.
        mean_hu: The mean image value over the lesion, None without an image.
    """

    lesion: int
    voxels: int
    volume_ml: float
    longest_axial_diameter_mm: float
    perpendicular_diameter_mm: float
    axial_slice: int
    centroid_mm: tuple[float, float, float]
    mean_hu: float | None


@dataclass(frozen=True)
class Burden:
    """The tumour burden of one mask.

    Attributes:
        liver_volume_ml: Volume of labels 1 and 2.
        tumour_volume_ml: Volume of label 2 (every tumour voxel, counted lesion or not).
        tumour_burden_percent: 100 x tumour / liver volume; None when there is no liver.
        lesion_count: Number of counted lesions.
        lesions: The counted lesions, largest first.
        excluded_components: Tumour components smaller than ``min_lesion_mm3``, not counted as lesions.
        excluded_volume_ml: Their total volume.
        min_lesion_mm3: The minimum lesion volume used.
        spacing_mm: The voxel spacing (x, y, z), ITK order.
        slice_axis: The voxel axis across the axial slices: 0, 1 or 2 for ITK's i, j, k (k for a usual axial CT).
        axial_tilt_deg: Angle between the slice plane and the patient's axial plane.
    """

    liver_volume_ml: float
    tumour_volume_ml: float
    tumour_burden_percent: float | None
    lesion_count: int
    lesions: tuple[Lesion, ...]
    excluded_components: int
    excluded_volume_ml: float
    min_lesion_mm3: float
    spacing_mm: tuple[float, float, float]
    slice_axis: int
    axial_tilt_deg: float

    def to_dict(self) -> dict[str, Any]:
        """The numbers as plain JSON-ready values (lesions as a list of dicts)."""
        result = asdict(self)
        result["lesions"] = [asdict(lesion) for lesion in self.lesions]
        for lesion in result["lesions"]:
            lesion["centroid_mm"] = list(lesion["centroid_mm"])
        result["spacing_mm"] = list(self.spacing_mm)
        return result

    def summary(self) -> str:
        """One line for people: liver and tumour volume, burden and lesion count."""
        burden = "n/a" if self.tumour_burden_percent is None else f"{self.tumour_burden_percent:.1f} %"
        return (
            f"liver {self.liver_volume_ml:.1f} mL, tumour {self.tumour_volume_ml:.1f} mL (burden {burden}), "
            f"{self.lesion_count} lesion{'' if self.lesion_count == 1 else 's'}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Geometry


def axial_axis(direction: Sequence[float]) -> tuple[int, float]:
    """``(slice axis, tilt in degrees)`` of an image with ITK direction ``direction`` (9 values, row-major).

    The slice axis is the voxel axis (0, 1, 2 for ITK's i, j, k) whose direction column has the largest absolute
    patient-z component; the tilt is the angle between that axis and the patient's z axis, i.e. between the slice
    plane and the axial plane.
    """
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    columns = matrix / np.linalg.norm(matrix, axis=0, keepdims=True)
    axis = int(np.argmax(np.abs(columns[2])))
    tilt = math.degrees(math.acos(min(1.0, abs(float(columns[2, axis])))))
    return axis, tilt


def _hull_polygon(points: np.ndarray) -> np.ndarray:
    """The convex hull of 2D ``points`` as an ordered polygon; for collinear points, the segment's two ends."""
    unique = np.unique(points, axis=0)
    if len(unique) >= 3:
        try:
            return unique[ConvexHull(unique).vertices]
        except QhullError:  # all points on one line
            pass
    if len(unique) == 1:
        return unique
    # Collinear: the two points farthest apart along the line through them.
    direction = unique[-1] - unique[0]
    t = unique @ direction
    return unique[[int(np.argmin(t)), int(np.argmax(t))]]


def _max_perpendicular_chord(polygon: np.ndarray, u: np.ndarray) -> float:
    """Longest chord of a convex polygon perpendicular to unit vector ``u``.

    The chord length along the lines ``x·u = t`` is a concave, piecewise linear function of ``t`` with its breaks at
    the vertices, so its maximum is at one of the vertices' ``t``: evaluating there is exact.
    """
    if len(polygon) < 3:
        return 0.0
    n = np.array([-u[1], u[0]])
    t, s = polygon @ u, polygon @ n
    ta, tb = t, np.roll(t, -1)
    sa, sb = s, np.roll(s, -1)
    lines = t[:, None]  # one candidate line per vertex
    lo, hi = np.minimum(ta, tb)[None, :], np.maximum(ta, tb)[None, :]
    crosses = (lines >= lo - 1e-9) & (lines <= hi + 1e-9)
    span = tb - ta
    flat = np.abs(span) < 1e-12
    fraction = np.where(flat, 0.0, (lines - ta) / np.where(flat, 1.0, span))
    where = sa + np.clip(fraction, 0.0, 1.0) * (sb - sa)
    # An edge lying on the line contributes both its ends.
    where_b = np.where(flat[None, :], sb[None, :], where)
    upper = np.maximum(np.where(crosses, where, -np.inf), np.where(crosses, where_b, -np.inf)).max(axis=1)
    lower = np.minimum(np.where(crosses, where, np.inf), np.where(crosses, where_b, np.inf)).min(axis=1)
    return float(np.max(upper - lower))


def axial_diameters(points: np.ndarray) -> tuple[float, float]:
    """``(longest, perpendicular)`` diameter, in the units of ``points``, of one slice's 2D voxel centres ``(n, 2)``.

    Longest: the largest distance between two points. Perpendicular: the longest chord of the points' convex hull
    perpendicular to that longest diameter. Both 0 for a single point; the perpendicular one 0 for collinear points.
    """
    points = np.asarray(points, dtype=float)
    if len(points) < 2:
        return 0.0, 0.0
    polygon = _hull_polygon(points)
    if len(polygon) < 2:
        return 0.0, 0.0
    d2 = ((polygon[:, None, :] - polygon[None, :, :]) ** 2).sum(axis=-1)
    i, j = np.unravel_index(int(np.argmax(d2)), d2.shape)
    longest = math.sqrt(float(d2[i, j]))
    if longest == 0.0:
        return 0.0, 0.0
    u = (polygon[j] - polygon[i]) / longest
    return longest, _max_perpendicular_chord(polygon, u)


# ----------------------------------------------------------------------------------------------------------------
# Measuring


def _read(image: str | Path | sitk.Image, what: str) -> tuple[sitk.Image, str]:
    if isinstance(image, sitk.Image):
        return image, what
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        return sitk.ReadImage(str(path)), str(path)
    except RuntimeError as e:
        raise ValueError(f"{path}: cannot read the {what}: {str(e).strip().splitlines()[-1]}") from e


def _labels(mask: sitk.Image, name: str) -> np.ndarray:
    if mask.GetNumberOfComponentsPerPixel() != 1 or mask.GetDimension() != 3:
        raise ValueError(f"{name}: a label mask must be a 3D single-component image")
    array = sitk.GetArrayViewFromImage(mask)
    values = np.unique(array)
    unknown = [v for v in values.tolist() if v not in LABEL_VALUES]
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:10])
        raise ValueError(f"{name}: label values {shown} are not LiTS labels (0 background, 1 liver, 2 tumour)")
    return np.asarray(array).astype(np.uint8)


def _same_grid(mask: sitk.Image, image: sitk.Image, mask_name: str, image_name: str) -> None:
    problems = []
    if mask.GetSize() != image.GetSize():
        problems.append(f"size {image.GetSize()} vs {mask.GetSize()}")
    for what, a, b in (
        ("spacing", image.GetSpacing(), mask.GetSpacing()),
        ("origin", image.GetOrigin(), mask.GetOrigin()),
        ("direction", image.GetDirection(), mask.GetDirection()),
    ):
        if not np.allclose(a, b, rtol=1e-5, atol=1e-4):
            problems.append(f"{what} {tuple(np.round(a, 5))} vs {tuple(np.round(b, 5))}")
    if problems:
        raise ValueError(f"{image_name}: not on the grid of mask {mask_name}: {'; '.join(problems)}")


def _in_plane_basis(mask: sitk.Image, slice_axis: int) -> tuple[tuple[int, int], np.ndarray]:
    """The two in-plane ITK axes and the 2x2 matrix taking their index offsets to orthonormal in-plane mm."""
    axes = tuple(a for a in range(3) if a != slice_axis)
    matrix = np.asarray(mask.GetDirection(), dtype=float).reshape(3, 3) * np.asarray(mask.GetSpacing())[None, :]
    # QR keeps distances: in-plane physical offsets M @ d have the norm of R @ d.
    _, r = np.linalg.qr(matrix[:, list(axes)])
    return axes, r  # type: ignore[return-value]


def measure_burden(
    mask: str | Path | sitk.Image,
    image: str | Path | sitk.Image | None = None,
    *,
    min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3,
) -> Burden:
    """Measure liver and tumour volume, tumour burden and every lesion of a LiTS-labelled mask.

    Args:
        mask: Label file or image (0 background, 1 liver, 2 tumour).
        image: The CT on the mask's grid, for each lesion's mean HU; None leaves ``mean_hu`` None.
        min_lesion_mm3: Tumour components smaller than this are not counted as lesions (0 counts all).

    Raises:
        FileNotFoundError: A file does not exist.
        ValueError: A file cannot be read, the mask holds other values than 0, 1, 2, or the image is on another grid.
    """
    if not (isinstance(min_lesion_mm3, int | float) and math.isfinite(min_lesion_mm3) and min_lesion_mm3 >= 0):
        raise ValueError(f"the minimum lesion volume must be a number >= 0 mm^3, got {min_lesion_mm3!r}")
    mask_image, mask_name = _read(mask, "mask")
    labels = _labels(mask_image, mask_name)
    intensities = None
    if image is not None:
        ct, image_name = _read(image, "image")
        _same_grid(mask_image, ct, mask_name, image_name)
        intensities = sitk.GetArrayViewFromImage(ct)

    spacing = tuple(float(s) for s in mask_image.GetSpacing())
    direction = np.asarray(mask_image.GetDirection(), dtype=float).reshape(3, 3)
    voxel_mm3 = float(abs(np.linalg.det(direction * np.asarray(spacing)[None, :])))
    slice_axis, tilt = axial_axis(mask_image.GetDirection())
    plane_axes, to_mm = _in_plane_basis(mask_image, slice_axis)

    tumour = labels == TUMOUR
    liver_voxels = int(np.count_nonzero(labels))
    tumour_voxels = int(np.count_nonzero(tumour))
    components, count = ndimage.label(tumour, structure=_STRUCTURE_26)
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    boxes = ndimage.find_objects(components)
    kept = [c for c in range(1, count + 1) if sizes[c - 1] * voxel_mm3 >= min_lesion_mm3]
    kept.sort(key=lambda c: (-int(sizes[c - 1]), c))  # largest first; ties by scan order
    excluded = count - len(kept)
    excluded_voxels = int(sizes.sum()) - int(sum(int(sizes[c - 1]) for c in kept))

    lesions = []
    for number, component in enumerate(kept, start=1):
        box = boxes[component - 1]
        local = components[box] == component
        offset = np.array([s.start for s in box])
        idx = np.argwhere(local) + offset  # numpy (k, j, i)
        itk_index = idx[:, ::-1].astype(float)  # (i, j, k)
        centroid = mask_image.TransformContinuousIndexToPhysicalPoint(tuple(itk_index.mean(axis=0).tolist()))
        longest, perpendicular, best_slice = -1.0, 0.0, 0
        for value in np.unique(itk_index[:, slice_axis]):
            in_slice = itk_index[itk_index[:, slice_axis] == value][:, list(plane_axes)]
            d_long, d_perp = axial_diameters(in_slice @ to_mm.T)
            if d_long > longest:
                longest, perpendicular, best_slice = d_long, d_perp, int(value)
        mean_hu = None
        if intensities is not None:
            mean_hu = float(np.mean(np.asarray(intensities[box], dtype=np.float64)[local]))
        lesions.append(
            Lesion(
                lesion=number,
                voxels=int(sizes[component - 1]),
                volume_ml=int(sizes[component - 1]) * voxel_mm3 / 1000.0,
                longest_axial_diameter_mm=longest,
                perpendicular_diameter_mm=perpendicular,
                axial_slice=best_slice,
                centroid_mm=tuple(float(c) for c in centroid),  # type: ignore[arg-type]
                mean_hu=mean_hu,
            )
        )
    liver_ml = liver_voxels * voxel_mm3 / 1000.0
    tumour_ml = tumour_voxels * voxel_mm3 / 1000.0
    return Burden(
        liver_volume_ml=liver_ml,
        tumour_volume_ml=tumour_ml,
        tumour_burden_percent=100.0 * tumour_voxels / liver_voxels if liver_voxels else None,
        lesion_count=len(lesions),
        lesions=tuple(lesions),
        excluded_components=excluded,
        excluded_volume_ml=excluded_voxels * voxel_mm3 / 1000.0,
        min_lesion_mm3=float(min_lesion_mm3),
        spacing_mm=spacing,  # type: ignore[arg-type]
        slice_axis=slice_axis,
        axial_tilt_deg=tilt,
    )


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def lesions_csv(cases: Sequence[tuple[str, Burden]]) -> str:
    """The per-lesion CSV text (:data:`LESION_COLUMNS`): one row per lesion of every case, header always present."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LESION_COLUMNS)
    for case, burden in cases:
        for lesion in burden.lesions:
            x, y, z = lesion.centroid_mm
            writer.writerow(
                [
                    _cell(v)
                    for v in (
                        case,
                        lesion.lesion,
                        lesion.voxels,
                        lesion.volume_ml,
                        lesion.longest_axial_diameter_mm,
                        lesion.perpendicular_diameter_mm,
                        lesion.axial_slice,
                        x,
                        y,
                        z,
                        lesion.mean_hu,
                    )
                ]
            )
    return buffer.getvalue()


def cases_csv(cases: Sequence[tuple[str, Burden]]) -> str:
    """The per-case CSV text (:data:`CASE_COLUMNS`), one row per case."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CASE_COLUMNS)
    for case, b in cases:
        row = (
            case,
            b.liver_volume_ml,
            b.tumour_volume_ml,
            b.tumour_burden_percent,
            b.lesion_count,
            b.excluded_components,
            b.excluded_volume_ml,
        )
        writer.writerow([_cell(v) for v in row])
    return buffer.getvalue()


def stats_header(min_lesion_mm3: float) -> dict[str, Any]:
    """What every stats.json starts with: the writer, the definitions and the settings."""
    return {
        "written_by": f"nnyseg {nnyseg.__version__}",
        "conventions": dict(CONVENTIONS),
        "settings": {"min_lesion_mm3": float(min_lesion_mm3)},
    }


def _mask_files(masks: Path) -> dict[str, Path]:
    if masks.is_file():
        ending = next((e for e in MASK_ENDINGS if masks.name.endswith(e)), None)
        if ending is None:
            raise ValueError(f"{masks}: not a label file (endings {', '.join(MASK_ENDINGS)})")
        return {masks.name[: -len(ending)]: masks}
    if not masks.is_dir():
        raise FileNotFoundError(f"{masks}: no such file or folder (MASKS)")
    found = {}
    for path in sorted(masks.iterdir()):
        ending = next((e for e in MASK_ENDINGS if path.name.endswith(e)), None)
        if ending is not None and path.is_file() and not path.name.startswith("."):
            found[path.name[: -len(ending)]] = path
    if not found:
        raise ValueError(f"{masks}: no label files (endings {', '.join(MASK_ENDINGS)})")
    return found


def _image_for(case: str, mask: Path, images: Path) -> Path:
    if images.is_file():
        return images
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: no such file or folder (--images)")
    ending = next(e for e in MASK_ENDINGS if mask.name.endswith(e))
    for candidate in (images / f"{case}_0000{ending}", images / mask.name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"case {case}: no image {case}_0000{ending} (or {mask.name}) in {images}")


def write_stats_folder(
    masks: str | Path,
    output: str | Path,
    *,
    images: str | Path | None = None,
    min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3,
    overwrite: bool = False,
) -> Path:
    """``nnyseg stats``: measure every mask and write ``stats.json``, ``lesions.csv`` and ``cases.csv`` into ``output``.

    Args:
        masks: A label file, or a folder of label files (each one a case, named by its file name).
        output: Folder to write, atomically (it replaces an existing one only when complete).
        images: The CT images for mean HU: the image file when ``masks`` is a file; else a folder holding
            ``CASE_0000.nii.gz`` (nnU-Net naming) or ``CASE.nii.gz`` for each case.
        min_lesion_mm3: Minimum lesion volume (see :func:`measure_burden`).
        overwrite: Replace an existing ``output``.

    Returns:
        The ``stats.json`` written.

    Raises:
        FileExistsError: ``output`` exists and ``overwrite`` is False.
        FileNotFoundError: A mask, image or folder is missing.
        ValueError: A file cannot be read, holds other labels, or an image is not on its mask's grid.
    """
    masks, output = Path(masks), Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: already exists (pass --overwrite to replace it)")
    files = _mask_files(masks)
    image_root = Path(images) if images is not None else None
    if image_root is not None and image_root.is_file() and len(files) > 1:
        raise ValueError(f"{image_root}: --images must be a folder when MASKS is a folder of several masks")
    results: list[tuple[str, Burden]] = []
    sources: dict[str, dict[str, str | None]] = {}
    for case, path in files.items():
        image = _image_for(case, path, image_root) if image_root is not None else None
        results.append((case, measure_burden(path, image, min_lesion_mm3=min_lesion_mm3)))
        sources[case] = {"mask": str(path.resolve()), "image": str(image.resolve()) if image else None}
    document = stats_header(min_lesion_mm3)
    document["cases"] = {case: {**sources[case], **burden.to_dict()} for case, burden in results}
    with atomic_folder(output, overwrite=overwrite) as folder:
        write_json_atomic(folder / "stats.json", document)
        with atomic_file(folder / "lesions.csv") as tmp:
            tmp.write_text(lesions_csv(results), encoding="utf-8")
        with atomic_file(folder / "cases.csv") as tmp:
            tmp.write_text(cases_csv(results), encoding="utf-8")
    return output / "stats.json"
