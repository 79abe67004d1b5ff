"""The model registry: every model listed, built from each preset, estimated, and ablated, as the trainers use it."""

from __future__ import annotations

import itertools
import json
import pydoc

import numpy as np
import pytest
import torch

from nnyseg.registry import (
    FULL,
    MODELS,
    PLANS_MODEL_KEY,
    TINY,
    AdaptationError,
    ConvUNetTopology,
    IsotropicTopology,
    adapt_configuration,
    estimate_memory,
    get_model,
    list_models,
    memory_budget,
    model_for_network,
)


@pytest.mark.parametrize("name", list_models())
def test_entry_is_consistent(name):
    spec = get_model(name)
    assert spec.name == name and set(spec.presets) == {FULL, TINY}
    assert pydoc.locate(spec.network_class_name) is spec.network_class  # the class path nnU-Net resolves
    assert model_for_network(spec.network_class_name) is spec
    assert model_for_network(spec.network_class.__name__) is spec
    tiny = spec.preset(TINY)
    assert tiny.max_patch_voxels and tiny.batch_size == 2 and tiny.trainer_settings["num_epochs"] >= 1
    assert "never for real data" in tiny.description


@pytest.mark.parametrize("name", list_models())
def test_cpu_preset_builds_and_runs_with_deep_supervision(name):
    spec = get_model(name)
    network, patch, architecture = spec.build([32, 64, 64], preset=TINY, num_classes=3)
    json.dumps(architecture)  # plain JSON, as plans hold it
    assert sum(p.numel() for p in network.parameters()) < 5e6  # "tiny" means it trains on a CPU
    with torch.no_grad():
        outputs = network.eval()(torch.zeros(1, 1, *patch))
    strides = np.array(architecture["arch_kwargs"]["strides"])
    assert outputs[0].shape == (1, 3, *patch)
    for output, scale in zip(outputs, np.cumprod(strides, axis=0), strict=False):
        assert tuple(output.shape[2:]) == tuple(int(p // s) for p, s in zip(patch, scale, strict=True))


@pytest.mark.parametrize("name", list_models())
def test_memory_estimate_grows_with_the_patch_and_the_preset(name):
    spec = get_model(name)
    _, full = spec.architecture([1.0, 1.0, 1.0], [128, 128, 128], FULL)
    _, tiny = spec.architecture([1.0, 1.0, 1.0], [128, 128, 128], TINY)
    sizes = ([64, 64, 64], [64, 64, 96], [96, 128, 128], [128, 128, 128])
    values = [estimate_memory(full, s, 1, 3) for s in sizes]
    assert all(b > a > 0 for a, b in itertools.pairwise(values))
    assert estimate_memory(tiny, sizes[-1], 1, 3) < values[-1]


@pytest.mark.parametrize(("name", "switch"), [(n, s) for n in list_models() for s in get_model(n).ablations])
def test_each_ablation_switch_builds_a_different_network(name, switch):
    spec = get_model(name)
    overrides = spec.ablations[switch]
    full, _, full_arch = spec.build([32, 64, 64], preset=TINY)
    ablated, _, arch = spec.build([32, 64, 64], preset=TINY, overrides=overrides)
    assert arch["arch_kwargs"] == {**full_arch["arch_kwargs"], **overrides}
    assert set(full.state_dict()) != set(ablated.state_dict()) or any(
        a.shape != b.shape for a, b in zip(full.state_dict().values(), ablated.state_dict().values(), strict=False)
    )


@pytest.mark.parametrize(
    ("name", "setting", "preset"),
    [(n, s, p) for n in list_models() for s, v in get_model(n).speed_settings.items() for p in v.overrides],
)
def test_each_speed_setting_builds_a_lighter_network_that_runs(name, setting, preset):
    """A speed setting changes the preset's network (the paper's stays the default) and needs less feature-map
    memory at the same patch; the lighter network still produces nnU-Net's deep-supervision outputs."""
    spec = get_model(name)
    overrides = spec.speed_settings[setting].overrides_for(preset)
    assert not overrides.items() <= dict(spec.preset(preset).arch_kwargs).items()  # not already the default
    reference, patch, ref_arch = spec.build([32, 32, 32], preset=preset, num_classes=3)
    lighter, _, arch = spec.build([32, 32, 32], preset=preset, num_classes=3, overrides=overrides)
    assert arch["arch_kwargs"] == {**ref_arch["arch_kwargs"], **overrides}
    ref_state, state = reference.state_dict(), lighter.state_dict()
    assert set(ref_state) != set(state) or any(ref_state[k].shape != state[k].shape for k in ref_state)
    sizes = [64, 64, 64]
    assert estimate_memory(arch, sizes, 1, 3) < estimate_memory(ref_arch, sizes, 1, 3)
    with torch.no_grad():
        outputs = lighter.eval()(torch.randn(1, 1, *patch))
    assert outputs[0].shape == (1, 3, *patch) and all(torch.isfinite(o).all() for o in outputs)


def test_topology_rules():
    conv = ConvUNetTopology()
    patch, kwargs = conv.fit([3.0, 0.75, 0.75], [48, 192, 192])
    assert kwargs["strides"][1] == [1, 2, 2] and kwargs["kernel_sizes"][0] == [1, 3, 3]
    assert all(p % s == 0 for p, s in zip(patch, np.prod(kwargs["strides"], axis=0), strict=True))
    smaller = conv.shrink([3.0, 0.75, 0.75], patch, 1)
    assert smaller[1] == patch[1] - int(np.prod([s[1] for s in kwargs["strides"]]))
    iso = IsotropicTopology()
    assert iso.fit([5.0, 0.8, 0.8], [50, 190, 170]) == ([64, 192, 160], {"strides": [[1, 1, 1]] + [[2, 2, 2]] * 5})
    assert iso.shrink([1, 1, 1], [64, 32, 96], 0) == [32, 32, 96] and iso.shrink([1, 1, 1], [64, 32, 96], 1) is None


def _plain_configuration(patch, batch, median):
    _, architecture = get_model("plainconvunet").architecture([1.0, 1.0, 1.0], patch, FULL)
    return {
        "patch_size": patch,
        "batch_size": batch,
        "median_image_size_in_voxels": median,
        "spacing": [1.0, 1.0, 1.0],
        "architecture": architecture,
        "data_identifier": "nnUNetPlans_3d_fullres",
    }


def test_memory_budget_is_what_the_given_network_spends_unless_the_image_limited_it():
    memory_limited = _plain_configuration([128, 128, 128], 2, [300, 300, 300])
    spent = estimate_memory(memory_limited["architecture"], [128, 128, 128], 1, 3) * 2
    assert memory_budget(memory_limited, 1, 3) == spent
    assert memory_budget(memory_limited, 1, 3, planner_reference=10 * spent) == spent  # the patch was memory-bound
    image_limited = _plain_configuration([64, 64, 64], 2, [60, 64, 62])
    small = estimate_memory(image_limited["architecture"], [64, 64, 64], 1, 3) * 2
    assert memory_budget(image_limited, 1, 3) == small
    assert memory_budget(image_limited, 1, 3, planner_reference=10 * small) == 10 * small


def test_adaptation_fills_the_budget_and_records_its_origin():
    given = _plain_configuration([128, 128, 128], 2, [300, 300, 300])
    adapted = adapt_configuration(get_model("nnynet"), given, input_channels=1, num_classes=3, num_training_cases=100)
    budget = memory_budget(given, 1, 3)
    estimate = estimate_memory(adapted["architecture"], adapted["patch_size"], 1, 3)
    assert estimate * 2 <= budget  # fits at the minimum batch
    assert all(p % 32 == 0 for p in adapted["patch_size"])
    assert adapted["batch_size"] == max(2, round(budget / estimate))
    record = adapted[PLANS_MODEL_KEY]
    assert (
        record["model"] == "nnynet" and record["preset"] == FULL and record["adapted_from"]["memory_budget"] == budget
    )
    assert record["adapted_from"]["patch_size"] == [128, 128, 128]
    assert adapted["data_identifier"] == given["data_identifier"]  # the preprocessed data stay nnU-Net's
    with pytest.raises(AdaptationError, match="2D configuration"):
        adapt_configuration(
            get_model("nnynet"),
            {**given, "spacing": [1.0, 1.0], "patch_size": [128, 128]},
            input_channels=1,
            num_classes=3,
            num_training_cases=10,
        )


def test_every_method_has_a_planner_and_docs():
    from pathlib import Path

    from nnyseg.planning.planners import PLANNERS

    repo = Path(__file__).resolve().parents[1]
    for name in list_models(methods_only=True):
        spec = MODELS[name]
        assert PLANNERS[spec.planner].model == name
        assert (repo / spec.docs).is_file()
        assert spec.trainers


def test_both_swin_networks_share_one_encoder_with_the_attention_bias_plugged_in():
    from nnyseg.network_architecture.building_blocks.dmsa import KeySaliencyBias
    from nnyseg.network_architecture.building_blocks.swin import SwinUNETREncoder

    nnynet, _, _ = get_model("nnynet").build([32, 32, 32], preset=TINY)
    dyntransnet, _, _ = get_model("dyntransnet").build([32, 32, 32], preset=TINY)
    assert type(nnynet.encoder) is SwinUNETREncoder and type(dyntransnet.encoder) is SwinUNETREncoder
    biases = [b.attn.extra_bias for stage in dyntransnet.encoder.swin.stages for b in stage.blocks]
    assert biases and all(isinstance(b, KeySaliencyBias) for b in biases)
    assert all(b.attn.extra_bias is None for stage in nnynet.encoder.swin.stages for b in stage.blocks)
    # the bias is counted in the memory estimate: switching D-MSA off makes the estimate smaller
    plain, _, _ = get_model("dyntransnet").build([32, 32, 32], preset=TINY, overrides={"dmsa_bias": "none"})
    size = (64, 64, 64)
    assert plain.encoder.compute_conv_feature_map_size(size) < dyntransnet.encoder.compute_conv_feature_map_size(size)
