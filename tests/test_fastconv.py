"""cnnjax.models.fastconv: the per-shape convolution paths compute XLA's convolution, forward and
backward, within float32 rounding; max pooling gives XLA's outputs bit for bit and its gradient
(to the first maximum of each window) within rounding; the rules pick the fast paths where they
should; the switch turns them off; models keep their parameters, names and counted
multiply-adds."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cnnjax
from cnnjax import runtime
from cnnjax.models import fastconv, layers

from helpers import jit_once, random_variables

DN = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))


def conv_and_grads(impl, x, k, strides, padding, groups):
    """The output and the gradients (input, kernel) of sum(conv * r) for a fixed random r."""
    def f(x, k):
        return fastconv.conv_general_dilated(x, k, strides, padding, dimension_numbers=DN,
                                             feature_group_count=groups)

    @jax.jit
    def run(x, k, r):
        y, vjp = jax.vjp(f, x, k)
        return (y, *vjp(r.astype(y.dtype)))

    with fastconv.impl(impl):  # read when `run` is traced, inside
        shape = jax.eval_shape(f, x, k).shape
        return run(x, k, np.random.default_rng(3).standard_normal(shape, np.float32))


def assert_same_as_xla(x, k, strides, padding, groups, path):
    assert fastconv.choose(x.shape, k.shape, strides, padding, groups, False) == path
    ours = conv_and_grads("auto", x, k, strides, padding, groups)
    ref = conv_and_grads("xla", x, k, strides, padding, groups)
    for name, a, b in zip(("output", "input gradient", "kernel gradient"), ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        # float32 sums of at most a few thousand terms in another order: a few ulps of the
        # largest magnitude
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * scale, err_msg=name)


@pytest.mark.parametrize("n, h, w, c, kernel, stride, pad", [
    (2, 9, 7, 4, 3, 1, 1),     # odd, non-square map
    (2, 9, 8, 5, 3, 2, 1),     # stride 2, the rows and columns not divisible by it
    (2, 10, 11, 4, 5, 2, 2),   # MnasNet / MobileNetV3's 5x5
    (2, 7, 7, 5, 3, 2, 0),     # unpadded
    (2, 12, 12, 3, 7, 3, 3),   # stride 3, 7x7
])
def test_depthwise_as_shifted_multiply_adds_matches_xla(n, h, w, c, kernel, stride, pad):
    x = jax.random.normal(jax.random.key(0), (n, h, w, c))
    k = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, c))
    assert_same_as_xla(x, k, (stride, stride), ((pad, pad), (pad, pad)), c, "shift")


def test_depthwise_kernel_gradient_never_writes_out_its_taps():
    """The kernel gradient's kh*kw per-channel sums are one reduction: XLA reads each window
    where it lies (the taps were each written out in full for a YNNPACK reduction of its own,
    nine passes over the map per depthwise layer: MobileNet v2's step 445 -> 340 ms)."""
    x = jax.random.normal(jax.random.key(0), (4, 28, 28, 32))  # large enough for YNNPACK
    k = jax.random.normal(jax.random.key(1), (3, 3, 1, 32))

    def f(x, k):
        y, vjp = jax.vjp(lambda x, k: fastconv.conv_general_dilated(
            x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN, feature_group_count=32),
            jnp.maximum(x, 0), k)
        return vjp(jnp.cos(y) * 2)

    text = runtime.jit(f).lower(x, k).compile().as_text()
    entry = [line.split("=", 1)[1].split("{")[0].strip()
             for line in text[text.index("ENTRY"):].splitlines()[1:] if " = " in line]
    # the input and the input gradient alone have the map's shape; no tap of it is kept
    assert sum(shape.startswith("f32[4,28,28,32]") for shape in entry) == 2, entry


def test_depthwise_with_uneven_padding_matches_xla():
    x = jax.random.normal(jax.random.key(0), (2, 8, 9, 6))
    k = jax.random.normal(jax.random.key(1), (3, 3, 1, 6))
    assert_same_as_xla(x, k, (2, 2), ((0, 1), (1, 0)), 6, "shift")


@pytest.mark.parametrize("c, f, groups, stride", [
    (16, 24, 1, 1), (16, 24, 1, 2),   # ResNet/DenseNet/MobileNet 1x1s; ResNet's downsample
    (24, 16, 8, 1), (12, 9, 3, 2),    # ShuffleNet v1's grouped 1x1s
])
def test_pointwise_as_a_matrix_product_matches_xla(c, f, groups, stride):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, c))
    k = jax.random.normal(jax.random.key(1), (1, 1, c // groups, f))
    assert_same_as_xla(x, k, (stride, stride), ((0, 0), (0, 0)), groups, "dot")


def test_pointwise_kernel_gradient_reads_the_output_gradient_in_place():
    """The 1x1 product's kernel gradient contracts the rows of two row-major matrices: XLA
    compiles it without a transposed copy of the output gradient (its 4-D form made one, a
    pass written across the whole activation)."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 16, 32))

    def f(x, k):
        y, vjp = jax.vjp(lambda x, k: fastconv.conv_general_dilated(
            x, k, (1, 1), ((0, 0), (0, 0)), dimension_numbers=DN), jnp.maximum(x, 0), k)
        return vjp(jnp.cos(y) * 2)  # the gradient comes out of a fusion, as in a model

    text = runtime.jit(f).lower(x, k).compile().as_text()
    assert "f32[128,32]" in text and "f32[32,128]" not in text  # rows x channels, never transposed


@pytest.mark.parametrize("h, c, f, groups, stride, pad", [
    (9, 8, 8, 4, 1, 1),     # ResNeXt's grouped 3x3 (2 channels a group)
    (9, 12, 6, 3, 2, 1),    # stride 2 on an odd map, fewer outputs than inputs
    (8, 8, 16, 2, 2, 0),    # unpadded, more outputs a group than inputs
])
def test_grouped_as_shifted_batched_products_matches_xla(h, c, f, groups, stride, pad):
    x = jax.random.normal(jax.random.key(0), (2, h, h + 1, c))
    k = jax.random.normal(jax.random.key(1), (3, 3, c // groups, f))
    assert_same_as_xla(x, k, (stride, stride), ((pad, pad), (pad, pad)), groups, "grouped")


@pytest.mark.parametrize("n, h, c, f, kernel, stride, padding", [
    (2, 2, 16, 8, 3, 1, ((1, 1), (1, 1))),   # ResNet's last 3x3s on 32-64 px images: 2x2 maps
    (2, 1, 16, 8, 3, 1, ((1, 1), (1, 1))),   # a 1x1 map: the centre tap alone reads input
    (3, 4, 8, 16, 3, 2, ((1, 1), (1, 1))),   # stride 2 onto 2x2
    (2, 2, 8, 4, 5, 1, ((2, 2), (2, 2))),    # 5x5
    (2, 3, 8, 4, 3, 2, ((0, 1), (1, 0))),    # uneven padding, odd map
    (2, 1, 4, 3, 2, 3, ((2, 2), (2, 2))),    # every window over padding alone: zeros
])
def test_small_maps_as_one_product_match_xla(n, h, c, f, kernel, stride, padding):
    x = jax.random.normal(jax.random.key(0), (n, h, h, c))
    k = jax.random.normal(jax.random.key(1), (kernel, kernel, c, f))
    assert_same_as_xla(x, k, (stride, stride), padding, 1, "small")


def test_small_maps_leave_out_the_taps_that_read_padding_alone():
    """On a 1x1 map with padding 1 a 3x3 kernel's eight outer taps multiply zeros: the product
    contracts the centre tap's channels alone."""
    def contraction(h):
        x, k = jnp.ones((2, h, h, 16)), jnp.ones((3, 3, 16, 8))
        eqns = jax.make_jaxpr(lambda x, k: fastconv.conv_general_dilated(
            x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN))(x, k).jaxpr.eqns
        dot, = [e for e in eqns if e.primitive.name == "dot_general"]
        return dot.invars[0].aval.shape[-1]
    assert contraction(1) == 16
    assert contraction(2) == 9 * 16  # on 2x2 every tap reads some input


def pool_and_grad(impl, x, window, strides, padding):
    """The max pool of `x` and the input gradient of sum(pool * r) for a fixed random r."""
    def f(x):
        return fastconv.max_pool(x, window, strides, padding)

    @jax.jit
    def run(x, r):
        y, vjp = jax.vjp(f, x)
        return y, vjp(r.astype(y.dtype))[0]

    with fastconv.impl(impl):
        shape = jax.eval_shape(f, x).shape
        return run(x, np.random.default_rng(3).standard_normal(shape, np.float32))


def tied(shape, dtype=jnp.float32):
    """ReLU outputs on a coarse grid: most windows hold several equal maxima (often 0)."""
    x = jnp.round(jax.random.normal(jax.random.key(0), shape) * 2) / 2
    return jnp.maximum(x, 0).astype(dtype)


@pytest.mark.parametrize("shape, window, stride, padding", [
    ((2, 12, 11, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool, odd width
    ((2, 8, 10, 3), (2, 2), (2, 2), ((0, 0), (0, 0))),   # VGG's 2x2
    ((2, 7, 9, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),    # GoogLeNet's branch pool
    ((2, 13, 13, 3), (3, 3), (2, 2), ((0, 0), (0, 0))),  # AlexNet's, unpadded
    ((2, 14, 12, 3), (3, 3), (2, 2), ((0, 1), (0, 1))),  # ceil mode: windows reach the padding
    ((1, 9, 9, 2), (3, 2), (2, 1), ((1, 0), (0, 1))),    # non-square window, uneven padding
])
def test_max_pooling_as_shifted_windows_matches_xla(shape, window, stride, padding):
    assert fastconv.choose_pool(window) == "shift"
    x = tied(shape)
    (y, gx), (y_ref, gx_ref) = (pool_and_grad(i, x, window, stride, padding)
                                for i in ("auto", "xla"))
    np.testing.assert_array_equal(y, y_ref)
    assert gx.shape == x.shape and gx.dtype == x.dtype
    # the same inputs receive the same gradients; overlapping windows may add them in another
    # order
    np.testing.assert_allclose(gx, gx_ref, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(gx_ref))))
    if window == stride:
        np.testing.assert_array_equal(gx, gx_ref)


def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window():
    """As XLA's own and PyTorch's: a tie sends the whole gradient to the first (row-major) of the
    equal inputs, none is split among them."""
    x = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(-1.0)
    y, gx = pool_and_grad("auto", x, (2, 2), (2, 2), ((0, 0), (0, 0)))
    r = np.random.default_rng(3).standard_normal((1, 2, 2, 1), np.float32)
    expected = np.zeros((4, 4), np.float32)
    expected[0, 0], expected[0, 2], expected[2, 0], expected[2, 2] = r.ravel()
    np.testing.assert_array_equal(y, np.zeros((1, 2, 2, 1)))
    np.testing.assert_array_equal(gx[0, :, :, 0], expected)


def test_bfloat16_stays_bfloat16_and_close_to_xla():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8), jnp.bfloat16)
    for k, groups in ((jax.random.normal(jax.random.key(1), (3, 3, 1, 8), jnp.bfloat16), 8),
                      (jax.random.normal(jax.random.key(1), (3, 3, 2, 8), jnp.bfloat16), 4),
                      (jax.random.normal(jax.random.key(1), (1, 1, 8, 4), jnp.bfloat16), 1)):
        pad = ((1, 1), (1, 1)) if k.shape[0] == 3 else ((0, 0), (0, 0))
        ours, ref = (conv_and_grads(impl, x, k, (1, 1), pad, groups)[0] for impl in ("auto", "xla"))
        assert ours.dtype == jnp.bfloat16
        np.testing.assert_allclose(ours.astype(np.float32), ref.astype(np.float32), atol=0.1,
                                   rtol=0.02)
    (y, gx), (y_ref, gx_ref) = (pool_and_grad(i, tied((2, 9, 9, 4), jnp.bfloat16), (3, 3),
                                              (2, 2), ((1, 1), (1, 1))) for i in ("auto", "xla"))
    assert y.dtype == gx.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(gx.astype(np.float32), gx_ref.astype(np.float32), atol=0.05)


@pytest.mark.parametrize("x, k, strides, padding, groups, dilated, path", [
    ((8, 56, 56, 64), (3, 3, 64, 64), (1, 1), ((1, 1),) * 2, 1, False, "xla"),  # full 3x3
    ((8, 56, 56, 64), (3, 3, 2, 64), (1, 1), ((1, 1),) * 2, 32, False, "grouped"),  # ResNeXt
    ((8, 56, 56, 64), (3, 3, 1, 128), (1, 1), ((1, 1),) * 2, 64, False, "xla"),  # multiplier 2
    ((8, 56, 56, 64), (3, 3, 1, 64), (1, 1), ((1, 1),) * 2, 64, True, "xla"),  # dilated
    ((8, 56, 56, 64), (1, 1, 64, 64), (1, 1), ((1, 1),) * 2, 1, False, "xla"),  # padded 1x1
    ((8, 56, 56, 64), (3, 3, 1, 64), (2, 2), ((1, 1),) * 2, 64, False, "shift"),
    ((8, 56, 56, 64), (1, 1, 64, 256), (2, 2), ((0, 0),) * 2, 1, False, "dot"),
    ((8, 2, 2, 512), (3, 3, 512, 512), (1, 1), ((1, 1),) * 2, 1, False, "small"),  # 2x2 map
    ((8, 4, 4, 128), (3, 3, 128, 256), (2, 2), ((1, 1),) * 2, 1, False, "small"),  # onto 2x2
    ((8, 3, 3, 512), (3, 3, 512, 512), (1, 1), ((1, 1),) * 2, 1, False, "xla"),  # 3x3 map
    ((8, 4, 4, 512), (3, 3, 512, 512), (1, 1), ((1, 1),) * 2, 1, False, "xla"),  # 4x4 map
    ((8, 2, 2, 64), (3, 3, 1, 64), (1, 1), ((1, 1),) * 2, 64, False, "shift"),  # depthwise
])
def test_the_rule_picks_the_fast_path_only_where_it_applies(x, k, strides, padding, groups,
                                                             dilated, path):
    assert fastconv.choose(x, k, strides, padding, groups, dilated) == path
    with fastconv.impl("xla"):
        assert fastconv.choose(x, k, strides, padding, groups, dilated) == "xla"


def test_the_pooling_rule():
    assert fastconv.choose_pool((3, 3)) == fastconv.choose_pool((5, 5)) == "shift"
    assert fastconv.choose_pool((7, 7)) == "xla"  # 49 taps: not measured
    with fastconv.impl("xla"):
        assert fastconv.choose_pool((3, 3)) == "xla"


def test_the_switch_is_checked_and_restored():
    assert fastconv.get_impl() == "auto"
    with pytest.raises(ValueError, match="unknown convolution implementation 'fast'; expected "
                                         "one of auto, xla"):
        fastconv.set_impl("fast")
    with fastconv.impl("xla"):
        assert fastconv.get_impl() == "xla"
    assert fastconv.get_impl() == "auto"


def primitives(f, *args) -> list[str]:
    return [e.primitive.name for e in jax.make_jaxpr(f)(*args).jaxpr.eqns]


@pytest.mark.parametrize("name", [
    "shufflenet_v1_g3",  # depthwise, 1x1 and grouped 1x1
    "resnet18",  # at 64x64 its last stage's 3x3s run on 2x2 maps: the "small" path
])
def test_a_model_is_the_same_function_with_the_same_parameters(name):
    """Same parameter tree, same logits and gradients within rounding, same counted MACs; and
    the fast model really has no depthwise or 1x1 convolution and no XLA max pooling left."""
    model = cnnjax.create_model(name, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    with fastconv.impl("xla"):
        variables = random_variables(model, x, train=False)
    auto_vars = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, auto_vars) == jax.tree.map(jnp.shape, variables)

    def loss(params, x):  # eval mode: train-mode BatchNorm over 2x2 maps would amplify rounding
        logits = model.apply({**variables, "params": params}, x, train=False)
        return jnp.sum(logits ** 2), logits

    results = {}
    for impl in ("xla", "auto"):
        with fastconv.impl(impl):
            results[impl] = jit_once(jax.grad(loss, has_aux=True))(variables["params"], x)
            # a new function for each setting: make_jaxpr caches traces by function
            eqns = jax.make_jaxpr(lambda p, x: loss(p, x))(variables["params"], x).jaxpr.eqns
            assert ("reduce_window_max" in [e.primitive.name for e in eqns]) == (impl == "xla")
            if impl == "auto":
                convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
    for a, b in zip(jax.tree.leaves(results["auto"]), jax.tree.leaves(results["xla"])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(b))))
    # what is left for XLA: the stem (a full 3x3), and ShuffleNet v1's grouped 3x3s are
    # depthwise, so only full convolutions with kernels larger than 1x1
    for e in convs:
        kernel = e.invars[1].aval.shape
        groups = e.params["feature_group_count"]
        assert kernel[:2] != (1, 1) and not (groups > 1 and kernel[2] == 1), (kernel, groups)
    with fastconv.impl("xla"):
        reference = cnnjax.profile(name, 224).macs
    assert cnnjax.profile(name, 224).macs == reference  # the profile still counts convolutions


