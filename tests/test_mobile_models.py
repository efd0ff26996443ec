"""MobileNet v1-v3, ShuffleNet v1/v2 and MnasNet: the papers' counts, widths, shuffle and SE gate.

Parity with torchvision (params, BatchNorm statistics, MACs at 224) is checked for every model
with a `reference` by tests/test_reference.py; this file covers what torchvision does not have
(MobileNet v1, ShuffleNet v1, the papers' own tables) and the pieces a user relies on.
MACs: one FLOP is one multiply-add, as in the papers' "mult-adds" and ShuffleNet's "FLOPs".
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import read_csv

import cnnjax
from cnnjax.models import layers

DERIVED = {r["model"]: r for r in read_csv("derived_counts.csv")}
M = 1e6


# --- channel shuffle (ShuffleNet v1 Sec. 3.1), the one function both ShuffleNets use -----------

def shuffle_permutation(channels: int, groups: int) -> np.ndarray:
    """Output channel i*groups + g holds input channel g*(channels/groups) + i."""
    n = channels // groups
    perm = np.empty(channels, dtype=int)
    for g in range(groups):
        for i in range(n):
            perm[i * groups + g] = g * n + i
    return perm


@pytest.mark.parametrize("channels, groups", [(12, 3), (12, 4), (8, 2), (240, 3), (6, 1), (6, 6)])
def test_channel_shuffle_is_the_papers_permutation(channels, groups):
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, channels))
    out = layers.channel_shuffle(x, groups)
    np.testing.assert_array_equal(out, x[..., shuffle_permutation(channels, groups)])


def test_channel_shuffle_small_example_by_hand():
    # Two groups (a0 a1 a2 | b0 b1 b2) interleave as a0 b0 a1 b1 a2 b2.
    x = jnp.arange(6.0).reshape(1, 1, 1, 6)
    assert layers.channel_shuffle(x, 2).ravel().tolist() == [0, 3, 1, 4, 2, 5]
    assert layers.channel_shuffle(x, 3).ravel().tolist() == [0, 2, 4, 1, 3, 5]


@pytest.mark.parametrize("channels, groups", [(12, 3), (12, 4), (24, 8), (116, 2)])
def test_channel_shuffle_is_undone_by_shuffling_with_channels_over_groups(channels, groups):
    x = jax.random.normal(jax.random.key(1), (2, 2, 2, channels))
    once = layers.channel_shuffle(x, groups)
    assert not np.array_equal(once, x)
    np.testing.assert_array_equal(layers.channel_shuffle(once, channels // groups), x)


def test_channel_shuffle_refuses_channels_that_do_not_split_into_groups():
    with pytest.raises(ValueError, match="10 channels do not split into 3 groups"):
        layers.channel_shuffle(jnp.zeros((1, 2, 2, 10)), 3)


@pytest.mark.parametrize("name, calls", [("shufflenet_v1_g3", 15), ("shufflenet_v2_x0_5", 16)])
def test_both_shufflenets_use_the_shared_channel_shuffle(name, calls, monkeypatch):
    """v1 shuffles in every unit but the first (its first 1x1 conv is not grouped); v2 in all 16."""
    seen = []

    def counting(x, groups):
        seen.append(groups)
        return shuffle(x, groups)

    shuffle = layers.channel_shuffle
    monkeypatch.setattr(layers, "channel_shuffle", counting)
    model = cnnjax.create_model(name)
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))  # traces one forward pass
    assert len(seen) == calls and set(seen) == {3 if "v1" in name else 2}


# --- MobileNet v1 (Howard et al. 2017) --------------------------------------------------------

def test_mobilenet_v1_equals_the_table_1_reconstruction():
    """4,231,976 params and 568,740,352 MACs: the paper's 4.2M parameters and 569M mult-adds."""
    ref = DERIVED["MobileNet v1 1.0-224 (Table 1 reconstruction)"]
    prof = cnnjax.profile("mobilenet_v1")
    assert (prof.params, prof.macs) == (int(ref["params"]), int(ref["macs"]))
    assert (prof.params, prof.macs) == (4_231_976, 568_740_352)
    assert round(prof.params / M, 1) == 4.2 and round(prof.macs / M) == 569
    dw = [layer for layer in prof.layers if layer.kind == "dwconv"]
    assert len(dw) == 13 and all(l.groups == l.input_shape[-1] for l in dw)
    assert prof.layers[-1].output_shape == (1, 1000)


