"""``nnyseg segment`` (:mod:`nnyseg.segment`) and its DICOM-SEG output (:mod:`nnyseg.dicom_seg`).

The end-to-end tests share one model trained as a user would (module fixture, subprocesses): a micro phantom with
clinical features and oblique geometry -> stock ``nnUNetv2_plan_and_preprocess`` -> ``nnUNetv2_train ...
nnYNetTrainer_tiny`` (1 epoch x 2 iterations, so its masks are nearly random: the tests check geometry, files and
exactness, not accuracy) -> ``nnUNetv2_find_best_configuration``. The DICOM tests read the real CT series in
``../shared/data/totalsegmentator_examples/example_ct_dicom`` and skip without it; the ``dciodvfy`` test skips where
``dicom3tools`` is not installed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from nnyseg import cli
from nnyseg.dicom_seg import write_dicom_seg
from nnyseg.evaluation.burden import measure_burden
from nnyseg.segment import (
    SegmentOptions,
    find_inputs,
    find_postprocessing,
    load_postprocessing,
    resolve_model_folder,
    segment,
)

from .conftest import QUICK_TRAINER_SETTINGS, REAL_DATA

# The model is a clinical nnY-Net; runs without --clinical treat every field as missing, which it says each time.
pytestmark = pytest.mark.filterwarnings("ignore:SwinNeXtUNet in 'clinical' cross-attention mode got no clinical input")

DICOM_SERIES = REAL_DATA / "example_ct_dicom"
DICOM_LIVER = REAL_DATA / "example_seg_dicom.nii.gz"  # TotalSegmentator mask of that series, liver = 5
needs_dicom = pytest.mark.skipif(not DICOM_SERIES.is_dir(), reason=f"{DICOM_SERIES} is absent")

DATASET_ID = 994
TRAINER = "nnYNetTrainer_tiny"
CONFIG = "3d_fullres"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Patient and study attributes the DICOM-SEG must carry over from the CT.
CARRIED_OVER = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "FrameOfReferenceUID",
)


def _script(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else str(shutil.which(name))


def _series_files(folder: Path, uid: str = "") -> list[str]:
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))


def _instance_uid(ds: pydicom.Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "") or ds.file_meta.MediaStorageSOPInstanceUID)


def check_dicom_seg(seg_file: Path, mask: sitk.Image, series_files: list[str]) -> pydicom.Dataset:
    """Read ``seg_file`` back (highdicom and pydicom) and check it against the mask and its source series.

    Every frame must reference a source instance, sit at that instance's Image Position (Patient), which must be the
    position of mask slice k, and hold exactly that slice of its segment; the frames together must rebuild the mask
    exactly (frames left out are empty). Returns the DICOM-SEG dataset.
    """
    import highdicom as hd

    labels = sitk.GetArrayFromImage(mask)
    sources = {}
    for f in series_files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sources[_instance_uid(ds)] = ds
    seg = hd.seg.segread(seg_file)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    # Liver includes its tumours: the segments overlap wherever there is tumour (highdicom says so from the data).
    assert seg.Modality == "SEG" and seg.SegmentsOverlap == ("YES" if (labels == 2).any() else "NO")
    liver, tumour = (seg.get_segment_description(n) for n in (1, 2))
    assert (liver.segment_label, tumour.segment_label) == ("Liver", "Liver tumour")
    assert (liver.segmented_property_type.value, liver.segmented_property_type.scheme_designator) == ("10200004", "SCT")
    assert liver.segmented_property_category.value == "91723000"  # Anatomical Structure, CID 7150
    assert tumour.segmented_property_type.value == "108369006"  # Neoplasm, CID 7159
    assert tumour.segmented_property_category.value == "49755003"  # Morphologically Abnormal Structure
    assert [c.value for c in tumour.anatomic_regions] == ["10200004"]
    for description in (liver, tumour):
        assert description.algorithm_type.value == "AUTOMATIC"
        algorithm = description.algorithm_identification[0]
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
        assert algorithm.AlgorithmName and algorithm.AlgorithmVersion
    first = next(iter(sources.values()))
    for keyword in CARRIED_OVER:
        assert str(seg.get(keyword, "")) == str(first.get(keyword, "")), keyword

    pixels = pydicom.dcmread(seg_file).pixel_array.reshape(-1, *labels.shape[1:])  # unpacked by pydicom, not highdicom
    assert len(pixels) == int(seg.NumberOfFrames) == len(seg.PerFrameFunctionalGroupsSequence)
    rebuilt = np.zeros_like(labels)
    for n, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        referenced = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        segment_number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        source_position = np.array([float(v) for v in sources[referenced].ImagePositionPatient])
        np.testing.assert_allclose(position, source_position, atol=1e-4)
        index = np.array(mask.TransformPhysicalPointToContinuousIndex(position.tolist()))
        k = round(index[2])
        np.testing.assert_allclose(index, [0, 0, k], atol=1e-3)  # the frame's slice is mask slice k
        expected = labels[k] >= 1 if segment_number == 1 else labels[k] == 2
        np.testing.assert_array_equal(pixels[n].astype(bool), expected)
        rebuilt[k] = np.maximum(rebuilt[k], pixels[n].astype(labels.dtype) * segment_number)
    np.testing.assert_array_equal(rebuilt, labels)  # the two segments give back the mask exactly
    # highdicom's own reading agrees.
    uids = [_instance_uid(pydicom.dcmread(f, stop_before_pixels=True)) for f in series_files]
    by_instance = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(by_instance.astype(bool), np.stack([labels >= 1, labels == 2], axis=-1))
    return seg


# ----------------------------------------------------------------------------------------------------------------
# DICOM-SEG writer on the real series (no model needed)


@pytest.fixture(scope="module")
def synthetic_mask():
    """Liver from TotalSegmentator's mask of the real series (resampled in physical space) with a 12 mm sphere."""
    if not DICOM_SERIES.is_dir():
        pytest.skip(f"{DICOM_SERIES} is absent")
    files = _series_files(DICOM_SERIES)
    image = sitk.ReadImage(files)
    liver = sitk.Resample(sitk.ReadImage(str(DICOM_LIVER)) == 5, image, sitk.Transform(), sitk.sitkNearestNeighbor)
    labels = sitk.GetArrayFromImage(liver).astype(np.uint8)
    k, j, i = (round(c) for c in np.argwhere(labels).mean(axis=0))  # inside this liver (convex enough here)
    centre = np.array(image.TransformIndexToPhysicalPoint((i, j, k)))
    size = image.GetSize()
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij"), axis=-1)[..., ::-1]
    points = grid * np.asarray(image.GetSpacing()) + np.asarray(image.GetOrigin())  # identity direction
    labels[(np.linalg.norm(points - centre, axis=-1) <= 12.0) & (labels == 1)] = 2
    assert (labels == 1).sum() > 10000 and (labels == 2).sum() > 1000
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(image)
    return mask, files


