"""Parameter and multiply-add parity with torchvision and the papers' reconstructions, exact."""
import math

import flax.linen as nn
import pytest
from conftest import read_csv

import cnnjax

TORCHVISION = {r["model"]: r for r in read_csv("torchvision_reference.csv")}
DERIVED = {r["model"]: r for r in read_csv("derived_counts.csv")}
REFERENCED = [n for n in cnnjax.list_models() if cnnjax.models.model_spec(n).reference]


def test_every_torchvision_architecture_we_register_has_a_reference_row():
    assert {cnnjax.models.model_spec(n).reference for n in REFERENCED} <= set(TORCHVISION)
    for name in ("alexnet", "vgg16_bn", "resnet50", "resnext101_32x8d", "wide_resnet50_2"):
        assert name in REFERENCED


@pytest.mark.parametrize("name", REFERENCED)
def test_params_batch_stats_and_macs_equal_torchvision(name):
    ref = TORCHVISION[cnnjax.models.model_spec(name).reference]
    prof = cnnjax.profile(name, 224)
    assert prof.params == int(ref["params"])
    assert prof.batch_stats == int(ref["bn_buffers"])
    assert prof.macs == int(ref["macs"])


# (registered name, create overrides, input size, derived_counts.csv row)
PAPER = [
    ("alexnet_v1", {}, 227, "AlexNet original (2-GPU groups, 227 input)"),
    ("zfnet", {}, 224, "ZFNet (Fig. 3 reconstruction)"),
    ("resnet50", {"stride_in_1x1": True}, 224, "ResNet-50 original (stride on 1x1)"),
    ("se_resnet50", {"stride_in_1x1": True}, 224, "SE-ResNet-50 (r=16, stride on 1x1)"),
    ("se_resnet50", {}, 224, "SE-ResNet-50 (r=16, torchvision-style stride on 3x3)"),
]


@pytest.mark.parametrize("name, overrides, size, row", PAPER)
def test_paper_reconstructions_equal_derived_counts(name, overrides, size, row):
    ref = DERIVED[row]
    prof = cnnjax.profile(name, size, **overrides)
    assert (prof.params, prof.macs) == (int(ref["params"]), int(ref["macs"]))


def test_se_adds_what_the_senet_paper_says():
    """SENet Sec. 4: ~2.5M extra parameters (~10%) and 3.86 -> 3.87 GFLOPs for ResNet-50 (v1)."""
    plain = cnnjax.profile("resnet50", stride_in_1x1=True)
    se = cnnjax.profile("se_resnet50", stride_in_1x1=True)
    assert 2.4e6 < se.params - plain.params < 2.6e6
    assert round(plain.macs / 1e9, 2) == 3.86 and round(se.macs / 1e9, 2) == 3.86  # paper: 3.87
    assert se.macs - plain.macs == 2_514_944  # 2 C^2/16 per block: 0.07% of the network


def test_alexnet_227_matches_the_lecture_table_row_by_row():
    ref = read_csv("alexnet_227_layers.csv")
    prof = cnnjax.profile("alexnet", 227)
    rows, total = ref[:-1], ref[-1]
    assert len(prof.layers) == len(rows)
    for layer, r in zip(prof.layers, rows):
        out = layer.output_shape
        c, h, w = (out[3], out[1], out[2]) if len(out) == 4 else (out[1], 1, 1)
        assert (c, h, w) == (int(r["C"]), int(r["H"]), int(r["W"])), r["layer"]
        assert round(layer.out_bytes / 1024, 1) == float(r["memory_KB"]), r["layer"]
        assert layer.params == int(r["params"]), r["layer"]
        assert layer.macs == int(r["macs"]), r["layer"]
    assert round(prof.activation_bytes / 1024, 1) == float(total["memory_KB"])
    assert prof.params == int(total["params"]) and prof.macs == int(total["macs"])
    # The lecture's observations: memory sits in the early convs, parameters in fc6, MACs in convs.
    by_name = {layer.name: layer for layer in prof.layers}
    assert max(prof.layers, key=lambda l: l.out_bytes).name == "conv1"
    assert by_name["fc6"].params > prof.params / 2
    conv_macs = sum(l.macs for l in prof.layers if l.kind == "conv")
    assert conv_macs > 0.9 * prof.macs