def bn_loss_and_grads(impl, x, dtype=None, use_stats=False):
    """Train-mode BatchNorm of `x` under `impl`: its output, updated statistics and the gradients
    (input, scale, bias) of a loss of the output (and of the new statistics, `use_stats`)."""
    model = layers.batch_norm(True, dtype, jnp.float32)()
    with fastconv.impl(impl):
        variables = model.init(jax.random.key(0), x)
        params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(1), p.shape),
                              variables["params"])

        @jax.jit
        def run(params, x):
            def loss(params, x):
                y, new = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                     x, mutable=["batch_stats"])
                total = jnp.sum(jnp.sin(y.astype(jnp.float32)) * jnp.arange(y.shape[-1]))
                if use_stats:
                    total += jnp.sum(jnp.cos(new["batch_stats"]["mean"]))
                    total += jnp.sum(jnp.sqrt(new["batch_stats"]["var"]))
                return total, (y, new)
            (_, (y, new)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
            return y, new, grads
        return run(params, x)


@pytest.mark.parametrize("shape, dtype, use_stats", [
    ((8, 7, 7, 24), None, False), ((3, 5, 4, 16), None, True), ((32, 10), None, False),
    ((4, 6, 6, 8), jnp.bfloat16, False)])
def test_batch_norm_with_its_backward_written_out_matches_flax(shape, dtype, use_stats):
    """layers.BatchNorm in training mode under "auto": flax's output and running statistics bit
    for bit, its gradients within float32 rounding; the same variables and names."""
    x = (jax.random.normal(jax.random.key(2), shape) * 3 + 1).astype(dtype or jnp.float32)
    ours, ref = (bn_loss_and_grads(impl, x, dtype, use_stats) for impl in ("auto", "xla"))
    assert ours[0].dtype == ref[0].dtype == (dtype or jnp.float32)
    np.testing.assert_array_equal(np.asarray(ours[0], np.float32), np.asarray(ref[0], np.float32))
    assert jax.tree.structure(ours[1]) == jax.tree.structure(ref[1])
    for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(ref[1])):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(ours[2]) == jax.tree.structure(ref[2])
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    for a, b in zip(jax.tree.leaves(ours[2]), jax.tree.leaves(ref[2])):
        assert a.dtype == b.dtype
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * float(np.max(np.abs(b))))


