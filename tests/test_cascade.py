"""The two-stage liver-then-tumour cascade: its pure logic, ``cascade prepare``, and ``cascade predict``.

``predict`` is checked twice: with both nnU-Net stages replaced by fakes that answer with the ground truth (the final
map must then be the ground truth, voxel for voxel, on the original grid), and end to end with two real nnU-Net models
trained for 2 iterations on a micro phantom (geometry and labels only: such models are not meant to be accurate).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnyseg import cascade
from nnyseg.cli import main as cli_main
from nnyseg.data.cropping import Box, box_in_reference, largest_component, paste_array
from nnyseg.data.phantom import write_nnunet_dataset
from tests.conftest import QUICK_TRAINER_SETTINGS, tree_digest

SOURCE_ID, STAGE1_ID, STAGE2_ID = 970, 971, 972


# --------------------------------------------------------------------------------------------------------------
# Pure logic
# --------------------------------------------------------------------------------------------------------------
def test_largest_component_keeps_only_the_largest():
    mask = np.zeros((10, 10, 10), bool)
    mask[1:4, 1:4, 1:4] = True  # 27 voxels
    mask[6:8, 6:8, 6:8] = True  # 8 voxels
    mask[4, 4, 4] = True  # touches the large block diagonally: 26-connected to it
    kept = largest_component(mask)
    expected = np.zeros_like(mask)
    expected[1:4, 1:4, 1:4] = True
    expected[4, 4, 4] = True
    np.testing.assert_array_equal(kept, expected)
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()


def test_liver_box_margin_in_mm_per_side_with_anisotropic_spacing():
    liver = np.zeros((20, 60, 60), bool)
    liver[8:12, 20:40, 25:35] = True
    spacing = (5.0, 0.75, 1.5)  # z, y, x
    margins = np.array([[5.0, 12.0], [3.0, 7.5], [20.0, 1.0]])
    box = cascade.liver_crop_box(liver, spacing, margins)
    # ceil(mm / spacing) voxels per side: z 1 and 3, y 4 and 10, x 14 and 1 (x start clipped at 0 -> 25 - 14 = 11).
    assert box == Box((7, 16, 11), (15, 50, 36))
    assert cascade.liver_crop_box(np.zeros_like(liver), spacing, 10.0) is None
    # A margin bigger than the image stops at the border.
    assert cascade.liver_crop_box(liver, spacing, 1000.0) == Box((0, 0, 0), liver.shape)


def test_paste_back_is_exact():
    rng = np.random.default_rng(0)
    full = rng.integers(0, 3, size=(9, 11, 13)).astype(np.uint8)
    box = Box((2, 3, 4), (7, 10, 12))
    pasted = paste_array(full[box.slices], box, full.shape)
    expected = np.zeros_like(full)
    expected[box.slices] = full[box.slices]
    np.testing.assert_array_equal(pasted, expected)
    with pytest.raises(ValueError, match="does not match box"):
        paste_array(full, box, full.shape)


def test_combine_gives_tumour_only_inside_the_liver():
    liver = np.zeros((4, 4, 4), bool)
    liver[1:3, 1:3, 1:3] = True
    tumour = np.zeros_like(liver)
    tumour[2:4, 2:4, 2:4] = True  # half inside, half outside the liver
    final = cascade.combine_stages(liver, tumour)
    assert final.dtype == np.uint8
    assert set(np.unique(final)) == {0, 1, 2}
    np.testing.assert_array_equal(final == 2, liver & tumour)
    np.testing.assert_array_equal(final == 1, liver & ~tumour)
    assert not final[~liver].any()


def test_jitter_is_uniform_in_range_and_reproducible():
    a = cascade.jittered_margins(cascade.case_rng(0, "case_0001"), (5, 20))
    b = cascade.jittered_margins(cascade.case_rng(0, "case_0001"), (5, 20))
    c = cascade.jittered_margins(cascade.case_rng(1, "case_0001"), (5, 20))
    d = cascade.jittered_margins(cascade.case_rng(0, "case_0002"), (5, 20))
    assert a.shape == (3, 2) and np.all((a >= 5) & (a <= 20))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, d)
    draws = cascade.jittered_margins(np.random.default_rng(0), (5, 20), ndim=3000)
    assert abs(draws.mean() - 12.5) < 0.2 and abs(draws.std() - 15 / np.sqrt(12)) < 0.2  # uniform on [5, 20]
    np.testing.assert_array_equal(cascade.jittered_margins(np.random.default_rng(0), (10, 10)), np.full((3, 2), 10.0))
    with pytest.raises(ValueError, match="jitter range"):
        cascade.jittered_margins(np.random.default_rng(0), (20, 5))


# --------------------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def source(tmp_path, monkeypatch):
    raw = tmp_path / "nnUNet_raw"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    return write_nnunet_dataset(
        raw, SOURCE_ID, "Liver", num_training=3, num_test=2, preset="micro", direction="oblique", progress=False
    )


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_prepare_writes_both_stage_datasets(source):
    before = tree_digest(source)
    stage1, stage2 = cascade.prepare_cascade(SOURCE_ID, STAGE1_ID, STAGE2_ID, seed=3, progress=False)
    assert tree_digest(source) == before
    assert stage1.name == "Dataset971_LiverCascadeLiver" and stage2.name == "Dataset972_LiverCascadeTumour"
    json1, json2 = (json.loads((s / "dataset.json").read_text(encoding="utf-8")) for s in (stage1, stage2))
    assert json1["labels"] == {"background": 0, "liver": 1} and json2["labels"] == {"background": 0, "tumor": 1}
    assert json1["channel_names"] == json2["channel_names"] == {"0": "CT"}
    assert json1["numTraining"] == json2["numTraining"] == 3
    assert sorted(p.name for p in (stage1 / "imagesTs").iterdir()) == ["case_0003_0000.nii.gz", "case_0004_0000.nii.gz"]
    assert not (stage2 / "imagesTs").exists()

    record = json.loads((stage2 / "cascade.json").read_text(encoding="utf-8"))
    for case in ("case_0000", "case_0001", "case_0002"):
        image_path = source / "imagesTr" / f"{case}_0000.nii.gz"
        label = _read(source / "labelsTr" / f"{case}.nii.gz")
        assert (stage1 / "imagesTr" / image_path.name).read_bytes() == image_path.read_bytes()
        np.testing.assert_array_equal(_read(stage1 / "labelsTr" / f"{case}.nii.gz"), (label > 0).astype(np.uint8))

        crop = sitk.ReadImage(str(stage2 / "imagesTr" / image_path.name))
        box = box_in_reference(crop, sitk.ReadImage(str(image_path)))  # a true crop of the original grid
        assert box == Box.from_json(record["cases"][case]["box"])
        liver = np.zeros(label.shape, bool)
        liver[box.slices] = True
        assert not ((label > 0) & ~liver).any(), "the crop must contain the whole ground-truth liver"
        np.testing.assert_array_equal(sitk.GetArrayFromImage(crop), _read(image_path)[box.slices])
        np.testing.assert_array_equal(_read(stage2 / "labelsTr" / f"{case}.nii.gz"), label[box.slices] == 2)
        margins = np.array(record["cases"][case]["margins_mm"])
        assert margins.shape == (3, 2) and np.all((margins >= 5) & (margins <= 20))


def test_prepare_is_reproducible_with_the_seed(source, tmp_path):
    def boxes(stage2: Path) -> dict:
        return {
            k: v["box"] for k, v in json.loads((stage2 / "cascade.json").read_text(encoding="utf-8"))["cases"].items()
        }

    _, a = cascade.prepare_cascade(SOURCE_ID, 971, 972, seed=7, progress=False)
    _, b = cascade.prepare_cascade(SOURCE_ID, 971, 972, seed=7, overwrite=True, progress=False, raw_root=tmp_path / "b")
    _, c = cascade.prepare_cascade(SOURCE_ID, 971, 972, seed=8, progress=False, raw_root=tmp_path / "c")
    assert boxes(a) == boxes(b) and boxes(a) != boxes(c)
    assert tree_digest(a / "imagesTr") == tree_digest(b / "imagesTr")


def test_prepare_errors_name_the_case(source, capsys):
    label_path = source / "labelsTr" / "case_0001.nii.gz"
    label = sitk.ReadImage(str(label_path))
    empty = sitk.GetImageFromArray(np.zeros(label.GetSize()[::-1], np.uint8))
    empty.CopyInformation(label)
    sitk.WriteImage(empty, str(label_path))
    argv = ["cascade", "prepare", str(SOURCE_ID), "--stage1-id", "971", "--stage2-id", "972"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "nnyseg cascade: error:" in err and "case_0001.nii.gz: no liver" in err
    assert not list(source.parent.glob("Dataset97[12]_*")), "nothing may be left behind"
    assert cli_main(["cascade", "prepare", str(SOURCE_ID), "--stage1-id", "971", "--stage2-id", "971"]) == 2


# --------------------------------------------------------------------------------------------------------------
# predict, with fake stages that answer with the ground truth
# --------------------------------------------------------------------------------------------------------------
def _fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text("{}", encoding="utf-8")
    (folder / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}), encoding="utf-8"
    )
    return folder


def test_predict_with_ground_truth_stages_gives_the_ground_truth(source, tmp_path, monkeypatch):
    truth = source / "labelsTs"
    stage1_model, stage2_model = _fake_model(tmp_path / "m1"), _fake_model(tmp_path / "m2")
    calls = []

    def fake_stage(model_folder, input_folder, output_folder, options):
        calls.append((model_folder, sorted(p.name for p in Path(input_folder).iterdir())))
        Path(output_folder).mkdir()
        for image_path in Path(input_folder).glob("*_0000.nii.gz"):
            case = image_path.name[: -len("_0000.nii.gz")]
            image = sitk.ReadImage(str(image_path))
            label = sitk.ReadImage(str(truth / f"{case}.nii.gz"))
            # The ground truth on the input's grid: the whole image for stage 1, the crop for stage 2.
            on_input = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            array = sitk.GetArrayFromImage(on_input)
            if model_folder == stage1_model:
                array = (array > 0).astype(np.uint8)
                if case == "case_0004":
                    array[:] = 0  # stage 1 misses this case's liver entirely
            else:
                array = (array == 2).astype(np.uint8)
            out = sitk.GetImageFromArray(array)
            out.CopyInformation(image)
            sitk.WriteImage(out, str(Path(output_folder) / f"{case}.nii.gz"))

    monkeypatch.setattr(cascade, "run_nnunet_stage", fake_stage)
    out = tmp_path / "pred"
    with pytest.warns(UserWarning, match="case_0004_0000.nii.gz: stage 1 found no liver"):
        cascade.predict_cascade(
            source / "imagesTs", out, stage1_model, stage2_model, options=cascade.StageOptions(progress=False)
        )
    assert [c[0] for c in calls] == [stage1_model, stage2_model]
    assert calls[1][1] == ["case_0003_0000.nii.gz"]  # the case without liver is not sent to stage 2

    gt = sitk.ReadImage(str(truth / "case_0003.nii.gz"))
    gt_array = sitk.GetArrayFromImage(gt)
    assert np.array_equal(largest_component(gt_array > 0), gt_array > 0)  # one liver: LCC changes nothing
    assert (gt_array == 2).any()
    pred = sitk.ReadImage(str(out / "case_0003.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(pred), gt_array)
    image = sitk.ReadImage(str(source / "imagesTs" / "case_0003_0000.nii.gz"))
    assert pred.GetSize() == image.GetSize() and pred.GetSpacing() == image.GetSpacing()
    assert pred.GetOrigin() == image.GetOrigin() and pred.GetDirection() == image.GetDirection()
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_0004.nii.gz"))).any()
    record = json.loads((out / "cascade.json").read_text(encoding="utf-8"))
    assert record["cases"]["case_0004"]["box"] is None and record["margin_mm"] == 10.0

    with pytest.raises(FileExistsError):
        cascade.predict_cascade(source / "imagesTs", out, stage1_model, stage2_model)
    with pytest.raises(FileNotFoundError, match="not a trained nnU-Net model folder"):
        cascade.predict_cascade(source / "imagesTs", tmp_path / "x", tmp_path, stage2_model)


# --------------------------------------------------------------------------------------------------------------
# End to end: prepare -> plan + preprocess + train both stages (2 iterations) -> predict
# --------------------------------------------------------------------------------------------------------------
QUICK = "3d_fullres_tiny_quick"
PLANS = "nnUNetPlans"


def _plan(dataset_id: int) -> None:
    """Fingerprint, nnU-Net's default plans plus a CPU-sized PlainConvUNet configuration with a 1 epoch x 2
    iterations schedule (trained by nnysegTrainer, which trains whatever the plans name), and preprocessing."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset

    from nnyseg.registry import PLANS_SETTINGS_KEY, TINY, adapt_configuration, get_model

    extract_fingerprint_dataset(dataset_id, num_processes=1)
    planner = ExperimentPlanner(dataset_id)
    planner.plan_experiment()
    preprocess_dataset(dataset_id, PLANS, ("3d_fullres",), (1,), show_progress_bar=False)
    plans_file = Path(os.environ["nnUNet_preprocessed"], planner.dataset_name, f"{PLANS}.json")
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    quick = adapt_configuration(
        get_model("plainconvunet"),
        plans["configurations"]["3d_fullres"],
        input_channels=1,
        num_classes=2,
        num_training_cases=3,
        preset=TINY,
    )
    plans["configurations"][QUICK] = {**quick, PLANS_SETTINGS_KEY: dict(QUICK_TRAINER_SETTINGS)}
    plans_file.write_text(json.dumps(plans, indent=1), encoding="utf-8")


