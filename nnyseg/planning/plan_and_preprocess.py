"""``nnyseg plan_and_preprocess``: nnU-Net's own command, able to see nnyseg's planners.

``nnUNetv2_plan_and_preprocess -pl NAME`` looks planners up by class name inside the nnunetv2 package only. This
module runs nnU-Net's own entry point (same flags, same code) while the planner lookup also answers for the names
in :data:`nnyseg.planning.planners.PLANNERS` (the lookup hook is in :mod:`nnyseg.nnunet_integration`). The plans it
writes are ordinary nnU-Net plans that the stock ``nnUNetv2_train`` and ``nnUNetv2_predict`` read.

The stock ``nnUNetv2_plan_and_preprocess`` is enough for every nnyseg trainer: a method trainer adapts nnU-Net's
default plans itself. A planner of ours is worth it for a plans file of one's own, or for the paper's CT window of
ELANRes-MSCA-UNet (``ELANResMSCAPaperPlanner``), which changes preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence

from nnyseg.nnunet_integration import nnunet_planner_class, nnyseg_planners_visible, run_nnunet_entry_point
from nnyseg.planning.planners import PLANNERS


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


def main(argv: Sequence[str] | None = None) -> None:
    """Validate the datasets, then run ``nnUNetv2_plan_and_preprocess`` with nnyseg's planners visible."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" not in argv and "--help" not in argv:
        from nnyseg.data.validation import validate_raw_dataset

        planner = _planner_name(argv)
        if planner is not None and planner not in PLANNERS and nnunet_planner_class(planner) is None:
            # nnU-Net itself would fail later with "'NoneType' object is not callable".
            raise ValueError(
                f"unknown planner '{planner}': nnyseg planners are {sorted(PLANNERS)}; nnU-Net's are in "
                "nnunetv2/experiment_planning (e.g. ExperimentPlanner, nnUNetPlannerResEncM)"
            )
        for dataset_id in _dataset_ids(argv):
            validate_raw_dataset(dataset_id)
    from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry

    with nnyseg_planners_visible(PLANNERS):
        run_nnunet_entry_point(plan_and_preprocess_entry, "nnyseg plan_and_preprocess", argv)
