"""The benchmark harness (benchmarks/bench.py): one tiny CPU run end to end, nnU-Net's DS targets, appending."""

from __future__ import annotations

import os
import re
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO, load_benchmark_script

ARCHS = ["plain", "elanres", "elanres_fused", "nnynet"]
TINY_ARGS = [
    "--tiny",
    "--patch",
    "32",
    "32",
    "32",
    "--batch",
    "1",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--device",
    "cpu",
    "--archs",
    *ARCHS,
]
# Column indexes of the results table.
TRAIN, TRAIN_X, INFER, INFER_X, MEM, MEM_X = 4, 5, 6, 7, 8, 9


bench = load_benchmark_script("bench")


def _sections(text: str) -> list[str]:
    """The run sections of a results file (each starts with a level-2 heading)."""
    return ["## " + part for part in re.split(r"^## ", text, flags=re.MULTILINE)[1:]]


def _table(section: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header cells, architecture -> row cells) of the section's table."""
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip().strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), line
        rows[cells[0]] = cells
    return header, rows


def _positive(cell: str) -> bool:
    try:
        return float(cell) > 0
    except ValueError:
        return False


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> SimpleNamespace:
    """One tiny harness run on the CPU (all four workers), shared by the tests below."""
    results = tmp_path_factory.mktemp("bench") / "R.md"
    argv = [*TINY_ARGS, "--results", str(results)]
    start = time.perf_counter()
    code = bench.main(argv)
    elapsed = time.perf_counter() - start
    return SimpleNamespace(
        code=code, results=results, argv=argv, text=results.read_text(encoding="utf-8"), elapsed=elapsed
    )


def test_tiny_run_writes_one_section_with_the_command_line(tiny_run):
    assert tiny_run.code == 0
    assert tiny_run.text.startswith("# nnyseg benchmarks")  # header of a new results file
    sections = _sections(tiny_run.text)
    assert len(sections) == 1
    heading = sections[0].splitlines()[0]
    assert "UTC" in heading and "torch" in heading and "patch 32x32x32" in heading and "batch 1" in heading
    assert "tiny preset" in heading and "threads" in heading and "CPU" in heading
    command = "python benchmarks/bench.py " + " ".join([*TINY_ARGS, "--results", str(tiny_run.results)])
    assert f"```bash\n{command}\n```" in sections[0]


def test_tiny_run_has_a_row_per_architecture_with_sane_numbers(tiny_run):
    header, rows = _table(_sections(tiny_run.text)[0])
    assert header[:4] == ["architecture", "network class", "patch", "params (M)"]
    assert header[TRAIN] == "train step (s)" and header[INFER] == "inference (s)"
    assert header[MEM].startswith("peak mem (GiB") and "RSS" in header[MEM]
    assert [header[i] for i in (TRAIN_X, INFER_X, MEM_X)] == ["x plain"] * 3
    assert list(rows) == ARCHS
    assert rows["plain"][1] == "PlainConvUNet"
    assert rows["elanres"][1] == rows["elanres_fused"][1] == "ELANResMSCAUNet"
    assert rows["nnynet"][1] == "SwinNeXtUNet"
    for arch, cells in rows.items():
        assert cells[2] == "32x32x32", arch
        assert _positive(cells[3]), (arch, cells)
        for col in (INFER, INFER_X, MEM):
            assert _positive(cells[col]), (arch, col, cells)
        if arch == "elanres_fused":  # inference only
            assert cells[TRAIN] == cells[TRAIN_X] == "n/a"
            assert cells[MEM_X] == "n/a"  # CPU: its worker's RSS is not comparable with a worker that trained
        else:
            for col in (TRAIN, TRAIN_X, MEM_X):
                assert _positive(cells[col]), (arch, col, cells)
    assert [rows["plain"][i] for i in (TRAIN_X, INFER_X, MEM_X)] == ["1.00", "1.00", "1.00"]
    # Fusing folds the RepConv branches: fewer parameters than the training-time network.
    assert float(rows["elanres_fused"][3]) < float(rows["elanres"][3])
    print(f"tiny benchmark run: {tiny_run.elapsed:.1f} s")


def test_deep_supervision_scales_and_weights_are_nnunets():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    scales = bench.deep_supervision_scales(strides)
    assert scales == [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [0.5, 0.25, 0.25]]
    # nnU-Net's own methods, called on a stand-in for the trainer.
    trainer = SimpleNamespace(
        enable_deep_supervision=True,
        configuration_manager=SimpleNamespace(pool_op_kernel_sizes=strides, batch_dice=bench.BATCH_DICE),
        label_manager=SimpleNamespace(has_regions=False, ignore_label=None),
        is_ddp=False,
        _do_i_compile=lambda: False,
    )
    nnunet_scales = nnUNetTrainer._get_deep_supervision_scales(trainer)
    assert [[float(v) for v in s] for s in nnunet_scales] == scales
    trainer._get_deep_supervision_scales = lambda: nnunet_scales
    nnunet_loss = nnUNetTrainer._build_loss(trainer)
    ours = bench.build_loss(len(scales))
    assert list(ours.weight_factors) == pytest.approx(list(nnunet_loss.weight_factors))
    assert bench.deep_supervision_weights(4) == pytest.approx([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0])
    assert type(ours.loss).__name__ == type(nnunet_loss.loss).__name__ == "DC_and_CE_loss"