@pytest.mark.realdata
def test_dicom_seg_frames_land_on_their_slices_with_exact_pixels(synthetic_mask, tmp_path):
    mask, files = synthetic_mask
    info = write_dicom_seg(
        sitk.GetArrayFromImage(mask),
        files,
        tmp_path / "seg.dcm",
        reference=sitk.ReadImage(files),
        algorithm_name="nnYNetTrainer",
        algorithm_parameters={"plans": "nnUNetPlans", "folds": "0 1 2 3 4"},
    )
    seg = check_dicom_seg(tmp_path / "seg.dcm", mask, files)
    assert (
        info.frames == int(seg.NumberOfFrames) == 20 + int((sitk.GetArrayFromImage(mask) == 2).any(axis=(1, 2)).sum())
    )
    assert seg.StudyInstanceUID == info.study_instance_uid
    assert seg.FrameOfReferenceUID == pydicom.dcmread(files[0], stop_before_pixels=True).FrameOfReferenceUID
    # The example series was anonymised with its UIDs blanked: the substitutes are said and deterministic.
    assert any("no Study Instance UID" in note for note in info.notes)
    again = write_dicom_seg(sitk.GetArrayFromImage(mask), files, tmp_path / "again.dcm")
    assert again.study_instance_uid == info.study_instance_uid and again.sop_instance_uid != info.sop_instance_uid


