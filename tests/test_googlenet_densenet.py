"""GoogLeNet (torchvision's and the paper's) and DenseNet: aux heads, paper numbers, remat."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import read_csv

import cnnjax
from cnnjax.models import googlenet
from cnnjax.models.densenet import DenseNet

from helpers import (
    assert_tree_close,
    jit_once,
    random_variables,
    residual_bytes,
    train_step_outputs,
)

TORCHVISION = {r["model"]: r for r in read_csv("torchvision_reference.csv")}
DERIVED = {r["model"]: r for r in read_csv("derived_counts.csv")}


def _nonzero(tree) -> bool:
    return all(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------------------------
# GoogLeNet


@pytest.mark.parametrize("name, size", [
    ("googlenet", 32),
    pytest.param("googlenet_v1", 79, marks=pytest.mark.slow),  # its smallest input with aux heads
])
def test_aux_logits_train_returns_three_heads_eval_returns_one(name, size):
    model = cnnjax.create_model(name, num_classes=10, aux_logits=True)
    plain = cnnjax.create_model(name, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    variables = random_variables(model, x, train=False)
    assert {"aux1", "aux2"} <= set(variables["params"])  # built by an eval-mode init
    w = jax.random.normal(jax.random.key(2), (3, 2, 10))

    @jit_once
    def run(variables, x):
        def loss(params):
            outs, updates = model.apply({**variables, "params": params}, x, train=True,
                                        mutable=["batch_stats"],
                                        rngs={"dropout": jax.random.key(3)})
            return sum(jnp.sum(o * wi) for o, wi in zip(outs, w)), (outs, updates)
        grads, (outs, updates) = jax.grad(loss, has_aux=True)(variables["params"])
        evals = (model.apply(variables, x, train=False), plain.apply(variables, x, train=False))
        return evals, outs, updates, grads

    (eval_logits, plain_logits), outs, updates, grads = run(variables, x)
    assert isinstance(outs, tuple) and len(outs) == 3
    chex.assert_shape([*outs, eval_logits], (2, 10))
    chex.assert_tree_all_finite((outs, eval_logits, grads))
    assert _nonzero(grads["aux1"]) and _nonzero(grads["aux2"])
    # Train with the heads, evaluate without: eval mode never runs them, so the aux-free model
    # gives the same logits from the same variables.
    np.testing.assert_array_equal(eval_logits, plain_logits)
    if name == "googlenet":  # the aux heads' BatchNorm statistics are updated too
        for head in ("aux1", "aux2"):
            before = jax.tree_util.tree_leaves(variables["batch_stats"][head])
            after = jax.tree_util.tree_leaves(updates["batch_stats"][head])
            assert all(not np.allclose(a, b) for a, b in zip(before, after))


def test_aux_heads_exist_only_with_aux_logits():
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    for aux in (False, True):
        model = cnnjax.create_model("googlenet", aux_logits=aux)
        for train in (False, True):
            variables = jax.eval_shape(functools.partial(model.init, train=train),
                                       {"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                       x)
            assert ({"aux1", "aux2"} <= set(variables["params"])) == aux
            assert ({"aux1", "aux2"} <= set(variables["batch_stats"])) == aux


def test_googlenet_profile_with_and_without_aux_equals_torchvision():
    """torchvision: aux heads add 6,379,984 params and 512 BN buffer elements, no eval MACs."""
    for overrides, row in (({}, "googlenet"), ({"aux_logits": True}, "googlenet(aux_logits=True)")):
        prof = cnnjax.profile("googlenet", **overrides)
        ref = TORCHVISION[row]
        assert (prof.params, prof.batch_stats, prof.macs) == (
            int(ref["params"]), int(ref["bn_buffers"]), int(ref["macs"]))
        assert not [layer.name for layer in prof.layers if layer.name.startswith(("aux", "("))]
    assert cnnjax.profile("googlenet", aux_logits=True).params == 13_004_888


def test_googlenet_batchnorm_is_torchvisions_basicconv2d():
    """Every BatchNorm has epsilon 1e-3 (torchvision's BasicConv2d), the paper network has none."""
    def epsilons(name):
        seen = []

        def record(f, args, kwargs, context):
            if isinstance(context.module, nn.BatchNorm):
                seen.append(context.module.epsilon)
            return f(*args, **kwargs)

        model = cnnjax.create_model(name, aux_logits=True)
        with nn.intercept_methods(record):
            jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                           jax.ShapeDtypeStruct((1, 96, 96, 3), jnp.float32))
        return seen

    assert len(epsilons("googlenet")) == 57 + 2 and set(epsilons("googlenet")) == {1e-3}
    assert epsilons("googlenet_v1") == []


