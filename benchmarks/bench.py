"""Side-by-side speed and memory benchmark of nnyseg's networks against nnU-Net's PlainConvUNet.

Every architecture is read from the model registry (``nnyseg.registry``) and built exactly as nnU-Net would build it
from plans for the requested patch (the model's topology rule, then nnU-Net's ``get_network_from_plans``) and
measured in its own subprocess, one after the other, with the same patch, batch, device and threads:

- parameters (millions);
- one training step as nnU-Net's ``nnUNetTrainer.train_step`` runs it: deep supervision on,
  ``DeepSupervisionWrapper(DC_and_CE_loss)`` with nnU-Net's weights, backward, ``clip_grad_norm_(12)`` and an SGD
  step (lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5); autocast + GradScaler on CUDA as nnU-Net does;
- one inference forward pass (``eval()``, deep supervision off, ``torch.inference_mode()``);
- peak memory (CUDA: ``torch.cuda.max_memory_allocated``; otherwise the worker process's peak RSS);

and every number also as a ratio to PlainConvUNet measured in the same run. The table is printed and appended to
``benchmarks/RESULTS.md``.

Usage::

    python benchmarks/bench.py                                  # all architectures, 64^3, batch 2
    python benchmarks/bench.py --archs plain elanres elanres_fused --patch 128 128 128 --device cuda
    python benchmarks/bench.py --tiny --patch 32 32 32 --batch 1 --repeats 1 --warmup 0 --device cpu --no-append
    python benchmarks/bench.py --archs all monai          # with MONAI's SwinUNETR and MedNeXt (pip install monai)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing nnyseg
    sys.path.insert(0, str(REPO))

DEFAULT_RESULTS = REPO / "benchmarks" / "RESULTS.md"
BASELINE = "plain"
NA = "n/a"
#: nnU-Net's 3d_fullres ``batch_dice`` when a 3d_lowres configuration exists (the usual case for liver CT).
BATCH_DICE = True
INPUT_CHANNELS = 1
#: nnU-Net's optimiser and gradient clipping (``nnUNetTrainer.configure_optimizers`` / ``train_step``).
LEARNING_RATE = 1e-2
MOMENTUM = 0.99
WEIGHT_DECAY = 3e-5
GRAD_CLIP = 12.0

RESULTS_HEADER = """# nnyseg benchmarks

Each section below is one run of `benchmarks/bench.py` (its exact command line is in the section). Every architecture
is built as nnU-Net builds it from plans for the given patch and measured in its own subprocess, one after the other,
on the same device with the same patch, batch and threads:

- **params (M)**: trainable and non-trainable parameters of the network as built (after fusion for `elanres_fused`).
- **train step (s)**: median wall time of one nnU-Net training step: forward with deep supervision,
  `DeepSupervisionWrapper(DC_and_CE_loss)` with nnU-Net's weights, backward, `clip_grad_norm_(12)`, SGD step
  (autocast + GradScaler on CUDA unless `--no-amp`). Data loading and augmentation are not included.
- **inference (s)**: median wall time of one forward pass in `eval()` mode, deep supervision off, under
  `torch.inference_mode()`, same batch.
