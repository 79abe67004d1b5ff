"""``nnyseg plan_and_preprocess``: nnU-Net's own command, able to see nnyseg's planners.

``nnUNetv2_plan_and_preprocess -pl NAME`` looks planners up by class name inside the nnunetv2 package only. This
module runs nnU-Net's own entry point (same flags, same code) while the planner lookup also answers for the names
in :data:`nnyseg.planning.planners.PLANNERS`. The plans it writes are ordinary nnU-Net plans that the stock
``nnUNetv2_train`` and ``nnUNetv2_predict`` read.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from nnyseg.planning.planners import PLANNERS


@contextmanager
def nnyseg_planners_visible() -> Iterator[None]:
    """Let nnU-Net's planner lookup find nnyseg's planners for as long as the context is open."""
    from nnunetv2.experiment_planning import plan_and_preprocess_api as api

    original = api.recursive_find_python_class

    def find(folder: str, class_name: str, current_module: str, *args, **kwargs):
        if class_name in PLANNERS:
            return PLANNERS[class_name]
        return original(folder, class_name, current_module, *args, **kwargs)

    api.recursive_find_python_class = find
    try:
        yield
    finally:
        api.recursive_find_python_class = original


def _dataset_ids(argv: Sequence[str]) -> list[int]:
    ids: list[int] = []
    if "-d" in argv:
        for token in argv[argv.index("-d") + 1 :]:
            if token.startswith("-"):
                break
            if token.isdigit():
                ids.append(int(token))
    return ids


def _planner_name(argv: Sequence[str]) -> str | None:
    return argv[argv.index("-pl") + 1] if "-pl" in argv and argv.index("-pl") + 1 < len(argv) else None


def _nnunet_has_planner(name: str) -> bool:
    import nnunetv2
    from nnunetv2.experiment_planning import plan_and_preprocess_api as api

    folder = os.path.join(nnunetv2.__path__[0], "experiment_planning")
    return api.recursive_find_python_class(folder, name, current_module="nnunetv2.experiment_planning") is not None


def main(argv: Sequence[str] | None = None) -> None:
    """Validate the datasets, then run ``nnUNetv2_plan_and_preprocess`` with nnyseg's planners visible."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" not in argv and "--help" not in argv:
        from nnyseg.data.validation import validate_raw_dataset

        planner = _planner_name(argv)
        if planner is not None and planner not in PLANNERS and not _nnunet_has_planner(planner):
            # nnU-Net itself would fail later with "'NoneType' object is not callable".
            raise ValueError(
                f"unknown planner '{planner}': nnyseg planners are {sorted(PLANNERS)}; nnU-Net's are in "
                "nnunetv2/experiment_planning (e.g. ExperimentPlanner, nnUNetPlannerResEncM)"
            )
        for dataset_id in _dataset_ids(argv):
            validate_raw_dataset(dataset_id)
    from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry

    old_argv = sys.argv
    sys.argv = ["nnyseg plan_and_preprocess", *argv]
    try:
        with nnyseg_planners_visible():
            plan_and_preprocess_entry()
    finally:
        sys.argv = old_argv