def test_googlenet_v1_equals_the_paper_reconstruction():
    """derived_counts.csv exactly. The paper's Table 1 sums to 6,797.7K params and 1,502M ops:
    ours are 200,852 params (3.0%) and 80.7M MACs (5.4%) more, and the MACs gap is its conv1 row
    (Table 1: 34M; 7x7x3x64 at 112x112 is 118.0M). Every other row is within 1M of Table 1 but
    inception5a (51.1M vs 54M)."""
    ref = DERIVED["GoogLeNet paper (Table 1, true 5x5, no BN, no aux)"]
    prof = cnnjax.profile("googlenet_v1")
    assert (prof.params, prof.macs) == (int(ref["params"]), int(ref["macs"]))
    assert (prof.params, prof.macs) == (6_998_552, 1_582_671_872)
    assert prof.params - 6_797_700 == 200_852 and prof.macs - 1_502_000_000 == 80_671_872

    table1_mops = {"conv1": 34, "conv2": 360, "inception3a": 128, "inception3b": 304,
                   "inception4a": 73, "inception4b": 88, "inception4c": 100, "inception4d": 119,
                   "inception4e": 170, "inception5a": 54, "inception5b": 71, "fc": 1}
    ours = {}
    for layer in prof.layers:  # Table 1's conv2 row is our conv2 (1x1 reduce) and conv3 (3x3)
        row = "conv2" if layer.name.startswith("conv3/") else layer.name.split("/")[0]
        ours[row] = ours.get(row, 0) + layer.macs
    assert {k for k, v in ours.items() if v} == set(table1_mops)
    assert ours["conv1"] == 112 * 112 * 64 * 7 * 7 * 3 == 118_013_952
    off = {k for k, mops in table1_mops.items() if abs(ours[k] / 1e6 - mops) >= 1}
    assert off == {"conv1", "inception5a"}


def test_googlenet_v1_differs_from_googlenet_by_the_5x5_branch_alone():
    """MACs: 16 extra taps (5x5 vs 3x3) on every "5x5" conv, nothing else. Params: those taps'
    weights, less one per conv channel (a bias where torchvision has BN's scale and offset)."""
    v1, tv = cnnjax.profile("googlenet_v1"), cnnjax.profile("googlenet")
    side = {"3": 28, "4": 14, "5": 7}  # the map size of each Inception stage at 224
    c5 = {k: w[3] * w[4] for k, w in googlenet.WIDTHS.items()}  # 5x5-reduce x 5x5 channels
    assert v1.macs - tv.macs == sum(16 * c * side[k[0]] ** 2 for k, c in c5.items()) == 84_295_680
    channels = 64 + 64 + 192 + sum(sum(w) for w in googlenet.WIDTHS.values())
    assert v1.params - tv.params == 16 * sum(c5.values()) - channels == 380_928 - 7_280
    assert v1.batch_stats == 0


def test_googlenet_v1_has_the_papers_stem_and_aux_heads():
    prof = cnnjax.profile("googlenet_v1", aux_logits=True)
    names = [layer.name for layer in prof.layers]
    stem = names[:names.index("inception3a/branch1x1/conv")]
    assert stem == ["conv1/conv", "maxpool1", "lrn1", "conv2/conv", "conv3/conv", "lrn2",
                    "maxpool2"]
    by_name = {layer.name: layer for layer in prof.layers}
    assert by_name["conv3/conv"].params == 3 * 3 * 64 * 192 + 192  # conv biases
    assert by_name["maxpool4"].kernel == (3, 3)  # torchvision's is 2x2
    assert {l.name: l.kernel for l in cnnjax.profile("googlenet").layers}["maxpool4"] == (2, 2)
    # Aux heads (Sec. 5): conv 128 + FC 1024 + FC 1000, with biases, on 512 and 528 channels.
    heads = (512 + 528) * 128 + 2 * (128 + 2048 * 1024 + 1024 + 1024 * 1000 + 1000)
    assert prof.params == 6_998_552 + heads == 13_378_280
    assert prof.macs == 1_582_671_872


