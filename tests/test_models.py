"""Every registered model: shapes, finiteness, gradients, BatchNorm updates, dtypes, input
checks."""
import functools
import importlib.util

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnnjax
from cnnjax import convert
from cnnjax.models import fastconv

from helpers import (
    SIBLINGS,
    assert_tree_close,
    jit_once,
    random_variables,
    residual_bytes,
    train_step_outputs,
)

# Deeper variants of a family whose every module a lighter sibling already trains in
# test_forward_train_and_gradients (resnet152: resnet50's blocks; densenet201: densenet121's):
# compiling their backward pass took 40-95 s each on a 2-core CPU, so they run the eval forward.
HEAVY = {"resnet152", "se_resnet152", "resnext101_32x8d", "resnet101", "se_resnet101",
         "wide_resnet50_2", "densenet161", "densenet169", "densenet201"}
LIGHT = [n for n in cnnjax.list_models() if n not in HEAVY and n not in SIBLINGS]


@functools.cache  # a sibling stands in for up to four variants: traced once per worker
def layer_kinds(name: str) -> frozenset:
    layers = cnnjax.profile(name, small_size(cnnjax.create_model(name))).layers
    return frozenset((layer.kind, layer.kernel, layer.stride) for layer in layers)


@pytest.mark.parametrize("variant, sibling", sorted(SIBLINGS.items()))
def test_variants_use_no_layer_kind_their_sibling_lacks(variant, sibling):
    assert sibling in LIGHT or sibling in HEAVY
    assert layer_kinds(variant) <= layer_kinds(sibling)


def small_size(model) -> int:
    return max(model.min_input_size, 32)


# Where torch is installed (.ci/run installs it), tests/test_convert.py runs every architecture
# torchvision shares at 224x224 and checks its logits against torchvision's: a stronger check of
# the same forward pass (resnet152, densenet161/201, resnext101, wide_resnet50_2 here).
TORCHVISION_CHECKED = (set(convert.shared_architectures())
                       if importlib.util.find_spec("torchvision") else set())


@pytest.mark.parametrize("name", sorted(HEAVY - set(SIBLINGS) - TORCHVISION_CHECKED))
def test_deep_variants_run_forward_to_finite_logits(name):
    model = cnnjax.create_model(name, num_classes=10)
    size = small_size(model)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    variables = random_variables(model, x, train=False)
    logits = jit_once(functools.partial(model.apply, train=False))(variables, x)
    chex.assert_shape(logits, (2, 10))
    chex.assert_tree_all_finite(logits)
    assert not np.allclose(logits[0], logits[1])  # the input reaches the output


@pytest.mark.parametrize("name", LIGHT)
def test_forward_train_and_gradients(name):
    model = cnnjax.create_model(name, num_classes=10)
    size = small_size(model)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    variables = random_variables(model, x, train=False)
    w = jax.random.normal(jax.random.key(2), (2, 10))

    train_step = train_step_outputs(model, w)

    @jit_once
    def run(variables, x):
        return (model.apply(variables, x, train=False), *train_step(variables, x))

    eval_logits, train_logits, updates, grads = run(variables, x)
    chex.assert_shape([eval_logits, train_logits], (2, 10))
    chex.assert_tree_all_finite((eval_logits, train_logits, grads))
    zero = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
            if not np.any(np.asarray(g) != 0)]
    if zero:
        # A BatchNorm offset read only through 1x1 convolutions by train-mode BatchNorms shifts
        # their inputs by a constant per channel, which they subtract: its train-mode gradient
        # is zero in exact arithmetic, and exactly zero when such a BatchNorm normalises two
        # values (a 1x1 map, batch 2: the mobile networks' last stages here). Those offsets
        # must still reach the loss in eval mode, where BatchNorm is an affine map.
        def eval_loss(params):
            return jnp.sum(model.apply({**variables, "params": params}, x, train=False) * w)
        eval_grads = jit_once(jax.grad(eval_loss))(variables["params"])
        flat = {jax.tree_util.keystr(p): g
                for p, g in jax.tree_util.tree_leaves_with_path(eval_grads)}
        unreached = [p for p in zero if not p.endswith("['bn']['bias']")
                     or not np.any(np.asarray(flat[p]) != 0)]
        assert not unreached, f"{name}: parameters with an all-zero gradient: {unreached}"
    if "batch_stats" in variables:  # train mode updates the running statistics
        before = jax.tree_util.tree_leaves(variables["batch_stats"])
        after = jax.tree_util.tree_leaves(updates["batch_stats"])
        assert any(not np.allclose(a, b) for a, b in zip(before, after))
    else:
        assert updates == {} or not updates.get("batch_stats")


