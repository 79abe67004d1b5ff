"""Tests of the synthetic CT phantom (nnyseg.data.phantom): determinism, labels, HU statistics, noise, geometry and
the nnU-Net raw dataset writer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnyseg.data import phantom
from nnyseg.data.phantom import (
    GENERATOR_VERSION,
    GRID_PRESETS,
    PHASES,
    TISSUE_HU,
    PhantomCase,
    make_case,
    tissue_statistics,
    write_nnunet_dataset,
)


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


@pytest.fixture(scope="module")
def tiny_cases() -> dict[int, PhantomCase]:
    return {seed: make_case(seed, "tiny") for seed in range(8)}


@pytest.fixture(scope="module")
def big_tumour_case(tiny_cases: dict[int, PhantomCase]) -> PhantomCase:
    """The tiny case with the largest tumour volume, so that tumour statistics are not all partial volume."""
    return max(tiny_cases.values(), key=lambda c: c.meta["tumour_volume_ml"])


# ---------------------------------------------------------------------------------------------------------------
# Presets and geometry


def test_presets_match_spec() -> None:
    expected = {
        "micro": ((6.0, 6.0, 8.0), (48, 40, 24)),
        "tiny": ((4.0, 4.0, 5.0), (96, 72, 40)),
        "small": ((2.0, 2.0, 3.0), (176, 128, 64)),
        "clinical": ((0.75, 0.75, 2.5), (448, 320, 96)),
        "lits_like": ((0.77, 0.77, 1.0), (416, 320, 200)),
    }
    assert set(GRID_PRESETS) == set(expected)
    for name, (spacing, shape) in expected.items():
        preset = GRID_PRESETS[name]
        assert preset.spacing == spacing and preset.shape == shape
        assert preset.supersample % 2 == 1
    with pytest.raises(AttributeError):
        GRID_PRESETS["tiny"].shape = (1, 1, 1)  # type: ignore[misc]
    assert PHASES == ("native", "portal", "arterial")


@pytest.mark.parametrize("preset", ["micro", "tiny"])
def test_case_arrays_and_geometry(preset: str, tiny_cases: dict[int, PhantomCase]) -> None:
    case = tiny_cases[0] if preset == "tiny" else make_case(0, preset)
    grid = GRID_PRESETS[preset]
    nx, ny, nz = grid.shape
    assert case.image.shape == case.label.shape == (nz, ny, nx)
    assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
    assert case.spacing == grid.spacing
    assert len(case.direction) == 9 and np.allclose(np.reshape(case.direction, (3, 3)), np.eye(3))
    assert case.image.min() >= -1024 and case.image.max() <= 3071
    image, label = case.to_sitk()
    for img in (image, label):
        assert img.GetSize() == grid.shape
        assert img.GetSpacing() == grid.spacing
        assert np.allclose(img.GetOrigin(), case.origin)
    assert image.GetPixelID() == sitk.sitkInt16 and label.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(label), case.label)
    # Air outside the body, soft tissue inside, bone in the spine.
    assert np.median(case.image[:, 0, :]) < -900
    assert case.image.max() > 300


def test_same_seed_same_case_different_seed_different(tiny_cases: dict[int, PhantomCase]) -> None:
    again = make_case(3, "tiny")
    ref = tiny_cases[3]
    assert _sha(again.label) == _sha(ref.label)
    assert np.array_equal(again.image, ref.image)
    assert again.tumours == ref.tumours and again.meta == ref.meta
    other = tiny_cases[4]
    assert _sha(other.label) != _sha(ref.label)
    assert not np.array_equal(other.image, ref.image)


def test_same_patient_across_phases_and_noise_levels() -> None:
    portal = make_case(5, "micro", "portal")
    native = make_case(5, "micro", "native")
    quiet = make_case(5, "micro", noise_hu=0.0)
    assert np.array_equal(portal.label, native.label)
    assert np.array_equal(portal.label, quiet.label)
    assert [t["centre_mm"] for t in portal.tumours] == [t["centre_mm"] for t in native.tumours]


def test_no_global_rng_use() -> None:
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    make_case(0, "micro")
    assert np.array_equal(np.random.get_state()[1], state)


# ---------------------------------------------------------------------------------------------------------------
# Labels and tumours


def test_labels_and_tumours_inside_liver(tiny_cases: dict[int, PhantomCase]) -> None:
    for seed, case in tiny_cases.items():
        assert set(np.unique(case.label)) <= {0, 1, 2}
        tumour = case.label == 2
        assert tumour.any(), f"seed {seed}: min_tumours=1 but no tumour voxels"
        assert 1 <= len(case.tumours) <= 8
        comps, n = ndimage.label(tumour)
        for i in range(1, n + 1):
            comp = comps == i
            ring = ndimage.binary_dilation(comp) & ~comp
            assert (case.label[ring] == 1).any(), f"seed {seed}: tumour component {i} does not touch the liver"
        for rec in case.tumours:
            x, y, z = rec["centre_voxel"]
            assert case.label[z, y, x] == 2
            assert rec["n_voxels"] >= 1 and rec["kind"] == "malignant"
            assert 3.0 <= rec["radius_mm"] <= 40.0 or rec["small"]
        # Liver of adult size (1.2-1.8 L targeted).
        assert 1000.0 < case.meta["liver_volume_ml"] < 2000.0


def test_min_tumours_zero_allows_tumour_free_cases() -> None:
    counts = [len(make_case(seed, "micro", min_tumours=0).tumours) for seed in range(25)]
    assert 0 in counts and max(counts) <= 8
    case = make_case(counts.index(0), "micro", min_tumours=0)
    assert not (case.label == 2).any() and (case.label == 1).any()
    assert len(make_case(counts.index(0), "micro", min_tumours=3).tumours) == 3


def test_small_tumour_present_when_two_or_more(tiny_cases: dict[int, PhantomCase]) -> None:
    seen = 0
    for seed, case in tiny_cases.items():
        if len(case.tumours) < 2:
            continue
        seen += 1
        assert sum(t["small"] for t in case.tumours) == 1
        comps, _ = ndimage.label(case.label == 2)
        extents = [(sl[1].stop - sl[1].start, sl[2].stop - sl[2].start) for sl in ndimage.find_objects(comps)]
        assert any(max(e) <= 4 and min(e) >= 1 for e in extents), f"seed {seed}: no tumour <= 4 voxels across"
    assert seen >= 2


def test_benign_lesions_look_the_same_but_are_liver(big_tumour_case: PhantomCase) -> None:
    seed = big_tumour_case.seed
    benign = make_case(seed, "tiny", benign_fraction=1.0)
    assert np.array_equal(benign.image, big_tumour_case.image)
    assert not (benign.label == 2).any()
    assert np.array_equal(benign.label, np.where(big_tumour_case.label == 2, 1, big_tumour_case.label))
    assert all(t["kind"] == "benign" for t in benign.tumours)
    lesions = big_tumour_case.label == 2
    assert benign.image[lesions].mean() == big_tumour_case.image[lesions].mean()
    assert benign.image[lesions].mean() < benign.image[benign.label == 1].mean() - 25


# ---------------------------------------------------------------------------------------------------------------
# CT numbers and noise


def test_portal_hu_statistics(big_tumour_case: PhantomCase) -> None:
    stats = tissue_statistics(big_tumour_case)
    liver, tumour = stats["liver"], stats["tumour"]
    assert abs(liver["interior_mean"] - TISSUE_HU["portal"]["liver"]) <= 15
    assert abs(liver["mean"] - 110) <= 15
    assert 30 <= liver["interior_mean"] - tumour["interior_mean"] <= 60
    assert 25 <= liver["mean"] - tumour["mean"] <= 60  # partial volume at the rim narrows the gap a little
    assert 8 <= liver["roi_sd_median"] <= 25
    assert stats["background"]["n"] > stats["liver"]["n"]


def test_native_and_arterial_phase_liver() -> None:
    native = tissue_statistics(make_case(2, "tiny", "native"))
    assert abs(native["liver"]["interior_mean"] - 60) <= 15
    assert 10 <= native["liver"]["interior_mean"] - native["tumour"]["interior_mean"] <= 35
    arterial = tissue_statistics(make_case(2, "tiny", "arterial"))
    assert abs(arterial["liver"]["interior_mean"] - 80) <= 15


def test_noise_is_correlated_in_plane_and_scaled_with_thickness() -> None:
    noisy = make_case(6, "tiny")
    clean = make_case(6, "tiny", noise_hu=0)
    assert np.array_equal(noisy.label, clean.label)  # the noise stream moves nothing else
    noise = noisy.image.astype(np.float64) - clean.image
    body = clean.image > -500
    expected = phantom.NOISE_SD_HU["portal"] * np.sqrt(3.0 / 5.0)
    assert noise[body].std() == pytest.approx(expected, rel=0.1)

    def lag1(axis: int) -> float:
        a, b = np.moveaxis(noise, axis, 0)[:-1], np.moveaxis(noise, axis, 0)[1:]
        m = np.moveaxis(body, axis, 0)[:-1] & np.moveaxis(body, axis, 0)[1:]
        return float(np.corrcoef(a[m], b[m])[0, 1])

    assert lag1(2) > 0.3 and lag1(1) > 0.3  # x, y: exp(-1 / (4 * 0.7^2)) = 0.60
    assert abs(lag1(0)) < 0.1  # z: thick slices, independent
    loud = make_case(6, "tiny", noise_hu=24.0)
    assert (loud.image.astype(np.float64) - clean.image)[body].std() == pytest.approx(2 * expected, rel=0.1)


# ---------------------------------------------------------------------------------------------------------------
# Direction variants


def test_direction_variants(tiny_cases: dict[int, PhantomCase], tmp_path: Path) -> None:
    ref = tiny_cases[1]
    flipped = make_case(1, "tiny", direction="flipped")
    oblique = make_case(1, "tiny", direction="oblique")
    assert flipped.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert np.array_equal(flipped.label[:, ::-1, ::-1], ref.label)
    assert np.array_equal(flipped.image[:, ::-1, ::-1], ref.image)
    ref_img, ref_lab = ref.to_sitk()
    # Same physical extent: the flipped grid covers the same box.
    flip_img, flip_lab = flipped.to_sitk()
    corners = [(0, 0, 0), tuple(s - 1 for s in ref_img.GetSize())]
    ref_box = np.sort([ref_img.TransformIndexToPhysicalPoint(c) for c in corners], axis=0)
    flip_box = np.sort([flip_img.TransformIndexToPhysicalPoint(c) for c in corners], axis=0)
    assert np.allclose(ref_box, flip_box)
    # Resampled into the identity grid, the anatomy is where it should be.
    back = sitk.GetArrayFromImage(sitk.Resample(flip_lab, ref_lab, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    assert np.array_equal(back, ref.label)
    obl_lab = oblique.to_sitk()[1]
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    assert np.allclose(oblique.direction, (c, -s, 0, s, c, 0, 0, 0, 1))
    back = sitk.GetArrayFromImage(sitk.Resample(obl_lab, ref_lab, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    liver_ref, liver_obl = ref.label > 0, back > 0
    dice = 2 * (liver_ref & liver_obl).sum() / (liver_ref.sum() + liver_obl.sum())
    assert dice > 0.9
    # Lesion records: the centre voxel maps to the recorded physical centre in every variant.
    for case in (ref, flipped, oblique):
        lab = case.to_sitk()[1]
        for rec in case.tumours:
            point = lab.TransformIndexToPhysicalPoint([int(v) for v in rec["centre_voxel"]])
            assert np.allclose(point, rec["centre_mm"], atol=1e-3)
    # Written to NIfTI and read back, the geometry survives.
    for case in (flipped, oblique):
        lab = case.to_sitk()[1]
        path = tmp_path / f"{case.orientation}.nii.gz"
        sitk.WriteImage(lab, str(path), True)
        read = _read(path)
        assert np.allclose(read.GetDirection(), case.direction, atol=1e-5)
        assert np.allclose(read.GetOrigin(), case.origin, atol=1e-3)
        assert np.allclose(read.GetSpacing(), case.spacing)
        assert np.array_equal(sitk.GetArrayFromImage(read), case.label)


# ---------------------------------------------------------------------------------------------------------------
# nnU-Net raw dataset


def test_write_nnunet_dataset(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    folder = write_nnunet_dataset(raw, 42, num_training=3, num_test=2, preset="micro", seed=7, progress=False)
    assert folder == raw / "Dataset042_LiverPhantom"
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset042_LiverPhantom"]  # no temp folder left
    tr = sorted(p.name for p in (folder / "imagesTr").iterdir())
    assert tr == ["case_0000_0000.nii.gz", "case_0001_0000.nii.gz", "case_0002_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [
        "case_0000.nii.gz",
        "case_0001.nii.gz",
        "case_0002.nii.gz",
    ]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["case_0003_0000.nii.gz", "case_0004_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == ["case_0003.nii.gz", "case_0004.nii.gz"]

    ds = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert ds["channel_names"] == {"0": "CT"}
    assert ds["labels"] == {"background": 0, "liver": [1, 2], "tumor": 2}
    assert ds["regions_class_order"] == [1, 2]
    assert ds["numTraining"] == 3 and ds["file_ending"] == ".nii.gz"
    for key in ("name", "description", "licence", "reference"):
        assert ds[key]

    side = json.loads((folder / "phantom.json").read_text(encoding="utf-8"))
    assert side["seed"] == 7 and side["preset"] == "micro" and side["phase"] == "portal"
    assert side["direction"] == "identity" and side["generator_version"] == GENERATOR_VERSION
    assert side["numpy_version"] == np.__version__ and "scipy_version" in side
    assert sorted(side["cases"]) == [f"case_{i:04d}" for i in range(5)]
    assert [side["cases"][f"case_{i:04d}"]["split"] for i in range(5)] == ["train"] * 3 + ["test"] * 2

    # Files hold the case the sidecar describes, with the preset's anisotropic spacing.
    rec = side["cases"]["case_0001"]
    case = make_case(rec["case_seed"], "micro")
    lab = _read(folder / "labelsTr" / "case_0001.nii.gz")
    img = _read(folder / "imagesTr" / "case_0001_0000.nii.gz")
    assert np.allclose(lab.GetSpacing(), (6.0, 6.0, 8.0)) and np.allclose(img.GetSpacing(), (6.0, 6.0, 8.0))
    assert img.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(lab), case.label)
    assert np.array_equal(sitk.GetArrayFromImage(img), case.image)
    assert rec["tumours"] == case.tumours

    # Re-running without overwrite fails and leaves the dataset alone.
    with pytest.raises(FileExistsError, match="Dataset042_LiverPhantom"):
        write_nnunet_dataset(raw, 42, num_training=3, num_test=2, preset="micro", seed=7, progress=False)

    # Same seed, same data: decoded arrays identical (and SimpleITK writes identical bytes, too).
    other = write_nnunet_dataset(
        tmp_path / "raw2", 42, num_training=3, num_test=2, preset="micro", seed=7, progress=False
    )
    for sub, name in (("labelsTr", "case_0002.nii.gz"), ("labelsTs", "case_0004.nii.gz")):
        a, b = _read(folder / sub / name), _read(other / sub / name)
        assert _sha(sitk.GetArrayFromImage(a)) == _sha(sitk.GetArrayFromImage(b))
        assert (folder / sub / name).read_bytes() == (other / sub / name).read_bytes()

    # Overwrite replaces the dataset only once the new one is complete.
    write_nnunet_dataset(raw, 42, num_training=2, num_test=0, preset="micro", seed=8, overwrite=True, progress=False)
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset042_LiverPhantom"]
    assert len(list((folder / "imagesTr").iterdir())) == 2 and not list((folder / "imagesTs").iterdir())
    assert json.loads((folder / "phantom.json").read_text(encoding="utf-8"))["seed"] == 8


def test_write_nnunet_dataset_cleans_up_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = phantom.make_case

    def failing(*args: object, **kwargs: object) -> PhantomCase:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(phantom, "make_case", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_nnunet_dataset(tmp_path, 3, num_training=2, num_test=0, preset="micro", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_write_nnunet_dataset_id_clash(tmp_path: Path) -> None:
    (tmp_path / "Dataset005_Other").mkdir()
    with pytest.raises(ValueError, match="Dataset005_Other"):
        write_nnunet_dataset(tmp_path, 5, num_training=1, num_test=0, preset="micro", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset005_Other"]


def test_dataset_passes_nnunet_verification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity").verify_dataset_integrity
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    folder = write_nnunet_dataset(tmp_path, 9, num_training=2, num_test=1, preset="micro", progress=False)
    verify(str(folder), 1)  # raises on any problem


# ---------------------------------------------------------------------------------------------------------------
# Argument validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preset": "huge"}, "unknown preset 'huge'.*'tiny'"),
        ({"phase": "venous"}, "unknown phase 'venous'.*'portal'"),
        ({"direction": "sideways"}, "unknown direction 'sideways'.*'oblique'"),
        ({"min_tumours": 9}, "min_tumours must be between 0 and 8"),
        ({"min_tumours": -1}, "min_tumours"),
        ({"noise_hu": -1.0}, "noise_hu"),
        ({"benign_fraction": 1.5}, "benign_fraction"),
        ({"seed": -3}, "seed must be a non-negative integer"),
        ({"seed": 1.5}, "seed must be a non-negative integer"),
    ],
)
def test_make_case_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_case(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset_id": 0}, "dataset_id must be between 1 and 999"),
        ({"dataset_id": 1000}, "dataset_id must be between 1 and 999"),
        ({"num_training": -1}, "num_training"),
        ({"num_test": -2}, "num_test must be >= 0"),
        ({"preset": "huge"}, "unknown preset"),
        ({"phase": "late"}, "unknown phase"),
        ({"direction": "up"}, "unknown direction"),
        ({"name": "bad/name"}, "name must be"),
        ({"seed": -1}, "seed"),
    ],
)
def test_write_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"raw_root": tmp_path, "dataset_id": 1, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_nnunet_dataset(**args)
    assert list(tmp_path.iterdir()) == []


def test_diagnosis_variant_changes_only_the_labels_of_benign_cases(tmp_path: Path) -> None:
    from nnyseg.data.clinical import load_clinical_table

    kwargs = {"num_training": 4, "num_test": 2, "preset": "micro", "min_tumours": 2, "progress": False}
    plain = write_nnunet_dataset(tmp_path / "a", 981, "Plain", **kwargs)
    clinical = write_nnunet_dataset(tmp_path / "b", 981, "Plain", diagnosis=True, **kwargs)
    table = load_clinical_table(clinical)  # validated against the dataset: every training case, test cases allowed
    assert table.field_names == ["diagnosis"] and len(table.case_ids) == 6
    assert not (plain / "clinical.json").exists()

    def read(root: Path, kind: str, sub: str, name: str) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(root / f"{kind}{sub}" / name)))

    for i in range(6):
        case, sub = f"case_{i:04d}", "Tr" if i < 4 else "Ts"
        np.testing.assert_array_equal(
            read(plain, "images", sub, f"{case}_0000.nii.gz"), read(clinical, "images", sub, f"{case}_0000.nii.gz")
        )
        before, after = read(plain, "labels", sub, f"{case}.nii.gz"), read(clinical, "labels", sub, f"{case}.nii.gz")
        kind = json.loads((clinical / "clinical.json").read_text(encoding="utf-8"))["cases"][case]["diagnosis"]
        assert kind == ("malignant" if i % 2 == 0 else "benign")
        assert (before == 2).any()
        if kind == "malignant":
            np.testing.assert_array_equal(after, before)
        else:  # the same lesions, labelled liver
            assert not (after == 2).any()
            np.testing.assert_array_equal(after, np.where(before == 2, 1, before))