def test_mobilenet_v1_spends_its_budget_as_table_2_says():
    """Table 2 (mult-adds / parameters): 1x1 convs 94.86% / 74.59%, depthwise 3.06% / 1.06%,
    the first (full) 3x3 conv 1.19% / 0.02%, FC 0.18% / 24.33%, with parameters counted as
    weights only (no BN, no bias). The 3x3 conv's mult-adds are 1.91%, not the printed 1.19%
    (digits swapped: with 1.19 the column sums to 99.29%)."""
    prof = cnnjax.profile("mobilenet_v1")
    kind = lambda l: {"dwconv": "dw", "linear": "fc"}.get(l.kind, "1x1" if l.kernel == (1, 1)
                                                             else "3x3")
    macs, weights = {}, {}
    for l in prof.layers:
        if l.kind in ("conv", "dwconv", "linear"):
            bias = l.output_shape[-1] if l.kind == "linear" else 0
            macs[kind(l)] = macs.get(kind(l), 0) + l.macs
            weights[kind(l)] = weights.get(kind(l), 0) + l.params - bias
    share = lambda d, k: round(100 * d[k] / sum(d.values()), 2)
    assert [share(macs, k) for k in ("1x1", "dw", "3x3", "fc")] == [94.86, 3.06, 1.91, 0.18]
    assert [share(weights, k) for k in ("1x1", "dw", "3x3", "fc")] == [74.59, 1.06, 0.02, 24.33]


# (width mult, input size, exact MACs, exact params, then Tables 6, 7, 9: M mult-adds, M params)
MOBILENET_V1_TABLES = [(0.75, 224, 325_400_448, 2_585_560, 325, 2.6),
                 (0.5, 224, 149_497_088, 1_331_592, 149, 1.3),
                 (0.25, 224, 41_030_272, 470_072, 41, 0.5),
                 (1.0, 192, 418_121_728, 4_231_976, 418, 4.2),
                 (1.0, 160, 290_675_200, 4_231_976, 290, 4.2),  # 290.7M: the paper prints 290
                 (1.0, 128, 186_400_768, 4_231_976, 186, 4.2),
                 (0.5, 160, 76_524_800, 1_331_592, 76, 1.3)]  # Table 9: 1.32M weights, no BN/bias


@pytest.mark.parametrize("alpha, size, macs, params, paper_macs, paper_params",
                         MOBILENET_V1_TABLES)
def test_mobilenet_v1_width_and_resolution_multipliers_match_tables_6_7_and_9(
        alpha, size, macs, params, paper_macs, paper_params):
    prof = cnnjax.profile("mobilenet_v1", size, width_mult=alpha)
    assert (prof.macs, prof.params) == (macs, params)
    assert abs(prof.macs / M - paper_macs) < 0.7 and round(prof.params / M, 1) == paper_params


# --- MobileNet v2 / v3 (torchvision parity is in test_reference.py) ----------------------------

@pytest.mark.parametrize("alpha, macs_m, stem, last", [(1.4, 582, 48, 1792), (0.75, 209, 24, 1280),
                                                      (0.5, 97, 16, 1280), (0.35, 59, 16, 1280)])
def test_mobilenet_v2_width_mult(alpha, macs_m, stem, last):
    """MACs as in the TF-slim / Keras MobileNetV2 table (M mult-adds at 224); the last conv never
    narrows below 1280 (the paper leaves the very last conv at full width for multipliers < 1)."""
    prof = cnnjax.profile("mobilenet_v2", width_mult=alpha)
    assert round(prof.macs / M) == macs_m
    rows = {l.name: l for l in prof.layers}
    assert rows["stem/conv"].output_shape[-1] == stem
    assert rows["conv_last/conv"].output_shape[-1] == last


def test_mobilenet_v3_width_mult_scales_every_layer_as_torchvision():
    """torchvision scales every width, the head included, by make_divisible(C * alpha, 8)."""
    full, slim = (cnnjax.profile("mobilenet_v3_large", width_mult=a) for a in (1.0, 0.75))
    rows = {l.name: l for l in slim.layers}
    assert rows["stem/conv"].output_shape[-1] == 16  # make_divisible(12, 8) rounds up
    assert rows["conv_last/conv"].output_shape[-1] == 6 * 120
    assert rows["fc_hidden"].output_shape[-1] == 960
    assert slim.params < 0.65 * full.params and slim.macs < 0.65 * full.macs


def submodules(name: str, module_name: str, **overrides) -> dict:
    """{block name: (module, input shape)} of every submodule called `module_name` in `name`,
    recorded while tracing one forward pass (nothing is run)."""
    found = {}

    def record(f, args, kwargs, context):
        if context.module.name == module_name and context.method_name == "__call__":
            found[context.module.path[0]] = (context.module, args[0].shape)
        return f(*args, **kwargs)

    model = cnnjax.create_model(name, **overrides)
    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                       jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    return found


