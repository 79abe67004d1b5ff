"""Tests of the nnY-Net network (SwinNeXtUNet) on tiny CPU configurations."""

from __future__ import annotations

import itertools
import json
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from nnyseg.network_architecture.building_blocks.cross_attention import ZeroInitLinear
from nnyseg.network_architecture.swin_next import SwinNeXtUNet

SCHEMA = [
    {"name": "age", "type": "numeric"},
    {"name": "diagnosis", "type": "categorical", "categories": ["benign", "malignant"]},
]
TINY: dict[str, Any] = {
    "feature_size": 12,
    "depths": (1, 1, 1, 1),
    "num_heads": (1, 2, 2, 4),
    "window_size": 4,
    "ca_heads": 2,
}
STRIDES = [[1, 1, 1]] + 5 * [[2, 2, 2]]
MISSING_MSG = "got no clinical input"


def tiny_net(*, deep_supervision: bool = True, seed: int = 0, init: bool = True, **kwargs: Any) -> SwinNeXtUNet:
    torch.manual_seed(seed)
    net = SwinNeXtUNet(1, 2, deep_supervision, **{**TINY, **kwargs})
    if init:
        net.apply(net.initialize)
    return net


def clinical(values: list[list[float]], missing: list[list[bool]] | None = None) -> tuple[torch.Tensor, Any]:
    v = torch.tensor(values)
    return v, None if missing is None else torch.tensor(missing)


def randomise_film(net: SwinNeXtUNet) -> None:
    with torch.no_grad():
        for film in (net.cross_attention.film, *net.cross_attention.level_films):
            film.weight.normal_(0.0, 0.5)
            film.bias.normal_(0.0, 0.1)


def film_layers(net: SwinNeXtUNet) -> list[ZeroInitLinear]:
    return [net.cross_attention.film, *net.cross_attention.level_films]