@pytest.mark.parametrize("name", cnnjax.list_models())
def test_num_classes_and_bf16_compute_keeps_float32_params(name):
    model = cnnjax.create_model(name, num_classes=7, dtype=jnp.bfloat16)
    size = small_size(model)
    x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    chex.assert_shape(logits, (3, 7))
    assert logits.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "alexnet_v1"])
def test_bf16_forward_is_finite_and_close_to_float32(name):
    f32 = cnnjax.create_model(name, num_classes=10)
    bf16 = cnnjax.create_model(name, num_classes=10, dtype=jnp.bfloat16)
    size = small_size(f32)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    variables = random_variables(f32, x, train=False)
    a, b = (jit_once(functools.partial(m.apply, train=False))(variables, x) for m in (f32, bf16))
    chex.assert_tree_all_finite(b)
    assert jnp.abs(a - b.astype(jnp.float32)).max() <= 0.05 * jnp.abs(a).max() + 1e-3


@pytest.mark.parametrize("name", cnnjax.list_models())
def test_min_input_size_is_exact(name):
    """The model takes min_input_size; one pixel less raises a ValueError naming the minimum,
    and without the check that smaller input would really break (a layer with an empty output)."""
    model = cnnjax.create_model(name)
    m = model.min_input_size
    prof = cnnjax.profile(name, m)
    assert all(0 not in layer.output_shape for layer in prof.layers)
    if m == 1:
        return
    with pytest.raises(ValueError, match=f"at least {m}x{m} pixels; got {m - 1}x{m - 1}"):
        cnnjax.profile(name, m - 1)
    try:
        unchecked = cnnjax.profile(name, m - 1, min_input_size=1)
    except Exception:  # noqa: BLE001 - any failure shows the size is really too small
        return
    assert any(0 in layer.output_shape for layer in unchecked.layers)


def test_alexnet_at_32_says_the_smallest_size():
    model = cnnjax.create_model("alexnet")
    with pytest.raises(ValueError,
                       match=r"alexnet needs an input of at least 63x63 pixels; got 32x32"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


@pytest.mark.parametrize("shape, message", [
    ((224, 224, 3), r"expects a batch of images of shape \(N, H, W, 3\) \(NHWC\); got an array "
                    r"of shape \(224, 224, 3\)"),
    ((1, 64, 64, 1), r"expects 3 input channels in the last axis \(NHWC\); got shape "
                     r"\(1, 64, 64, 1\)"),
    ((1, 3, 64, 64), r"looks channels-first \(NCHW\): transpose it to NHWC"),
])
def test_wrong_rank_or_channels_is_a_clear_error(shape, message):
    model = cnnjax.create_model("resnet18")
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.key(0), jnp.zeros(shape), train=False)


def test_integer_images_are_refused():
    model = cnnjax.create_model("resnet18")
    with pytest.raises(ValueError, match="floating-point images"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8), train=False)


def test_channel_check_also_guards_apply():
    """Initialised for 3 channels, a 1-channel batch fails with the message, not an XLA error."""
    model = cnnjax.create_model("resnet18")
    variables = random_variables(model, jnp.zeros((1, 32, 32, 3)), train=False)
    with pytest.raises(ValueError, match="expects 3 input channels"):
        model.apply(variables, jnp.zeros((1, 32, 32, 1)), train=False)


def test_in_channels_override_for_grayscale():
    model = cnnjax.create_model("resnet18", num_classes=10, in_channels=1)
    variables = random_variables(model, jnp.zeros((2, 8, 8, 1)), train=False)
    apply = jit_once(functools.partial(model.apply, train=False))
    chex.assert_shape(apply(variables, jnp.zeros((2, 8, 8, 1))), (2, 10))
    assert variables["params"]["conv_init"]["kernel"].shape == (7, 7, 1, 64)


def test_dropout_needs_and_uses_the_dropout_rng():
    model = cnnjax.create_model("alexnet", num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, 63, 63, 3))
    variables = random_variables(model, x, train=False)
    train = jit_once(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key}))
    a, b = (train(variables, x, jax.random.key(k)) for k in (2, 3))
    assert not np.allclose(a, b)
    evaluate = jit_once(functools.partial(model.apply, train=False))
    np.testing.assert_array_equal(evaluate(variables, x), evaluate(variables, x))