def test_ds_targets_have_nnunets_shapes():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    target = torch.randint(0, 3, (2, 1, 20, 50, 40), dtype=torch.int16)
    targets = bench.make_ds_targets(target, bench.deep_supervision_scales(strides))
    # round(size * scale) per axis, as batchgeneratorsv2's DownsampleSegForDSTransform (round(12.5) == 12).
    assert [tuple(t.shape) for t in targets] == [(2, 1, 20, 50, 40), (2, 1, 20, 25, 20), (2, 1, 10, 12, 10)]
    assert torch.equal(targets[0], target)
    expected = torch.nn.functional.interpolate(target.float(), size=(10, 12, 10), mode="nearest-exact")
    assert torch.equal(targets[2], expected.to(torch.int16))
    assert all(t.dtype == torch.int16 for t in targets)


@pytest.mark.parametrize("key", ["plain", "nnynet"])
def test_ds_targets_match_the_network_outputs(key):
    specs = bench.architecture_specs()
    network, patch, architecture = bench.build_architecture(
        specs[key], [32, 32, 32], spacing=[1, 1, 1], tiny=True, num_classes=3
    )
    scales = bench.deep_supervision_scales(architecture["arch_kwargs"]["strides"])
    target = torch.randint(0, 3, (1, 1, *patch), dtype=torch.int16)
    targets = bench.make_ds_targets(target, scales)
    with torch.no_grad():
        outputs = network(torch.randn(1, 1, *patch))
    bench.check_ds_outputs(key, outputs, targets)
    assert [o.shape[2:] for o in outputs] == [t.shape[2:] for t in targets]


def test_architecture_selection():
    from nnyseg.registry import MODELS

    keys = bench.resolve_archs(None)
    assert keys[:2] == ["plain", "resenc_m"]
    assert {"nnynet", "dyntransnet", "elanres", "elanres_fused"} <= set(keys)
    specs = bench.architecture_specs()
    assert {specs[k].model for k in keys} == set(MODELS)  # every registry model is a row
    assert not any(specs[k].arch_kwargs for k in keys)  # ablation rows only on request
    ablations = bench.resolve_archs(["ablations"])
    switched = {
        f"{bench.ROW_NAMES.get(name, name)}_{switch}" for name, spec in MODELS.items() for switch in spec.ablations
    }
    assert switched == {k for k in ablations if specs[k].arch_kwargs}
    assert {"dyntransnet_no_dmsa", "nnynet_ca_off", "nnynet_film_bottleneck"} <= switched
    assert ablations.index("dyntransnet") < ablations.index("dyntransnet_no_rm")  # the full network, then its switches
    assert bench.resolve_archs(["nnynet", "elanres_msca"]) == ["plain", "nnynet", "elanres"]  # plain added first
    with pytest.raises(ValueError, match="unknown architecture"):
        bench.resolve_archs(["nope"])
    with pytest.raises(SystemExit):
        bench.main(["--archs", "nope", "--no-append"])


def test_speed_rows_follow_the_registry_and_the_preset():
    from nnyseg.registry import MODELS

    full, tiny = bench.resolve_archs(["speed"]), bench.resolve_archs(["speed"], bench.architecture_specs("tiny"))
    specs = bench.architecture_specs()
    expected = {
        f"{bench.ROW_NAMES.get(n, n)}_{s}" for n, spec in MODELS.items() for s, v in spec.speed_settings.items()
    }
    assert {k for k in full if specs[k].speed} == expected and "nnynet_light_full_res" in expected
    assert full.index("nnynet") < full.index("nnynet_light_full_res")  # each row beside the network it lightens
    assert "nnynet_light_full_res" in tiny and "nnynet_window_4" not in tiny  # the tiny preset's window is 4 already
    assert dict(specs["nnynet_light_full_res"].arch_kwargs) == {"decoder_blocks": [2, 2, 2, 2, 0]}
    assert not any(specs[k].speed for k in bench.resolve_archs(["all", "ablations"]))


def test_monai_rows_only_on_request():
    specs = bench.architecture_specs()
    assert not any(specs[k].external for k in bench.resolve_archs(["all"]))
    assert bench.resolve_archs(["monai"]) == ["plain", "monai_swinunetr", "monai_mednext"]
    assert bench.resolve_archs(["nnynet", "monai_swinunetr"]) == ["plain", "nnynet", "monai_swinunetr"]