def test_mobilenet_v3_se_is_relu_then_hard_sigmoid_on_a_quarter_width_bottleneck():
    # block4 of Large: 5x5, expanded 72, SE squeezing to make_divisible(72 / 4, 8) = 24.
    module, shape = submodules("mobilenet_v3_large", "se")["block4"]
    se = module.clone(parent=None)
    u = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, *shape[1:])))
    params = se.init(jax.random.key(1), u)["params"]
    assert params["fc_squeeze"]["kernel"].shape == (72, 24)
    assert params["fc_expand"]["kernel"].shape == (24, 72)
    # Spread the expand biases over [-6, 6] so the gate meets both of its saturated ends.
    params["fc_expand"]["bias"] = jnp.linspace(-6.0, 6.0, 72)
    out = se.apply({"params": params}, u)
    hidden = jax.nn.relu(u.mean((1, 2)) @ params["fc_squeeze"]["kernel"]
                         + params["fc_squeeze"]["bias"])
    logits = hidden @ params["fc_expand"]["kernel"] + params["fc_expand"]["bias"]
    gate = jnp.clip(logits + 3.0, 0.0, 6.0) / 6.0  # hard sigmoid: ReLU6(x + 3) / 6
    np.testing.assert_allclose(out, u * gate[:, None, None, :], rtol=1e-5, atol=1e-6)
    # The hard gate saturates (exactly 0 and 1 occur); a logistic sigmoid would not.
    assert float(gate.min()) == 0.0 and float(gate.max()) == 1.0
    assert not np.allclose(out, u * jax.nn.sigmoid(logits)[:, None, None, :], rtol=1e-2, atol=0)


@pytest.mark.parametrize("name, se_blocks, squeeze", [
    ("mobilenet_v3_large", (4, 5, 6, 11, 12, 13, 14, 15), (24, 32, 32, 120, 168, 168, 240, 240)),
    ("mobilenet_v3_small", (1, 4, 5, 6, 7, 8, 9, 10, 11), (8, 24, 64, 64, 32, 40, 72, 144, 144)),
])
def test_mobilenet_v3_se_sits_where_the_papers_tables_put_it(name, se_blocks, squeeze):
    model = cnnjax.create_model(name)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    params = variables["params"]
    with_se = sorted(int(k[5:]) for k, v in params.items() if k.startswith("block") and "se" in v)
    assert tuple(with_se) == se_blocks
    assert tuple(params[f"block{i}"]["se"]["fc_squeeze"]["bias"].shape[0]
                 for i in se_blocks) == squeeze


# --- ShuffleNet v1 (Zhang et al. 2018) --------------------------------------------------------

def test_shufflenet_v1_g3_equals_the_table_1_reconstruction():
    """1,865,728 params and 137,460,672 MACs: Table 1's 137M for g=3 (the "140" of Tables 2 and
    8 is the budget the row belongs to; SENet's Table 3 quotes 1.8M parameters)."""
    ref = DERIVED["ShuffleNet v1 1x g=3 (Table 1 reconstruction)"]
    prof = cnnjax.profile("shufflenet_v1_g3")
    assert (prof.params, prof.macs) == (int(ref["params"]), int(ref["macs"]))
    assert (prof.params, prof.macs) == (1_865_728, 137_460_672)
    assert round(prof.macs / M) == 137


# groups: (exact MACs, Table 1 "complexity" in MFLOPs)
V1_TABLE_1 = {1: (143_078_976, 143), 2: (140_836_512, 140), 3: (137_460_672, 137),
              4: (134_339_776, 133), 8: (138_365_952, 137)}
V1_STAGE_OUT = {1: 576, 2: 800, 3: 960, 4: 1088, 8: 1536}  # Table 1, stage 4 output channels


@pytest.mark.parametrize("groups", sorted(V1_TABLE_1))
def test_shufflenet_v1_complexity_per_group_count_matches_table_1(groups):
    """With the classifier, g=2/4/8 round to 141/134/138M, 0.6-1.0% above Table 1's 140/133/137M
    (g=1 and g=3 round to the table). Without the 1000-way FC (576K-1.5M MACs) all five round to
    Table 1 exactly: the table counts the convolutional layers only."""
    macs, paper = V1_TABLE_1[groups]
    prof = cnnjax.profile(f"shufflenet_v1_g{groups}")
    fc = next(l for l in prof.layers if l.name == "fc")
    assert prof.macs == macs
    assert round((prof.macs - fc.macs) / M) == paper
    assert fc.macs == 1000 * V1_STAGE_OUT[groups]
    assert round(prof.macs / M) - paper == {1: 0, 2: 1, 3: 0, 4: 1, 8: 1}[groups]


