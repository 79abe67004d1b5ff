"""The ELANRes-MSCA paper's CT preprocessing: the [-200, 200] HU window through the plans, and the body-mask crop.

A micro phantom is planned with ``ELANResMSCAPaperPlanner`` and preprocessed in-process by nnU-Net; the window must
reach nnU-Net's preprocessed training data and nnU-Net's inference-time preprocessing alike. The body crop is checked
on phantom cases and through ``nnyseg body-crop`` / ``nnyseg uncrop``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnyseg.cli import main as cli_main
from nnyseg.data.cropping import (
    Box,
    body_mask,
    bounding_box,
    box_in_reference,
    crop_image,
    grow_box,
    paste_image,
)
from nnyseg.data.phantom import make_case, write_nnunet_dataset
from nnyseg.planning.planners import ELANResMSCAPaperPlanner
from tests.conftest import plan_micro_phantom, tree_digest

DATASET_ID = 981
PLANS = "ELANResMSCAPaperPlans"


def paper_window(hu: np.ndarray) -> np.ndarray:
    """The paper's formula, written independently of nnU-Net."""
    return np.clip(hu.astype(np.float64), -200.0, 200.0) / 200.0


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct_preprocessing")
    mp = pytest.MonkeyPatch()
    raw, preprocessed, plans = plan_micro_phantom(
        root, mp, DATASET_ID, ELANResMSCAPaperPlanner, name="PaperCT", num_training=2
    )
    yield raw, preprocessed, plans
    mp.undo()


# --------------------------------------------------------------------------------------------------------------
# Intensity window
# --------------------------------------------------------------------------------------------------------------
def test_plans_carry_the_window_and_their_own_data(planned):
    _, preprocessed, plans = planned
    assert plans["plans_name"] == PLANS and plans["experiment_planner_used"] == "ELANResMSCAPaperPlanner"
    assert plans["foreground_intensity_properties_per_channel"] == {
        "0": {"mean": 0.0, "std": 200.0, "percentile_00_5": -200.0, "percentile_99_5": 200.0}
    }
    fullres = plans["configurations"]["3d_fullres"]
    assert fullres["normalization_schemes"] == ["CTNormalization"]
    assert fullres["use_mask_for_norm"] == [False]
    assert fullres["data_identifier"] == f"{PLANS}_3d_fullres"  # not nnU-Net's shared nnUNetPlans_3d_fullres
    assert (preprocessed / f"{PLANS}_3d_fullres").is_dir()
    assert not (preprocessed / "nnUNetPlans_3d_fullres").exists()
    assert any("clip(HU, -200, 200) / 200" in c for c in plans["nnyseg"]["changes_from_nnunet_defaults"])


def test_preprocessed_training_data_is_the_window(planned):
    raw, preprocessed, plans = planned
    fullres = plans["configurations"]["3d_fullres"]
    dataset = nnUNetDatasetBlosc2(str(preprocessed / fullres["data_identifier"]))
    assert len(dataset.identifiers) == 2
    for case in dataset.identifiers:
        data, _, _, properties = dataset.load_case(case)
        data = np.asarray(data[:])
        assert data.min() >= -1.0 and data.max() <= 1.0
        # Same spacing in every phantom case: nnU-Net's target spacing is the case's, so nothing is resampled.
        assert np.allclose(properties["spacing"], fullres["spacing"])
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz")))
        bbox = properties["bbox_used_for_cropping"]
        expected = paper_window(image)[tuple(slice(a, b) for a, b in bbox)]
        assert data.shape == (1, *expected.shape)
        np.testing.assert_allclose(data[0], expected, atol=1e-5)
        assert (data[0] == -1).any() and (data[0] == 1).any()  # both ends of the window are reached


def test_inference_preprocessing_uses_the_same_window(planned):
    raw, preprocessed, _ = planned
    # What nnUNetPredictor does with a trained model's plans.json and a new image.
    plans_manager = PlansManager(str(preprocessed / f"{PLANS}.json"))
    configuration = plans_manager.get_configuration("3d_fullres")
    preprocessor = configuration.preprocessor_class(verbose=False)
    image_path = raw / "imagesTr" / "case_0000_0000.nii.gz"
    data, _, properties = preprocessor.run_case(
        [str(image_path)], None, plans_manager, configuration, str(preprocessed / "dataset.json")
    )
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path)))
    bbox = properties["bbox_used_for_cropping"]
    np.testing.assert_allclose(data[0], paper_window(image)[tuple(slice(a, b) for a, b in bbox)], atol=1e-5)


def test_non_ct_channel_is_refused(tmp_path, monkeypatch):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    raw = write_nnunet_dataset(tmp_path / "nnUNet_raw", 982, "NotCT", num_training=2, num_test=0, preset="micro")
    dataset_json = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    dataset_json["channel_names"] = {"0": "T1"}
    (raw / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    extract_fingerprint_dataset(982, num_processes=1)
    with pytest.raises(ValueError, match=r"Dataset982_NotCT.*'T1'"):
        ELANResMSCAPaperPlanner(982).plan_experiment()


# --------------------------------------------------------------------------------------------------------------
# Body mask and crop
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["identity", "oblique"])
def test_body_crop_keeps_every_label_voxel_and_removes_air(direction):
    case = make_case(3, "micro", direction=direction)
    mask = body_mask(case.image)
    box = bounding_box(mask)
    assert box.contains(bounding_box(case.label > 0))
    outside = np.ones(case.image.shape, bool)
    outside[box.slices] = False
    assert outside.any() and case.image[outside].max() <= -500  # only air is cut away
    assert np.prod(box.shape) < 0.9 * case.image.size
    # Hole filling: nothing inside the body is left out of the mask (the lungs and bowel gas included).
    assert mask[case.label > 0].all()