def test_googlenet_v1_aux_heads_need_79_pixels():
    model = cnnjax.create_model("googlenet_v1", aux_logits=True)
    with pytest.raises(ValueError, match="googlenet_v1 with aux_logits=True needs an input of "
                                         "at least 79x79 pixels; got 78x78"):
        model.init(jax.random.key(0), jnp.zeros((1, 78, 78, 3)), train=False)
    assert cnnjax.create_model("googlenet_v1").min_input_size == 31  # without the heads


# ---------------------------------------------------------------------------------------------
# DenseNet


@pytest.mark.parametrize("name, growth, blocks, stem, final", [
    ("densenet121", 32, (6, 12, 24, 16), 64, 1024), ("densenet161", 48, (6, 12, 36, 24), 96, 2208),
    ("densenet169", 32, (6, 12, 32, 32), 64, 1664), ("densenet201", 32, (6, 12, 48, 32), 64, 1920),
])
def test_densenet_layout(name, growth, blocks, stem, final):
    model = cnnjax.create_model(name, num_classes=10)
    params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
    assert params["conv0"]["kernel"].shape == (7, 7, 3, stem)
    channels = stem
    for i, size in enumerate(blocks, start=1):
        assert f"denseblock{i}_layer{size}" in params
        assert f"denseblock{i}_layer{size + 1}" not in params
        layer3 = params[f"denseblock{i}_layer3"]  # sees the block input and two layers' maps
        assert layer3["bottleneck"]["conv1"]["kernel"].shape == (1, 1, channels + 2 * growth,
                                                                 4 * growth)
        assert layer3["conv2"]["kernel"].shape == (3, 3, 4 * growth, growth)
        channels += size * growth
        if i < len(blocks):  # compression 0.5
            assert params[f"transition{i}"]["conv"]["kernel"].shape == (1, 1, channels,
                                                                        channels // 2)
            channels //= 2
    assert f"transition{len(blocks)}" not in params
    assert channels == final and params["fc"]["kernel"].shape == (final, 10)


def test_memory_efficient_is_the_same_function_on_the_same_variables():
    """A small DenseNet (with dropout): same params tree, logits, BN updates and gradients."""
    tiny = functools.partial(DenseNet, arch="densenet_tiny", growth_rate=8, block_config=(2, 3),
                             num_init_features=16, bn_size=2, drop_rate=0.2, num_classes=5,
                             min_input_size=1)
    plain, efficient = tiny(), tiny(memory_efficient=True)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    variables = jax.jit(functools.partial(plain.init, train=False))(jax.random.key(1), x)
    efficient_shapes = jax.eval_shape(functools.partial(efficient.init, train=False),
                                      jax.random.key(1), x)
    assert (jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), efficient_shapes)
            == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), variables))
    w = jax.random.normal(jax.random.key(2), (4, 5))
    steps = [jax.jit(train_step_outputs(m, w)).lower(variables, x).compile()
             for m in (plain, efficient)]
    a, b = (step(variables, x) for step in steps)
    for part_a, part_b in zip(a, b):  # logits, BatchNorm updates, gradients
        assert_tree_close(part_a, part_b)
    assert _nonzero(b[2])
    # XLA:CPU merges the recomputation back into the forward pass: the step must not grow
    # (beyond scheduling noise); on a GPU it shrinks (the densenet121 test below).
    temp = [step.memory_analysis().temp_size_in_bytes for step in steps]
    print(f"\ntiny DenseNet step: XLA temp {temp[0]:,} -> {temp[1]:,} bytes")
    assert temp[1] <= 1.01 * temp[0]
    # The point of the option: fewer bytes kept from the forward pass for the backward pass.
    assert residual_bytes(efficient, variables, x) < 0.9 * residual_bytes(plain, variables, x)


