"""Deterministic synthetic abdominal CT phantom with liver and liver-tumour labels.

The generator draws a simplified upper abdomen (body wall, spine, vessels, liver, spleen, kidneys, stomach, bowel,
gallbladder, lung bases and heart) on a chosen voxel grid and paints CT numbers per tissue and contrast phase. It
models partial volume (in-plane supersampling), a Gaussian point-spread function, smooth organ texture and spatially
correlated quantum noise. Labels follow the LiTS / MSD Task03 convention: 0 background, 1 liver, 2 tumour.

Everything is pure numpy + scipy (SimpleITK only writes files), needs no network, and is deterministic: one
``numpy.random.SeedSequence(seed)`` is split into four independent streams (geometry, tumours, texture, noise), so
e.g. changing the noise level never moves a tumour, and the same seed gives the same patient on every grid preset.

The tissue values, geometry and noise model, with their sources, are described in docs/phantom.md; among them: mean
unenhanced liver 58.8 HU (Boyce et al., AJR 2010), portal-venous hepatic enhancement +56 HU (Naruo et al., Radiat Med
2007), hypodense metastases about 30-60 HU below the liver in the portal phase (about -48 HU in a LiTS case), and
noise that falls with the square root of the slice thickness (Kanal et al., AJR 2007).

Coordinates: arrays are indexed ``(z, y, x)`` as ``SimpleITK.GetArrayFromImage`` returns them; spacing, origin and
direction are in SimpleITK's (x, y, z) order and LPS convention (x towards the patient's left, y posterior,
z superior). NIfTI files are written by SimpleITK, which converts LPS to the file's RAS affine itself.

Example:
    >>> case = make_case(0, "tiny")
    >>> image, label = case.to_sitk()
    >>> write_nnunet_dataset(Path("/data/nnUNet_raw"), 501, num_training=8, num_test=2)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import SimpleITK as sitk
from scipy import ndimage

__all__ = [
    "DEFAULT_PHASE",
    "DIRECTIONS",
    "GENERATOR_VERSION",
    "GRID_PRESETS",
    "NOISE_SD_HU",
    "PHASES",
    "TISSUE_HU",
    "TISSUE_TEXTURE_SD",
    "TUMOUR_DELTA_HU",
    "GridPreset",
    "PhantomCase",
    "make_case",
    "tissue_statistics",
    "write_nnunet_dataset",
]

GENERATOR_VERSION = "1.0"
"""Bumped whenever the same seed and arguments would give different labels."""

PHASES = ("native", "portal", "arterial")
DEFAULT_PHASE = "portal"
DIRECTIONS = ("identity", "flipped", "oblique")
OBLIQUE_ANGLE_DEG = 10.0
"""Rotation about the z axis of the ``oblique`` direction variant."""

MAX_TUMOURS = 8
TUMOUR_RADIUS_MM = (3.0, 40.0)
LABEL_BACKGROUND, LABEL_LIVER, LABEL_TUMOUR = 0, 1, 2

NOISE_SD_HU = {"native": 10.0, "portal": 12.0, "arterial": 12.0}
"""Quantum-noise ROI SD (HU) at the reference slice thickness, per phase."""
NOISE_REFERENCE_THICKNESS_MM = 3.0
NOISE_SIGMA_XY_VOXEL = 0.7
"""In-plane Gaussian that correlates the noise: lag-1 correlation exp(-1 / (4 sigma^2)) = 0.60."""
PSF_SIGMA_XY_VOXEL = 0.4
TEXTURE_SIGMA_MM = (4.0, 6.0)
TUMOUR_TEXTURE_SD = 8.0

# Grid centre in physical LPS coordinates (mm). Non-zero so that code which drops the origin is caught.
_GRID_CENTRE = (0.0, 20.0, -150.0)


@dataclass(frozen=True)
class GridPreset:
    """A voxel grid for the phantom.

    Attributes:
        spacing: Voxel spacing in mm, SimpleITK order (x, y, z).
        shape: Grid size in voxels, SimpleITK order (x, y, z).
        supersample: In-plane supersampling factor used to model partial volume (odd, so that one sample sits at
            each voxel centre and labels can come from it).
        use: What the preset is meant for.
    """

    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    supersample: int = 3
    use: str = ""

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        """Field of view in mm, (x, y, z)."""
        return tuple(float(n * s) for n, s in zip(self.shape, self.spacing, strict=True))  # type: ignore[return-value]

    @property
    def array_shape(self) -> tuple[int, int, int]:
        """Shape of the numpy arrays, (z, y, x)."""
        return (self.shape[2], self.shape[1], self.shape[0])


GRID_PRESETS: dict[str, GridPreset] = {
    "micro": GridPreset((6.0, 6.0, 8.0), (48, 40, 24), 3, "fastest end-to-end tests"),
    "tiny": GridPreset((4.0, 4.0, 5.0), (96, 72, 40), 3, "unit tests"),
    "small": GridPreset((2.0, 2.0, 3.0), (176, 128, 64), 3, "nnU-Net plan/preprocess smoke tests"),
    "clinical": GridPreset((0.75, 0.75, 2.5), (448, 320, 96), 1, "realistic anisotropy (CHAOS, TotalSegmentator)"),
    "lits_like": GridPreset((0.77, 0.77, 1.0), (416, 320, 200), 1, "benchmarks only"),
}

# ----------------------------------------------------------------------------------------------------------------
# Tissue table (docs/phantom.md, "CT numbers"): HU (native, portal, arterial) and texture SD (native, portal, arterial).
_TISSUE_ROWS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "air": ((-1000.0, -1000.0, -1000.0), (0.0, 0.0, 0.0)),
    "lung": ((-850.0, -850.0, -850.0), (30.0, 30.0, 30.0)),
    "fat": ((-100.0, -100.0, -100.0), (10.0, 10.0, 10.0)),
    "skin": ((30.0, 40.0, 40.0), (5.0, 5.0, 5.0)),
    "muscle": ((50.0, 60.0, 60.0), (5.0, 5.0, 5.0)),
    "liver": ((60.0, 110.0, 80.0), (4.0, 6.0, 6.0)),
    "spleen": ((50.0, 115.0, 150.0), (5.0, 6.0, 20.0)),
    "kidney_cortex": ((30.0, 160.0, 180.0), (6.0, 8.0, 10.0)),
    "kidney_medulla": ((25.0, 120.0, 140.0), (6.0, 8.0, 10.0)),
    "aorta": ((45.0, 170.0, 300.0), (5.0, 6.0, 8.0)),
    "ivc": ((45.0, 140.0, 70.0), (5.0, 6.0, 8.0)),
    "portal_vein": ((45.0, 140.0, 70.0), (5.0, 6.0, 8.0)),
    "hepatic_vein": ((45.0, 135.0, 80.0), (4.0, 6.0, 6.0)),
    "bone_trabecular": ((200.0, 200.0, 200.0), (30.0, 30.0, 30.0)),
    "bone_cortical": ((900.0, 900.0, 900.0), (40.0, 40.0, 40.0)),
    "bone_mixed": ((350.0, 350.0, 350.0), (40.0, 40.0, 40.0)),
    "disc": ((80.0, 80.0, 80.0), (5.0, 5.0, 5.0)),
    "csf": ((10.0, 10.0, 10.0), (3.0, 3.0, 3.0)),
    "gallbladder": ((10.0, 10.0, 10.0), (2.0, 2.0, 2.0)),
    "gi_content": ((20.0, 20.0, 20.0), (3.0, 3.0, 3.0)),
    "gi_wall": ((40.0, 80.0, 90.0), (5.0, 5.0, 5.0)),
    "heart": ((40.0, 130.0, 250.0), (8.0, 8.0, 8.0)),
}
TISSUE_HU: dict[str, dict[str, float]] = {
    phase: {name: row[0][i] for name, row in _TISSUE_ROWS.items()} for i, phase in enumerate(PHASES)
}
"""Mean HU per phase and tissue."""
TISSUE_TEXTURE_SD: dict[str, dict[str, float]] = {
    phase: {name: row[1][i] for name, row in _TISSUE_ROWS.items()} for i, phase in enumerate(PHASES)
}
"""SD (HU) of the smooth texture field per phase and tissue."""
TUMOUR_DELTA_HU: dict[str, tuple[float, float]] = {
    "native": (15.0, 30.0),
    "portal": (30.0, 60.0),
    "arterial": (15.0, 25.0),
}
"""Range of (liver - tumour) HU per phase; hypovascular metastases are hypodense."""

# Tissue codes painted on the supersampled canvas. Several codes share a tissue but differ in label
# (intra- versus extrahepatic portal vein) or texture stream.
_C_AIR, _C_LUNG, _C_FAT_SUB, _C_FAT_VISC, _C_SKIN, _C_MUSCLE, _C_LIVER, _C_SPLEEN = range(8)
_C_KID_CTX, _C_KID_MED, _C_AORTA, _C_IVC, _C_PV_EXTRA, _C_PV_INTRA, _C_HV, _C_BONE_TRAB = range(8, 16)
_C_BONE_CORT, _C_BONE_MIX, _C_DISC, _C_CSF, _C_GB, _C_GI_CONTENT, _C_GI_AIR, _C_GI_WALL = range(16, 24)
_C_HEART, _C_DIAPHRAGM = 24, 25
_C_TUMOUR0 = 32  # tumour k has code 32 + k
_CODE_TISSUE = {
    _C_AIR: "air", _C_LUNG: "lung", _C_FAT_SUB: "fat", _C_FAT_VISC: "fat", _C_SKIN: "skin", _C_MUSCLE: "muscle",
    _C_LIVER: "liver", _C_SPLEEN: "spleen", _C_KID_CTX: "kidney_cortex", _C_KID_MED: "kidney_medulla",
    _C_AORTA: "aorta", _C_IVC: "ivc", _C_PV_EXTRA: "portal_vein", _C_PV_INTRA: "portal_vein",
    _C_HV: "hepatic_vein", _C_BONE_TRAB: "bone_trabecular", _C_BONE_CORT: "bone_cortical",
    _C_BONE_MIX: "bone_mixed", _C_DISC: "disc", _C_CSF: "csf", _C_GB: "gallbladder", _C_GI_CONTENT: "gi_content",
    _C_GI_AIR: "air", _C_GI_WALL: "gi_wall", _C_HEART: "heart", _C_DIAPHRAGM: "muscle",
}  # fmt: skip
# Independent texture fields: 0 liver, 1 tumours/kidney/heart, 2 spleen/muscle/bone/GI, 3 fat/lung/vessels/fluid.
_CODE_GROUP = {
    _C_LIVER: 0, _C_HV: 0, _C_PV_INTRA: 0, _C_KID_CTX: 1, _C_KID_MED: 1, _C_HEART: 1, _C_SPLEEN: 2, _C_MUSCLE: 2,
    _C_SKIN: 2, _C_DIAPHRAGM: 2, _C_BONE_TRAB: 2, _C_BONE_CORT: 2, _C_BONE_MIX: 2, _C_DISC: 2, _C_GI_WALL: 2,
    _C_GI_CONTENT: 2,
}  # fmt: skip
_N_TEXTURE_FIELDS = 4
_LIVER_CODES = (_C_LIVER, _C_PV_INTRA, _C_HV)


@dataclass
class PhantomCase:
    """One generated CT case.

    Attributes:
        image: CT numbers, int16 HU, array order (z, y, x).
        label: uint8 labels, 0 background, 1 liver, 2 tumour; same shape as ``image``.
        spacing: Voxel spacing in mm, (x, y, z).
        origin: Physical position (LPS, mm) of voxel (0, 0, 0), (x, y, z).
        direction: Row-major 3x3 direction cosine matrix, as ``SimpleITK.Image.GetDirection``.
        tumours: One dict per lesion: ``centre_mm`` (physical LPS), ``centre_voxel`` (x, y, z index),
            ``radius_mm``, ``axes_mm``, ``kind`` ("malignant" or "benign"; benign lesions look the same but are
            labelled liver), ``delta_hu`` (liver minus lesion), ``small`` (the forced small lesion) and
            ``n_voxels`` (voxels that carry this lesion).
        seed: The seed that made the case.
        preset: Grid preset name.
        phase: Contrast phase.
        orientation: Direction variant ("identity", "flipped" or "oblique").
        meta: Further numbers: liver and tumour volume in ml, noise SD, texture sigma, body size.
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    tumours: list[dict[str, Any]] = field(default_factory=list)
    seed: int = 0
    preset: str = ""
    phase: str = DEFAULT_PHASE
    orientation: str = "identity"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_sitk(self) -> tuple[sitk.Image, sitk.Image]:
        """The image and label as SimpleITK images with spacing, origin and direction set.

        Returns:
            ``(image, label)``: an int16 image and a uint8 label image on the same geometry.
        """
        out = []
        for array in (self.image, self.label):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing(tuple(float(v) for v in self.spacing))
            img.SetOrigin(tuple(float(v) for v in self.origin))
            img.SetDirection(tuple(float(v) for v in self.direction))
            out.append(img)
        return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------------
