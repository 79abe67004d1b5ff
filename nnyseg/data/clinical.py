"""Per-case clinical features for nnY-Net's cross-attention ("Y") branch: file format, validation, normalisation.

nnY-Net (arXiv:2501.01406) feeds patient features ("such as pathology and treatment information") to a
cross-attention module as queries. nnyseg turns each clinical field into one token (numeric fields z-scored on the
training folds, categorical fields as learned embeddings, learned tokens for missing values; docs/nnynet.md,
"Clinical features"). This module is the data side: it reads the table, validates it against the dataset, fits the
z-score statistics on one fold's training cases and turns cases into the ``(values, missing)`` tensors that
:class:`~nnyseg.network_architecture.building_blocks.cross_attention.ClinicalTokenizer` takes.

File format
-----------
The table lives in the raw dataset folder, next to ``dataset.json`` (``$nnUNet_raw/DatasetXXX_Name/``).

**Primary format, ``clinical.json``**::

    {
      "schema": [
        {"name": "age", "type": "numeric"},
        {"name": "diagnosis", "type": "categorical", "categories": ["HCC", "metastasis", "other"]}
      ],
      "cases": {
        "case_0000": {"age": 64, "diagnosis": "HCC"},
        "case_0001": {"age": null, "diagnosis": "metastasis"},
        "case_0002": {"diagnosis": null}
      }
    }

* ``schema``: the fields in the column order the network uses (the same format as the network's
  ``clinical_schema``). ``name`` must be unique; ``type`` is ``"numeric"`` or ``"categorical"``; a categorical field
  lists its ``categories`` (strings or numbers, compared by their string form, so ``1`` and ``"1"`` are the same
  category). Extra keys (e.g. ``"description"``, ``"unit"``) are allowed and ignored.
* ``cases``: one entry per case identifier (nnU-Net's case id, e.g. ``case_0000`` for
  ``imagesTr/case_0000_0000.nii.gz``). **Every training case must be listed.** Cases of ``imagesTs`` may be listed
  too (for prediction); any other id is an error. A numeric value is a JSON number; a categorical value one of the
  field's categories.
* Missing values are allowed: ``null`` or a field left out of a case. They are passed to the network as "missing"
  and replaced there by the field's learned missing token.

**Alternative format, ``clinical.csv`` + ``clinical_schema.json``**: a CSV with the header row
``case_id,<field 1>,<field 2>,...`` (one column per schema field, any order) and one row per case; an empty cell means
missing. ``clinical_schema.json`` holds the schema list (or ``{"schema": [...]}``). Numeric cells must parse as
numbers. A dataset has either ``clinical.json`` or ``clinical.csv``, never both.

Normalisation
-------------
:func:`fit_normalisation` computes, for every numeric field, the mean and the (population) standard deviation over the
**training cases of one fold only**, ignoring missing values, so no validation or test case leaks into the model.
A field with zero spread gets SD 1 and a field without any value among the training cases gets mean 0 and SD 1
(a warning is issued). :meth:`ClinicalNormalisation.apply_to` writes the statistics into the network's tokenizer,
whose buffers are part of the state dict: every fold's checkpoint carries its own statistics, the network takes raw
values, and an ensemble of folds at prediction time needs only the raw table of the new cases
(:func:`load_clinical_file`, used by ``nnyseg predict --clinical``). The record is also written as JSON beside each
fold's checkpoint (:meth:`ClinicalNormalisation.to_dict`) for people to read.

Example:
    >>> table = load_clinical_table(raw_dataset_folder)  # doctest: +SKIP
    >>> fit_normalisation(table, train_keys).apply_to(network)  # doctest: +SKIP
    >>> network.set_condition(table.network_input(batch_keys))  # raw (B, M) values, (B, M) missing  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

from nnyseg.data.validation import ProblemListError
from nnyseg.network_architecture.building_blocks.cross_attention import parse_clinical_schema

__all__ = [
    "CLINICAL_CSV",
    "CLINICAL_JSON",
    "CLINICAL_SCHEMA_JSON",
    "NORMALISATION_VERSION",
    "ClinicalNormalisation",
    "ClinicalTable",
    "ClinicalTableError",
    "dataset_case_ids",
    "find_clinical_table",
    "fit_normalisation",
    "load_clinical_file",
    "load_clinical_table",
    "normalise_schema",
]

CLINICAL_JSON = "clinical.json"
CLINICAL_CSV = "clinical.csv"
CLINICAL_SCHEMA_JSON = "clinical_schema.json"
NORMALISATION_VERSION = 1

#: A parsed cell: a float for numeric fields, a category index for categorical fields, None when missing.
Cell = float | int | None


class ClinicalTableError(ProblemListError):
    """A clinical table that cannot be used; the message names the file and every problem found."""

    max_shown = 20

    @property
    def path(self) -> str:
        return self.where


def normalise_schema(schema: Any) -> list[dict[str, Any]]:
    """Validated schema as ``[{"name", "type"[, "categories"]}]`` (extra keys dropped, categories as given).

    Raises:
        ValueError: If the schema is not a valid list of field descriptions (see the module docstring).
    """
    parse_clinical_schema(schema)  # the network's own validation: names, types, non-empty category lists
    fields = []
    for entry in schema:
        item: dict[str, Any] = {"name": str(entry["name"]), "type": entry["type"]}
        if entry["type"] == "categorical":
            categories = list(entry["categories"])
            keys = [str(c) for c in categories]
            if len(set(keys)) != len(keys):
                raise ValueError(f"categorical field {item['name']!r} lists a category twice: {categories}")
            if any(not isinstance(c, (str, int, float)) or isinstance(c, bool) for c in categories):
                raise ValueError(f"categories of field {item['name']!r} must be strings or numbers, got {categories}")
            item["categories"] = categories
        fields.append(item)
    return fields


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _parse_cell(value: Any, spec: Mapping[str, Any], *, from_text: bool) -> tuple[Cell, str | None]:
    """Returns ``(parsed, problem)``; ``problem`` is an error description or None."""
    if _is_missing(value):
        return None, None
    if spec["type"] == "numeric":
        if from_text:
            try:
                number = float(str(value).strip())
            except ValueError:
                return None, f"non-numeric value {value!r}"
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, f"non-numeric value {value!r} (numeric fields need a JSON number or null)"
        else:
            number = float(value)
        if not math.isfinite(number):
            return None, f"non-finite value {value!r} (use null / an empty cell for a missing value)"
        return number, None
    key = str(value).strip() if from_text else str(value)
    categories = [str(c) for c in spec["categories"]]
    if isinstance(value, (dict, list, bool)) or key not in categories:
        return None, f"unknown category {value!r}; allowed: {spec['categories']}"
    return categories.index(key), None


def dataset_case_ids(raw_dataset_folder: str | Path) -> tuple[list[str], list[str]]:
    """The training case ids (from ``dataset.json``'s ``dataset`` entry or ``imagesTr``) and the ``imagesTs`` ids.

    Raises:
        FileNotFoundError: If ``dataset.json`` is missing.
    """
    folder = Path(raw_dataset_folder)
    dataset_json_path = folder / "dataset.json"
    if not dataset_json_path.is_file():
        raise FileNotFoundError(f"{dataset_json_path}: no dataset.json in the raw dataset folder")
    dataset_json = json.loads(dataset_json_path.read_text(encoding="utf-8"))
    ending = dataset_json.get("file_ending", ".nii.gz")
    if "dataset" in dataset_json:
        training = sorted(str(k) for k in dataset_json["dataset"])
    elif (folder / "imagesTr").is_dir():
        training = [str(i) for i in get_identifiers_from_splitted_dataset_folder(str(folder / "imagesTr"), ending)]
    else:
        training = []
    test = []
    if (folder / "imagesTs").is_dir():
        test = [str(i) for i in get_identifiers_from_splitted_dataset_folder(str(folder / "imagesTs"), ending)]
    return training, test


def find_clinical_table(raw_dataset_folder: str | Path) -> Path | None:
    """The clinical table file of a raw dataset folder (``clinical.json`` or ``clinical.csv``), or None.

    Raises:
        ClinicalTableError: If both formats are present.
    """
    folder = Path(raw_dataset_folder)
    candidates = [folder / name for name in (CLINICAL_JSON, CLINICAL_CSV) if (folder / name).is_file()]
    if len(candidates) > 1:
        raise ClinicalTableError(folder, [f"both {CLINICAL_JSON} and {CLINICAL_CSV} exist; keep exactly one"])
    return candidates[0] if candidates else None


@dataclass(frozen=True)
class ClinicalTable:
    """A validated clinical table.

    Attributes:
        schema: Normalised schema (see :func:`normalise_schema`), in column order.
        rows: Case id -> one parsed cell per field (float, category index or None for missing).
        source: The file it was read from (for messages).
    """

    schema: list[dict[str, Any]]
    rows: dict[str, tuple[Cell, ...]]
    source: str = "<memory>"

    @property
    def field_names(self) -> list[str]:
        """Field names in column order."""
        return [f["name"] for f in self.schema]

    @property
    def case_ids(self) -> list[str]:
        """Case ids in the table, sorted."""
        return sorted(self.rows)

    def raw_values(self, case_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Un-normalised ``(values, missing)`` arrays ``(N, M)``: NaN and True where a value is missing.

        Raises:
            KeyError: If a case id is not in the table.
        """
        unknown = [c for c in case_ids if c not in self.rows]
        if unknown:
            raise KeyError(f"{self.source}: no clinical row for case(s) {unknown[:10]}")
        values = np.array(
            [[np.nan if v is None else float(v) for v in self.rows[c]] for c in case_ids], dtype=np.float64
        ).reshape(len(case_ids), len(self.schema))
        return values, np.isnan(values)

    def network_input(self, case_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's clinical input for ``case_ids``: raw ``values`` (float32 ``(N, M)``; numeric values as
        given, category indices as floats, 0 where missing) and ``missing`` (bool ``(N, M)``).

        Values are not z-scored here: the network's tokenizer holds the fold's statistics (see
        :meth:`ClinicalNormalisation.apply_to`).

        Raises:
            KeyError: If a case id is not in the table.
        """
        values, missing = self.raw_values([str(c) for c in case_ids])
        values = np.where(missing, 0.0, values)
        return torch.from_numpy(values.astype(np.float32)), torch.from_numpy(missing)

    def check_schema(self, schema: Sequence[Mapping[str, Any]], *, where: str) -> None:
        """Raises ``ValueError`` unless ``schema`` (e.g. the network's ``clinical_schema``) equals this table's.

        Only name, type and categories are compared, in order: they define the columns of the values tensor.
        """
        _compare_schemas(self.schema, schema, ours=self.source, theirs=where)


def _compare_schemas(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], *, ours: str, theirs: str) -> None:
    na, nb = normalise_schema(a), normalise_schema(b)
    if [(f["name"], f["type"], [str(c) for c in f.get("categories", [])]) for f in na] != [
        (f["name"], f["type"], [str(c) for c in f.get("categories", [])]) for f in nb
    ]:
        raise ValueError(
            f"the clinical schema of {theirs} does not match the one of {ours} (names, types and categories must "
            f"be equal and in the same order):\n  {theirs}: {nb}\n  {ours}: {na}"
        )


def _load_json(path: Path, problems: list[str]) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                problems.append(
                    f"duplicate key {key!r}" + (" (a case id listed twice)" if isinstance(value, dict) else "")
                )
            seen[key] = value
        return seen

    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ClinicalTableError(path, [f"not valid JSON: {err}"]) from err


def _schema_or_error(schema: Any, path: Path) -> list[dict[str, Any]]:
    if schema is None:
        raise ClinicalTableError(path, ["no 'schema' entry (a list of field descriptions)"])
    try:
        return normalise_schema(schema)
    except ValueError as err:
        raise ClinicalTableError(path, [f"invalid schema: {err}"]) from err


def _read_json_table(path: Path) -> tuple[list[dict[str, Any]], dict[str, tuple[Cell, ...]], list[str]]:
    problems: list[str] = []
    data = _load_json(path, problems)
    if not isinstance(data, dict):
        raise ClinicalTableError(
            path, [f"the top level must be an object with 'schema' and 'cases', got {type(data).__name__}"]
        )
    unknown_keys = sorted(set(data) - {"schema", "cases"})
    if unknown_keys:
        problems.append(f"unknown top-level key(s) {unknown_keys}; expected 'schema' and 'cases'")
    schema = _schema_or_error(data.get("schema"), path)
    cases = data.get("cases")
    if not isinstance(cases, dict):
        raise ClinicalTableError(path, [*problems, "'cases' must be an object mapping case ids to field objects"])
    names = [f["name"] for f in schema]
    rows: dict[str, tuple[Cell, ...]] = {}
    for case_id, record in cases.items():
        if not isinstance(record, dict):
            problems.append(f"case {case_id!r}: expected an object of field values, got {record!r}")
            continue
        extra = sorted(set(record) - set(names))
        if extra:
            problems.append(f"case {case_id!r}: unknown field(s) {extra}; the schema has {names}")
        row = []
        for spec in schema:
            cell, problem = _parse_cell(record.get(spec["name"]), spec, from_text=False)
            if problem:
                problems.append(f"case {case_id!r}, field {spec['name']!r}: {problem}")
            row.append(cell)
        rows[str(case_id)] = tuple(row)
    return schema, rows, problems


def _read_csv_table(path: Path) -> tuple[list[dict[str, Any]], dict[str, tuple[Cell, ...]], list[str]]:
    schema_path = path.with_name(CLINICAL_SCHEMA_JSON)
    if not schema_path.is_file():
        raise ClinicalTableError(path, [f"{CLINICAL_CSV} needs its schema in {schema_path}, which does not exist"])
    schema_problems: list[str] = []
    schema_data = _load_json(schema_path, schema_problems)
    if schema_problems:
        raise ClinicalTableError(schema_path, schema_problems)
    schema = _schema_or_error(schema_data.get("schema") if isinstance(schema_data, dict) else schema_data, schema_path)
    names = [f["name"] for f in schema]
    problems: list[str] = []
    rows: dict[str, tuple[Cell, ...]] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a byte-order mark from Excel is not data
            reader = csv.reader(handle)
            header = [h.strip() for h in next(reader, [])]
            if not header or header[0] != "case_id":
                raise ClinicalTableError(path, [f"the header row must start with 'case_id', got {header}"])
            columns = header[1:]
            if len(set(columns)) != len(columns):
                problems.append(f"the header names a column twice: {header}")
            missing_cols = [n for n in names if n not in columns]
            extra_cols = [c for c in columns if c not in names]
            if missing_cols or extra_cols:
                raise ClinicalTableError(
                    path,
                    [
                        f"header columns {columns} do not match the schema fields {names} (missing {missing_cols}, "
                        f"unknown {extra_cols})"
                    ],
                )
            index = {name: columns.index(name) + 1 for name in names}
            for line, cells in enumerate(reader, start=2):
                if not any(c.strip() for c in cells):
                    continue  # blank line
                if len(cells) != len(header):
                    problems.append(f"line {line}: {len(cells)} cells, the header has {len(header)}")
                    continue
                case_id = cells[0].strip()
                if not case_id:
                    problems.append(f"line {line}: empty case_id")
                    continue
                if case_id in rows:
                    problems.append(f"line {line}: duplicate case id {case_id!r}")
                row = []
                for spec in schema:
                    cell, problem = _parse_cell(cells[index[spec["name"]]], spec, from_text=True)
                    if problem:
                        problems.append(f"line {line}, case {case_id!r}, field {spec['name']!r}: {problem}")
                    row.append(cell)
                rows[case_id] = tuple(row)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ClinicalTableError(path, [f"not a readable CSV file: {err}"]) from err
    return schema, rows, problems


def load_clinical_table(
    raw_dataset_folder: str | Path,
    *,
    case_ids: Sequence[str] | None = None,
    allowed_extra_ids: Sequence[str] | None = None,
) -> ClinicalTable:
    """Reads and validates the clinical table of a raw dataset folder (format: see the module docstring).

    Args:
        raw_dataset_folder: ``$nnUNet_raw/DatasetXXX_Name``.
        case_ids: Case ids that must all be in the table; default: the dataset's training cases.
        allowed_extra_ids: Further ids the table may hold; default: the dataset's ``imagesTs`` cases.

    Returns:
        The validated table.

    Raises:
        FileNotFoundError: If the folder has no clinical table (the message names the expected files).
        ClinicalTableError: For a malformed file, an invalid schema, duplicate case ids, unknown fields, non-numeric
            values in numeric fields, unknown categories, cases missing from the table or unknown case ids. All
            problems are listed, each with its case and field.
    """
    folder = Path(raw_dataset_folder)
    path = find_clinical_table(folder)
    if path is None:
        raise FileNotFoundError(
            f"{folder}: no clinical table; expected {folder / CLINICAL_JSON} (or {folder / CLINICAL_CSV} with "
            f"{folder / CLINICAL_SCHEMA_JSON}); see nnyseg.data.clinical for the format"
        )
    reader = _read_json_table if path.suffix == ".json" else _read_csv_table
    schema, rows, problems = reader(path)
    if case_ids is None or allowed_extra_ids is None:
        training, test = dataset_case_ids(folder)
        case_ids = training if case_ids is None else case_ids
        allowed_extra_ids = test if allowed_extra_ids is None else allowed_extra_ids
    required = [str(c) for c in case_ids]
    absent = [c for c in required if c not in rows]
    if absent:
        problems.append(
            f"{len(absent)} case(s) of the dataset have no entry: {absent[:10]}"
            + (" ..." if len(absent) > 10 else "")
            + " (list every case; use null / empty values for unknown fields)"
        )
    known = set(required) | {str(c) for c in allowed_extra_ids}
    unknown = sorted(c for c in rows if c not in known)
    if unknown:
        problems.append(
            f"{len(unknown)} case id(s) are neither training cases nor imagesTs cases of the dataset: {unknown[:10]}"
            + (" ..." if len(unknown) > 10 else "")
        )
    if problems:
        raise ClinicalTableError(path, problems)
    return ClinicalTable(schema=schema, rows=rows, source=str(path))


def load_clinical_file(path: str | Path) -> ClinicalTable:
    """Reads and validates one clinical table file on its own, e.g. the table of new cases at prediction time.

    ``path`` is a ``.json`` table, or a ``.csv`` table with ``clinical_schema.json`` beside it (format: see the
    module docstring). Unlike :func:`load_clinical_table`, any case ids are accepted.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ClinicalTableError: For a malformed file, an invalid schema, unknown fields, non-numeric values in numeric
            fields or unknown categories; every problem is listed with its case and field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: clinical table not found")
    if path.suffix.lower() not in (".json", ".csv"):
        raise ClinicalTableError(path, ["a clinical table is a .json file or a .csv file with clinical_schema.json"])
    reader = _read_json_table if path.suffix.lower() == ".json" else _read_csv_table
    schema, rows, problems = reader(path)
    if problems:
        raise ClinicalTableError(path, problems)
    return ClinicalTable(schema=schema, rows=rows, source=str(path))


@dataclass(frozen=True)
class ClinicalNormalisation:
    """Z-score statistics of the numeric fields, fitted on one fold's training cases, plus the schema.

    Attributes:
        schema: Normalised schema (column order of the encoded tensors).
        mean: Field name -> mean, for numeric fields.
        std: Field name -> standard deviation (> 0), for numeric fields.
        n_cases: Field name -> number of training cases with a value, for numeric fields.
        fitted_on: The training case ids the statistics come from.
    """

    schema: list[dict[str, Any]]
    mean: dict[str, float]
    std: dict[str, float]
    n_cases: dict[str, int] = field(default_factory=dict)
    fitted_on: list[str] = field(default_factory=list)

    @property
    def field_names(self) -> list[str]:
        return [f["name"] for f in self.schema]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored with the model)."""
        return {
            "version": NORMALISATION_VERSION,
            "schema": [dict(f) for f in self.schema],
            "numeric": {
                f["name"]: {
                    "mean": self.mean[f["name"]],
                    "std": self.std[f["name"]],
                    "n_cases": self.n_cases.get(f["name"], 0),
                }
                for f in self.schema
                if f["type"] == "numeric"
            },
            "fitted_on": list(self.fitted_on),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClinicalNormalisation:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: If the dict is not a valid normalisation record.
        """
        if not isinstance(data, Mapping) or "schema" not in data or "numeric" not in data:
            raise ValueError("a clinical normalisation record needs 'schema' and 'numeric' entries")
        if data.get("version", NORMALISATION_VERSION) != NORMALISATION_VERSION:
            raise ValueError(f"unsupported clinical normalisation version {data.get('version')!r}")
        schema = normalise_schema(data["schema"])
        numeric = data["numeric"]
        mean, std, n_cases = {}, {}, {}
        for f in schema:
            if f["type"] != "numeric":
                continue
            entry = numeric.get(f["name"]) if isinstance(numeric, Mapping) else None
            if not isinstance(entry, Mapping) or "mean" not in entry or "std" not in entry:
                raise ValueError(f"clinical normalisation has no mean/std for numeric field {f['name']!r}")
            mean[f["name"]], std[f["name"]] = float(entry["mean"]), float(entry["std"])
            if not (math.isfinite(mean[f["name"]]) and math.isfinite(std[f["name"]]) and std[f["name"]] > 0):
                raise ValueError(f"clinical normalisation of field {f['name']!r} is invalid: {dict(entry)}")
            n_cases[f["name"]] = int(entry.get("n_cases", 0))
        return cls(schema=schema, mean=mean, std=std, n_cases=n_cases, fitted_on=list(data.get("fitted_on", [])))

    def save(self, path: str | Path) -> None:
        """Writes :meth:`to_dict` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ClinicalNormalisation:
        """Reads a file written by :meth:`save`."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err

    def check_schema(self, schema: Sequence[Mapping[str, Any]], *, where: str) -> None:
        """Raises ``ValueError`` unless ``schema`` has the same fields, types and categories in the same order."""
        _compare_schemas(self.schema, schema, ours="the clinical normalisation", theirs=where)

    def apply_to(self, network: torch.nn.Module) -> None:
        """Writes the statistics into the clinical tokenizer of ``network`` (an nnY-Net, or the tokenizer itself).

        Raises:
            ValueError: If the network has no clinical tokenizer, or its schema differs from this record's.
        """
        tokenizer = network if hasattr(network, "set_normalisation") else None
        tokenizer = tokenizer or getattr(getattr(network, "cross_attention", None), "tokenizer", None)
        if tokenizer is None:
            raise ValueError("the network has no clinical tokenizer (cross_attention mode is not 'clinical')")
        if tokenizer.field_names != self.field_names:
            raise ValueError(f"the network's clinical fields {tokenizer.field_names} differ from {self.field_names}")
        tokenizer.set_normalisation(self.mean, self.std)


def fit_normalisation(table: ClinicalTable, case_ids: Sequence[str]) -> ClinicalNormalisation:
    """Fits the z-score statistics of the numeric fields on ``case_ids`` (a fold's training cases) only.

    Mean and population SD over the cases that have a value. SD 0 becomes 1 (the field then encodes as 0);
    a field with no value among ``case_ids`` gets mean 0, SD 1 and a warning.

    Raises:
        ValueError: If ``case_ids`` is empty.
        KeyError: If a case id is not in the table.
    """
    ids = [str(c) for c in case_ids]
    if not ids:
        raise ValueError("fit_normalisation needs at least one training case")
    values, missing = table.raw_values(ids)
    mean, std, n_cases = {}, {}, {}
    for j, f in enumerate(table.schema):
        if f["type"] != "numeric":
            continue
        column = values[~missing[:, j], j]
        n_cases[f["name"]] = int(column.size)
        if column.size == 0:
            warnings.warn(
                f"{table.source}: numeric field {f['name']!r} has no value among the {len(ids)} training cases; "
                "using mean 0 and SD 1",
                stacklevel=2,
            )
            mean[f["name"]], std[f["name"]] = 0.0, 1.0
            continue
        sd = float(column.std())
        mean[f["name"]] = float(column.mean())
        std[f["name"]] = sd if sd > 1e-12 else 1.0
    return ClinicalNormalisation(
        schema=[dict(f) for f in table.schema], mean=mean, std=std, n_cases=n_cases, fitted_on=sorted(ids)
    )