@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "full"])
def test_monai_rows_build_the_published_networks(tiny):
    pytest.importorskip("monai")
    swin = bench.build_external("monai_swinunetr", [64, 64, 64], tiny=tiny, num_classes=3)
    mednext = bench.build_external("monai_mednext", [64, 64, 64], tiny=tiny, num_classes=3)
    assert type(swin).__name__ == "SwinUNETR" and type(mednext).__name__ == "MedNeXt"
    n_swin = sum(p.numel() for p in swin.parameters()) / 1e6
    if not tiny:
        assert 60 < n_swin < 65  # SwinUNETR at feature size 48: 62.2 M parameters
    with torch.no_grad():
        assert mednext(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def _fake_result(key: str, patch: list[int], train: float | None, infer: float) -> dict:
    result = {
        "arch": key,
        "network_class": "FakeNet",
        "patch": patch,
        "params_m": 1.5,
        "device_name": "CPU: Fake",
        "torch": torch.__version__,
        "threads": 2,
        "memory_kind": "peak_rss",
        "phases": ["inference"] if train is None else ["train", "inference"],
        "inference_s": infer,
        "peak_rss_gib": 1.25,
    }
    if train is not None:
        result["train_s"] = train
    return result


def test_second_run_appends_a_section_without_touching_the_first(tmp_path, monkeypatch):
    results = tmp_path / "R.md"
    first = bench.format_section(
        bench.build_parser().parse_args(["--device", "cpu"]),
        ["--device", "cpu"],
        [_fake_result("plain", [64, 64, 64], 2.0, 0.5)],
        started=bench.dt.datetime(2024, 1, 2, 3, 4, tzinfo=bench.dt.timezone.utc),
        wall_s=1.0,
    )
    bench.append_section(results, first)
    before = results.read_bytes()
    assert len(_sections(before.decode())) == 1

    fakes = {
        "plain": _fake_result("plain", [64, 64, 64], 2.0, 0.5),
        "nnynet": _fake_result("nnynet", [64, 64, 64], 3.0, 1.0),
        "elanres_fused": _fake_result("elanres_fused", [64, 64, 64], None, 0.25),
    }
    fakes["nnynet"]["patch"] = [64, 64, 96]
    monkeypatch.setattr(bench, "run_architecture", lambda args, key: fakes[key])
    argv = ["--device", "cpu", "--archs", "nnynet", "elanres_fused", "--results", str(results), "--note", "2nd"]
    assert bench.main(argv) == 0

    after = results.read_bytes()
    assert after.startswith(before)  # the first section is untouched
    sections = _sections(after.decode())
    assert len(sections) == 2
    second = sections[1]
    assert "```bash\npython benchmarks/bench.py " + " ".join(argv) + "\n```" in second
    assert "Note: 2nd" in second
    _, rows = _table(second)
    assert list(rows) == ["plain", "nnynet", "elanres_fused"]
    assert rows["nnynet"][TRAIN_X] == "1.50" and rows["nnynet"][INFER_X] == "2.00"
    assert rows["elanres_fused"][TRAIN] == "n/a" and rows["elanres_fused"][INFER_X] == "0.50"
    assert "nnynet: patch adjusted" in second and "64x64x96" in second
    assert not list(tmp_path.glob(".R.md.*"))  # no temp file left behind


def test_no_append_prints_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_architecture", lambda args, key: _fake_result(key, [64, 64, 64], 2.0, 0.5))
    results = tmp_path / "R.md"
    assert bench.main(["--device", "cpu", "--archs", "plain", "--results", str(results), "--no-append"]) == 0
    assert not results.exists()
    assert "| plain | FakeNet | 64x64x64 |" in capsys.readouterr().out


def test_an_ablation_row_builds_the_switched_network():
    specs = bench.architecture_specs()
    full, _, full_arch = bench.build_architecture(
        specs["dyntransnet"], [32, 32, 32], spacing=[1, 1, 1], tiny=True, num_classes=3
    )
    ablated, _, arch = bench.build_architecture(
        specs["dyntransnet_no_rm"], [32, 32, 32], spacing=[1, 1, 1], tiny=True, num_classes=3
    )
    assert arch["arch_kwargs"] == {**full_arch["arch_kwargs"], "residual_module": False}
    n_full, n_ablated = (sum(p.numel() for p in net.parameters()) for net in (full, ablated))
    assert n_ablated < n_full  # the Residual Modules' convolutions are gone


def test_gpu_script_forwards_precision_and_compile_and_needs_cuda():
    import subprocess

    args = bench.build_parser().parse_args(["--device", "cuda", "--amp-dtype", "bf16", "--compile"])
    cmd = bench.worker_command(args, "nnynet")
    assert cmd[cmd.index("--amp-dtype") + 1] == "bf16" and "--compile" in cmd
    script = REPO / "benchmarks" / "gpu.sh"
    text = script.read_text(encoding="utf-8")
    assert "--patch 128 128 128 --batch 2" in text and all(
        f'"{d} {c}"' in text for d in ("fp16", "bf16") for c in ("off", "on")
    )
    if not torch.cuda.is_available():  # the script measures nothing without a GPU, and says so
        result = subprocess.run(
            ["bash", str(script)], capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}
        )
        assert result.returncode == 2 and "no CUDA device" in result.stderr
