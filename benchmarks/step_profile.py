"""Where the time of a training step goes: forward and backward time per top-level module and per block type.

Each network of the model registry (``nnyseg.registry``) is built at the requested patch and preset, and one nnU-Net
training step (deep supervision on, nnU-Net's Dice + CE with its weights, backward) is timed module by module:
forward from a module's forward pre-hook to its forward hook during the step, backward by replaying each module call
on its recorded inputs and timing the backward pass of that call alone. Time of nested modules is counted in their
parents too; the tables show, per network, the top-level children of the network and of its encoder/decoder, and
every block class (inclusive time, summed over its instances). The peak memory is the worker's peak RSS on the CPU
or ``torch.cuda.max_memory_allocated`` on CUDA. Each network runs in its own subprocess. The result is printed and,
unless ``--no-append``, appended to ``benchmarks/RESULTS.md``::

    python benchmarks/step_profile.py --patch 64 64 64 --batch 2 --device cpu
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (the benchmark's registry rows, loss and targets)

MODELS = ("plainconvunet", "nnynet", "dyntransnet", "elanres_msca")
#: Module classes too small to be worth a row of their own (they are inside the blocks that are listed).
SKIP_TYPES = {
    *("Conv3d", "ConvTranspose3d", "Linear", "LayerNorm", "GELU", "LeakyReLU", "Dropout", "Identity"),
    *("InstanceNorm3d", "BatchNorm3d", "GroupNorm", "ModuleList", "Sequential", "DropPath", "Softmax"),
}


def _detached(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().clone().requires_grad_(True)
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


def _tensors(value: Any) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def profile_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    key = bench.ROW_NAMES.get(args.worker, args.worker)
    spec = bench.architecture_specs()[key]
    network, patch, architecture = bench.build_architecture(
        spec, args.patch, spacing=[1.0, 1.0, 1.0], tiny=args.tiny, num_classes=3
    )
    network.to(device).train()
    network.decoder.deep_supervision = True
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    forward: dict[str, float] = defaultdict(float)
    backward: dict[str, float] = defaultdict(float)
    starts: dict[tuple[int, str], float] = {}
    calls: list[tuple[str, Any, tuple]] = []
    handles = []
    recording = {"on": False}

    def add(name: str, module: Any) -> None:
        def fwd_pre(mod, inputs):
            sync()
            starts[(id(mod), name)] = time.perf_counter()

        def fwd_post(mod, inputs, output):
            sync()
            forward[name] += time.perf_counter() - starts.pop((id(mod), name))
            if recording["on"]:
                calls.append((name, mod, tuple(_detached(i) for i in inputs)))

        handles.extend([module.register_forward_pre_hook(fwd_pre), module.register_forward_hook(fwd_post)])

    top = {}
    for name, child in network.named_children():
        top[name] = child
        if name in ("encoder", "decoder"):
            for sub, grandchild in child.named_children():
                if all(grandchild is not m for m in top.values()):  # nnU-Net's decoder holds the encoder too
                    top[f"{name}.{sub}"] = grandchild
    for name, module in top.items():
        add(f"module {name}", module)
    for module in network.modules():
        kind = type(module).__name__
        if module is not network and kind not in SKIP_TYPES and module not in top.values():
            add(f"block {kind}", module)

    scales = bench.deep_supervision_scales(architecture["arch_kwargs"]["strides"])
    loss_fn = bench.build_loss(len(scales))
    x = torch.randn(args.batch, 1, *patch, device=device)
    target = torch.randint(0, 3, (args.batch, 1, *patch), dtype=torch.int16)
    targets = [t.to(device) for t in bench.make_ds_targets(target, scales)]

    def step() -> tuple[float, float]:
        network.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        loss = loss_fn(network(x), targets)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        return t1 - t0, time.perf_counter() - t1

    step()  # warm-up, not recorded
    forward.clear()
    recording["on"] = True
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fwd_total, bwd_total = step()
    recording["on"] = False
    for handle in handles:
        handle.remove()
    # Backward per module: replay each recorded call on its recorded inputs and time the backward pass alone (module
    # backward hooks clash with in-place activations).
    failed: set[str] = set()
    for name, module, inputs in calls:
        try:
            out = module(*inputs)
            loss = sum(o.float().mean() for o in _tensors(out))
            sync()
            t0 = time.perf_counter()
            loss.backward()
            sync()
        except (ValueError, RuntimeError, TypeError):  # a module that needs its parent's state (window attention)
            failed.add(name)
            continue
        backward[name] += time.perf_counter() - t0
        module.zero_grad(set_to_none=True)
    result = {
        "model": args.worker,
        "network_class": type(network).__name__,
        "patch": patch,
        "params_m": sum(p.numel() for p in network.parameters()) / 1e6,
        "forward_s": fwd_total,
        "backward_s": bwd_total,
        "rows": {
            k: [forward.get(k, 0.0), None if k in failed else backward.get(k, 0.0)]
            for k in sorted(set(forward) | set(backward))
        },
        "params_by_module": {name: sum(p.numel() for p in module.parameters()) / 1e6 for name, module in top.items()},
    }
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        result["peak_gib"] = bench.peak_rss_gib()
    return result


def format_section(args: argparse.Namespace, argv: list[str], results: list[dict[str, Any]], wall_s: float) -> str:
    started = dt.datetime.now(dt.timezone.utc)
    lines = [
        f"## {started:%Y-%m-%d %H:%M} UTC, profile of one training step, patch {bench._patch(args.patch)}, batch "
        f"{args.batch}, {'tiny' if args.tiny else 'full'} preset, {bench.device_name(args.device)}",
        "",
        "```bash",
        "python benchmarks/step_profile.py " + " ".join(argv),
        "```",
        "",
        "Forward and backward seconds of one training step (after one warm-up step), per top-level module and per "
        "block class (inclusive of nested modules; a block class sums its instances), with the share of the whole "
        "step (n/a: a block that cannot run outside its parent). Backward times come from replaying each call "
        "alone, so shares are approximate and need not add up to 100 %. "
        f"Wall time {wall_s:.0f} s.",
    ]
    for r in results:
        step = r["forward_s"] + r["backward_s"]
        lines += [
            "",
            f"### {r['model']} ({r['network_class']}, {r['params_m']:.1f} M parameters, patch "
            f"{bench._patch(r['patch'])}): step {step:.2f} s (forward {r['forward_s']:.2f} s, backward "
            f"{r['backward_s']:.2f} s), peak memory {r['peak_gib']:.2f} GiB",
            "",
            "| part | params (M) | forward (s) | backward (s) | share of step |",
            "|---|---:|---:|---:|---:|",
        ]
        rows = sorted(r["rows"].items(), key=lambda kv: (not kv[0].startswith("module"), -kv[1][0] - (kv[1][1] or 0)))
        for name, (f, b) in rows:
            params = r["params_by_module"].get(name.removeprefix("module "), None)
            cell = f"{params:.2f}" if params is not None else ""
            back = "n/a" if b is None else f"{b:.2f}"
            lines.append(f"| {name} | {cell} | {f:.2f} | {back} | {100 * (f + (b or 0)) / step:.0f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", nargs=3, type=int, default=[64, 64, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(profile_worker(args)))
        return 0
    start = time.time()
    results = []
    for model in args.models:
        cmd = [sys.executable, __file__, "--worker", model, "--patch", *map(str, args.patch), "--batch",
               str(args.batch), "--device", args.device] + (["--tiny"] if args.tiny else [])  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{model}: {results[-1]['forward_s'] + results[-1]['backward_s']:.2f} s", file=sys.stderr, flush=True)
    section = format_section(args, argv, results, time.time() - start)
    print(section)
    if not args.no_append:
        bench.append_section(bench.DEFAULT_RESULTS, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