@pytest.mark.slow
def test_end_to_end_on_the_phantom(tmp_path, monkeypatch):
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    import torch
    from nnunetv2.run.run_training import run_training

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    source = write_nnunet_dataset(tmp_path / "nnUNet_raw", SOURCE_ID, "Liver", num_training=3, num_test=2,
                                  preset="micro", progress=False)  # fmt: skip
    assert cli_main(["cascade", "prepare", str(SOURCE_ID), "--stage1-id", "971", "--stage2-id", "972"]) == 0
    for dataset_id in (STAGE1_ID, STAGE2_ID):
        _plan(dataset_id)

    # nnU-Net's own training entry (what nnUNetv2_train calls), on all cases, with everything in this process.
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # augmentation in this process: no worker start-up on 2 cores
    monkeypatch.setattr(nnunet_trainer_module, "default_num_processes", 1)
    models = []
    for dataset_id in (STAGE1_ID, STAGE2_ID):
        run_training(str(dataset_id), QUICK, "all", "nnysegTrainer", PLANS, device=torch.device("cpu"))
        models.append(
            next((tmp_path / "nnUNet_results").glob(f"Dataset{dataset_id}_*")) / f"nnysegTrainer__{PLANS}__{QUICK}"
        )
    assert all((m / "fold_all" / "checkpoint_final.pth").is_file() for m in models)

    images = tmp_path / "nnUNet_raw" / "Dataset971_LiverCascadeLiver" / "imagesTs"
    out = tmp_path / "cascade_pred"
    argv = ["cascade", "predict", "-i", str(images), "-o", str(out), "-m1", str(models[0]), "-m2", str(models[1])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 2-iteration stage 1 may miss the liver of a case
        assert cli_main([*argv, "-f", "all", "-device", "cpu", "-npp", "0", "-nps", "0", "--disable-tta"]) == 0

    for image_path in sorted(images.glob("*_0000.nii.gz")):
        case = image_path.name[: -len("_0000.nii.gz")]
        image, pred = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert pred.GetSize() == image.GetSize() and pred.GetSpacing() == image.GetSpacing()
        assert pred.GetOrigin() == image.GetOrigin() and pred.GetDirection() == image.GetDirection()
        labels = sitk.GetArrayFromImage(pred)
        assert set(np.unique(labels).tolist()) <= {0, 1, 2}
        liver = labels > 0
        assert np.array_equal(largest_component(liver), liver), "the liver is stage 1's largest component"
    assert sorted(p.name for p in out.iterdir()) == ["cascade.json", "case_0003.nii.gz", "case_0004.nii.gz"]
    assert source.is_dir()