def test_shufflenet_v1_units_follow_figure_2():
    """Stride-2 units: the branch makes out - in channels and an avg-pooled shortcut is
    concatenated; the bottleneck is out/4; the first 1x1 of stage 2 is not grouped."""
    rows = {l.name: l for l in cnnjax.profile("shufflenet_v1_g3").layers}
    first = lambda n: rows[f"stage2_block1/{n}"]
    assert (first("gconv1/conv").groups, first("gconv1/conv").output_shape[-1]) == (1, 60)
    assert first("dw/conv").kind == "dwconv" and first("dw/conv").output_shape == (1, 28, 28, 60)
    assert (first("gconv2/conv").groups, first("gconv2/conv").output_shape[-1]) == (3, 240 - 24)
    assert first("pool_shortcut").output_shape == (1, 28, 28, 24)
    assert rows["stage2_block2/gconv1/conv"].groups == 3
    assert rows["stage3_block1/gconv2/conv"].output_shape[-1] == 480 - 240
    assert rows["stage4_block4/gconv2/conv"].output_shape == (1, 7, 7, 960)
    assert sum(1 for n in rows if n.endswith("/gconv1/conv")) == 4 + 8 + 4


@pytest.mark.parametrize("width, stem, macs_m", [(0.5, None, 38), (2.0, None, 524), (1.5, 24, 292)])
def test_shufflenet_v1_width_mult_matches_the_papers_sx_models(width, stem, macs_m):
    """ShuffleNet s x (g=3), Tables 2 and 5: 0.5x 38M, 1.5x 292M, 2x 524M. Widths scale by s
    (stages rounded to multiples of 4g); the authors' released code gives 1.5x a 24-channel
    stem, and only with it is the count 292M (scaling the stem to 36 gives 299.6M)."""
    prof = cnnjax.profile("shufflenet_v1_g3", width_mult=width, stem_channels=stem)
    assert round(prof.macs / M) == macs_m
    out = {l.name: l.output_shape[-1] for l in prof.layers}
    assert out["stage4_block4/gconv2/conv"] == int(960 * width)


def test_shufflenet_v1_bad_groups_or_stem_is_a_clear_error():
    with pytest.raises(ValueError, match=r"groups must be one of \[1, 2, 3, 4, 8\]"):
        cnnjax.profile(cnnjax.create_model("shufflenet_v1_g3", groups=5), 32)
    with pytest.raises(ValueError, match="stem_channels must be a multiple of groups=8; got 20"):
        cnnjax.profile(cnnjax.create_model("shufflenet_v1_g8", stem_channels=20), 32)


# --- ShuffleNet v2 and MnasNet ---------------------------------------------------------------

def test_shufflenet_v2_splits_channels_and_downsamples_with_both_branches():
    rows = {l.name: l for l in cnnjax.profile("shufflenet_v2_x1_0").layers}
    assert rows["stage2_block1/left_dw/conv"].output_shape == (1, 28, 28, 24)
    assert rows["stage2_block1/right_pw2/conv"].output_shape[-1] == 58
    assert rows["stage2_block2/right_pw1/conv"].input_shape[-1] == 58  # half of 116
    assert "stage2_block2/left_dw/conv" not in rows
    assert rows["conv_last/conv"].output_shape == (1, 7, 7, 1024)


@pytest.mark.parametrize("alpha, params, gmacs", [(0.75, 3_170_208, 0.215),
                                                   (1.3, 6_282_256, 0.526)])
def test_mnasnet_depth_multiplier_matches_torchvision(alpha, params, gmacs):
    """torchvision's MNASNet0_75 / MNASNet1_3 weights: num_params and "_ops" (GMACs)."""
    prof = cnnjax.profile("mnasnet1_0", width_mult=alpha)
    assert prof.params == params and round(prof.macs / 1e9, 3) == gmacs


def test_mnasnet_first_block_has_no_shortcut_even_when_widths_agree():
    """At 0.25 the stem and the separable block both have 8 channels; torchvision adds nothing:
    with the projection's BN zeroed the block outputs zeros, not its input."""
    module, shape = submodules("mnasnet1_0", "sepconv", width_mult=0.25)["sepconv"]
    assert shape[-1] == module.features == 8
    block = module.clone(parent=None)
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8))
    variables = block.init(jax.random.key(1), x)
    variables["params"]["pw"]["bn"]["scale"] = jnp.zeros(8)
    variables["params"]["pw"]["bn"]["bias"] = jnp.zeros(8)
    assert not np.any(block.apply(variables, x))
