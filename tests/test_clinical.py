"""Clinical table: file formats, validation errors, fold-only normalisation and encoding (nnyseg.data.clinical)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nnyseg.data.clinical import (
    ClinicalNormalisation,
    ClinicalTableError,
    dataset_case_ids,
    find_clinical_table,
    fit_normalisation,
    load_clinical_file,
    load_clinical_table,
)
from nnyseg.network_architecture.building_blocks.cross_attention import ClinicalTokenizer

SCHEMA = [
    {"name": "age", "type": "numeric", "unit": "years"},
    {"name": "diagnosis", "type": "categorical", "categories": ["HCC", "metastasis", "other"]},
    {"name": "afp", "type": "numeric"},
]
CASES = {
    "case_0000": {"age": 60, "diagnosis": "HCC", "afp": 10.0},
    "case_0001": {"age": 70, "diagnosis": "metastasis", "afp": None},
    "case_0002": {"age": None, "diagnosis": "other", "afp": 30.0},
    "case_0003": {"age": 50, "afp": 20.0},  # diagnosis left out: missing
    "case_0004": {"age": 90, "diagnosis": None, "afp": 1000.0},
}
TRAIN = ["case_0000", "case_0001", "case_0002", "case_0003"]


def make_dataset(root: Path, n_train: int = 5, n_test: int = 0, name: str = "Dataset900_Clin") -> Path:
    """A raw dataset folder with dataset.json and (empty) image files: enough for the case-id lookup."""
    folder = root / name
    for sub, ids in (("imagesTr", range(n_train)), ("imagesTs", range(n_train, n_train + n_test))):
        if n_test or sub == "imagesTr":
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for i in ids:
            (folder / sub / f"case_{i:04d}_0000.nii.gz").touch()
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}
    dataset_json["numTraining"] = n_train
    (folder / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    return folder


def write_table(folder: Path, schema=SCHEMA, cases=CASES, **extra) -> Path:
    path = folder / "clinical.json"
    path.write_text(json.dumps({"schema": schema, "cases": cases, **extra}), encoding="utf-8")
    return path


def write_csv(folder: Path, text: str, schema=SCHEMA) -> Path:
    (folder / "clinical_schema.json").write_text(json.dumps({"schema": schema}), encoding="utf-8")
    path = folder / "clinical.csv"
    path.write_text(text, encoding="utf-8")
    return path


CSV_TEXT = (
    "case_id,diagnosis,age,afp\n"
    "case_0000,HCC,60,10\n"
    "case_0001,metastasis,70,\n"
    "case_0002,other,,30.0\n"
    "case_0003,,50,20\n"
    "\n"
    "case_0004, ,90,1e3\n"
)


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path)


# ------------------------------------------------------------------------------------------------------- reading
def test_json_table_is_read_with_missing_values(dataset):
    write_table(dataset)
    table = load_clinical_table(dataset)
    assert table.field_names == ["age", "diagnosis", "afp"]
    assert table.schema[0] == {"name": "age", "type": "numeric"}  # extra keys dropped
    assert table.case_ids == [f"case_{i:04d}" for i in range(5)]
    assert table.rows["case_0000"] == (60.0, 0, 10.0)
    assert table.rows["case_0001"] == (70.0, 1, None)
    assert table.rows["case_0003"] == (50.0, None, 20.0)  # absent field -> missing
    values, missing = table.raw_values(["case_0002", "case_0004"])
    assert values.shape == (2, 3) and np.isnan(values[0, 0]) and values[1, 2] == 1000.0
    np.testing.assert_array_equal(missing, [[True, False, False], [False, True, False]])
    assert find_clinical_table(dataset) == dataset / "clinical.json"


def test_csv_table_gives_the_same_rows_as_json(dataset, tmp_path):
    write_table(dataset)
    from_json = load_clinical_table(dataset)
    other = make_dataset(tmp_path / "csv")
    write_csv(other, CSV_TEXT)
    from_csv = load_clinical_table(other)
    assert from_csv.rows == from_json.rows and from_csv.schema == from_json.schema


def test_test_cases_may_be_listed_and_dataset_json_case_list_is_used(tmp_path):
    folder = make_dataset(tmp_path, n_train=5, n_test=1)
    assert dataset_case_ids(folder) == ([f"case_{i:04d}" for i in range(5)], ["case_0005"])
    write_table(folder, cases={**CASES, "case_0005": {"age": 40}})
    assert "case_0005" in load_clinical_table(folder).rows
    # a dataset.json "dataset" entry defines the training cases instead of imagesTr
    dj = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    dj["dataset"] = {k: {"images": [], "label": ""} for k in ("case_0000", "case_0001")}
    (folder / "dataset.json").write_text(json.dumps(dj), encoding="utf-8")
    write_table(folder, cases={k: CASES[k] for k in ("case_0000", "case_0001")})
    assert load_clinical_table(folder).case_ids == ["case_0000", "case_0001"]


# -------------------------------------------------------------------------------------------------------- errors
def test_missing_table_names_the_expected_files(dataset):
    with pytest.raises(FileNotFoundError, match=r"clinical\.json.*clinical\.csv.*clinical_schema\.json"):
        load_clinical_table(dataset)
    assert find_clinical_table(dataset) is None


def test_malformed_json_names_the_file(dataset):
    (dataset / "clinical.json").write_text('{"schema": [}')
    with pytest.raises(ClinicalTableError, match=r"(?s)clinical\.json.*not valid JSON"):
        load_clinical_table(dataset)
    (dataset / "clinical.json").write_text("[1, 2]")
    with pytest.raises(ClinicalTableError, match="top level must be an object"):
        load_clinical_table(dataset)


@pytest.mark.parametrize(
    ("schema", "match"),
    [
        (None, "no 'schema'"),
        ([{"name": "age", "type": "date"}], "expected 'numeric' or 'categorical'"),
        ([{"name": "x", "type": "categorical"}], "non-empty 'categories'"),
        ([{"name": "x", "type": "numeric"}, {"name": "x", "type": "numeric"}], "twice"),
        ([{"name": "x", "type": "categorical", "categories": [1, "1"]}], "category twice"),
    ],
)
def test_invalid_schema(dataset, schema, match):
    path = dataset / "clinical.json"
    path.write_text(json.dumps({"cases": {}} if schema is None else {"schema": schema, "cases": {}}))
    with pytest.raises(ClinicalTableError, match=match) as info:
        load_clinical_table(dataset)
    assert str(path) in str(info.value)


def test_duplicate_case_ids_json_and_csv(dataset, tmp_path):
    body = json.dumps({"schema": SCHEMA, "cases": CASES})
    dup = body[:-2] + ', "case_0000": {"age": 1}}}'
    (dataset / "clinical.json").write_text(dup, encoding="utf-8")
    with pytest.raises(ClinicalTableError, match=r"duplicate key 'case_0000' \(a case id listed twice\)"):
        load_clinical_table(dataset)
    other = make_dataset(tmp_path / "csv")
    write_csv(other, CSV_TEXT + "case_0001,HCC,1,1\n")
    with pytest.raises(ClinicalTableError, match=r"line 8: duplicate case id 'case_0001'"):
        load_clinical_table(other)


def test_unknown_and_missing_case_ids(dataset):
    cases = {k: v for k, v in CASES.items() if k != "case_0002"}
    cases["case_0099"] = {"age": 1}
    path = write_table(dataset, cases=cases)
    with pytest.raises(ClinicalTableError) as info:
        load_clinical_table(dataset)
    message = str(info.value)
    assert str(path) in message
    assert "have no entry: ['case_0002']" in message
    assert "neither training cases nor imagesTs cases of the dataset: ['case_0099']" in message


@pytest.mark.parametrize(
    ("value", "match"),
    [("sixty", "non-numeric value 'sixty'"), (True, "non-numeric value True"), ([1], "non-numeric")],
)
def test_non_numeric_values_in_numeric_fields(dataset, value, match):
    write_table(dataset, cases={**CASES, "case_0001": {"age": value}})
    with pytest.raises(ClinicalTableError, match=rf"case 'case_0001', field 'age': {match}"):
        load_clinical_table(dataset)


def test_non_numeric_csv_cell_and_unknown_category(dataset, tmp_path):
    write_table(dataset, cases={**CASES, "case_0002": {"diagnosis": "cyst"}})
    with pytest.raises(ClinicalTableError, match=r"field 'diagnosis': unknown category 'cyst'; allowed: \['HCC'"):
        load_clinical_table(dataset)
    other = make_dataset(tmp_path / "csv")
    write_csv(other, CSV_TEXT.replace("case_0000,HCC,60,10", "case_0000,HCC,sixty,10"))
    with pytest.raises(ClinicalTableError, match=r"line 2, case 'case_0000', field 'age': non-numeric value 'sixty'"):
        load_clinical_table(other)


def test_unknown_field_and_every_problem_is_listed(dataset):
    cases = {**CASES, "case_0000": {"agee": 60}, "case_0001": {"age": "x", "diagnosis": "y"}}
    write_table(dataset, cases=cases)
    with pytest.raises(ClinicalTableError) as info:
        load_clinical_table(dataset)
    assert len(info.value.problems) == 3
    assert "unknown field(s) ['agee']" in str(info.value)


def test_csv_specific_errors(dataset):
    write_csv(dataset, CSV_TEXT.replace("case_id,diagnosis,age,afp", "id,diagnosis,age,afp"))
    with pytest.raises(ClinicalTableError, match="must start with 'case_id'"):
        load_clinical_table(dataset)
    write_csv(dataset, CSV_TEXT.replace("case_id,diagnosis,age,afp", "case_id,diagnosis,age"))
    with pytest.raises(ClinicalTableError, match=r"do not match the schema fields.*missing \['afp'\]"):
        load_clinical_table(dataset)
    (dataset / "clinical_schema.json").unlink()
    with pytest.raises(ClinicalTableError, match=r"clinical_schema\.json, which does not exist"):
        load_clinical_table(dataset)


def test_both_formats_is_an_error(dataset):
    write_table(dataset)
    write_csv(dataset, CSV_TEXT)
    with pytest.raises(ClinicalTableError, match="keep exactly one"):
        load_clinical_table(dataset)


# ------------------------------------------------------------------------------------------------- normalisation
def test_normalisation_uses_the_training_cases_only(dataset):
    write_table(dataset)
    table = load_clinical_table(dataset)
    stats = fit_normalisation(table, TRAIN)
    ages = np.array([60.0, 70.0, 50.0])  # case_0002 has no age; case_0004 (90) is not a training case
    afps = np.array([10.0, 30.0, 20.0])  # case_0001 has no afp; case_0004 (1000) is held out
    assert stats.mean["age"] == pytest.approx(ages.mean()) and stats.std["age"] == pytest.approx(ages.std())
    assert stats.mean["afp"] == pytest.approx(afps.mean()) and stats.std["afp"] == pytest.approx(afps.std())
    assert stats.n_cases == {"age": 3, "afp": 3}
    assert "diagnosis" not in stats.mean and stats.fitted_on == TRAIN
    # a held-out case's value does not change the statistics
    write_table(dataset, cases={**CASES, "case_0004": {"age": -5000, "afp": 1e9}})
    assert fit_normalisation(load_clinical_table(dataset), TRAIN).to_dict() == stats.to_dict()
    # ... while a training case's value does
    write_table(dataset, cases={**CASES, "case_0000": {"age": 61, "diagnosis": "HCC", "afp": 10.0}})
    assert fit_normalisation(load_clinical_table(dataset), TRAIN).mean["age"] != stats.mean["age"]


def test_constant_and_all_missing_fields(dataset):
    cases = {k: {"age": 40, "diagnosis": "HCC", "afp": None} for k in CASES}
    cases["case_0004"]["afp"] = 5.0  # the only afp value is in a held-out case
    write_table(dataset, cases=cases)
    table = load_clinical_table(dataset)
    with pytest.warns(UserWarning, match="'afp' has no value among the 4 training cases"):
        stats = fit_normalisation(table, TRAIN)
    assert (stats.mean["age"], stats.std["age"]) == (40.0, 1.0)
    assert (stats.mean["afp"], stats.std["afp"]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="at least one training case"):
        fit_normalisation(table, [])
    with pytest.raises(KeyError, match="case_0042"):
        fit_normalisation(table, ["case_0042"])


def test_network_input_is_raw_and_the_tokenizer_z_scores_with_the_fitted_statistics(dataset):
    write_table(dataset)
    table = load_clinical_table(dataset)
    stats = fit_normalisation(table, TRAIN)
    order = ["case_0004", "case_0002", "case_0000", "case_0003"]
    values, missing = table.network_input(order)
    assert values.shape == missing.shape == (4, 3)
    assert values.dtype == torch.float32 and missing.dtype == torch.bool
    # raw values (0 where missing): the statistics live in the network, so every fold can carry its own
    np.testing.assert_allclose(values.numpy(), [[90, 0, 1000], [0, 2, 30], [60, 0, 10], [50, 0, 20]])
    np.testing.assert_array_equal(
        missing.numpy(),
        [[False, True, False], [True, False, False], [False, False, False], [False, True, False]],
    )
    tokenizer = ClinicalTokenizer(table.schema, dim=8).eval()
    stats.apply_to(tokenizer)
    tokens = tokenizer(values, missing)
    assert tokens.shape == (4, 3, 8)
    mu_age, sd_age = np.mean([60, 70, 50]), np.std([60, 70, 50])
    mu_afp, sd_afp = np.mean([10, 30, 20]), np.std([10, 30, 20])
    age, afp = 0, 1  # rows of numeric_weight / numeric_bias
    for row, case_age, case_afp in ((2, 60, 10), (3, 50, 20)):
        z_age, z_afp = (case_age - mu_age) / sd_age, (case_afp - mu_afp) / sd_afp
        want_age = z_age * tokenizer.numeric_weight[age] + tokenizer.numeric_bias[age]
        want_afp = z_afp * tokenizer.numeric_weight[afp] + tokenizer.numeric_bias[afp]
        torch.testing.assert_close(tokens[row, 0], want_age)
        torch.testing.assert_close(tokens[row, 2], want_afp)
    torch.testing.assert_close(tokens[0, 1], tokenizer.missing_tokens[1])
    torch.testing.assert_close(tokens[1, 0], tokenizer.missing_tokens[0])
    # the statistics are persistent buffers: they travel in the state dict
    state = tokenizer.state_dict()
    torch.testing.assert_close(state["numeric_mean"], torch.tensor([mu_age, mu_afp], dtype=torch.float32))
    torch.testing.assert_close(state["numeric_std"], torch.tensor([sd_age, sd_afp], dtype=torch.float32))


def test_normalisation_round_trips_through_json_and_checks_the_network(dataset, tmp_path):
    write_table(dataset)
    table = load_clinical_table(dataset)
    stats = fit_normalisation(table, TRAIN)
    path = tmp_path / "norm.json"
    stats.save(path)
    again = ClinicalNormalisation.load(path)
    assert again == stats and json.loads(path.read_text(encoding="utf-8"))["numeric"]["age"]["n_cases"] == 3
    with pytest.raises(ValueError, match="clinical fields"):
        again.apply_to(ClinicalTokenizer(SCHEMA[:2], dim=4))
    with pytest.raises(ValueError, match="no clinical tokenizer"):
        again.apply_to(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no mean/std for numeric field 'age'"):
        ClinicalNormalisation.from_dict({**stats.to_dict(), "numeric": {}})
    bad = stats.to_dict()
    bad["numeric"]["age"]["std"] = 0.0
    with pytest.raises(ValueError, match="'age' is invalid"):
        ClinicalNormalisation.from_dict(bad)


def test_schema_comparison(dataset):
    write_table(dataset)
    table = load_clinical_table(dataset)
    table.check_schema([dict(f, description="x") for f in SCHEMA], where="plans")  # extra keys do not matter
    with pytest.raises(ValueError, match="the clinical schema of plans does not match"):
        table.check_schema(SCHEMA[::-1], where="plans")
    stats = fit_normalisation(table, TRAIN)
    with pytest.raises(ValueError, match="does not match"):
        stats.check_schema(SCHEMA[:2], where="the network")


def test_load_clinical_file_reads_a_table_of_new_cases_on_its_own(dataset, tmp_path):
    new_cases = {"case_0100": {"age": 55, "diagnosis": "HCC", "afp": 3.0}, "case_0101": {"age": None}}
    path = tmp_path / "new.json"
    path.write_text(json.dumps({"schema": SCHEMA, "cases": new_cases}), encoding="utf-8")
    table = load_clinical_file(path)
    assert table.case_ids == ["case_0100", "case_0101"]
    values, missing = table.network_input(["case_0101", "case_0100"])
    np.testing.assert_allclose(values.numpy(), [[0, 0, 0], [55, 0, 3]])
    np.testing.assert_array_equal(missing.numpy(), [[True, True, True], [False, False, False]])
    csv_path = write_csv(tmp_path, "case_id,age,diagnosis,afp\ncase_0100,55,HCC,3\n")
    assert load_clinical_file(csv_path).rows == {"case_0100": table.rows["case_0100"]}
    path.write_text(json.dumps({"schema": SCHEMA, "cases": {"case_0100": {"age": "old"}}}), encoding="utf-8")
    with pytest.raises(ClinicalTableError, match=r"(?s)new.json.*case 'case_0100', field 'age'"):
        load_clinical_file(path)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_clinical_file(tmp_path / "nope.json")