def test_batch_norm_takes_its_own_path_only_in_training_on_the_cpu():
    """The written-out backward is a custom_vjp in the traced train step under "auto" alone;
    evaluation (running statistics) and "xla" are flax's code."""
    x = jnp.ones((2, 4, 4, 8))

    def custom_calls(train, impl):
        model = layers.batch_norm(train, None, jnp.float32)()
        with fastconv.impl(impl):
            variables = model.init(jax.random.key(0), x)
            jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))(
                variables, x)
        return sum(e.primitive.name == "custom_vjp_call" for e in jaxpr.jaxpr.eqns)

    for train in (True, False):  # a method interceptor (cnnjax.profile) sees one BatchNorm
        model = layers.batch_norm(train, None, jnp.float32)()
        variables, seen = model.init(jax.random.key(0), x), []
        def record(f, args, kwargs, context, seen=seen):
            seen.append(context.method_name)
            return f(*args, **kwargs)
        with nn.intercept_methods(record):
            model.apply(variables, x, mutable=["batch_stats"])
        assert seen == ["__call__"], (train, seen)
    assert fastconv.choose_batch_norm() == "fast"
    assert custom_calls(True, "auto") == 1
    assert custom_calls(True, "xla") == 0 and custom_calls(False, "auto") == 0
    with fastconv.impl("xla"):
        assert fastconv.choose_batch_norm() == "xla"