# Argument checks


def _check_choice(value: str, choices: tuple[str, ...] | list[str], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(repr(c) for c in choices)}")
    return value


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        value = operator.index(seed)
    except TypeError:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}") from None
    if value < 0:
        raise ValueError(f"seed must be a non-negative integer, got {value}")
    return value


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Canvas: the supersampled grid, its anatomical coordinates, and the tissue-code volume being painted.


class _Canvas:
    """Supersampled tissue-code volume with in-plane anatomical coordinates.

    ``xa`` (patient left +) and ``ya`` (posterior +) are 2-D (rows, cols) arrays in mm relative to the body centre;
    ``zeta`` is the height in mm relative to the top slice (<= 0). Shapes are evaluated only inside their bounding
    boxes, which keeps the generator fast.
    """

    def __init__(self, preset: GridPreset, theta: float, body_offset: tuple[float, float]):
        f = preset.supersample
        nx, ny, nz = preset.shape
        sx, sy, sz = preset.spacing
        self.f = f
        self.preset = preset
        ix = (np.arange(nx * f) + 0.5) / f - 0.5
        iy = (np.arange(ny * f) + 0.5) / f - 0.5
        u = (ix - (nx - 1) / 2.0) * sx
        v = (iy - (ny - 1) / 2.0) * sy
        uu, vv = np.meshgrid(u, v)
        c, s = math.cos(theta), math.sin(theta)
        # Physical offset from the grid centre is D @ (u, v); D rotates about z by theta.
        self.xa = c * uu - s * vv - body_offset[0]
        self.ya = s * uu + c * vv - body_offset[1]
        self.zeta = (np.arange(nz) - (nz - 1)) * float(sz)
        self.z_top = (nz - 1) / 2.0 * sz  # physical z offset of the top slice from the grid centre
        self.step = (float(sz), sy / f, sx / f)
        self.tid = np.zeros((nz, ny * f, nx * f), np.uint8)

    def box(
        self, lo: tuple[float, float], hi: tuple[float, float], zr: tuple[float, float] | None = None
    ) -> tuple[slice, slice, slice] | None:
        """Index slices covering the anatomical box [lo, hi] x zr (mm), or None if it misses the grid."""
        m = (self.xa >= lo[0]) & (self.xa <= hi[0]) & (self.ya >= lo[1]) & (self.ya <= hi[1])
        rows = np.flatnonzero(m.any(axis=1))
        cols = np.flatnonzero(m.any(axis=0))
        zi = np.arange(self.zeta.size) if zr is None else np.flatnonzero((self.zeta >= zr[0]) & (self.zeta <= zr[1]))
        if not (rows.size and cols.size and zi.size):
            return None
        return slice(zi[0], zi[-1] + 1), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)

    def coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 X (1, h, w), Y (1, h, w) and zeta (d, 1, 1) for a box."""
        x = self.xa[sl[1], sl[2]].astype(np.float32)[None]
        y = self.ya[sl[1], sl[2]].astype(np.float32)[None]
        z = self.zeta[sl[0]].astype(np.float32)[:, None, None]
        return x, y, z

    def ellipsoid(
        self, centre: tuple[float, float, float], semi: tuple[float, float, float], grow: float = 1.0
    ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Box and normalised squared radius of an axis-aligned ellipsoid (inside where < 1)."""
        a, b, c = (grow * s for s in semi)
        sl = self.box((centre[0] - a, centre[1] - b), (centre[0] + a, centre[1] + b), (centre[2] - c, centre[2] + c))
        if sl is None:
            return None
        x, y, z = self.coords(sl)
        r2 = ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
        return sl, r2 + ((z - centre[2]) / semi[2]) ** 2

    def capsule(
        self, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float
    ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Box and inside-mask of a tapered tube from p0 (radius r0) to p1 (radius r1); points are (X, Y, zeta)."""
        rmax = max(r0, r1)
        lo = np.minimum(p0, p1) - rmax
        hi = np.maximum(p0, p1) + rmax
        sl = self.box((lo[0], lo[1]), (hi[0], hi[1]), (lo[2], hi[2]))
        if sl is None:
            return None
        x, y, z = self.coords(sl)
        d = np.asarray(p1, float) - np.asarray(p0, float)
        length2 = float(d @ d) or 1e-9
        dx, dy, dz = x - np.float32(p0[0]), y - np.float32(p0[1]), z - np.float32(p0[2])
        t = np.clip((dx * d[0] + dy * d[1]) / length2 + dz * (d[2] / length2), 0.0, 1.0).astype(np.float32)
        dist2 = (dx - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dz - t * d[2]) ** 2
        radius = r0 + (r1 - r0) * t
        return sl, dist2 <= radius * radius

    def paint(
        self, sl: tuple[slice, slice, slice], mask: np.ndarray, code: int, allowed: tuple[int, ...] | None = None
    ) -> None:
        """Set ``code`` where ``mask`` holds and the current code is in ``allowed`` (anywhere if None)."""
        view = self.tid[sl]
        mask = np.broadcast_to(mask, view.shape)
        if allowed is not None:
            lut = np.zeros(256, bool)
            lut[list(allowed)] = True
            mask = mask & lut[view]
        view[mask] = code

    def centre_codes(self) -> np.ndarray:
        """Tissue codes at the voxel centres (the centre sample of each supersampled block)."""
        h = self.f // 2
        return self.tid[:, h :: self.f, h :: self.f]


def _ellipse2(x: np.ndarray, y: np.ndarray, c: tuple[float, float], semi: tuple[float, float]) -> np.ndarray:
    return ((x - c[0]) / semi[0]) ** 2 + ((y - c[1]) / semi[1]) ** 2


def _rotation(q: np.ndarray) -> np.ndarray:
    """Rotation matrix from an (unnormalised) quaternion (w, x, y, z)."""
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


# ----------------------------------------------------------------------------------------------------------------
# Random parameters. Everything is drawn up front, in a fixed order and with fixed sizes, so that the draws do not
# depend on the preset, phase or direction: the same seed is the same patient on every grid.


def _draw_geometry(rng: np.random.Generator) -> dict[str, Any]:
    g: dict[str, Any] = {}
    g["body_ab"] = np.array([160.0, 115.0]) * rng.uniform(0.9, 1.1, 2)
    g["body_offset"] = rng.uniform(-5.0, 5.0, 2)
    g["fat_mm"] = rng.uniform(10.0, 30.0)
    g["muscle_mm"] = rng.uniform(8.0, 12.0)
    g["z_shift"] = rng.uniform(-10.0, 10.0)
    g["liver_scale"] = rng.uniform(0.96, 1.04)
    g["liver_jitter"] = rng.uniform(-1.0, 1.0, (3, 6))
    g["liver_warp"] = rng.uniform(0.0, 1.0, (4, 7))
    g["vertebra"] = rng.uniform(0.0, 1.0, 2)
    g["organs"] = rng.uniform(-1.0, 1.0, (10, 3))
    g["domes"] = rng.uniform(-1.0, 1.0, 2)
    g["pv_radius"] = rng.uniform(6.0, 7.0)
    g["pv_branches"] = rng.uniform(-1.0, 1.0, (6, 3))
    g["hv"] = rng.uniform(-1.0, 1.0, (3, 3))
    g["stomach_level"] = rng.uniform(0.15, 0.45)
    g["bowel"] = rng.uniform(0.0, 1.0, (6, 7))
    g["rib_phase"] = rng.uniform(0.0, 26.0)
    return g


def _draw_tumours(rng: np.random.Generator) -> dict[str, Any]:
    t: dict[str, Any] = {}
    t["count"] = int(rng.poisson(2.0))
    t["u_radius"] = rng.random(MAX_TUMOURS)
    t["ratios"] = rng.uniform(0.7, 1.3, (MAX_TUMOURS, 3))
    t["quat"] = rng.standard_normal((MAX_TUMOURS, 4))
    t["harm2"] = rng.standard_normal((MAX_TUMOURS, 6))
    t["amp2"] = rng.uniform(0.0, 0.08, MAX_TUMOURS)
    t["harm3"] = rng.standard_normal((MAX_TUMOURS, 3))
    t["amp3"] = rng.uniform(0.0, 0.07, MAX_TUMOURS)
    t["u_delta"] = rng.random(MAX_TUMOURS)
    t["u_small"] = rng.random()
    t["u_centre"] = rng.random(MAX_TUMOURS)
    t["u_kind"] = rng.random(MAX_TUMOURS)
    return t


# ----------------------------------------------------------------------------------------------------------------
# Anatomy


def _paint_anatomy(cv: _Canvas, g: dict[str, Any]) -> dict[str, float]:
    """Paint everything except tumours; return body measurements."""
    preset = cv.preset
    fov = np.array(preset.extent_mm[:2])
    # Fit the body into the field of view (with a margin that also covers the oblique variant).
    a, b = np.minimum(g["body_ab"], 0.46 * fov)
    kx, ky = a / 160.0, b / 115.0
    s = math.sqrt(kx * ky)
    zs = g["z_shift"]
    oj = g["organs"]

    def pos(xn: float, yn: float) -> tuple[float, float]:
        return xn * kx, yn * ky

    t_fat, t_mus = g["fat_mm"], g["muscle_mm"]
    ca, cb = a - t_fat - t_mus, b - t_fat - t_mus  # visceral cavity semi-axes
    X, Y = cv.xa, cv.ya

    # ---- 2-D base slice: body wall, paraspinal muscles, spine, aorta, IVC
    base = np.zeros(X.shape, np.uint8)
    base[_ellipse2(X, Y, (0, 0), (a, b)) <= 1] = _C_SKIN
    base[_ellipse2(X, Y, (0, 0), (a - 2.0, b - 2.0)) <= 1] = _C_FAT_SUB
    base[_ellipse2(X, Y, (0, 0), (a - t_fat, b - t_fat)) <= 1] = _C_MUSCLE
    cavity = _ellipse2(X, Y, (0, 0), (ca, cb)) <= 1
    base[cavity] = _C_FAT_VISC
    for side in (-1, 1):
        base[_ellipse2(X, Y, pos(side * 32, 86), (22 * s, 17 * s)) <= 1] = _C_MUSCLE
    vb_c = pos(0, 38)
    vb_r = 20.0
    r2_vb = _ellipse2(X, Y, vb_c, (vb_r, vb_r))
    vb_mask = r2_vb <= 1
    base[vb_mask] = _C_BONE_CORT
    base[r2_vb <= ((vb_r - 1.5) / vb_r) ** 2] = _C_BONE_TRAB
    canal_c = (vb_c[0], vb_c[1] + vb_r + 10.0)
    base[_ellipse2(X, Y, canal_c, (9.0, 9.0)) <= 1] = _C_CSF
    base[_ellipse2(X, Y, pos(18 + 2 * oj[0, 0], 4 + 2 * oj[0, 1]), (11.0, 11.0)) <= 1] = _C_AORTA
    ivc_c = pos(-24 + 2 * oj[1, 0], 5 + 2 * oj[1, 1])
    base[_ellipse2(X, Y, ivc_c, (11.0, 9.0)) <= 1] = _C_IVC
    cv.tid[:] = base[None]

    zeta = cv.zeta
    # ---- vertebrae along z: discs every ~30 mm, posterior arch on half of each period
    period = 27.0 + 6.0 * g["vertebra"][0]
    phase_z = period * g["vertebra"][1]
    rel = np.mod(zeta - phase_z, period)
    rr, cc = np.nonzero(vb_mask)
    for k in np.flatnonzero(rel < 5.0):
        cv.tid[k, rr, cc] = _C_DISC
    arch = (_ellipse2(X, Y, canal_c, (15.0, 15.0)) <= 1) & ~vb_mask  # laminae around the canal
    arch |= _ellipse2(X, Y, (canal_c[0], canal_c[1] + 24.0), (5.0, 13.0)) <= 1  # spinous process
    for side in (-1, 1):
        arch |= _ellipse2(X, Y, (canal_c[0] + side * 26.0, canal_c[1] - 6.0), (13.0, 5.0)) <= 1  # transverse
    arch &= base != _C_CSF
    rr, cc = np.nonzero(arch)
    for k in np.flatnonzero((rel >= 8.0) & (rel < 8.0 + period / 2.0)):
        cv.tid[k, rr, cc] = _C_BONE_MIX

    # ---- ribs inside the muscle wall of the upper abdomen, sloping down anteriorly
    ring = (_ellipse2(X, Y, (0, 0), (ca + 0.5, cb + 0.5)) > 1) & (
        _ellipse2(X, Y, (0, 0), (ca + t_mus, cb + t_mus)) <= 1
    )
    ring &= ~((np.abs(X) < 0.3 * ca) & (Y < 0)) & ~((np.abs(X) < 45.0) & (Y > 0))
    rr, cc = np.nonzero(ring)
    if rr.size:
        zz = zeta[:, None] + 0.3 * Y[rr, cc][None, :] + g["rib_phase"]
        rib = (np.mod(zz, 26.0) < 9.0) & (zeta[:, None] > -140.0 + zs)
        sub = cv.tid[:, rr, cc]
        cv.tid[:, rr, cc] = np.where(rib, _C_BONE_MIX, sub)

    # ---- diaphragm, lung bases and heart above it
    apex_r, apex_l = -20.0 + zs + 5.0 * g["domes"][0], -30.0 + zs + 5.0 * g["domes"][1]

    def dome(x0: float, apex: float) -> np.ndarray:
        return apex - 35.0 * ((X - x0) / (85.0 * s)) ** 2 - 30.0 * ((Y + 10.0 * ky) / (75.0 * s)) ** 2

    zd = np.maximum(dome(-55.0 * kx, apex_r), dome(55.0 * kx, apex_l))
    rr, cc = np.nonzero(cavity)
    if rr.size:
        zdp = zd[rr, cc][None, :]
        top = np.flatnonzero(zeta > zdp.min() - 4.0)
        if top.size:
            zt = zeta[top][:, None]
            ti, ri, ci = top[:, None], rr[None, :], cc[None, :]
            sub = cv.tid[ti, ri, ci]
            fat = sub == _C_FAT_VISC
            sub = np.where(fat & (zt > zdp), _C_LUNG, sub)
            sub = np.where(fat & (zt > zdp - 4.0) & (zt <= zdp), _C_DIAPHRAGM, sub)
            cv.tid[ti, ri, ci] = sub
    heart = cv.ellipsoid((*pos(15, -35), 25.0 + zs), (65 * s, 50 * s, 60.0))
    if heart is not None:
        cv.paint(heart[0], heart[1] <= 1, _C_HEART, (_C_LUNG,))

    # ---- psoas (lower slices), kidneys, spleen, stomach, bowel, gallbladder
    lower = np.flatnonzero(zeta < -100.0 + zs)
    for side in (-1, 1):
        for k in lower:
            grow = min(1.0, (-100.0 + zs - zeta[k]) / 80.0)
            sl = (slice(k, k + 1), slice(None), slice(None))
            m = _ellipse2(X, Y, pos(side * 38, 48), ((6 + 10 * grow) * s, (8 + 8 * grow) * s)) <= 1
            cv.paint(sl, m[None], _C_MUSCLE, (_C_FAT_VISC,))
    for side, (xn, yn, zc), j in ((-1, (-68, 45, -150), oj[2]), (1, (68, 42, -138), oj[3])):
        c = (*pos(xn + 4 * j[0], yn + 3 * j[1]), zc + zs + 5 * j[2])
        semi = (27 * s, 25 * s, 55.0)
        e = cv.ellipsoid(c, semi)
        if e is None:
            continue
        cv.paint(e[0], e[1] <= 1, _C_KID_CTX, (_C_FAT_VISC,))
        inner = (semi[0] - 5, semi[1] - 5, semi[2] - 5)
        e2 = cv.ellipsoid(c, inner)
        if e2 is not None:
            cv.paint(e2[0], e2[1] <= 1, _C_KID_MED, (_C_KID_CTX,))
        sinus = cv.ellipsoid((c[0] - side * 0.8 * semi[0], c[1] - 4.0, c[2]), (0.45 * semi[0], 0.45 * semi[1], 28.0))
        if sinus is not None:
            cv.paint(sinus[0], sinus[1] <= 1, _C_FAT_VISC, (_C_KID_CTX, _C_KID_MED))
    e = cv.ellipsoid((*pos(92 + 5 * oj[4, 0], 40 + 5 * oj[4, 1]), -60.0 + zs + 8 * oj[4, 2]), (27 * s, 50 * s, 42.0))
    if e is not None:
        cv.paint(e[0], e[1] <= 1, _C_SPLEEN, (_C_FAT_VISC,))
    st_c = (*pos(52 + 5 * oj[5, 0], -12 + 5 * oj[5, 1]), -60.0 + zs + 8 * oj[5, 2])
    st_semi = (42 * s, 36 * s, 50.0)
    e = cv.ellipsoid(st_c, st_semi)
    if e is not None:
        cv.paint(e[0], e[1] <= 1, _C_GI_WALL, (_C_FAT_VISC,))
        e2 = cv.ellipsoid(st_c, (st_semi[0] - 4, st_semi[1] - 4, st_semi[2] - 4))
        if e2 is not None:
            sl, r2 = e2
            level = st_c[1] - st_semi[1] + 2 * st_semi[1] * g["stomach_level"]
            air = np.broadcast_to(cv.coords(sl)[1] < level, r2.shape)
            cv.paint(sl, (r2 <= 1) & air, _C_GI_AIR, (_C_GI_WALL,))
            cv.paint(sl, (r2 <= 1) & ~air, _C_GI_CONTENT, (_C_GI_WALL,))
    for u in g["bowel"]:
        c = (*pos(-20 + 110 * u[0], -80 + 60 * u[1]), -200.0 + 70 * u[2] + zs)
        semi = ((12 + 8 * u[3]) * s, (12 + 6 * u[4]) * s, 15.0 + 15.0 * u[5])
        e = cv.ellipsoid(c, semi)
        if e is None:
            continue
        cv.paint(e[0], e[1] <= 1, _C_GI_WALL, (_C_FAT_VISC,))
        e2 = cv.ellipsoid(c, (semi[0] - 3, semi[1] - 3, semi[2] - 3))
        if e2 is not None:
            cv.paint(e2[0], e2[1] <= 1, _C_GI_AIR if u[6] < 0.35 else _C_GI_CONTENT, (_C_GI_WALL,))
    e = cv.ellipsoid((*pos(-32 + 4 * oj[6, 0], -42 + 4 * oj[6, 1]), -122.0 + zs + 5 * oj[6, 2]), (14 * s, 14 * s, 33.0))
    if e is not None:
        cv.paint(e[0], e[1] <= 1, _C_GB, (_C_FAT_VISC,))

    # ---- liver: union of three ellipsoids, warped, clipped against everything but visceral fat, smoothed
    liver_def = (
        ((-62, 5, -92), (62, 70, 82)),  # right lobe, reaching into the right dome of the diaphragm
        ((-15, -28, -70), (45, 42, 52)),  # medial segment / caudate
        ((30, -48, -62), (55, 24, 32)),  # left lateral lobe crossing the midline
    )
    ls = g["liver_scale"]
    ells = []
    for (c, semi), j in zip(liver_def, g["liver_jitter"], strict=True):
        cc_ = (*pos(c[0] + 5 * j[0], c[1] + 5 * j[1]), c[2] + zs + 5 * j[2])
        ss_ = (
            semi[0] * s * ls * (1 + 0.06 * j[3]),
            semi[1] * s * ls * (1 + 0.06 * j[4]),
            semi[2] * ls * (1 + 0.06 * j[5]),
        )
        ells.append((cc_, ss_))
    margin = 8.0
    lo = np.min([np.subtract(c, np.multiply(sm, 1.06)) for c, sm in ells], axis=0) - margin
    hi = np.max([np.add(c, np.multiply(sm, 1.06)) for c, sm in ells], axis=0) + margin
    sl = cv.box((lo[0], lo[1]), (hi[0], hi[1]), (lo[2], hi[2]))
    if sl is not None:
        x, y, z = cv.coords(sl)
        field_ = None
        for c, sm in ells:
            r2 = ((x - c[0]) / sm[0]) ** 2 + ((y - c[1]) / sm[1]) ** 2 + ((z - c[2]) / sm[2]) ** 2
            field_ = r2 if field_ is None else np.minimum(field_, r2)
        for w in g["liver_warp"]:  # separable low-frequency warp, |w| <= 0.1 in total
            k = 2 * np.pi / (90.0 + 90.0 * w[1:4])
            term = np.cos(k[0] * x + 2 * np.pi * w[4]) * np.cos(k[1] * y + 2 * np.pi * w[5])
            field_ = field_ + np.float32(0.025 * (2 * w[0] - 1)) * term * np.cos(k[2] * z + 2 * np.pi * w[6])
        view = cv.tid[sl]
        occ = ((field_ <= 1.0) & (view == _C_FAT_VISC)).astype(np.float32)
        sigma = tuple(2.0 / st for st in cv.step)
        smooth = ndimage.gaussian_filter(occ, sigma, mode="constant")
        mask = (smooth > 0.5) & (view == _C_FAT_VISC)
        view[mask] = _C_LIVER

    # ---- portal vein (trunk into the hilum, 2 branch generations) and hepatic veins
    pj = g["pv_branches"]

    def p3(xn: float, yn: float, z: float) -> np.ndarray:
        return np.array([*pos(xn, yn), z + zs])

    trunk0, hilum = p3(8, -15, -150), p3(-28, -18, -112)
    rpv = g["pv_radius"]
    tube = cv.capsule(trunk0, hilum, rpv, rpv)
    if tube is not None:
        cv.paint(tube[0], tube[1], _C_PV_EXTRA, (_C_FAT_VISC,))
        cv.paint(tube[0], tube[1], _C_PV_INTRA, (_C_LIVER,))
    gen1 = (p3(-72, -2, -102), p3(12, -42, -80))
    kids = (((-25, -25, 15), (-20, 30, -15)), ((30, -8, 10), (4, -12, 28)))
    i = 0
    for end, offsets in zip(gen1, kids, strict=True):
        tube = cv.capsule(hilum, end, 4.0, 4.0)
        if tube is not None:
            cv.paint(tube[0], tube[1], _C_PV_INTRA, (_C_LIVER,))
        for off in offsets:
            tip = end + np.array(off, float) + 10.0 * pj[i]
            i += 1
            tube = cv.capsule(end, tip, 2.0, 2.0)
            if tube is not None:
                cv.paint(tube[0], tube[1], _C_PV_INTRA, (_C_LIVER,))
    confluence = np.array([ivc_c[0], ivc_c[1], -40.0 + zs])
    for end, j in zip((p3(-95, -10, -85), p3(-42, -50, -95), p3(18, -46, -62)), g["hv"], strict=True):
        tube = cv.capsule(confluence, end + 8.0 * j, 4.0, 1.8)
        if tube is not None:
            cv.paint(tube[0], tube[1], _C_HV, (_C_LIVER,))
    return {"body_width_mm": 2 * a, "body_depth_mm": 2 * b}


# ----------------------------------------------------------------------------------------------------------------
# Tumours


def _place_tumours(cv: _Canvas, t: dict[str, Any], n: int, phase: str, benign_fraction: float) -> list[dict[str, Any]]:
    """Choose lesion sizes and centres inside the liver and paint them; returns the lesion records."""
    preset = cv.preset
    sx, sy, sz = preset.spacing
    f = cv.f
    h = f // 2
    codes = cv.centre_codes()
    liver = np.isin(codes, _LIVER_CODES)
    if n == 0 or not liver.any():
        return []
    # Distance (mm) to the liver boundary, computed on a padded crop.
    zi, yi, xi = np.nonzero(liver)
    crop = tuple(slice(max(v.min() - 1, 0), v.max() + 2) for v in (zi, yi, xi))
    sub = np.pad(liver[crop], 1)
    dist = ndimage.distance_transform_edt(sub, sampling=(sz, sy, sx))[1:-1, 1:-1, 1:-1]
    cz, cy, cx = np.nonzero(liver[crop])
    cand_d = dist[cz, cy, cx]
    cz, cy, cx = cz + crop[0].start, cy + crop[1].start, cx + crop[2].start
    # Anatomical coordinates of the candidate voxel centres (exact sample positions).
    cand_p = np.stack([cv.xa[cy * f + h, cx * f + h], cv.ya[cy * f + h, cx * f + h], cv.zeta[cz]], axis=1)
    voxel_diag = math.sqrt(sx * sx + sy * sy + sz * sz)
    lo_d, hi_d = TUMOUR_DELTA_HU[phase]
    liver_hu = TISSUE_HU[phase]["liver"]
    placed: list[dict[str, Any]] = []
    for k in range(n):
        small = n >= 2 and k == 0
        ratios = t["ratios"][k] / np.prod(t["ratios"][k]) ** (1.0 / 3.0)
        amp2, amp3 = float(t["amp2"][k]), float(t["amp3"][k])
        if small:
            # 2-4 voxels across in-plane: radius 1.0-1.75 in-plane voxels, nearly spherical, no harmonics.
            r = (1.0 + 0.75 * t["u_small"]) * max(sx, sy)
            ratios = 1.0 + 0.3 * (ratios - 1.0)
            ratios = np.minimum(ratios, 1.0 + 0.25 / (1.0 + 0.75 * t["u_small"]))
            amp2 = amp3 = 0.0
            r_min = r
        else:
            lo_r, hi_r = TUMOUR_RADIUS_MM
            r = float(np.exp(np.log(lo_r) + (np.log(hi_r) - np.log(lo_r)) * t["u_radius"][k]))
            r_min = lo_r
        r = max(min(r, float(cand_d.max()) - 2.0), min(r_min, r))
        ok = np.zeros(cand_d.shape, bool)
        for _ in range(8):
            ext = r * float(ratios.max()) * (1.0 + amp2 + amp3)
            ok = cand_d >= r + 2.0
            for p in placed:
                gap = np.linalg.norm(cand_p - p["_pos"], axis=1)
                ok &= gap >= ext + p["_ext"] + 2.0 * voxel_diag
            if ok.any() or r <= r_min:
                break
            r = max(0.75 * r, r_min)
        if not ok.any():  # no room apart from the others: allow overlap, keep the erosion
            ok = cand_d >= min(r + 2.0, float(cand_d.max()))
        idx = np.flatnonzero(ok)
        pick = idx[min(int(t["u_centre"][k] * idx.size), idx.size - 1)]
        centre = cand_p[pick]
        ext = r * float(ratios.max()) * (1.0 + amp2 + amp3)
        # Lesion shape: rotated ellipsoid with a boundary perturbed by degree-2 and degree-3 harmonics.
        rot = _rotation(t["quat"][k])
        semi = r * ratios
        hv = t["harm2"][k]
        A = np.array([[hv[0], hv[3], hv[4]], [hv[3], hv[1], hv[5]], [hv[4], hv[5], hv[2]]])
        A -= np.trace(A) / 3.0 * np.eye(3)
        A *= amp2 / max(np.abs(np.linalg.eigvalsh(A)).max(), 1e-9)
        c3 = t["harm3"][k] * (amp3 / max(np.linalg.norm(t["harm3"][k]), 1e-9))
        pad = ext + 2 * max(cv.step)
        sl = cv.box(
            (centre[0] - pad, centre[1] - pad), (centre[0] + pad, centre[1] + pad), (centre[2] - pad, centre[2] + pad)
        )
        code = _C_TUMOUR0 + k
        if sl is not None:
            x, y, z = cv.coords(sl)
            d = (x - np.float32(centre[0]), y - np.float32(centre[1]), z - np.float32(centre[2]))
            q = [
                ((d[0] * rot[0, i] + d[1] * rot[1, i]) + d[2] * np.float32(rot[2, i])) / np.float32(semi[i])
                for i in range(3)
            ]
            rho2 = q[0] ** 2 + q[1] ** 2 + q[2] ** 2
            inv = 1.0 / np.sqrt(np.maximum(rho2, 1e-12))
            nv = [qi * inv for qi in q]
            hfun = (
                A[0, 0] * nv[0] ** 2 + A[1, 1] * nv[1] ** 2 + A[2, 2] * nv[2] ** 2
                + 2 * (A[0, 1] * nv[0] * nv[1] + A[0, 2] * nv[0] * nv[2] + A[1, 2] * nv[1] * nv[2])
                + c3[0] * nv[0] ** 3 + c3[1] * nv[1] ** 3 + c3[2] * nv[2] ** 3
            )  # fmt: skip
            cv.paint(sl, rho2 <= (1.0 + hfun) ** 2, code, _LIVER_CODES)
        delta = lo_d + (hi_d - lo_d) * float(t["u_delta"][k])
        kind = "benign" if float(t["u_kind"][k]) < benign_fraction else "malignant"
        iz, iy, ix = int(cz[pick]), int(cy[pick]), int(cx[pick])
        placed.append(
            {
                "index": k,
                "kind": kind,
                "radius_mm": round(float(r), 3),
                "axes_mm": [round(float(v), 3) for v in semi],
                "delta_hu": round(float(delta), 3),
                "hu": round(float(liver_hu - delta), 3),
                "small": bool(small),
                "_voxel": (ix, iy, iz),
                "_pos": centre,
                "_ext": ext,
                "_code": code,
            }
        )
    return placed


# ----------------------------------------------------------------------------------------------------------------
# Intensities


def _smooth_field(
    shape: tuple[int, int, int], sigma_vox: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """Unit-SD smooth Gaussian random field; large sigmas are filtered on a coarser grid and interpolated."""
    down = max(1, int(min(sigma_vox[1], sigma_vox[2]) // 2.5))
    if down == 1:
        f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox, mode="reflect")
    else:
        coarse = (shape[0], -(-shape[1] // down) + 1, -(-shape[2] // down) + 1)
        f = ndimage.gaussian_filter(
            rng.standard_normal(coarse, dtype=np.float32),
            (sigma_vox[0], sigma_vox[1] / down, sigma_vox[2] / down),
            mode="reflect",
        )
        f = ndimage.zoom(f, (1.0, shape[1] / coarse[1], shape[2] / coarse[2]), order=1, grid_mode=False)
        f = f[:, : shape[1], : shape[2]]
    f -= f.mean()
    f /= max(float(f.std()), 1e-6)
    return f


def _correlated_noise(shape: tuple[int, int, int], sd: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise filtered in-plane (sigma 0.7 voxel, none in z) and rescaled to SD ``sd``."""
    white = rng.standard_normal(shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(white, (0.0, NOISE_SIGMA_XY_VOXEL, NOISE_SIGMA_XY_VOXEL), mode="reflect")
    noise *= np.float32(sd / max(float(noise.std()), 1e-6))
    return noise


def make_case(
    seed: int,
    preset: str = "tiny",
    phase: str = DEFAULT_PHASE,
    *,
    min_tumours: int = 1,
    direction: str = "identity",
    noise_hu: float | None = None,
    benign_fraction: float = 0.0,
) -> PhantomCase:
    """Generate one synthetic CT case with liver and tumour labels.

    Args:
        seed: Non-negative integer. The same seed gives the same case on every call. The random draws (body,
            organs, lesion count, sizes, shapes and contrast) do not depend on preset, phase or direction, so a seed
            is one patient everywhere; lesion centres are picked among the grid's voxel centres, so they move a
            little between presets, and the body is shrunk where a preset's field of view is too small for it.
        preset: Grid preset, one of ``GRID_PRESETS``.
        phase: Contrast phase, one of ``PHASES``.
        min_tumours: Lower bound (0-8) on the lesion count, which is otherwise Poisson(2) clipped to at most 8.
        direction: "identity"; "flipped" (x and y axes reversed, direction diag(-1, -1, 1), same physical extent and
            the same arrays reversed); or "oblique" (grid rotated 10 degrees about z around the same centre).
        noise_hu: Quantum-noise SD in HU at the reference 3 mm slice thickness; the applied SD is
            ``noise_hu * sqrt(3 / slice_thickness)``. None uses the phase default (``NOISE_SD_HU``); 0 disables noise
            without changing anything else.
        benign_fraction: Probability (0-1) that a lesion is benign: it looks identical in the image but is labelled
            liver (1). Changing it changes only labels.

    Returns:
        The case: int16 image, uint8 label, geometry and lesion records.

    Raises:
        ValueError: On an unknown preset, phase or direction, or an out-of-range argument.
    """
    seed = _check_seed(seed)
    _check_choice(preset, list(GRID_PRESETS), "preset")
    _check_choice(phase, PHASES, "phase")
    _check_choice(direction, DIRECTIONS, "direction")
    min_tumours = _check_int(min_tumours, "min_tumours", 0, MAX_TUMOURS)
    if noise_hu is not None and not (_is_real(noise_hu) and math.isfinite(noise_hu) and noise_hu >= 0):
        raise ValueError(f"noise_hu must be None or a finite number >= 0, got {noise_hu!r}")
    if not (_is_real(benign_fraction) and 0.0 <= float(benign_fraction) <= 1.0):
        raise ValueError(f"benign_fraction must be a number between 0 and 1, got {benign_fraction!r}")

    grid = GRID_PRESETS[preset]
    rng_geom, rng_tum, rng_tex, rng_noise = (
        np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence(seed).spawn(4)
    )
    g = _draw_geometry(rng_geom)
    t = _draw_tumours(rng_tum)
    n_tumours = int(np.clip(t["count"], min_tumours, MAX_TUMOURS))

    theta = math.radians(OBLIQUE_ANGLE_DEG) if direction == "oblique" else 0.0
    cv = _Canvas(grid, theta, (float(g["body_offset"][0]), float(g["body_offset"][1])))
    body = _paint_anatomy(cv, g)
    lesions = _place_tumours(cv, t, n_tumours, phase, float(benign_fraction))

    # Look-up tables from tissue code to HU, texture SD, texture field and label.
    hu_lut = np.zeros(256, np.float32)
    tex_lut = np.zeros(256, np.float32)
    grp_lut = np.full(256, 3, np.intp)
    lab_lut = np.zeros(256, np.uint8)
    for code, tissue in _CODE_TISSUE.items():
        hu_lut[code] = TISSUE_HU[phase][tissue]
        tex_lut[code] = TISSUE_TEXTURE_SD[phase][tissue]
        grp_lut[code] = _CODE_GROUP.get(code, 3)
    lab_lut[list(_LIVER_CODES)] = LABEL_LIVER
    for les in lesions:
        hu_lut[les["_code"]] = les["hu"]
        tex_lut[les["_code"]] = TUMOUR_TEXTURE_SD
        grp_lut[les["_code"]] = 1
        lab_lut[les["_code"]] = LABEL_TUMOUR if les["kind"] == "malignant" else LABEL_LIVER

    nz, ny, nx = grid.array_shape
    f = grid.supersample
    sx, sy, sz = grid.spacing
    # Partial volume: average the supersampled CT numbers over each voxel.
    image = np.empty((nz, ny, nx), np.float32)
    for k in range(nz):
        image[k] = hu_lut[cv.tid[k]].reshape(ny, f, nx, f).mean(axis=(1, 3))
    codes = np.ascontiguousarray(cv.centre_codes())
    label = lab_lut[codes]

    # Texture: smooth fields (sigma 4-6 mm) scaled to each tissue's texture SD.
    tex_sigma_mm = float(rng_tex.uniform(*TEXTURE_SIGMA_MM))
    sigma_vox = (tex_sigma_mm / sz, tex_sigma_mm / sy, tex_sigma_mm / sx)
    groups = grp_lut[codes]
    tex_sd = tex_lut[codes]
    for gi in range(_N_TEXTURE_FIELDS):
        fld = _smooth_field((nz, ny, nx), sigma_vox, rng_tex)
        sel = groups == gi
        image[sel] += tex_sd[sel] * fld[sel]
    # Point-spread function, then correlated quantum noise scaled with slice thickness.
    image = ndimage.gaussian_filter(image, (0.0, PSF_SIGMA_XY_VOXEL, PSF_SIGMA_XY_VOXEL), mode="nearest")
    noise_ref = NOISE_SD_HU[phase] if noise_hu is None else float(noise_hu)
    noise_sd = noise_ref * math.sqrt(NOISE_REFERENCE_THICKNESS_MM / sz)
    if noise_sd > 0:
        image += _correlated_noise((nz, ny, nx), noise_sd, rng_noise)
    image = np.rint(np.clip(image, -1024.0, 3071.0)).astype(np.int16)

    # Geometry. Direction D and origin chosen so that the grid centre is the same physical point in every variant.
    centre = np.array(_GRID_CENTRE)
    if direction == "oblique":
        c, s = math.cos(theta), math.sin(theta)
        dmat = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    elif direction == "flipped":
        dmat = np.diag([-1.0, -1.0, 1.0])
    else:
        dmat = np.eye(3)
    half = (np.array(grid.shape) - 1) / 2.0 * np.array(grid.spacing)
    origin = centre - dmat @ half
    if direction == "flipped":  # the identity arrays, reversed in x and y: the same voxels at the same places
        image = np.ascontiguousarray(image[:, ::-1, ::-1])
        label = np.ascontiguousarray(label[:, ::-1, ::-1])
        codes = codes[:, ::-1, ::-1]

    tumours = []
    body_off = np.asarray(g["body_offset"], float)
    for les in lesions:
        ix, iy, iz = les["_voxel"]
        if direction == "flipped":
            ix, iy = nx - 1 - ix, ny - 1 - iy
        pos = les["_pos"]
        rel = np.array([pos[0] + body_off[0], pos[1] + body_off[1], pos[2] + cv.z_top])
        phys = centre + rel  # flipping the arrays with the direction keeps physical positions
        rec = {k: v for k, v in les.items() if not k.startswith("_")}
        rec["centre_mm"] = [round(float(v), 3) for v in phys]
        rec["centre_voxel"] = [ix, iy, iz]
        rec["n_voxels"] = int(np.count_nonzero(codes == les["_code"]))
        tumours.append(rec)

    vox_ml = grid.voxel_volume_ml
    meta = {
        "liver_volume_ml": round(float(np.count_nonzero(label > 0)) * vox_ml, 3),
        "tumour_volume_ml": round(float(np.count_nonzero(label == LABEL_TUMOUR)) * vox_ml, 3),
        "lesion_volume_ml": round(float(sum(r["n_voxels"] for r in tumours)) * vox_ml, 3),
        "noise_sd_hu": round(noise_sd, 3),
        "texture_sigma_mm": round(tex_sigma_mm, 3),
        "body_width_mm": round(float(body["body_width_mm"]), 3),
        "body_depth_mm": round(float(body["body_depth_mm"]), 3),
    }
    return PhantomCase(
        image=image,
        label=label,
        spacing=(float(sx), float(sy), float(sz)),
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in dmat.ravel()),
        tumours=tumours,
        seed=seed,
        preset=preset,
        phase=phase,
        orientation=direction,
        meta=meta,
    )


def tissue_statistics(case: PhantomCase, *, roi_size: int = 5) -> dict[str, dict[str, float]]:
    """CT-number statistics per label, as used to check the phantom against real data (docs/phantom.md).

    Args:
        case: A generated case.
        roi_size: Side (voxels) of the square in-plane ROIs used for ``roi_sd_median``.

    Returns:
        For "background", "liver" and "tumour": ``n`` (voxels), ``volume_ml``, ``mean`` and ``sd`` over all voxels,
        ``interior_mean`` and ``interior_sd`` over the voxels left after a one-voxel in-plane erosion (free of
        partial volume; NaN if none), and ``roi_sd_median``: the median SD of ``roi_size`` x ``roi_size`` in-plane
        windows that lie entirely in the label (NaN if none fits), the usual noise measurement.
    """
    img = case.image.astype(np.float64)
    cross = np.zeros((1, 3, 3), bool)
    cross[0, 1, :] = cross[0, :, 1] = True
    vox_ml = float(np.prod(case.spacing)) / 1000.0
    win = (1, roi_size, roi_size)
    mean_w = ndimage.uniform_filter(img, win, mode="nearest")
    var_w = np.maximum(ndimage.uniform_filter(img * img, win, mode="nearest") - mean_w**2, 0.0)
    out: dict[str, dict[str, float]] = {}
    for name, value in (("background", LABEL_BACKGROUND), ("liver", LABEL_LIVER), ("tumour", LABEL_TUMOUR)):
        m = case.label == value
        entry = {"n": float(m.sum()), "volume_ml": float(m.sum()) * vox_ml}
        nan = float("nan")
        entry.update(mean=nan, sd=nan, interior_mean=nan, interior_sd=nan, roi_sd_median=nan)
        if m.any():
            entry["mean"], entry["sd"] = float(img[m].mean()), float(img[m].std())
            inner = ndimage.binary_erosion(m, cross)
            if inner.any():
                entry["interior_mean"], entry["interior_sd"] = float(img[inner].mean()), float(img[inner].std())
            full = ndimage.uniform_filter(m.astype(np.float32), win, mode="constant") > 0.999
            if full.any():
                entry["roi_sd_median"] = float(np.median(np.sqrt(var_w[full])))
        out[name] = entry
    return out


# ----------------------------------------------------------------------------------------------------------------
# nnU-Net raw dataset

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def _case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


def write_nnunet_dataset(
    raw_root: Path,
    dataset_id: int,
    name: str = "LiverPhantom",
    *,
    num_training: int = 8,
    num_test: int = 2,
    preset: str = "tiny",
    seed: int = 0,
    phase: str = DEFAULT_PHASE,
    direction: str = "identity",
    overwrite: bool = False,
    progress: bool = True,
    min_tumours: int = 1,
    diagnosis: bool = False,
) -> Path:
    """Write a phantom dataset in nnU-Net v2's raw format, atomically.

    Layout of ``raw_root/DatasetXXX_<name>/``: ``imagesTr/case_XXXX_0000.nii.gz`` and ``labelsTr/case_XXXX.nii.gz``
    for the training cases, ``imagesTs/`` and ``labelsTs/`` (ground truth for evaluation, which nnU-Net ignores)
    for the test cases, ``dataset.json`` (regions liver = (1, 2) and tumour = 2) and a ``phantom.json`` sidecar
    with the generator settings, library versions and every case's lesions. Test cases are numbered after the
    training cases. Case ``i`` is ``make_case(SeedSequence([seed, i]) -> uint32, ...)``, so the data depend only on
    the arguments.

    Everything is written into a hidden temporary sibling folder that is renamed into place at the end, so a crash
    never leaves a half-written dataset.

    Args:
        raw_root: The nnU-Net raw folder (``nnUNet_raw``); created if missing.
        dataset_id: nnU-Net dataset id, 1-999.
        name: Dataset name (letters, digits, ``_`` and ``-``).
        num_training: Number of training cases (>= 1).
        num_test: Number of test cases (>= 0).
        preset: Grid preset, one of ``GRID_PRESETS``.
        seed: Non-negative base seed.
        phase: Contrast phase, one of ``PHASES``.
        direction: Direction variant, one of ``DIRECTIONS``.
        overwrite: Replace an existing dataset folder of the same name (only once the new one is complete).
        progress: Show a progress bar.
        min_tumours: Lower bound on the lesions per case (0-8).
        diagnosis: Write the clinical-feature variant of the nnY-Net issue: every second case (even index,
            training and test alike) is "malignant" and keeps its lesions labelled tumour; the others are "benign",
            with the same-looking lesions labelled liver (``make_case(..., benign_fraction=1)``). A
            ``clinical.json`` (format: :mod:`nnyseg.data.clinical`) holds the categorical field ``diagnosis`` of
            every case, the one thing that tells the two apart. Images are those of ``diagnosis=False``.

    Returns:
        The dataset folder.

    Raises:
        ValueError: On invalid arguments, or when ``raw_root`` already holds a dataset with the same id and another
            name (nnU-Net would see two datasets with one id).
        FileExistsError: When the dataset folder exists and ``overwrite`` is False.
    """
    dataset_id = _check_int(dataset_id, "dataset_id", 1, 999)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"name must be letters, digits, '_' or '-' (starting with a letter or digit), got {name!r}")
    num_training = _check_int(num_training, "num_training", 1)
    num_test = _check_int(num_test, "num_test", 0)
    min_tumours = _check_int(min_tumours, "min_tumours", 0, MAX_TUMOURS)
    seed = _check_seed(seed)
    _check_choice(preset, list(GRID_PRESETS), "preset")
    _check_choice(phase, PHASES, "phase")
    _check_choice(direction, DIRECTIONS, "direction")

    raw_root = Path(raw_root)
    folder_name = f"Dataset{dataset_id:03d}_{name}"
    target = raw_root / folder_name
    if raw_root.is_dir():
        clashes = sorted(
            p.name
            for p in raw_root.glob(f"Dataset{dataset_id:03d}_*")
            if p.is_dir() and p.name != folder_name and not p.name.startswith(".")
        )
        if clashes:
            raise ValueError(
                f"{raw_root} already holds {', '.join(clashes)} with dataset id {dataset_id}; nnU-Net would see two "
                f"datasets with one id. Use another id or remove {clashes[0]}"
            )
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    raw_root.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm  # nnU-Net's own progress bars; imported here to keep the generator free of it

    tmp = raw_root / f".{folder_name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir(parents=True)
        cases: dict[str, Any] = {}
        diagnoses: dict[str, dict[str, str]] = {}
        total = num_training + num_test
        for i in tqdm(range(total), desc=f"phantom {folder_name}", unit="case", disable=not progress):
            split = "train" if i < num_training else "test"
            case_seed = _case_seed(seed, i)
            kind = ("malignant" if i % 2 == 0 else "benign") if diagnosis else None
            case = make_case(
                case_seed,
                preset,
                phase,
                min_tumours=min_tumours,
                direction=direction,
                benign_fraction=1.0 if kind == "benign" else 0.0,
            )
            ident = f"case_{i:04d}"
            if kind is not None:
                diagnoses[ident] = {"diagnosis": kind}
            img, lab = case.to_sitk()
            suffix = "Tr" if split == "train" else "Ts"
            sitk.WriteImage(img, str(tmp / f"images{suffix}" / f"{ident}_0000.nii.gz"), True)
            sitk.WriteImage(lab, str(tmp / f"labels{suffix}" / f"{ident}.nii.gz"), True)
            cases[ident] = {"split": split, "case_seed": case_seed, **case.meta, "tumours": case.tumours}

        grid = GRID_PRESETS[preset]
        dataset_json = {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "liver": [1, 2], "tumor": 2},
            "regions_class_order": [1, 2],
            "numTraining": num_training,
            "file_ending": ".nii.gz",
            "name": folder_name,
            "description": (
                f"Synthetic abdominal CT phantom (nnyseg {GENERATOR_VERSION}): {preset} grid "
                f"{grid.spacing} mm, {phase} phase, {direction} direction, seed {seed}. Labels: 0 background, "
                "1 liver, 2 tumour (LiTS convention); test ground truth in labelsTs."
                + (
                    " Clinical variant: lesions of 'benign' cases (clinical.json) are labelled liver."
                    if diagnosis
                    else ""
                )
            ),
            "licence": "CC0-1.0 (synthetic data, no patient information)",
            "reference": "nnyseg.data.phantom; docs/phantom.md",
        }
        sidecar = {
            "generator": "nnyseg.data.phantom",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "preset": preset,
            "spacing": list(grid.spacing),
            "shape": list(grid.shape),
            "phase": phase,
            "direction": direction,
            "min_tumours": min_tumours,
            "diagnosis": diagnosis,
            "num_training": num_training,
            "num_test": num_test,
            "numpy_version": np.__version__,
            "scipy_version": scipy.__version__,
            "simpleitk_version": sitk.Version_VersionString(),
            "case_seed_rule": "numpy.random.SeedSequence([seed, case_index]).generate_state(1, dtype=uint32)[0]",
            "coordinates": "LPS (SimpleITK); NIfTI files hold the equivalent RAS affine",
            "cases": cases,
        }
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n", encoding="utf-8")
        (tmp / "phantom.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
        if diagnosis:
            schema = [{"name": "diagnosis", "type": "categorical", "categories": ["benign", "malignant"]}]
            clinical = {"schema": schema, "cases": diagnoses}
            (tmp / "clinical.json").write_text(json.dumps(clinical, indent=2) + "\n", encoding="utf-8")

        if target.exists():  # overwrite: swap only now that the new dataset is complete
            old = raw_root / f".{folder_name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