def test_vgg16_every_cin_eq_cout_conv_in_stages_1_to_4_costs_the_same():
    """Halving the resolution while doubling the channels keeps a 3x3 C->C conv's cost fixed."""
    prof = cnnjax.profile("vgg16")
    convs = [l for l in prof.layers if l.kind == "conv" and l.input_shape[-1] == l.output_shape[-1]]
    stage = lambda l: int(l.name[4])
    per_stage = {s: {l.macs for l in convs if stage(l) == s} for s in range(1, 6)}
    assert all(len(v) == 1 for v in per_stage.values())
    cost = per_stage[1].pop()
    assert cost == 224 * 224 * 64 * 64 * 9  # 36 H W C^2 with H = W = 112, C = 64
    for s in (2, 3, 4):
        assert per_stage[s] == {cost}
    assert per_stage[5] == {cost // 4}  # stage 5 keeps 512 channels at 14x14
    # Memory halves from stage to stage (2HWC vs 4HWC) while the params quadruple (9C^2 -> 36C^2).
    first = {stage(l): l for l in reversed(convs)}
    for s in (1, 2, 3):
        assert first[s].out_bytes == 2 * first[s + 1].out_bytes
        assert 4 * (first[s].params - first[s].output_shape[-1]) == (
            first[s + 1].params - first[s + 1].output_shape[-1])


def test_two_3x3_convs_have_18c2_params_where_one_5x5_has_25c2():
    prof = cnnjax.profile("vgg16")
    pair = [l for l in prof.layers if l.name in ("conv3_2", "conv3_3")]
    c = 256
    assert sum(l.params - c for l in pair) == 18 * c * c  # minus the biases
    assert sum(l.macs for l in pair) == 18 * c * c * 56 * 56
    five = cnnjax.profile(_Conv5x5On256(), 56)
    assert five.params == 25 * c * c and five.macs == 25 * c * c * 56 * 56


class _Conv5x5On256(nn.Module):
    in_channels: int = 256

    @nn.compact
    def __call__(self, x):
        return nn.Conv(256, (5, 5), padding=2, use_bias=False)(x)


@pytest.mark.parametrize("name, size", [("alexnet", 227), ("zfnet", 224), ("resnet18", 224)])
def test_macs_agree_with_xla_cost_analysis(name, size):
    """XLA counts 2 FLOPs per MAC but skips kernel taps that fall on zero padding (and adds the
    elementwise work), so at ImageNet sizes it lands within 10% of 2 x our MACs."""
    prof = cnnjax.profile(name, size)
    ratio = prof.xla_cost()["flops"] / (2 * prof.macs)
    assert 0.9 < ratio < 1.1, ratio


def test_xla_counts_exactly_twice_our_macs_without_padding():
    class Unpadded(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(32, (3, 3), padding="VALID", use_bias=False)(x)
            return nn.Dense(10, use_bias=False)(x.reshape(x.shape[0], -1))

    prof = cnnjax.profile(Unpadded(), 16)
    assert prof.macs == 14 * 14 * 32 * 27 + 14 * 14 * 32 * 10
    assert prof.xla_cost()["flops"] == 2 * prof.macs


def test_profile_counts_what_it_traces_without_per_layer_formulas():
    """A module the profiler has never seen (einsum, grouped conv) is counted from the jaxpr."""

    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(12, (3, 3), feature_group_count=3, padding=1, use_bias=False)(x)
            w = self.param("w", nn.initializers.ones, (12, 5))
            return jax_einsum("nhwc,cd->nhwd", x, w)

    prof = cnnjax.profile(Odd(), 8)
    assert prof.macs == 8 * 8 * 12 * (3 * 3 * 1) + 8 * 8 * 12 * 5
    assert prof.params == 12 * 1 * 9 + 60
    assert [l.name for l in prof.layers] == ["Conv_0", "(other)"]
    assert prof.layers[0].macs == 8 * 8 * 12 * 9 and prof.layers[1].macs == 8 * 8 * 12 * 5


def jax_einsum(*args):
    import jax.numpy as jnp
    return jnp.einsum(*args)


def test_memory_counts_output_bytes_of_the_compute_dtype():
    import jax.numpy as jnp
    f32 = cnnjax.profile("resnet18", 64)
    bf16 = cnnjax.profile("resnet18", 64, dtype=jnp.bfloat16)
    assert bf16.activation_bytes * 2 == f32.activation_bytes
    assert bf16.params == f32.params and bf16.macs == f32.macs
    assert math.prod(f32.layers[0].output_shape) * 4 == f32.layers[0].out_bytes