@pytest.mark.realdata
@pytest.mark.parametrize("content", ["empty", "liver only"])
def test_dicom_seg_of_masks_without_tumour(synthetic_mask, tmp_path, content):
    mask, files = synthetic_mask
    labels = sitk.GetArrayFromImage(mask)
    labels = np.zeros_like(labels) if content == "empty" else np.minimum(labels, 1)
    empty = sitk.GetImageFromArray(labels)
    empty.CopyInformation(mask)
    write_dicom_seg(labels, files, tmp_path / "seg.dcm", reference=mask)
    check_dicom_seg(tmp_path / "seg.dcm", empty, files)


@pytest.mark.realdata
def test_dicom_seg_refuses_a_mask_that_does_not_fit(synthetic_mask, tmp_path):
    mask, files = synthetic_mask
    labels = sitk.GetArrayFromImage(mask)
    with pytest.raises(ValueError, match="20 instances"):
        write_dicom_seg(labels[:5], files, tmp_path / "seg.dcm")
    shifted = sitk.Image(mask)
    shifted.SetOrigin((0.0, 0.0, 5.0))
    with pytest.raises(ValueError, match="irregular slice spacing or missing slices"):
        write_dicom_seg(labels, files, tmp_path / "seg.dcm", reference=shifted)
    with pytest.raises(ValueError, match="LiTS labels"):
        write_dicom_seg(labels * 3, files, tmp_path / "seg.dcm")
    assert not list(tmp_path.iterdir())


@pytest.mark.realdata
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_dciodvfy_accepts_the_dicom_seg(synthetic_mask, tmp_path):
    mask, files = synthetic_mask
    write_dicom_seg(sitk.GetArrayFromImage(mask), files, tmp_path / "seg.dcm", reference=mask)
    result = subprocess.run(["dciodvfy", str(tmp_path / "seg.dcm")], capture_output=True, text=True, timeout=120)
    report = (result.stdout + result.stderr).strip()
    print(f"dciodvfy says:\n{report}")  # shown with pytest -s / -rP
    assert "Segmentation" in report  # the IOD it recognised and checked against
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report


# ----------------------------------------------------------------------------------------------------------------
# Inputs, model folders and postprocessing (no model needed)