- **peak mem (GiB)**: on CUDA `torch.cuda.max_memory_allocated` during the timed training steps (the timed inference
  passes for rows without a training step, against plain's inference peak); on CPU/MPS the peak RSS of the whole
  worker process (Python, torch and nnU-Net imports included, so CPU ratios understate the differences; n/a ratio for
  inference-only rows such as `elanres_fused`, whose worker did not train).
- **x plain**: the value divided by PlainConvUNet's (`plain`) value from the same run.
- Each worker runs the training steps first, then the inference passes (nnU-Net's order); `n/a` = not measured.

Ratios are only comparable within one section (one run); absolute numbers depend on the machine and its load.
"""


# ----------------------------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchSpec:
    """One benchmark row.

    Attributes:
        key: Name used with ``--archs`` and in the table.
        model: Key of ``nnyseg.registry.MODELS`` whose preset builds the network.
        fused: Whether ``switch_to_deploy()`` is applied before inference (inference only, no training step).
        description: One line for ``--help``.
        arch_kwargs: Overrides of the plans' ``arch_kwargs``: an ablation switch, as a plans configuration sets it.
        external: Whether the row is a published relative built by :func:`build_external` (MONAI), not a registry
            model; measured only when named, since MONAI is a benchmark-only extra (``pip install monai``).
        speed: Whether ``arch_kwargs`` is a named speed setting of the registry (``--archs speed``), not an ablation.
    """

    key: str
    model: str
    fused: bool = False
    description: str = ""
    arch_kwargs: tuple[tuple[str, Any], ...] = ()
    external: bool = False
    speed: bool = False


#: Published relatives, measured with the same loss and step as our networks but without deep supervision (neither
#: network has nnU-Net's; their single output gets nnU-Net's loss). ``--tiny`` builds the CPU-sized counterpart.
EXTERNAL_ROWS = {
    "monai_swinunetr": "MONAI SwinUNETR, feature size 48 (tiny: 12, depths 1-1-1-1, window 4); pip install monai",
    "monai_mednext": "MONAI MedNeXt-B, kernel 3 (tiny: MedNeXt-S with 8 initial filters); pip install monai",
}


def build_external(key: str, patch_size: Sequence[int], *, tiny: bool, num_classes: int) -> Any:
    """Builds an :data:`EXTERNAL_ROWS` network (deep supervision off); raises ``ImportError`` without MONAI."""
    try:
        with _quiet_stdout():
            from monai.networks.nets import MedNeXt, SwinUNETR
            from monai.networks.nets.mednext import create_mednext
    except ImportError as err:
        raise ImportError(f"row {key!r} needs MONAI, a benchmark-only extra: pip install monai") from err
    if key == "monai_swinunetr":
        if tiny:
            return SwinUNETR(
                INPUT_CHANNELS, num_classes, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4
            )
        return SwinUNETR(INPUT_CHANNELS, num_classes, feature_size=48)
    if key == "monai_mednext":
        if tiny:
            return MedNeXt(
                init_filters=8, in_channels=INPUT_CHANNELS, out_channels=num_classes, kernel_size=3,
                blocks_down=(2, 2, 2, 2), blocks_up=(2, 2, 2, 2), use_residual_connection=True,
            )  # fmt: skip
        return create_mednext("B", in_channels=INPUT_CHANNELS, out_channels=num_classes, kernel_size=3)
    raise KeyError(f"no external row {key!r}")


#: Row keys of registry models whose key is not the row name (short names kept from earlier result tables).
ROW_NAMES = {"plainconvunet": "plain", "resencunet_m": "resenc_m", "elanres_msca": "elanres"}


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Sends Python-level prints (nnU-Net prints on import) to stderr so that stdout carries only results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _registry() -> Any:
    with _quiet_stdout():
        from nnyseg import registry
    return registry


def architecture_specs(preset: str = "full") -> dict[str, ArchSpec]:
    """All benchmark rows, read from the model registry: the baseline first, one row per model (plus the fused
    ELANRes-MSCA-UNet), then one row per ablation switch and per speed setting that ``preset`` has
    (``<model row>_<switch>``), measured only on request."""
    registry = _registry()
    specs: dict[str, ArchSpec] = {}
    models = [n for n in registry.list_models() if not registry.get_model(n).trainers]
    models += registry.list_models(methods_only=True)
    for name in models:
        model = registry.get_model(name)
        key = ROW_NAMES.get(name, name)
        specs[key] = ArchSpec(key, name, description=model.title)
        if callable(getattr(model.network_class, "switch_to_deploy", None)):
            specs[f"{key}_fused"] = ArchSpec(
                f"{key}_fused", name, fused=True, description=f"{model.title}, after switch_to_deploy() (inference)"
            )
    for name in models:
        model = registry.get_model(name)
        key = ROW_NAMES.get(name, name)
        for switch, kwargs in model.ablations.items():
            specs[f"{key}_{switch}"] = ArchSpec(
                f"{key}_{switch}", name, description=f"{model.title}, {switch}", arch_kwargs=tuple(kwargs.items())
            )
        for setting, speed in model.speed_settings.items():
            if preset in speed.overrides:
                specs[f"{key}_{setting}"] = ArchSpec(
                    f"{key}_{setting}",
                    name,
                    description=f"{model.title}, speed setting {setting}: {speed.description}",
                    arch_kwargs=tuple(speed.overrides_for(preset).items()),
                    speed=True,
                )
    for key, description in EXTERNAL_ROWS.items():
        specs[key] = ArchSpec(key, key, description=description, external=True)
    return specs


def resolve_archs(requested: Sequence[str] | None, specs: dict[str, ArchSpec] | None = None) -> list[str]:
    """Turns ``--archs`` into row keys: ``None`` or ``all`` means every architecture (ablation, speed and MONAI rows
    excluded); ``ablations`` means each ablation row after the full network it ablates; ``speed`` each speed-setting
    row after its network; ``monai`` the MONAI rows;
    registry keys are aliases.

    The baseline ``plain`` is always included, first.

    Raises:
        ValueError: For a name that is neither a row key nor a registry key.
    """
    specs = architecture_specs() if specs is None else specs
    ablation_keys = {k for k, spec in specs.items() if spec.arch_kwargs and not spec.speed}
    speed_keys = {k for k, spec in specs.items() if spec.speed}
    external_keys = [k for k, spec in specs.items() if spec.external]
    aliases = {spec.model: spec.key for spec in specs.values() if not spec.fused and not spec.arch_kwargs}
    keys: list[str] = []
    for name in requested or ["all"]:
        if name == "all":
            keys += [k for k in specs if k not in ablation_keys | speed_keys and k not in external_keys]
        elif name == "monai":
            keys += external_keys
        elif name in ("ablations", "speed"):
            for key in ablation_keys if name == "ablations" else speed_keys:
                keys += [aliases[specs[key].model], key]
            keys = sorted(dict.fromkeys(keys), key=list(specs).index)
        else:
            key = name if name in specs else aliases.get(name)
            if key is None:
                raise ValueError(
                    f"unknown architecture {name!r}; choose from: all, ablations, speed, monai, {', '.join(specs)}"
                )
            keys.append(key)
    ordered = [BASELINE] + [k for k in keys if k != BASELINE]
    return list(dict.fromkeys(ordered))


def build_architecture(
    spec: ArchSpec,
    patch_size: Sequence[int],
    *,
    spacing: Sequence[float],
    tiny: bool,
    num_classes: int,
    input_channels: int = INPUT_CHANNELS,
) -> tuple[Any, list[int], dict]:
    """Builds ``spec``'s network with deep supervision on, as nnU-Net would from plans.

    Returns:
        ``(network, patch_size, architecture)``; the patch is the one the model's topology rule accepted.
    """
    registry = _registry()
    with _quiet_stdout():
        return registry.get_model(spec.model).build(
            list(patch_size),
            spacing=list(spacing),
            preset=registry.TINY if tiny else registry.FULL,
            input_channels=input_channels,
            num_classes=num_classes,
            deep_supervision=True,
            overrides=dict(spec.arch_kwargs),
        )


# ----------------------------------------------------------------------------------------------------------------
# nnU-Net's deep-supervision loss and targets
# ----------------------------------------------------------------------------------------------------------------
def deep_supervision_scales(strides: Sequence[Sequence[int]]) -> list[list[float]]:
    """nnU-Net's ``_get_deep_supervision_scales``: ``1 / cumprod(strides)`` per stage, without the deepest one."""
    import numpy as np

    cumulative = np.cumprod(np.vstack([list(s) for s in strides]), axis=0)
    return [[float(v) for v in 1 / row] for row in cumulative][:-1]


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """nnU-Net's loss weights: ``1 / 2**i``, the lowest-resolution output 0, normalised to sum 1."""
    if n_outputs == 1:
        return [1.0]
    weights = [1 / 2**i for i in range(n_outputs)]
    weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def make_ds_targets(target: Any, scales: Sequence[Sequence[float]]) -> list[Any]:
    """Deep-supervision targets as nnU-Net's data pipeline makes them.

    Applies batchgeneratorsv2's ``DownsampleSegForDSTransform`` (nearest-exact interpolation to
    ``round(size * scale)``, dtype kept) to every sample, as nnU-Net's training transforms do, and stacks the batch.

    Args:
        target: Integer labels ``(B, 1, *spatial)`` (a CPU tensor).
        scales: :func:`deep_supervision_scales`.

    Returns:
        One ``(B, 1, *scaled_spatial)`` tensor per scale, highest resolution first.
    """
    import torch

    with _quiet_stdout():
        from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    transform = DownsampleSegForDSTransform(ds_scales=[list(s) for s in scales])
    per_sample = [transform(segmentation=sample)["segmentation"] for sample in target]
    return [torch.stack([sample[i] for sample in per_sample]) for i in range(len(scales))]


def build_loss(n_outputs: int) -> Any:
    """nnU-Net's ``_build_loss`` for label (not region) training with deep supervision."""
    with _quiet_stdout():
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss(
        {"batch_dice": BATCH_DICE, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=None,
        dice_class=MemoryEfficientSoftDiceLoss,
    )
    return DeepSupervisionWrapper(loss, deep_supervision_weights(n_outputs))


# ----------------------------------------------------------------------------------------------------------------
# Worker: one architecture in its own process
# ----------------------------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    """GPU name for CUDA, Apple GPU for MPS, else the CPU model from ``/proc/cpuinfo`` (or ``platform``)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    if device == "mps":
        return f"Apple MPS ({platform.machine()})"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return "CPU: " + line.split(":", 1)[1].strip()
    return "CPU: " + (platform.processor() or platform.machine() or "unknown")


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def time_iterations(
    fn: Callable[[], Any], *, warmup: int, repeats: int, sync: Callable[[], None], label: str
) -> list[float]:
    """Runs ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (``sync`` around each timing)."""
    for i in range(warmup):
        fn()
        _log(f"{label}: warm-up {i + 1}/{warmup} done")
    sync()
    times = []
    for i in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        _log(f"{label}: {i + 1}/{repeats} {times[-1]:.4f} s")
    return times


def _grad_scaler() -> Any:
    """nnU-Net's CUDA GradScaler (``torch.amp`` from torch 2.3, ``torch.cuda.amp`` before)."""
    import torch

    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measures one architecture in this process (``--worker KEY``) and returns the JSON-able result."""
    import torch

    spec = architecture_specs("tiny" if args.tiny else "full")[args.worker]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    is_cuda = device.type == "cuda"
    amp = bool(args.amp) and is_cuda
    if is_cuda:
        torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.amp_dtype]

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=amp_dtype, enabled=True) if amp else contextlib.nullcontext()

    result: dict[str, Any] = {
        "arch": spec.key,
        "model": spec.model,
        "fused": spec.fused,
        "device": str(device),
        "device_name": device_name(str(device)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "amp": amp,
        "amp_dtype": args.amp_dtype if amp else None,
        "compiled": bool(args.compile),
        "memory_kind": "cuda_max_allocated" if is_cuda else "peak_rss",
        "requested_patch": list(args.patch),
        "batch": args.batch,
    }
    if spec.external:
        network = build_external(spec.key, args.patch, tiny=args.tiny, num_classes=args.num_classes)
        patch, architecture = list(args.patch), None
    else:
        network, patch, architecture = build_architecture(
            spec, args.patch, spacing=args.spacing, tiny=args.tiny, num_classes=args.num_classes
        )
    patch = [int(p) for p in patch]
    result["patch"] = patch
    result["network_class"] = type(network).__name__
    result["params_m"] = sum(p.numel() for p in network.parameters()) / 1e6
    _log(f"{spec.key}: {result['network_class']}, {result['params_m']:.3f} M parameters, patch {patch}")
    network.to(device)
    bare = network
    if args.compile:
        # nnU-Net's _do_i_compile: torch.compile on the network (CUDA only; set nnUNet_compile=f to switch off there).
        network = torch.compile(network)

    x = torch.randn(args.batch, INPUT_CHANNELS, *patch, device=device)

    def measure(phase: str, fn: Callable[[], None]) -> None:
        """Warm-up, timed repeats and (CUDA) the peak allocated memory of the timed iterations of one phase."""
        try:
            if is_cuda:
                torch.cuda.empty_cache()
            for i in range(args.warmup):
                fn()
                _log(f"{spec.key} {phase}: warm-up {i + 1}/{args.warmup} done")
            if is_cuda:
                sync()
                torch.cuda.reset_peak_memory_stats(device)
            times = time_iterations(fn, warmup=0, repeats=args.repeats, sync=sync, label=f"{spec.key} {phase}")
            result[f"{phase}_times"] = times
            result[f"{phase}_s"] = statistics.median(times)
            if is_cuda:
                result[f"peak_{phase}_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        except torch.cuda.OutOfMemoryError:
            result[f"{phase}_error"] = "OOM"
            _log(f"{spec.key} {phase}: out of memory")
        result["phases"].append(phase)

    result["phases"] = []
    # Training first, then inference: nnU-Net's order (train, then predict). Inference first would also let networks
    # cache tensors created under inference_mode that autograd then refuses in training. A fused row trains the
    # unfused network too (and does not report it): the allocator state a process reaches after training steps makes
    # later inference passes markedly faster on the CPU, so fused and unfused inference must share that history.
    if not args.forward_only:
        # One training step as nnUNetTrainer.train_step (data already on the device).
        network.train()
        set_deep_supervision(bare, True)
        scales = (
            [[1.0] * len(patch)] if spec.external else deep_supervision_scales(architecture["arch_kwargs"]["strides"])
        )
        loss_fn = build_loss(len(scales))
        target = torch.randint(0, args.num_classes, (args.batch, 1, *patch), dtype=torch.int16)
        targets = [t.to(device) for t in make_ds_targets(target, scales)]
        optimizer = torch.optim.SGD(
            network.parameters(), LEARNING_RATE, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM, nesterov=True
        )
        scaler = _grad_scaler() if amp and args.amp_dtype == "fp16" else None  # bf16 needs no loss scaling
        checked = False
        losses: list[float] = []

        def step() -> None:
            nonlocal checked
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                outputs = network(x)
                if spec.external:
                    outputs = [outputs]  # one output, nnU-Net's loss with weight 1
                if not checked:
                    check_ds_outputs(spec.key, outputs, targets)
                    checked = True
                loss = loss_fn(outputs, targets)
            losses.append(float(loss.detach()))
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(network.parameters(), GRAD_CLIP)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(network.parameters(), GRAD_CLIP)
                optimizer.step()

        measure("train", step)
        if losses:
            result["train_loss"] = losses[-1]
            result["loss_finite"] = all(math.isfinite(v) for v in losses)
        optimizer.zero_grad(set_to_none=True)  # inference holds the weights only, as nnU-Net's predictor
        del optimizer, scaler, targets, target, loss_fn
        if spec.fused:  # the fused network cannot train: that step was only there to match the process history
            for key in ("train_s", "train_times", "peak_train_gib", "train_error"):
                result.pop(key, None)
            result["phases"].remove("train")

    if spec.fused:
        from nnyseg.network_architecture.building_blocks.reparam import count_inference_parameters

        bare.eval()
        result["n_fused"] = int(bare.switch_to_deploy())
        result["params_m"] = count_inference_parameters(bare) / 1e6  # the fused kernels it runs

    network.eval()
    set_deep_supervision(bare, False)

    def infer() -> None:
        with torch.inference_mode(), autocast():
            network(x)

    measure("inference", infer)
    if not is_cuda:
        result["peak_rss_gib"] = peak_rss_gib()
    return result


def set_deep_supervision(network: Any, enabled: bool) -> None:
    """nnU-Net's switch (``network.decoder.deep_supervision``); MONAI's rows are built without it."""
    decoder = getattr(network, "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = enabled


def check_ds_outputs(key: str, outputs: Any, targets: Sequence[Any]) -> None:
    """Raises ``RuntimeError`` unless the deep-supervision outputs have the spatial shapes of nnU-Net's targets."""
    if isinstance(outputs, (list, tuple)) and [tuple(o.shape[2:]) for o in outputs] == [
        tuple(t.shape[2:]) for t in targets
    ]:
        return
    got = [tuple(o.shape) for o in outputs] if isinstance(outputs, (list, tuple)) else tuple(outputs.shape)
    raise RuntimeError(
        f"{key}: deep-supervision outputs {got} do not match nnU-Net's targets {[tuple(t.shape) for t in targets]}"
    )


def worker_main(args: argparse.Namespace) -> int:
    """Runs :func:`run_worker` with everything printed (also by C code) on stderr; the JSON alone goes to stdout."""
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    code = 0
    try:
        with _quiet_stdout():
            result = run_worker(args)
    except Exception as err:
        traceback.print_exc()
        result = {"arch": args.worker, "error": f"{type(err).__name__}: {err}"}
        code = 1
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return code


# ----------------------------------------------------------------------------------------------------------------
# Parent: run the workers, build the table, append to RESULTS.md
# ----------------------------------------------------------------------------------------------------------------
def worker_command(args: argparse.Namespace, key: str) -> list[str]:
    """The subprocess command that measures architecture ``key`` with the run's settings."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", key]
    cmd += ["--patch", *map(str, args.patch), "--batch", str(args.batch), "--device", args.device]
    cmd += ["--spacing", *map(str, args.spacing), "--num-classes", str(args.num_classes)]
    cmd += ["--warmup", str(args.warmup), "--repeats", str(args.repeats), "--amp" if args.amp else "--no-amp"]
    cmd += ["--amp-dtype", args.amp_dtype] + (["--compile"] if args.compile else [])
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.tiny:
        cmd.append("--tiny")
    if args.forward_only:
        cmd.append("--forward-only")
    return cmd


def run_architecture(args: argparse.Namespace, key: str) -> dict[str, Any]:
    """Runs one worker subprocess (its stderr passes through as progress) and returns its parsed JSON result."""
    proc = subprocess.run(worker_command(args, key), stdout=subprocess.PIPE, text=True, encoding="utf-8", check=False)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    with contextlib.suppress(IndexError, json.JSONDecodeError):
        result = json.loads(lines[-1])
        if proc.returncode != 0 and "error" not in result:
            result["error"] = f"worker exited with code {proc.returncode}"
        return result
    reason = f"worker exited with code {proc.returncode} and no result"
    if proc.returncode < 0:
        reason += f" (signal {-proc.returncode}{', probably out of memory' if proc.returncode == -9 else ''})"
    return {"arch": key, "error": reason}


def _num(value: float | None) -> str:
    """Three significant figures, no exponent for values >= 1e-4; ``n/a`` for None."""
    if value is None:
        return NA
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:#.3g}"


def _ratio(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None or baseline <= 0:
        return NA
    return f"{value / baseline:.2f}"


def _patch(patch: Sequence[int] | None) -> str:
    return "x".join(f"{p:g}" for p in patch) if patch else NA


def memory_cells(row: dict[str, Any], base: dict[str, Any]) -> tuple[float | None, float | None]:
    """The row's peak memory for the table and the baseline value its ratio is taken against.

    CUDA: the training-step peak, or the inference peak for rows without a training step, against plain's peak of the
    same phase. CPU/MPS: the worker's whole-process peak RSS, against plain's only if both ran the same phases.
    """
    if row.get("memory_kind") == "cuda_max_allocated":
        phase = "train" if row.get("peak_train_gib") is not None else "inference"
        return row.get(f"peak_{phase}_gib"), base.get(f"peak_{phase}_gib")
    same_phases = row.get("phases") == base.get("phases")
    return row.get("peak_rss_gib"), base.get("peak_rss_gib") if same_phases else None


def memory_header(results: Sequence[dict[str, Any]], device: str) -> str:
    """The peak-memory column header, naming what was measured."""
    kinds = {r.get("memory_kind") for r in results if r.get("memory_kind")}
    kind = kinds.pop() if len(kinds) == 1 else ("cuda_max_allocated" if device.startswith("cuda") else "peak_rss")
    return "peak mem (GiB, CUDA max allocated)" if kind == "cuda_max_allocated" else "peak mem (GiB, worker peak RSS)"


def format_table(results: Sequence[dict[str, Any]], device: str) -> str:
    """The Markdown table: one row per architecture, ratios against the ``plain`` row."""
    base = next((r for r in results if r.get("arch") == BASELINE), {})
    header = [
        "architecture",
        "network class",
        "patch",
        "params (M)",
        "train step (s)",
        "x plain",
        "inference (s)",
        "x plain",
        memory_header(results, device),
        "x plain",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 7) + "|"]
    for r in results:
        failed = "error" in r
        train = r.get("train_s")
        infer = r.get("inference_s")
        mem, base_mem = memory_cells(r, base)
        train_cell = "error" if failed else r.get("train_error") or _num(train)
        infer_cell = "error" if failed else r.get("inference_error") or _num(infer)
        cells = [
            r.get("arch", "?"),
            r.get("network_class", NA),
            _patch(r.get("patch")),
            _num(r.get("params_m")),
            train_cell,
            _ratio(train, base.get("train_s")),
            infer_cell,
            _ratio(infer, base.get("inference_s")),
            "error" if failed else _num(mem),
            _ratio(mem, base_mem),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def command_line(argv: Sequence[str]) -> str:
    """The command as typed, reconstructed from the arguments."""
    return "python benchmarks/bench.py" + ("".join(" " + shlex.quote(a) for a in argv))


def format_section(
    args: argparse.Namespace,
    argv: Sequence[str],
    results: Sequence[dict[str, Any]],
    *,
    started: dt.datetime,
    wall_s: float,
) -> str:
    """One RESULTS.md section: heading, command line, settings, table and notes."""
    info = next((r for r in results if "error" not in r), {})
    import torch

    dev_name = info.get("device_name") or device_name(args.device)
    threads = info.get("threads") or args.threads or torch.get_num_threads()
    preset = "tiny" if args.tiny else "full"
    heading = (
        f"## {started:%Y-%m-%d %H:%M} UTC, {dev_name}, torch {info.get('torch', torch.__version__)}, "
        f"{threads} thread{'s' if threads != 1 else ''}, patch {_patch(args.patch)}, batch {args.batch}, "
        f"{preset} preset"
    )
    amp = bool(args.amp) and args.device.startswith("cuda")
    settings = (
        f"Device `{args.device}`; warm-up {args.warmup}, timed repeats {args.repeats} (median reported); "
        f"AMP {_amp_text(args.amp_dtype) if amp else 'off'}; torch.compile {'on' if args.compile else 'off'}; "
        f"spacing {_patch(args.spacing)}; "
        f"{args.num_classes} classes, {INPUT_CHANNELS} input channel; "
        f"{'training steps skipped (--forward-only); ' if args.forward_only else ''}"
        f"total wall time {wall_s:.0f} s."
    )
    if args.note:
        settings = f"Note: {args.note}\n\n{settings}"
    notes = []
    cuda = any(r.get("memory_kind") == "cuda_max_allocated" for r in results)
    if cuda and not args.forward_only:
        notes.append(
            "peak mem: max_memory_allocated during the timed training steps; rows whose train step is n/a show the "
            "peak of their timed inference passes, and their x plain is against plain's inference peak."
        )
        base_peak = next((r.get("peak_inference_gib") for r in results if r.get("arch") == BASELINE), None)
        peaks = [
            f"{r['arch']} {_num(r['peak_inference_gib'])} ({_ratio(r['peak_inference_gib'], base_peak)})"
            for r in results
            if r.get("peak_inference_gib") is not None
        ]
        if peaks:
            notes.append("inference peak mem in GiB (x plain): " + ", ".join(peaks) + ".")
    elif not cuda:
        notes.append(
            "peak mem: peak RSS of the worker process over its whole run (Python, torch and nnU-Net imports, the "
            "network, then "
            + ("the inference passes" if args.forward_only else "the training steps, then the inference passes")
            + "); x plain is n/a for a row whose worker ran other phases than plain's (an inference-only row)."
        )
    for r in results:
        if r.get("patch") and list(r["patch"]) != list(args.patch):
            notes.append(
                f"{r['arch']}: patch adjusted by its topology rule from {_patch(args.patch)} to {_patch(r['patch'])}; "
                "its row is not at the same patch as the others."
            )
        if r.get("n_fused") is not None:
            notes.append(f"{r['arch']}: {r['n_fused']} RepConv modules fused by switch_to_deploy().")
        if "error" in r:
            notes.append(f"{r.get('arch')}: failed: {r['error']}")
        if r.get("loss_finite") is False:
            notes.append(f"{r['arch']}: the training loss was not finite in this precision (last {r['train_loss']}).")
    finite = [r["arch"] for r in results if r.get("loss_finite")]
    if finite and not args.forward_only:
        notes.append("finite training loss in every timed step: " + ", ".join(finite) + ".")
    parts = [heading, "", "```bash", command_line(argv), "```", "", settings, "", format_table(results, args.device)]
    if notes:
        parts += [""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def _amp_text(dtype: str) -> str:
    return "on (autocast fp16 + GradScaler, as nnU-Net)" if dtype == "fp16" else "on (autocast bf16, no GradScaler)"


def append_section(path: Path, section: str) -> None:
    """Appends ``section`` to ``path`` atomically (temp file + ``os.replace``), creating it with a header if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text(encoding="utf-8") if path.exists() else RESULTS_HEADER
    if not existing.endswith("\n"):
        existing += "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(existing + "\n" + section)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (shared by the parent run and its ``--worker`` subprocesses)."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description=(
            "Benchmark nnyseg's networks side by side with nnU-Net's PlainConvUNet: parameters, training-step and "
            "inference time, peak memory, each also as a ratio to PlainConvUNet from the same run. Each architecture "
            "runs in its own subprocess; the table is printed and appended to the results file."
        ),
    )
    parser.add_argument(
        "--archs",
        nargs="+",
        default=None,
        metavar="NAME",
        help="architectures to measure (default: all): one row per model of nnyseg.registry (plain, resenc_m, "
        "elanres, elanres_fused, nnynet, dyntransnet), 'ablations' for every ablation switch, 'speed' for every "
        "speed setting of the preset, 'monai' for MONAI's SwinUNETR and MedNeXt; plain is always added",
    )
    parser.add_argument(
        "--patch", nargs=3, type=int, default=[64, 64, 64], metavar=("D", "H", "W"), help="patch size (default: 64^3)"
    )
    parser.add_argument("--batch", type=int, default=2, help="batch size (default: 2)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda", "mps"], default=None, help="default: cuda if available, else cpu"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny CPU presets of every architecture")
    parser.add_argument(
        "--spacing",
        nargs=3,
        type=float,
        default=[1.0, 1.0, 1.0],
        metavar=("SD", "SH", "SW"),
        help="voxel spacing used by the topology rule (default: 1 1 1)",
    )
    parser.add_argument("--forward-only", action="store_true", help="skip training steps (inference only)")
    parser.add_argument("--num-classes", type=int, default=3, help="output classes incl. background (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per phase (default: 1)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed iterations per phase, median reported (default: 3)"
    )
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="autocast fp16 + GradScaler on CUDA, as nnU-Net trains and predicts (default: on; ignored on cpu/mps)",
    )
    parser.add_argument(
        "--amp-dtype",
        choices=["fp16", "bf16"],
        default="fp16",
        help="autocast dtype on CUDA: fp16 with GradScaler (nnU-Net's) or bf16 without (default: %(default)s)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the network, as nnU-Net does on CUDA (nnUNet_compile)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help="Markdown file to append to (default: benchmarks/RESULTS.md)",
    )
    parser.add_argument("--no-append", action="store_true", help="print the table only")
    parser.add_argument("--note", default=None, help="free text added to the section")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark (or, with ``--worker``, one architecture's measurement) and returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = _default_device()
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0 or args.num_classes < 2:
        parser.error("need --batch >= 1, --repeats >= 1, --warmup >= 0 and --num-classes >= 2")
    if args.worker:
        return worker_main(args)

    try:
        keys = resolve_archs(args.archs, architecture_specs("tiny" if args.tiny else "full"))
    except ValueError as err:
        parser.error(str(err))
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    results = []
    for i, key in enumerate(keys, 1):
        print(f"[{i}/{len(keys)}] {key} ...", file=sys.stderr, flush=True)
        t_arch = time.perf_counter()
        result = run_architecture(args, key)
        results.append(result)
        status = f"failed: {result['error']}" if "error" in result else "done"
        print(f"[{i}/{len(keys)}] {key} {status} ({time.perf_counter() - t_arch:.0f} s)", file=sys.stderr, flush=True)
        if result.get("patch") and list(result["patch"]) != list(args.patch):
            print(
                f"WARNING: {key} runs at patch {_patch(result['patch'])}, not the requested {_patch(args.patch)} "
                "(its topology rule adjusted it)",
                file=sys.stderr,
            )
    section = format_section(args, argv, results, started=started, wall_s=time.perf_counter() - t0)
    print(section)
    if not args.no_append:
        append_section(args.results, section)
        print(f"appended to {args.results}", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