def test_body_mask_steps_on_a_hand_made_volume():
    image = np.full((12, 20, 20), -1000, np.int16)
    image[:, 4:16, 4:16] = 40  # body, touching the top and bottom slices
    image[5:7, 8:12, 8:12] = -900  # internal air (a hole)
    image[6, 2, 2] = 100  # isolated bright voxel outside the body
    mask = body_mask(image)
    expected = np.zeros(image.shape, bool)
    expected[:, 4:16, 4:16] = True
    np.testing.assert_array_equal(mask, expected)  # largest component, hole filled, no erosion at the borders


def test_grow_box_in_mm_with_anisotropic_spacing():
    box = Box((5, 10, 10), (8, 20, 20))
    grown = grow_box(box, 10.0, spacing=(5.0, 0.8, 2.0), shape=(10, 100, 25))
    # ceil(10 / 5) = 2, ceil(10 / 0.8) = 13, ceil(10 / 2) = 5 voxels; z and x clipped at the border.
    assert grown == Box((3, 0, 5), (10, 33, 25))


def test_crop_uncrop_round_trip_is_exact_with_geometry(tmp_path):
    case = make_case(4, "micro", direction="oblique")
    image, label = case.to_sitk()
    box = Box((2, 5, 7), (20, 33, 41))
    cropped = crop_image(label, box)
    np.testing.assert_allclose(cropped.GetOrigin(), label.TransformIndexToPhysicalPoint((7, 5, 2)), atol=1e-9)
    assert cropped.GetSpacing() == label.GetSpacing() and cropped.GetDirection() == label.GetDirection()
    assert box_in_reference(cropped, image) == box
    back = paste_image(cropped, image)
    assert back.GetSize() == image.GetSize() and back.GetOrigin() == image.GetOrigin()
    assert back.GetDirection() == image.GetDirection() and back.GetSpacing() == image.GetSpacing()
    expected = np.zeros_like(case.label)
    expected[box.slices] = case.label[box.slices]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), expected)


def test_paste_refuses_a_crop_off_the_grid():
    image, label = make_case(4, "micro").to_sitk()
    cropped = crop_image(label, Box((0, 0, 0), (4, 4, 4)))
    cropped.SetOrigin(tuple(o + 1.0 for o in cropped.GetOrigin()))  # a third of a voxel
    with pytest.raises(ValueError, match="not on a voxel"):
        paste_image(cropped, image)


def test_body_crop_and_uncrop_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    source = write_nnunet_dataset(
        tmp_path / "raw", 983, "Body", num_training=2, num_test=1, preset="micro", direction="oblique", progress=False
    )
    before = tree_digest(source)
    assert cli_main(["body-crop", "983", "-d", "984"]) == 0
    assert tree_digest(source) == before
    target = tmp_path / "raw" / "Dataset984_BodyBodyCrop"
    crops = json.loads((target / "crops.json").read_text(encoding="utf-8"))
    assert set(crops["cases"]) == {"case_0000", "case_0001", "case_0002"}
    for case, info in crops["cases"].items():
        split = info["split"]
        labels = split.replace("images", "labels")
        original_label = sitk.ReadImage(str(source / labels / f"{case}.nii.gz"))
        cropped_label = sitk.ReadImage(str(target / labels / f"{case}.nii.gz"))
        cropped_image = sitk.ReadImage(str(target / split / f"{case}_0000.nii.gz"))
        box = Box.from_json(info["box"])
        assert box_in_reference(cropped_image, original_label) == box
        assert cropped_label.GetSize() == cropped_image.GetSize() and np.prod(box.shape) < np.prod(
            info["original_shape_zyx"]
        )
        # every label voxel survives the crop
        assert sitk.GetArrayFromImage(cropped_label).sum() == sitk.GetArrayFromImage(original_label).sum()

    # Labels of the cropped dataset stand in for predictions: uncrop must give back the original label files.
    out = tmp_path / "uncropped"
    assert cli_main(["uncrop", str(target / "labelsTr"), "--reference", str(source / "imagesTr"), "-o", str(out)]) == 0
    for case in ("case_0000", "case_0001"):
        original = sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz"))
        restored = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(original))
        assert restored.GetSize() == original.GetSize()
        np.testing.assert_allclose(restored.GetOrigin(), original.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(restored.GetDirection(), original.GetDirection(), atol=1e-9)
        np.testing.assert_allclose(restored.GetSpacing(), original.GetSpacing(), atol=1e-9)

    # Bad input: a clear error naming the file, exit code 2.
    capsys.readouterr()
    wrong_reference = ["--reference", str(source / "imagesTs"), "-o", str(tmp_path / "other")]
    assert cli_main(["uncrop", str(target / "labelsTr"), *wrong_reference]) == 2
    assert "nnyseg uncrop: error:" in (err := capsys.readouterr().err) and "case_0000_0000.nii.gz" in err
    assert not (tmp_path / "other").exists()