def test_inputs_are_found_and_named(tmp_path):
    for name in ("b_0000.nii.gz", "a.nii", ".hidden.nii.gz", "notes.txt"):
        (tmp_path / "folder").mkdir(exist_ok=True)
        (tmp_path / "folder" / name).write_bytes(b"")
    cases = find_inputs(tmp_path / "folder")
    assert [(c.case, c.kind, c.source.name) for c in cases] == [
        ("a", "nifti", "a.nii"),
        ("b", "nifti", "b_0000.nii.gz"),
    ]
    assert [c.case for c in find_inputs(tmp_path / "folder" / "b_0000.nii.gz")] == ["b"]
    (tmp_path / "series").mkdir()
    assert [(c.case, c.kind) for c in find_inputs(tmp_path / "series")] == [("series", "dicom")]
    with pytest.raises(ValueError, match="not a NIfTI file"):
        find_inputs(tmp_path / "folder" / "notes.txt")
    with pytest.raises(ValueError, match="--series-uid is for DICOM input"):
        find_inputs(tmp_path / "folder", series_uid="1.2.3")
    (tmp_path / "folder" / "a_0000.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="both case 'a'"):
        find_inputs(tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        find_inputs(tmp_path / "missing")


def test_model_folder_resolution(tmp_path):
    results = tmp_path / "results"
    folder = results / "Dataset007_Liver" / "nnYNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        (folder / name).write_text("{}", encoding="utf-8")
    found = resolve_model_folder(dataset="7", configuration="3d_fullres", trainer="nnYNetTrainer", results=results)
    assert found == folder
    assert resolve_model_folder(dataset="Dataset007_Liver", configuration="3d_fullres", trainer="nnYNetTrainer",
                                results=results) == folder  # fmt: skip
    assert resolve_model_folder(model_folder=folder) == folder
    with pytest.raises(FileNotFoundError, match="holds \\['nnYNetTrainer__nnUNetPlans__3d_fullres'\\]"):
        resolve_model_folder(dataset="7", configuration="2d", results=results)
    with pytest.raises(ValueError, match="not both"):
        resolve_model_folder(model_folder=folder, dataset="7", configuration="3d_fullres")
    with pytest.raises(ValueError, match="-d DATASET -c CONFIGURATION"):
        resolve_model_folder(dataset="7")
    with pytest.raises(FileNotFoundError, match="not a trained nnU-Net model folder"):
        resolve_model_folder(model_folder=results)


def test_postprocessing_is_found_where_find_best_configuration_puts_it(tmp_path):
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation as keep_largest,
    )

    model = tmp_path / "Dataset007_Liver" / "nnYNetTrainer__nnUNetPlans__3d_fullres"
    crossval = model / "crossval_results_folds_0_1"
    crossval.mkdir(parents=True)
    assert find_postprocessing(model, (0, 1)) is None
    with (crossval / "postprocessing.pkl").open("wb") as f:
        pickle.dump(([keep_largest], [{"labels_or_regions": (1, 2)}]), f)
    assert find_postprocessing(model, (0, 1)) == crossval / "postprocessing.pkl"
    assert find_postprocessing(model, (0,)) is None  # chosen for other folds
    elsewhere = tmp_path / "ensembles" / "postprocessing.pkl"
    elsewhere.parent.mkdir()
    shutil.copyfile(crossval / "postprocessing.pkl", elsewhere)
    info = {
        "folds": [0, 1],
        "best_model_or_ensemble": {
            "postprocessing_file": str(elsewhere),
            "selected_model_or_models": [
                {"trainer": "nnYNetTrainer", "plans_identifier": "nnUNetPlans", "configuration": "3d_fullres"}
            ],
        },
    }
    (model.parent / "inference_information.json").write_text(json.dumps(info), encoding="utf-8")
    assert find_postprocessing(model, (0, 1)) == elsewhere
    info["best_model_or_ensemble"]["selected_model_or_models"] *= 2  # an ensemble: not this model's
    (model.parent / "inference_information.json").write_text(json.dumps(info), encoding="utf-8")
    assert find_postprocessing(model, (0, 1)) == crossval / "postprocessing.pkl"
    functions, kwargs = load_postprocessing(elsewhere)
    assert functions == [keep_largest] and kwargs == [{"labels_or_regions": (1, 2)}]


def test_postprocessing_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / "postprocessing.pkl").write_bytes(pickle.dumps(([Evil()], [{}])))
    with pytest.raises(ValueError, match="not nnU-Net postprocessing"):
        load_postprocessing(tmp_path / "postprocessing.pkl")
    assert not (tmp_path / "pwned").exists()


