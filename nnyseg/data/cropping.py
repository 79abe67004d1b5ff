"""Voxel boxes, body masks, crops and paste-back: the geometry shared by ``nnyseg body-crop`` and the cascade.

Conventions:

* Arrays and boxes are in numpy order ``(z, y, x)``, as ``SimpleITK.GetArrayFromImage`` returns them. SimpleITK's
  spacing, origin, size and index are ``(x, y, z)``; :func:`spacing_zyx` converts the spacing.
* A :class:`Box` is a half-open voxel box (``start`` inclusive, ``stop`` exclusive), like Python slices.
* Cropping keeps the physical geometry: a crop has the source's spacing and direction, and its origin is the physical
  position of the box's first voxel. Pasting back is therefore exact, voxel for voxel, and :func:`box_in_reference`
  recovers the box of any crop from its header alone.
* Margins are in millimetres and become whole voxels per axis (rounded up, so a crop is never smaller than asked),
  clipped at the image border.

``nnyseg body-crop`` (:func:`body_crop_dataset`) implements the body-mask crop of the ELANRes-MSCA paper in dataset
conversion (docs/elanres_msca.md, "Preprocessing"): HU > -500, largest connected component, binary closing with a
ball of radius 3 voxels, hole filling, crop to the bounding box. nnU-Net's own ``crop_to_nonzero`` cannot do this for
CT: air is about -1024 HU, not 0, so its non-zero mask covers the whole image. ``nnyseg uncrop``
(:func:`uncrop_predictions`) pastes predictions made on the cropped images back onto the original grids.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from nnyseg.io import atomic_folder

BODY_THRESHOLD_HU = -500.0
BODY_CLOSING_RADIUS_VOXELS = 3
#: Tolerance for "the same grid": a crop's origin must fall this close to a voxel of the reference (in voxels).
_INDEX_ATOL = 1e-3
_GEOMETRY_ATOL = 1e-5
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


@dataclass(frozen=True)
class Box:
    """A half-open voxel box in numpy ``(z, y, x)`` order."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.start) != len(self.stop) or any(a >= b for a, b in zip(self.start, self.stop, strict=True)):
            raise ValueError(f"not a non-empty box: start {self.start}, stop {self.stop}")

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))

    def union(self, other: Box) -> Box:
        return Box(
            tuple(map(min, self.start, other.start)),
            tuple(map(max, self.stop, other.stop)),
        )

    def contains(self, other: Box) -> bool:
        return all(a <= c for a, c in zip(self.start, other.start, strict=True)) and all(
            b >= d for b, d in zip(self.stop, other.stop, strict=True)
        )

    def to_json(self) -> dict[str, list[int]]:
        return {"start_zyx": list(self.start), "stop_zyx": list(self.stop)}

    @classmethod
    def from_json(cls, data: dict) -> Box:
        return cls(tuple(int(v) for v in data["start_zyx"]), tuple(int(v) for v in data["stop_zyx"]))


def spacing_zyx(image: sitk.Image) -> tuple[float, ...]:
    """The image's voxel spacing in numpy order."""
    return tuple(image.GetSpacing()[::-1])


def bounding_box(mask: np.ndarray) -> Box | None:
    """The smallest box holding every True voxel of ``mask``, or None when the mask is empty."""
    found = ndimage.find_objects(np.asarray(mask, dtype=bool).astype(np.uint8))
    if not found or found[0] is None:
        return None
    return Box(tuple(s.start for s in found[0]), tuple(s.stop for s in found[0]))