def test_zero_init_residual_makes_blocks_start_as_identity_branches():
    model = cnnjax.create_model("resnet50", zero_init_residual=True)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    init = lambda model: jit_once(functools.partial(model.init, train=False))(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    real = init(model)
    for stage_block in ("stage1_block1", "stage4_block3"):
        assert np.all(np.asarray(real["params"][stage_block]["bn3"]["scale"]) == 0)
        assert np.all(np.asarray(real["params"][stage_block]["bn1"]["scale"]) == 1)
    default = init(cnnjax.create_model("resnet18"))
    assert np.all(np.asarray(default["params"]["stage1_block1"]["bn2"]["scale"]) == 1)
    assert variables["params"]["stage1_block1"]["bn3"]["scale"].shape == (256,)


@pytest.mark.parametrize("block", ["BasicBlock", "Bottleneck"])
def test_resnet_remat_is_the_same_function(block):
    """`remat=True` on a two-block ResNet of each block kind (the bottleneck with SE): the same
    parameter paths and shapes, logits, BatchNorm updates and gradients."""
    from cnnjax.models import resnet
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    plain, remat = (resnet.ResNet(arch="resnet_tiny", stage_sizes=(1, 1),
                                  block=getattr(resnet, block), num_classes=10,
                                  se_reduction=16 if block == "Bottleneck" else None, remat=r)
                    for r in (False, True))
    init = [functools.partial(m.init, train=False) for m in (plain, remat)]
    chex.assert_trees_all_equal_shapes_and_dtypes(  # same paths: flax draws each by its path
        *(jax.eval_shape(f, jax.random.key(1), x) for f in init))
    variables = random_variables(plain, x, train=False)
    w = jax.random.normal(jax.random.key(2), (2, 10))
    a, b = (jit_once(train_step_outputs(m, w))(variables, x) for m in (plain, remat))
    chex.assert_tree_all_finite(b)
    for part_a, part_b in zip(a, b):  # logits, BatchNorm updates, gradients
        assert_tree_close(part_a, part_b)


@pytest.mark.parametrize("arch, ratio", [("resnet18", 0.45), ("se_resnet50", 0.2)])
def test_resnet_remat_keeps_less_for_the_backward_pass(arch, ratio):
    """The activations the forward pass keeps for the backward one, beyond the weights, by
    tracing at 32x32, batch 2: resnet18 1.73 -> 0.70 MB, se_resnet50 8.66 -> 1.48 MB (XLA:CPU
    compiles both settings to about the same temp buffers, as for DenseNet's memory_efficient:
    the saving is the accelerators'). Same parameter shapes and profile counts."""
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    models = [cnnjax.create_model(arch, num_classes=10, remat=r) for r in (False, True)]
    shapes = [jax.eval_shape(functools.partial(m.init, train=False), jax.random.key(1), x)
              for m in models]
    chex.assert_trees_all_equal_shapes_and_dtypes(*shapes)
    weights = sum(v.size * v.dtype.itemsize for v in jax.tree_util.tree_leaves(shapes[0]["params"]))
    # XLA's convolutions keep each kernel once, as it is; fastconv's "small" path (the last
    # stages' 1x1 and 2x2 maps at 32x32) keeps its concatenated taps' kernels instead, which
    # would blur "beyond the weights"
    with fastconv.impl("xla"):
        kept = [residual_bytes(m, shapes[0], jnp.zeros(x.shape)) - weights for m in models]
    assert kept[1] < ratio * kept[0], kept
    p0, p1 = (cnnjax.profile(arch, 32, num_classes=10, remat=r) for r in (False, True))
    assert (p0.params, p0.macs, len(p0.layers)) == (p1.params, p1.macs, len(p1.layers))


def test_shufflenet_v1_zero_init_residual_starts_added_units_at_relu_x():
    from cnnjax.models import layers, shufflenet
    init = lambda model: jit_once(functools.partial(model.init, train=False))(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    params = init(cnnjax.create_model("shufflenet_v1_g3", zero_init_residual=True))
    scale = lambda block: np.asarray(params[block]["gconv2"]["bn"]["scale"])
    assert np.all(scale("stage3_block2") == 0) and np.all(scale("stage4_block4") == 0)
    # A stride-2 unit concatenates its branch to the pooled shortcut: that branch keeps scale 1.
    assert np.all(scale("stage3_block1") == 1)
    assert np.all(np.asarray(params["stage3_block2"]["dw"]["bn"]["scale"]) == 1)
    unit = shufflenet.ShuffleUnit(48, 1, 3, 3, layers.conv(jnp.float32, jnp.float32),
                                  layers.batch_norm(True, jnp.float32, jnp.float32),
                                  zero_init_last=True)
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 48))
    variables = unit.init(jax.random.key(2), x)
    y, _ = unit.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_array_equal(y, jax.nn.relu(x))
    default = init(cnnjax.create_model("shufflenet_v1_g3"))
    assert np.all(np.asarray(default["stage3_block2"]["gconv2"]["bn"]["scale"]) == 1)