@pytest.mark.parametrize("patch", [(32, 32, 32), (32, 64, 64), (64, 32, 32)])
def test_output_shapes_with_and_without_deep_supervision(patch: tuple[int, int, int]) -> None:
    net = tiny_net(decoder_blocks=1).eval()
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        outputs = net(x)
        assert isinstance(outputs, list) and len(outputs) == 5
        for scale, out in zip((1, 2, 4, 8, 16), outputs, strict=True):
            assert out.shape == (1, 2, *(p // scale for p in patch))
        net.decoder.deep_supervision = False
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (1, 2, *patch)
    torch.testing.assert_close(single, outputs[0])


def test_every_parameter_gets_a_finite_gradient_in_clinical_mode() -> None:
    net = tiny_net(cross_attention="clinical", clinical_schema=SCHEMA).train()
    x = torch.randn(2, 1, 32, 32, 32)
    outputs = net(x, clinical([[0.3, 1.0], [float("nan"), 0.0]], [[False, False], [True, False]]))
    sum(out.float().mean() for out in outputs).backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert all(film.weight.grad.abs().sum() > 0 for film in film_layers(net))  # zero-init, yet trainable


def test_clinical_mode_equals_off_mode_at_initialisation() -> None:
    net_clinical = tiny_net(cross_attention="clinical", clinical_schema=SCHEMA).eval()
    net_off = tiny_net(cross_attention="off", seed=1).eval()
    result = net_off.load_state_dict(net_clinical.state_dict(), strict=False)
    assert not result.missing_keys
    assert result.unexpected_keys and all(k.startswith("cross_attention.") for k in result.unexpected_keys)
    films = film_layers(net_clinical)
    assert len(films) == 6  # the bottleneck and the five decoder levels
    assert all(isinstance(f, ZeroInitLinear) and not f.weight.any() and not f.bias.any() for f in films)
    net_clinical.apply(net_clinical.initialize)  # applying it again must not break the identity either
    assert not any(f.weight.any() for f in films)
    net_off.load_state_dict(net_clinical.state_dict(), strict=False)
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        expected = net_off(x)
        got = net_clinical(x, clinical([[1.5, 1.0]]))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_clinical_values_change_the_output_once_film_is_trained() -> None:
    net = tiny_net(cross_attention="clinical", clinical_schema=SCHEMA).eval()
    randomise_film(net)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        base = net(x, clinical([[0.0, 0.0]]))[0]
        numeric = net(x, clinical([[2.0, 0.0]]))[0]
        category = net(x, clinical([[0.0, 1.0]]))[0]
        missing = net(x, clinical([[0.0, 0.0]], [[True, False]]))[0]
    for other in (numeric, category, missing):
        assert not torch.allclose(base, other)


def test_film_of_the_finest_level_shifts_the_logits_through_its_head() -> None:
    # The reason the branch also modulates the decoder levels: their FiLM reaches the segmentation head with no
    # normalisation in between, so beta on the last level moves the logits by exactly head_weight @ beta.
    net = tiny_net(cross_attention="clinical", clinical_schema=SCHEMA, deep_supervision=False).eval()
    finest = net.cross_attention.level_films[-1]
    channels = finest.out_features // 2
    beta = torch.linspace(-1.0, 1.0, channels)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        before = net(x, clinical([[0.5, 1.0]]))
        finest.bias[channels:] = beta
        after = net(x, clinical([[0.5, 1.0]]))
    head = net.decoder.seg_layers[-1].weight.view(2, channels)
    expected_shift = (head @ beta).view(1, 2, 1, 1, 1).expand_as(before)
    torch.testing.assert_close(after - before, expected_shift, atol=1e-5, rtol=1e-4)


def test_film_levels_bottleneck_is_the_specs_routing() -> None:
    net = tiny_net(cross_attention="clinical", clinical_schema=SCHEMA, ca_film_levels="bottleneck").eval()
    assert len(net.cross_attention.level_films) == 0
    assert not any(".level_films." in key for key in net.state_dict())
    randomise_film(net)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        benign, malignant = net(x, clinical([[0.0, 0.0]]))[0], net(x, clinical([[0.0, 1.0]]))[0]
    assert not torch.allclose(benign, malignant)


def test_latent_mode_runs_without_clinical_input() -> None:
    net = tiny_net(cross_attention="latent", deep_supervision=False).eval()
    assert net.cross_attention.tokenizer is None and net.cross_attention.num_queries == 4
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{MISSING_MSG}.*")
        with torch.no_grad():
            out = net(torch.randn(2, 1, 32, 32, 32))
    assert out.shape == (2, 2, 32, 32, 32)


@pytest.mark.parametrize("shape", [(1, 1, 40, 40, 40), (1, 1, 32, 32, 48), (1, 1, 16, 32, 32)])
def test_bad_patch_size_raises_before_any_compute(shape: tuple[int, ...]) -> None:
    net = tiny_net(init=False)
    calls = []
    net.encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match="divisible by 32") as err:
        net(torch.randn(*shape))
    assert str(shape) in str(err.value)
    assert not calls
    with pytest.raises(ValueError, match="divisible by 32"):
        SwinNeXtUNet.check_patch_size(shape[2:])


def test_check_patch_size_names_nearest_valid_sizes() -> None:
    with pytest.raises(ValueError, match=r"40 -> 32 or 64, 16 -> 32, 64"):
        SwinNeXtUNet.check_patch_size((40, 16, 64))
    SwinNeXtUNet.check_patch_size([32, 64, 96])
    SwinNeXtUNet.check_patch_size(np.array([128, 128, 128]))
    with pytest.raises(ValueError, match="3D patch size"):
        SwinNeXtUNet.check_patch_size((64, 64))


def test_bad_input_dims_and_channels() -> None:
    net = tiny_net(init=False)
    with pytest.raises(ValueError, match="5D input"):
        net(torch.randn(1, 32, 32, 32))
    with pytest.raises(ValueError, match="1 input channels"):
        net(torch.randn(1, 2, 32, 32, 32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strides": [[1, 1, 1]] + 4 * [[2, 2, 2]]}, "fixed topology"),
        ({"strides": [[1, 1, 1], [1, 2, 2]] + 4 * [[2, 2, 2]]}, "fixed topology"),
        ({"num_heads": (5, 2, 2, 4)}, "must divide the width of Swin stage 0"),
        ({"depths": (1, 1, 1)}, "4 entries"),
        ({"ca_heads": 5}, "cross-attention heads"),
        ({"cross_attention": "clinical"}, "non-empty clinical_schema"),
        ({"cross_attention": "yes"}, "must be one of"),
        ({"ca_film_levels": "decoder"}, "ca_film_levels must be one of"),
        ({"decoder_expansion": (2, 2)}, "decoder_expansion"),
    ],
)
def test_invalid_constructor_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SwinNeXtUNet(1, 2, **{**TINY, **kwargs})


def test_built_by_nnunet_get_network_from_plans() -> None:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch_kwargs = json.loads(
        json.dumps(
            {
                "strides": STRIDES,
                "feature_size": 12,
                "depths": [1, 1, 1, 1],
                "num_heads": [1, 2, 2, 4],
                "window_size": 4,
                "decoder_expansion": [2, 2, 2, 2, 2],
                "decoder_blocks": 1,
                "cross_attention": "clinical",
                "clinical_schema": SCHEMA,
                "ca_heads": 2,
            }
        )
    )
    torch.manual_seed(0)
    net = get_network_from_plans(
        "nnyseg.network_architecture.swin_next.SwinNeXtUNet",
        arch_kwargs,
        [],
        input_channels=1,
        output_channels=2,
        allow_init=True,
        deep_supervision=True,
    )
    assert isinstance(net, SwinNeXtUNet)
    assert not net.cross_attention.film.weight.any()
    # nnU-Net's deep-supervision scales: cumprod(pool_op_kernel_sizes)[:-1]
    scales = np.cumprod(np.vstack(arch_kwargs["strides"]), axis=0)[:-1]
    patch = (32, 64, 32)
    net.eval()
    net.set_condition(clinical([[0.0, 1.0]]))
    with torch.no_grad():
        outputs = net(torch.randn(1, 1, *patch))
        assert len(outputs) == len(scales)
        for out, scale in zip(outputs, scales, strict=True):
            assert out.shape[2:] == tuple(int(p // s) for p, s in zip(patch, scale, strict=True))
        net.decoder.deep_supervision = False
        single = net(torch.randn(1, 1, *patch))
    assert isinstance(single, torch.Tensor) and single.shape == (1, 2, *patch)


def test_gradient_checkpointing_gives_same_outputs_and_grads() -> None:
    reference = tiny_net(cross_attention="latent").train()
    randomise_film(reference)
    checkpointed = tiny_net(cross_attention="latent", use_checkpoint=True, seed=3).train()
    checkpointed.load_state_dict(reference.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    results = []
    for net in (reference, checkpointed):
        outputs = net(x)
        sum(out.mean() for out in outputs).backward()
        results.append((outputs, {n: p.grad for n, p in net.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    for a, b in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(a, b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compute_conv_feature_map_size_is_monotonic() -> None:
    sizes = [(32, 32, 32), (32, 32, 64), (32, 64, 64), (64, 64, 64), (64, 64, 96), (96, 96, 96), (128, 128, 128)]
    for kwargs in (TINY, {}):  # tiny and default (F=48) configuration, built like the planner does (no init)
        net = SwinNeXtUNet(1, 3, True, **kwargs)
        values = [net.compute_conv_feature_map_size(s) for s in sizes]
        assert all(isinstance(v, int) and v > 0 for v in values)
        assert all(b > a for a, b in itertools.pairwise(values)), values
        for axis in range(3):  # growing a single axis never decreases the estimate
            grown = [
                net.compute_conv_feature_map_size(tuple(s if i != axis else s + 32 for i, s in enumerate(p)))
                for p in sizes
            ]
            assert all(g > v for g, v in zip(grown, values, strict=True))
        assert net.compute_conv_feature_map_size(np.array([64, 64, 64])) == values[3]


def test_attention_term_of_feature_map_size() -> None:
    # window attention matrices (tokens x window tokens x heads) make a bigger window cost more memory
    small = SwinNeXtUNet(1, 2, **{**TINY, "window_size": 2})
    large = SwinNeXtUNet(1, 2, **{**TINY, "window_size": 8})
    assert large.compute_conv_feature_map_size((64, 64, 64)) > small.compute_conv_feature_map_size((64, 64, 64))


def test_set_and_clear_condition() -> None:
    net = tiny_net(cross_attention="clinical", clinical_schema=SCHEMA, deep_supervision=False).eval()
    randomise_film(net)
    x = torch.randn(2, 1, 32, 32, 32)
    cond_a = clinical([[0.5, 1.0]])
    cond_b = clinical([[-1.0, 0.0]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explicit_a = net(x, cond_a)
        explicit_b = net(x, cond_b)
        all_missing = net(x, clinical([[0.0, 0.0]], [[True, True]]))
        net.set_condition(cond_a)
        assert net.condition is not None
        torch.testing.assert_close(net(x), explicit_a)  # stored condition is used (one row broadcast to batch 2)
        torch.testing.assert_close(net(x, cond_b), explicit_b)  # an explicit argument wins
        torch.testing.assert_close(net(x), explicit_a)  # ... without replacing the stored one
        net.clear_condition()
        assert net.condition is None
        torch.testing.assert_close(net(x), all_missing)  # no condition at all: every field missing
        net.set_condition(cond_b[0])  # a bare values tensor works too
        torch.testing.assert_close(net(x), explicit_b)
        net.set_condition(None)
        assert net.condition is None
    with pytest.raises(ValueError):
        net.set_condition("age=3")
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        net.set_condition(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="missing mask shape"):
        net.set_condition((torch.zeros(1, 2), torch.zeros(2, 2, dtype=torch.bool)))


def test_missing_clinical_warning_fires_once_per_instance() -> None:
    x = torch.randn(1, 1, 32, 32, 32)
    net = tiny_net(cross_attention="clinical", clinical_schema=SCHEMA).eval()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net(x)
        net(x)
        net(x, clinical([[0.0, 1.0]]))
        other = tiny_net(cross_attention="clinical", clinical_schema=SCHEMA).eval()
        other(x)
    messages = [w for w in caught if MISSING_MSG in str(w.message)]
    assert len(messages) == 2  # once for `net`, once for `other`


def test_training_works_after_inference_in_the_same_process():
    # Regression: a cached relative-position index created under inference_mode broke every later backward pass.
    from nnyseg.network_architecture.building_blocks.swin import _relative_position_index_cpu

    _relative_position_index_cpu.cache_clear()
    net = SwinNeXtUNet(
        1, 2, True, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4, ca_heads=2
    )
    with torch.inference_mode():
        net(torch.zeros(1, 1, 32, 32, 32))
    sum(out.sum() for out in net(torch.zeros(1, 1, 32, 32, 32))).backward()
    assert all(p.grad is not None for p in net.parameters())
