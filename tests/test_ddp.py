"""Multi-process training (issue #14, requirement 4): each nnyseg trainer's training step under torch DDP.

nnU-Net trains on several GPUs with ``nnUNetv2_train ... -num_gpus N``: ``run_training`` spawns one process per GPU
(``mp.spawn(run_ddp)``), each joins an NCCL process group, builds its trainer with nnU-Net's
``get_trainer_from_args``, and ``nnUNetTrainer`` then splits the batch over the ranks, converts BatchNorm to
SyncBatchNorm and wraps the network in ``DistributedDataParallel``. This module drives that code path with two CPU
processes. What is swapped, in the worker processes of this test only (never in nnyseg), is what needs CUDA:

* the process group is ``gloo`` (nnU-Net hard-codes ``nccl``), rendezvous through a file, traffic over loopback;
* the device nnU-Net forces under DDP (``cuda:<rank>``) is set back to the CPU after construction, and the CUDA
  GradScaler it made for that device is dropped (nnU-Net uses none on the CPU);
* ``DDP(..., device_ids=[rank])`` is called without ``device_ids`` (a CPU module takes none);
* ``SyncBatchNorm`` (ELANRes-MSCA-UNet's BatchNorms after nnU-Net's conversion) runs only on GPUs: its training
  forward is replaced by the same maths with an autograd-aware ``all_reduce`` of the batch sums (global batch
  statistics, gradients through them on every rank), so ELANRes trains with synchronised BatchNorm as on GPUs,
  and DDP's check that refuses SyncBatchNorm in a CPU module is skipped.

Each rank trains on its own case (``batch["keys"]`` differs), from the trainer's real data loader and augmentation.
One spawn runs every trainer in turn; the tests then compare what the two ranks saved.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnyseg.data.clinical import load_clinical_table

pytestmark = pytest.mark.slow  # two spawned processes (~35 s on 2 cores)

DATASET_ID = 972
NAME = "DDPPhantom"
WORLD_SIZE = 2
STEPS_CONFIGURATION = "3d_fullres_steps"
#: trainer -> configuration. The ``_nnUNet`` variants (nnU-Net's loss and deep-supervision weights) are cheap here.
TRAINERS = {
    "nnYNetTrainer_tiny": "3d_fullres",
    "DynTransNetTrainer_tiny": "3d_fullres",
    "DynTransNetTrainer_nnUNet_tiny": "3d_fullres",
    "ELANResMSCATrainer_tiny": STEPS_CONFIGURATION,
    "ELANResMSCATrainer_nnUNet_tiny": STEPS_CONFIGURATION,
}
EPOCH = 2  # the epoch the step runs in; ELANRes's weights decay every epoch in STEPS_CONFIGURATION
AGES = [64.0, 51.0, 73.0, None, 58.0, 69.0]  # a numeric clinical field beside the phantom's categorical diagnosis
FOLD0_TRAIN = [f"case_{i:04d}" for i in range(5)]
#: The case each rank trains on: malignant case_0000 (age 64) and benign case_0001 (age 51).
RANK_KEYS = FOLD0_TRAIN[:WORLD_SIZE]


# ------------------------------------------------------------------------------------------------------------------
# Worker side (runs in the spawned processes)
# ------------------------------------------------------------------------------------------------------------------
def _gloo_sync_batch_norm_forward(self: torch.nn.SyncBatchNorm, input: torch.Tensor) -> torch.Tensor:
    """SyncBatchNorm's training forward for CPU tensors: batch statistics over all ranks, as the CUDA kernel does.

    The per-channel sum, sum of squares and count are summed over the ranks with the autograd-aware
    ``torch.distributed.nn.functional.all_reduce``, so the backward also flows through the other ranks' statistics.
    Eval mode (running statistics) is SyncBatchNorm's own code path, which needs no communication.
    """
    from torch.distributed.nn.functional import all_reduce

    if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
        return _ORIGINAL_SYNC_BN_FORWARD(self, input)
    channels = input.shape[1]
    dims = [0, *range(2, input.dim())]
    count = torch.full((1,), input.numel() / channels, dtype=input.dtype)
    stats = all_reduce(torch.cat([input.sum(dims), (input * input).sum(dims), count]))
    n = stats[-1]
    mean = stats[:channels] / n
    var = stats[channels : 2 * channels] / n - mean * mean  # biased, for normalising
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
            self.running_mean.mul_(1 - momentum).add_(momentum * mean)
            self.running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))  # unbiased, as torch stores
    shape = [1, channels] + [1] * (input.dim() - 2)
    out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    if self.affine:
        out = out * self.weight.view(shape) + self.bias.view(shape)
    return out


_ORIGINAL_SYNC_BN_FORWARD = torch.nn.SyncBatchNorm.forward


def _flat_grads(parameters: Sequence[torch.nn.Parameter]) -> tuple[torch.Tensor, list[int]]:
    """All gradients as one vector (zeros where None) and the indices of the parameters without gradient."""
    missing = [i for i, p in enumerate(parameters) if p.grad is None]
    flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).detach().reshape(-1) for p in parameters])
    return flat.clone(), missing


def _compare_across_ranks(local: torch.Tensor, averaged: torch.Tensor, after_step: torch.Tensor) -> dict:
    """Gradient comparisons with the other ranks, as numbers (the vectors are millions of floats per trainer).

    Args:
        local: This rank's own gradient (no all-reduce), before clipping.
        averaged: DDP's gradient of the same step, before nnU-Net's clipping.
        after_step: The gradient left after nnU-Net's whole train_step (clipped, optimiser stepped).
    """
    gathered = {}
    for name, tensor in (("local", local), ("after_step", after_step)):
        gathered[name] = [torch.empty_like(tensor) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered[name], tensor)
    mean = torch.stack(gathered["local"]).mean(0)
    return {
        "local_spread": (gathered["local"][0] - gathered["local"][1]).abs().max().item(),
        "averaged_minus_mean": (averaged - mean).abs().max().item(),
        "mean_scale": mean.abs().max().item(),
        "after_step_equal": all(torch.equal(t, after_step) for t in gathered["after_step"]),
        "after_step_norm": after_step.norm().item(),
    }


def _patch_for_cpu() -> dict:
    """The CPU swaps (module docstring); returns a dict that the clip hook fills with the pre-clipping gradients."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    from torch.nn.parallel import DistributedDataParallel

    def ddp_on_cpu(module, device_ids=None, **kwargs):
        return DistributedDataParallel(module, **kwargs)

    trainer_module.DDP = ddp_on_cpu
    torch.nn.SyncBatchNorm.forward = _gloo_sync_batch_norm_forward
    # DDP refuses SyncBatchNorm in CPU modules (a check only); the forward above makes it work on the CPU.
    DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None

    captured: dict = {}
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        # nnU-Net's train_step clips right after backward: the gradients here are DDP's averaged, unclipped ones.
        parameters = list(parameters)
        captured["grads"] = _flat_grads([p for p in parameters if p.requires_grad])[0]
        return clip(parameters, max_norm, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = recording_clip
    return captured


def _train_one_step(trainer_name: str, configuration: str, rank: int, captured: dict) -> dict:
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnyseg.network_architecture.swin_next import SwinNeXtUNet

    trainer = get_trainer_from_args(str(DATASET_ID), configuration, 0, trainer_name, "nnUNetPlans", False)
    assert trainer.is_ddp and trainer.local_rank == rank
    trainer.device = torch.device("cpu")  # nnU-Net set cuda:<rank>
    trainer.grad_scaler = None  # made for that CUDA device; nnU-Net trains without one on the CPU
    trainer.on_train_start()  # initialize() (batch split, SyncBatchNorm, DDP), data loaders, nnU-Net's barrier
    trainer.current_epoch = EPOCH
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()

    # This rank's own case, through the trainer's real loader and augmentation.
    loader = trainer.dataloader_train.data_loader
    loader.get_indices = lambda: [RANK_KEYS[rank]] * loader.batch_size
    batch = next(trainer.dataloader_train)
    conditions: list[tuple[torch.Tensor, torch.Tensor]] = []
    set_condition = SwinNeXtUNet.set_condition

    def recording_set_condition(self, clinical):
        conditions.append(tuple(t.detach().clone() for t in clinical))
        return set_condition(self, clinical)

    SwinNeXtUNet.set_condition = recording_set_condition
    try:
        named = list(trainer.network.module.named_parameters())
        parameters = [p for _, p in named if p.requires_grad]  # what DDP reduces
        seed = 1000 + rank  # the same randomness in both passes below
        # This rank's own gradient: the same train_step on the network inside DDP (no gradient all-reduce, DDP's
        # reducer untouched for the real step below), without the optimiser step.
        ddp = trainer.network
        torch.manual_seed(seed)
        trainer.network, trainer.optimizer.step = ddp.module, lambda *args, **kwargs: None
        try:
            trainer.train_step(batch)
        finally:
            trainer.network = ddp
            del trainer.optimizer.step
        local = captured.pop("grads")
        # nnU-Net's train_step under DDP.
        torch.manual_seed(seed)
        trainer.train_step(batch)
        averaged = captured.pop("grads")
        after_step, missing = _flat_grads(parameters)
        # A second step: DDP raises here if the first left a parameter without gradient (its reducer never finished).
        trainer.train_step(batch)
    finally:
        SwinNeXtUNet.set_condition = set_condition
    network = trainer.network.module
    tokenizer = getattr(getattr(network, "cross_attention", None), "tokenizer", None)
    weight_factors = getattr(trainer.loss, "weight_factors", None)
    result = {
        "keys": list(batch["keys"]),
        "batch_size": trainer.batch_size,
        "ddp": type(trainer.network).__name__,
        "sync_batch_norms": sum(isinstance(m, torch.nn.SyncBatchNorm) for m in network.modules()),
        **_compare_across_ranks(local, averaged, after_step),
        "missing_grads": missing,
        "frozen": [name for name, p in named if not p.requires_grad],
        "weight_factors": None if weight_factors is None else [float(w) for w in weight_factors],
        "num_outputs": len(trainer._get_deep_supervision_scales() or []),
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "conditions": conditions,  # one per train_step: the local pass, the DDP step, the second DDP step
        "numeric_mean": None if tokenizer is None else tokenizer.numeric_mean.tolist(),
    }
    trainer.dataloader_train = trainer.dataloader_val = None
    return result


def _worker(rank: int, init_method: str, out: str) -> None:
    """One DDP rank: every trainer of TRAINERS in turn, results to ``out/rank<rank>.pt``."""
    torch.set_num_threads(1)  # two ranks on two shared cores
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=300)
    )
    try:
        captured = _patch_for_cpu()
        results = {name: _train_one_step(name, cfg, rank, captured) for name, cfg in TRAINERS.items()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------------
# Test side
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    """Micro phantom with a clinical table, nnU-Net's default plans and data, then the two-rank spawn.

    Returns:
        ``{"raw": raw dataset folder, trainer: (rank 0's results, rank 1's results), ...}``.
    """
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset

    from nnyseg.data.phantom import write_nnunet_dataset

    root = tmp_path_factory.mktemp("ddp")
    monkeypatch = pytest.MonkeyPatch()
    threads = torch.get_num_threads()
    try:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (root / var).mkdir()
            monkeypatch.setenv(var, str(root / var))
        monkeypatch.setenv("nnUNet_n_proc_DA", "1")  # the planner sets torch's thread count from it
        raw = write_nnunet_dataset(
            root / "nnUNet_raw", DATASET_ID, NAME, num_training=6, num_test=0, preset="micro", progress=False,
            diagnosis=True,
        )  # fmt: skip
        table = json.loads((raw / "clinical.json").read_text(encoding="utf-8"))
        table["schema"].append({"name": "age", "type": "numeric"})
        for case, age in zip(sorted(table["cases"]), AGES, strict=True):
            table["cases"][case]["age"] = age
        (raw / "clinical.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
        extract_fingerprint_dataset(DATASET_ID, num_processes=1)
        ExperimentPlanner(DATASET_ID).plan_experiment()
        preprocess_dataset(DATASET_ID, "nnUNetPlans", ("3d_fullres",), (1,), show_progress_bar=False)
        preprocessed = root / "nnUNet_preprocessed" / raw.name
        plans = json.loads((preprocessed / "nnUNetPlans.json").read_text(encoding="utf-8"))
        plans["configurations"][STEPS_CONFIGURATION] = {
            "inherits_from": "3d_fullres",
            "nnyseg_trainer_settings": {"lr_step_size": 1, "ds_alpha_every": 1},
        }
        (preprocessed / "nnUNetPlans.json").write_text(json.dumps(plans, indent=1), encoding="utf-8")
        splits = [{"train": FOLD0_TRAIN, "val": ["case_0005"]}]
        (preprocessed / "splits_final.json").write_text(json.dumps(splits), encoding="utf-8")

        # Inherited by the spawned ranks: augmentation in the rank process, gloo over loopback only.
        monkeypatch.setenv("nnUNet_n_proc_DA", "0")
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
        monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
        out = root / "ranks"
        out.mkdir()
        init_method = (root / "rendezvous").as_uri()  # file:// rendezvous: no port to pick or collide on
        mp.spawn(_worker, args=(init_method, str(out)), nprocs=WORLD_SIZE, join=True)
        results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
        return {"raw": raw, **{name: tuple(r[name] for r in results) for name in TRAINERS}}
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_gradients_are_equal_across_ranks_after_a_step(ranks, trainer):
    r0, r1 = ranks[trainer]
    # nnU-Net's DDP set-up: the global batch of 2 split into one case per rank, each rank its own case.
    assert r0["ddp"] == r1["ddp"] == "DistributedDataParallel"
    assert r0["batch_size"] == r1["batch_size"] == 1
    assert (r0["keys"], r1["keys"]) == ([RANK_KEYS[0]], [RANK_KEYS[1]])
    assert r0["missing_grads"] == r1["missing_grads"] == []
    # Without deep supervision only the full-resolution head runs: the lower heads are frozen, else DDP waits for
    # their gradients and nnU-Net's second iteration fails (the worker's second train_step is that check).
    if trainer == "DynTransNetTrainer_tiny":
        assert r0["frozen"] == [f"decoder.seg_layers.{i}.{w}" for i in range(4) for w in ("weight", "bias")]
    else:
        assert r0["frozen"] == []
    # The ranks' own gradients differ (different cases), DDP's averaged ones are their mean, on both ranks...
    scale = r0["mean_scale"]
    assert scale > 0 and r0["local_spread"] > 1e-3 * scale
    for r in (r0, r1):
        assert r["averaged_minus_mean"] <= 1e-5 * scale
    # ...and after nnU-Net's clipping and the optimiser step the gradients are identical (bit for bit).
    assert r0["after_step_equal"] and r1["after_step_equal"]
    assert r0["after_step_norm"] == r1["after_step_norm"] > 0
    assert r0["lr"] == r1["lr"]
    if trainer.startswith("ELANRes"):
        assert r0["sync_batch_norms"] == r1["sync_batch_norms"] > 0  # nnU-Net converted its BatchNorms


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_deep_supervision_weights_are_the_same_on_both_ranks(ranks, trainer):
    r0, r1 = ranks[trainer]
    assert r0["weight_factors"] == r1["weight_factors"]
    n = r0["num_outputs"]
    if trainer == "DynTransNetTrainer_tiny":
        assert r0["weight_factors"] is None and n == 0  # the paper's recipe: no deep supervision
        return
    assert n >= 2
    if trainer == "ELANResMSCATrainer_tiny":
        alpha = 0.4 * 0.8**EPOCH  # the decay at this epoch (every epoch in this configuration)
        expected = [1.0] + [alpha] * min(3, n - 1) + [1e-6] * max(0, n - 4)  # DDP: 1e-6 instead of 0
    else:
        # nnU-Net's weights; under DDP the lowest output gets 1e-6 instead of 0.
        weights = np.array([1 / 2**i for i in range(n)])
        weights[-1] = 1e-6
        expected = (weights / weights.sum()).tolist()
    np.testing.assert_allclose(r0["weight_factors"], expected, rtol=1e-9)


def test_nnynet_conditions_each_rank_on_its_own_cases(ranks):
    r0, r1 = ranks["nnYNetTrainer_tiny"]
    table = load_clinical_table(ranks["raw"])
    for r in (r0, r1):
        values, missing = table.network_input(r["keys"])
        assert len(r["conditions"]) == 3  # every train_step set this rank's row
        for condition_values, condition_missing in r["conditions"]:
            assert torch.equal(condition_values, values) and torch.equal(condition_missing, missing)
    assert not torch.equal(r0["conditions"][0][0], r1["conditions"][0][0])  # the cases differ in diagnosis and age
    # Both ranks z-score with the statistics of the same training cases.
    ages = [a for a in AGES[: len(FOLD0_TRAIN)] if a is not None]
    assert r0["numeric_mean"] == r1["numeric_mean"] == pytest.approx([float(np.mean(ages))])