def test_segment_help_lists_the_nnunet_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["segment", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("-m", "-d", "-c", "-tr", "-p", "-f", "-chk", "--clinical", "--series-uid", "--postprocessing"):
        assert f" {flag}" in text


# ----------------------------------------------------------------------------------------------------------------
# End to end with a trained model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet", "NNYSEG"))}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(root / var)
        (root / var).mkdir()
    env.update(nnUNet_def_n_proc="2", nnUNet_n_proc_DA="2", PYTHONUNBUFFERED="1")

    def run(*cmd: str, timeout: int = 600) -> str:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", timeout=timeout)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        return result.stdout + result.stderr

    phantom = ("phantom", "-d", str(DATASET_ID), "--preset", "micro", "--num-training", "5", "--num-test", "1")
    run(sys.executable, "-m", "nnyseg.cli", *phantom, "--diagnosis", "--direction", "oblique")
    run(_script("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", CONFIG, "-npfp", "2", "-np", "2")
    plans_file = next((root / "nnUNet_preprocessed").glob(f"Dataset{DATASET_ID}_*")) / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    plans["configurations"][CONFIG]["nnyseg_trainer_settings"] = dict(QUICK_TRAINER_SETTINGS)
    plans_file.write_text(json.dumps(plans, indent=1), encoding="utf-8")
    run(_script("nnUNetv2_train"), str(DATASET_ID), CONFIG, "0", "-tr", TRAINER, "-device", "cpu")
    run(_script("nnUNetv2_find_best_configuration"), str(DATASET_ID), "-c", CONFIG, "-tr", TRAINER, "-f", "0")
    raw = next((root / "nnUNet_raw").glob(f"Dataset{DATASET_ID}_*"))
    model = next((root / "nnUNet_results").glob(f"Dataset{DATASET_ID}_*")) / f"{TRAINER}__nnUNetPlans__{CONFIG}"
    return SimpleNamespace(root=root, env=env, run=run, raw=raw, model=model)


QUICK = SegmentOptions(device="cpu", use_mirroring=False, progress=False)


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "hidden work or temporary folders left"


@pytest.mark.slow
@pytest.mark.realdata
@needs_dicom
def test_segment_dicom_series_end_to_end(trained, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "nnyseg.cli", "segment", str(DICOM_SERIES), "-o", str(out)]
    log = trained.run(*command, "-d", str(DATASET_ID), "-c", CONFIG, "-tr", TRAINER, "-device", "cpu", "--disable_tta")
    assert "There are 1 cases that I would like to predict" in log  # nnU-Net's own progress output
    case = out / DICOM_SERIES.name
    assert sorted(p.name for p in case.iterdir()) == [
        "lesions.csv",
        "mask.nii.gz",
        "preview.png",
        "seg.dcm",
        "stats.json",
    ]
    _no_leftovers(out)

    files = _series_files(DICOM_SERIES)
    series = sitk.ReadImage(files)
    mask = sitk.ReadImage(str(case / "mask.nii.gz"))
    assert mask.GetSize() == series.GetSize() and mask.GetPixelID() == sitk.sitkUInt8
    for a, b in ((mask.GetSpacing(), series.GetSpacing()), (mask.GetOrigin(), series.GetOrigin())):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(mask.GetDirection(), series.GetDirection(), atol=1e-7)
    assert set(np.unique(sitk.GetArrayFromImage(mask)).tolist()) <= {0, 1, 2}
    check_dicom_seg(case / "seg.dcm", mask, files)

    stats = json.loads((case / "stats.json").read_text(encoding="utf-8"))
    assert stats["input"]["kind"] == "dicom" and stats["input"]["instances"] == 20
    assert stats["model"]["folds"] == [0] and stats["model"]["trainer"] == TRAINER
    # find_best_configuration's choice, as it recorded it in inference_information.json
    info = json.loads((trained.model.parent / "inference_information.json").read_text(encoding="utf-8"))
    assert stats["model"]["postprocessing"] == info["best_model_or_ensemble"]["postprocessing_file"]
    burden = measure_burden(mask, series).to_dict()
    for key in ("liver_volume_ml", "tumour_volume_ml", "tumour_burden_percent", "lesion_count", "lesions"):
        assert (
            stats[key] == pytest.approx(burden[key]) if not isinstance(burden[key], list) else stats[key] == burden[key]
        )
    assert stats["dicom_seg"]["frames"] == int(
        pydicom.dcmread(case / "seg.dcm", stop_before_pixels=True).NumberOfFrames
    )
    assert any("Study Instance UID" in note for note in stats["notes"])
    assert (case / "preview.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (case / "lesions.csv").read_text(encoding="utf-8").count("\n") == 1 + stats["lesion_count"]


def _multi_series_folder(tmp_path: Path) -> tuple[Path, str, str]:
    """The real series copied twice with new UIDs: all 20 slices as one series, 3 slices as another."""
    from pydicom.uid import generate_uid

    folder = tmp_path / "two_series"
    folder.mkdir()
    big, small = generate_uid(), generate_uid()
    files = _series_files(DICOM_SERIES)
    for uid, chosen in ((big, files), (small, files[5:8])):
        for n, f in enumerate(chosen):
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / f"{uid[-6:]}_{n:02d}.dcm")
    return folder, big, small


@pytest.mark.slow
@pytest.mark.realdata
@needs_dicom
def test_segment_lists_the_series_of_a_folder_and_takes_series_uid(trained, tmp_path, capsys):
    folder, big, small = _multi_series_folder(tmp_path)
    out = tmp_path / "out"
    args = ["segment", str(folder), "-o", str(out), "-m", str(trained.model), "-device", "cpu", "--disable_tta"]
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert "holds 2 DICOM series, choose one with --series-uid" in error
    assert f"{big!r} (20 files)" in error and f"{small!r} (3 files)" in error
    assert not out.exists()  # created by the failed run, and removed again since nothing was written

    assert cli.main([*args, "--series-uid", small, "--disable_progress_bar"]) == 0
    mask = sitk.ReadImage(str(out / "two_series" / "mask.nii.gz"))
    assert mask.GetSize() == (512, 512, 3)
    check_dicom_seg(out / "two_series" / "seg.dcm", mask, _series_files(folder, small))


def _nifti_case(trained) -> Path:
    (image,) = sorted((trained.raw / "imagesTs").glob("*_0000.nii.gz"))
    return image


@pytest.mark.slow
def test_segment_nifti_keeps_the_exact_grid_and_feeds_clinical_features(trained, tmp_path):
    image_file = _nifti_case(trained)
    case = image_file.name.removesuffix("_0000.nii.gz")
    image = sitk.ReadImage(str(image_file))
    assert not np.allclose(image.GetDirection(), np.eye(3).ravel())  # the oblique phantom
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folders = segment(
            trained.raw / "imagesTs", out, trained.model, clinical=trained.raw / "clinical.json", options=QUICK
        )
    assert folders == [out / case]
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "no clinical input" in m or "no row for" in m], messages  # the row was set
    assert sorted(p.name for p in (out / case).iterdir()) == ["lesions.csv", "mask.nii.gz", "preview.png", "stats.json"]
    _no_leftovers(out)
    mask = sitk.ReadImage(str(out / case / "mask.nii.gz"))
    assert mask.GetSize() == image.GetSize()
    assert mask.GetSpacing() == image.GetSpacing() and mask.GetOrigin() == image.GetOrigin()
    assert mask.GetDirection() == image.GetDirection()  # the input's header, copied
    stats = json.loads((out / case / "stats.json").read_text(encoding="utf-8"))
    assert stats["model"]["clinical_table"] == str((trained.raw / "clinical.json").resolve())
    assert stats["input"] == {"kind": "nifti", "path": str(image_file.resolve()), "size": list(image.GetSize())}


@pytest.mark.slow
def test_segment_applies_the_postprocessing(trained, tmp_path):
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation as keep_largest,
    )

    image_file = _nifti_case(trained)
    pp = ([keep_largest, keep_largest], [{"labels_or_regions": (1, 2)}, {"labels_or_regions": 2}])
    (tmp_path / "postprocessing.pkl").write_bytes(pickle.dumps(pp))
    raw, processed = tmp_path / "raw", tmp_path / "processed"
    segment(image_file, raw, trained.model, options=SegmentOptions(**{**QUICK.__dict__, "postprocessing": "none"}))
    options = SegmentOptions(**{**QUICK.__dict__, "postprocessing": str(tmp_path / "postprocessing.pkl")})
    (folder,) = segment(image_file, processed, trained.model, options=options)
    before = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / folder.name / "mask.nii.gz")))
    after = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "mask.nii.gz")))
    np.testing.assert_array_equal(after, apply_postprocessing(before, *pp))
    assert json.loads((folder / "stats.json").read_text(encoding="utf-8"))["model"]["postprocessing"].endswith(".pkl")


@pytest.mark.slow
def test_segment_leaves_no_half_written_case(trained, tmp_path, monkeypatch, capsys):
    import nnyseg.segment

    image_file = _nifti_case(trained)
    case = image_file.name.removesuffix("_0000.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's file", encoding="utf-8")

    def broken_preview(*args, **kwargs):
        raise RuntimeError("preview failed")

    monkeypatch.setattr(nnyseg.segment, "render_preview", broken_preview)
    with pytest.raises(RuntimeError, match="preview failed"):
        segment(image_file, out, trained.model, options=QUICK)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # mask and DICOM-SEG were written, then removed
    monkeypatch.undo()

    segment(image_file, out, trained.model, options=QUICK)
    before = (out / case / "stats.json").read_bytes()
    assert cli.main(["segment", str(image_file), "-o", str(out), "-m", str(trained.model), "-device", "cpu"]) == 2
    assert "already exist" in capsys.readouterr().err and (out / case / "stats.json").read_bytes() == before