def grow_box(
    box: Box,
    margin_mm: float | np.ndarray | Sequence,
    spacing: Sequence[float],
    shape: Sequence[int],
) -> Box:
    """``box`` grown by a margin in mm on every side, in whole voxels rounded up, clipped to an image of ``shape``.

    Args:
        box: The box to grow, ``(z, y, x)``.
        margin_mm: One margin for every side, or an array of shape ``(ndim, 2)``: (before, after) per axis.
        spacing: Voxel spacing in mm, numpy order (:func:`spacing_zyx`).
        shape: Image shape, numpy order.
    """
    margins = np.broadcast_to(np.asarray(margin_mm, dtype=float), (len(shape), 2))
    if np.any(margins < 0):
        raise ValueError(f"margins must not be negative, got {margin_mm}")
    voxels = np.ceil(margins / np.asarray(spacing, dtype=float)[:, None] - 1e-9).astype(int)
    start = np.maximum(np.asarray(box.start) - voxels[:, 0], 0)
    stop = np.minimum(np.asarray(box.stop) + voxels[:, 1], np.asarray(shape))
    return Box(tuple(int(v) for v in start), tuple(int(v) for v in stop))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of ``mask`` (all False when the mask is empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    return cc3d.largest_k(mask, k=1, connectivity=26) > 0


def body_mask(
    image: np.ndarray,
    *,
    threshold_hu: float = BODY_THRESHOLD_HU,
    closing_radius: int = BODY_CLOSING_RADIUS_VOXELS,
) -> np.ndarray:
    """The patient's body in a CT array (HU): threshold, largest component, closing, hole filling.

    The array is padded by the closing radius first, so that the closing does not erode the mask where the body
    touches the image border (the top and bottom slices of an abdominal scan always do).
    """
    mask = largest_component(np.asarray(image) > threshold_hu)
    if closing_radius > 0 and mask.any():
        ball = ndimage.iterate_structure(ndimage.generate_binary_structure(mask.ndim, 1), closing_radius)
        padded = np.pad(mask, closing_radius, mode="edge")
        closed = ndimage.binary_closing(padded, structure=ball)
        mask = closed[tuple(slice(closing_radius, -closing_radius) for _ in range(mask.ndim))]
    return ndimage.binary_fill_holes(mask)


def crop_image(image: sitk.Image, box: Box) -> sitk.Image:
    """The voxels of ``box``, with the physical geometry kept (origin moved, spacing and direction unchanged)."""
    size = image.GetSize()[::-1]
    if any(a < 0 or b > n for a, b, n in zip(box.start, box.stop, size, strict=True)):
        raise ValueError(f"box {box} does not fit an image of shape {size} (z, y, x)")
    return sitk.RegionOfInterest(image, size=box.shape[::-1], index=box.start[::-1])


def paste_array(cropped: np.ndarray, box: Box, shape: Sequence[int], fill: int | float = 0) -> np.ndarray:
    """An array of ``shape`` that holds ``cropped`` in ``box`` and ``fill`` elsewhere."""
    if tuple(cropped.shape) != box.shape:
        raise ValueError(f"crop of shape {cropped.shape} does not match box {box}")
    full = np.full(tuple(shape), fill, dtype=cropped.dtype)
    full[box.slices] = cropped
    return full


def read_header(path: str | Path) -> sitk.ImageFileReader:
    """The header of an image file (size, spacing, origin, direction) without reading its voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def copy_geometry(image: sitk.Image, reference: sitk.Image | sitk.ImageFileReader) -> sitk.Image:
    """``image`` with ``reference``'s spacing, origin and direction (a header or an image of the same size)."""
    if tuple(image.GetSize()) != tuple(reference.GetSize()):
        raise ValueError(f"size {image.GetSize()} does not match the reference's {reference.GetSize()}")
    image.SetSpacing(reference.GetSpacing())
    image.SetOrigin(reference.GetOrigin())
    image.SetDirection(reference.GetDirection())
    return image


def box_in_reference(cropped: sitk.Image | sitk.ImageFileReader, reference: sitk.Image | sitk.ImageFileReader) -> Box:
    """The box of ``reference`` that ``cropped`` covers, from the two headers (images or :func:`read_header`).

    Raises:
        ValueError: The crop is not on the reference's grid (other spacing or direction, an origin between voxels),
            or reaches outside it.
    """
    problems = []
    spacing = np.asarray(reference.GetSpacing())
    direction = np.asarray(reference.GetDirection()).reshape(len(spacing), len(spacing))
    if not np.allclose(cropped.GetSpacing(), spacing, rtol=0, atol=_GEOMETRY_ATOL):
        problems.append(f"spacing {cropped.GetSpacing()} != {tuple(spacing)}")
    if not np.allclose(cropped.GetDirection(), direction.ravel(), rtol=0, atol=_GEOMETRY_ATOL):
        problems.append(f"direction {cropped.GetDirection()} != {tuple(direction.ravel())}")
    # physical = origin + direction @ (spacing * index)  =>  index = (direction @ diag(spacing))^-1 (physical - origin)
    offset = np.asarray(cropped.GetOrigin()) - np.asarray(reference.GetOrigin())
    index = np.linalg.solve(direction * spacing, offset)
    start_xyz = np.rint(index).astype(int)
    if not np.allclose(index, start_xyz, rtol=0, atol=_INDEX_ATOL):
        problems.append(f"origin {cropped.GetOrigin()} is not on a voxel of the reference (index {index.tolist()})")
    stop_xyz = start_xyz + np.asarray(cropped.GetSize())
    if np.any(start_xyz < 0) or np.any(stop_xyz > np.asarray(reference.GetSize())):
        problems.append(f"covers voxels {start_xyz.tolist()}..{stop_xyz.tolist()} outside {reference.GetSize()}")
    if problems:
        raise ValueError("not a crop of the reference grid: " + "; ".join(problems))
    return Box(tuple(int(v) for v in start_xyz[::-1]), tuple(int(v) for v in stop_xyz[::-1]))


def paste_image(cropped: sitk.Image, reference: sitk.Image | sitk.ImageFileReader, fill: int = 0) -> sitk.Image:
    """``cropped`` pasted onto ``reference``'s grid (``fill`` outside), with ``reference``'s exact geometry."""
    box = box_in_reference(cropped, reference)
    full = paste_array(sitk.GetArrayFromImage(cropped), box, reference.GetSize()[::-1], fill)
    return copy_geometry(sitk.GetImageFromArray(full), reference)


# ------------------------------------------------------------------------------------------------------------------
# Whole datasets
# ------------------------------------------------------------------------------------------------------------------
def case_images(folder: Path, file_ending: str) -> dict[str, list[Path]]:
    """nnU-Net image files of a folder grouped by case: ``{case: [CASE_0000.ext, CASE_0001.ext, ...]}``."""
    cases: dict[str, list[Path]] = {}
    for path in sorted(folder.glob(f"*{file_ending}")):
        stem = path.name[: -len(file_ending)]
        if _CHANNEL_SUFFIX.search(stem):
            cases.setdefault(stem[:-5], []).append(path)
    return cases


def _check_new_dataset_id(raw_root: Path, dataset_id: int, folder_name: str) -> None:
    clashes = sorted(
        p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir() and p.name != folder_name
    )
    if clashes:
        raise ValueError(f"{raw_root} already holds {clashes[0]} with dataset id {dataset_id}; choose another id")


def new_dataset_folder(raw_root: Path, dataset_id: int, name: str) -> Path:
    """``raw_root/DatasetXXX_name``, after checking that no other folder uses the id."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id must be 1-999, got {dataset_id}")
    folder_name = f"Dataset{dataset_id:03d}_{name}"
    _check_new_dataset_id(raw_root, dataset_id, folder_name)
    return raw_root / folder_name


def body_crop_dataset(
    dataset: int | str | Path,
    new_dataset_id: int,
    *,
    name: str | None = None,
    raw_root: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a copy of a raw dataset with every case cropped to its body mask; returns the new folder.

    The box comes from the first channel (CT in HU). For training cases it also covers every labelled voxel, so no
    annotation is ever lost. Images and labels (``labelsTr`` and, where present, ``labelsTs``) are cropped alike, and
    ``crops.json`` records per case the source files, the box and the original shape. The source is only read.

    Raises:
        ValueError: Bad dataset (see :func:`nnyseg.data.validation.find_raw_dataset`), an id in use, or a case whose
            label does not share its image's grid.
        FileExistsError: The new dataset exists and ``overwrite`` is False.
    """
    from nnyseg.data.validation import compare_geometry, find_raw_dataset, load_dataset_json, nnunet_raw_folder

    source = find_raw_dataset(dataset)
    dataset_json = load_dataset_json(source)
    ending = dataset_json["file_ending"]
    raw_root = Path(raw_root) if raw_root is not None else nnunet_raw_folder()
    target = new_dataset_folder(raw_root, new_dataset_id, name or f"{source.name.split('_', 1)[1]}BodyCrop")

    record: dict = {
        "source": str(source),
        "body_mask": {"threshold_hu": BODY_THRESHOLD_HU, "closing_radius_voxels": BODY_CLOSING_RADIUS_VOXELS},
        "convention": "boxes are half-open voxel index ranges in numpy (z, y, x) order of the original image",
        "cases": {},
    }
    with atomic_folder(target, overwrite=overwrite) as tmp:
        for images_sub, labels_sub in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
            cases = case_images(source / images_sub, ending)
            for case, files in tqdm(cases.items(), desc=f"body crop {images_sub}", disable=not progress):
                label_path = source / labels_sub / f"{case}{ending}"
                first = sitk.ReadImage(str(files[0]))
                mask = body_mask(sitk.GetArrayFromImage(first))
                box = bounding_box(mask)
                if label_path.is_file():
                    problems = compare_geometry(files[0], label_path)
                    if problems:
                        raise ValueError(f"{label_path}: " + "; ".join(problems))
                    label = sitk.ReadImage(str(label_path))
                    label_box = bounding_box(sitk.GetArrayViewFromImage(label) > 0)
                    if label_box is not None:
                        box = label_box if box is None else box.union(label_box)
                if box is None:
                    raise ValueError(f"{files[0]}: no voxel above {BODY_THRESHOLD_HU} HU; is this a CT in HU?")
                for path in files:
                    image = first if path == files[0] else sitk.ReadImage(str(path))
                    (tmp / images_sub).mkdir(exist_ok=True)
                    sitk.WriteImage(crop_image(image, box), str(tmp / images_sub / path.name), True)
                if label_path.is_file():
                    (tmp / labels_sub).mkdir(exist_ok=True)
                    sitk.WriteImage(crop_image(label, box), str(tmp / labels_sub / label_path.name), True)
                record["cases"][case] = {
                    "split": images_sub,
                    "source_images": [str(p) for p in files],
                    "box": box.to_json(),
                    "original_shape_zyx": list(first.GetSize()[::-1]),
                }
        new_json = dict(dataset_json, name=target.name)
        new_json["description"] = f"{source.name} cropped to the body mask (nnyseg body-crop; see crops.json)"
        (tmp / "dataset.json").write_text(json.dumps(new_json, indent=2) + "\n", encoding="utf-8")
        (tmp / "crops.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return target


def uncrop_predictions(
    predictions: Path,
    reference_images: Path,
    output: Path,
    *,
    file_ending: str = ".nii.gz",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Paste every prediction of ``predictions`` back onto its original image grid (0 outside); returns ``output``.

    ``CASE.ext`` is matched with ``CASE_0000.ext`` (or ``CASE.ext``) in ``reference_images``; the box is recovered
    from the two headers (:func:`box_in_reference`), so any crop of the original grid works.

    Raises:
        FileNotFoundError: A folder or a case's reference image is missing.
        ValueError: A prediction is not a crop of its reference's grid (the message names both files).
    """
    predictions, reference_images = Path(predictions), Path(reference_images)
    for folder in (predictions, reference_images):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
    files = sorted(predictions.glob(f"*{file_ending}"))
    if not files:
        raise FileNotFoundError(f"{predictions}: no {file_ending} files")
    with atomic_folder(output, overwrite=overwrite) as tmp:
        for path in tqdm(files, desc="uncrop", disable=not progress):
            case = path.name[: -len(file_ending)]
            candidates = [reference_images / f"{case}_0000{file_ending}", reference_images / f"{case}{file_ending}"]
            reference_path = next((p for p in candidates if p.is_file()), None)
            if reference_path is None:
                raise FileNotFoundError(f"{path}: no reference image {candidates[0].name} in {reference_images}")
            try:
                full = paste_image(sitk.ReadImage(str(path)), read_header(reference_path))
            except ValueError as e:
                raise ValueError(f"{path} on {reference_path}: {e}") from e
            sitk.WriteImage(full, str(tmp / path.name), True)
        for extra in ("dataset.json", "plans.json"):
            if (predictions / extra).is_file():
                shutil.copy2(predictions / extra, tmp / extra)
    return Path(output)