def test_drop_rate_uses_the_dropout_rng():
    model = DenseNet(arch="densenet_tiny", growth_rate=8, block_config=(2,), num_init_features=16,
                     drop_rate=0.5, num_classes=5, min_input_size=1)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = model.init(jax.random.key(1), x, train=False)
    run = lambda key: model.apply(variables, x, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": key})[0]
    assert not np.allclose(run(jax.random.key(2)), run(jax.random.key(3)))


def test_profile_attributes_macs_under_remat():
    """The remat'd bottleneck keeps its name scope: the same rows and MACs, no "(other)" row."""
    plain = cnnjax.profile("densenet121")
    efficient = cnnjax.profile("densenet121", memory_efficient=True)
    rows = lambda prof: [(layer.name, layer.params, layer.macs) for layer in prof.layers]
    assert rows(efficient) == rows(plain)
    assert efficient.macs == plain.macs == int(TORCHVISION["densenet121"]["macs"])
    assert "(other)" not in {layer.name for layer in efficient.layers}
    assert {layer.name: layer.macs for layer in efficient.layers}[
        "denseblock1_layer3/bottleneck/conv1"] == 56 * 56 * 128 * (64 + 2 * 32)


def densenet121_at_64(memory_efficient):
    """densenet121 (10 classes) and its batch of 8 images at 64x64."""
    return (cnnjax.create_model("densenet121", num_classes=10, memory_efficient=memory_efficient),
            jax.random.normal(jax.random.key(0), (8, 64, 64, 3)))


def test_densenet121_memory_efficient_keeps_less_for_the_backward_pass():
    """The residuals halve (202 -> 105 MB at batch 8, 64x64), measured by tracing alone (the
    variables too are only shapes): nothing compiles."""
    (plain, x), (efficient, _) = densenet121_at_64(False), densenet121_at_64(True)
    variables = jax.eval_shape(functools.partial(plain.init, train=False), jax.random.key(1), x)
    res = {False: residual_bytes(plain, variables, x),
           True: residual_bytes(efficient, variables, x)}
    print(f"\ndensenet121, batch 8, 64x64: residuals {res[False]:,} -> {res[True]:,} bytes")
    assert res[True] < 0.6 * res[False]


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="XLA:CPU compiles both settings to "
                    "the same temporary size; test_memory_efficient_is_the_same_function_on_the_"
                    "same_variables checks that it does not grow")
def test_densenet121_memory_efficient_step_is_the_same_function_in_less_memory_on_a_gpu():
    """XLA's temp buffers for the whole step shrink on a GPU (H100: 79.7 -> 59.3 MB, 59.7 ->
    40.9 MB with TF32 convs), with the same logits, BatchNorm updates and gradients. XLA:CPU
    drops remat's optimization barriers and merges the recomputed concat-BN-ReLU with the
    forward one: the same temp size (to 0.12% with fastconv's 1x1 matrix products)."""
    (plain, x), (efficient, _) = densenet121_at_64(False), densenet121_at_64(True)
    w = jax.random.normal(jax.random.key(2), (8, 10))
    variables = jax.jit(functools.partial(plain.init, train=False))(jax.random.key(1), x)
    # Full float32 convolutions: on GPUs the default (TF32) rounds the two schedules differently.
    with jax.default_matmul_precision("highest"):
        steps = {eff: jax.jit(train_step_outputs(m, w)).lower(variables, x).compile()
                 for eff, m in ((False, plain), (True, efficient))}
    outputs = {eff: step(variables, x) for eff, step in steps.items()}
    chex.assert_tree_all_finite(outputs[True])
    for part_a, part_b in zip(outputs[False], outputs[True]):  # logits, BN updates, gradients
        assert_tree_close(part_a, part_b)
    temp = {eff: s.memory_analysis().temp_size_in_bytes for eff, s in steps.items()}
    print(f"\ndensenet121 train step, batch 8, 64x64: XLA temp {temp[False]:,} -> "
          f"{temp[True]:,} bytes (memory_efficient False -> True)")
    assert temp[True] < 0.8 * temp[False]
