"""Convolution as the CPU computes it fastest: the `conv_general_dilated` every cnnjax Conv uses.

XLA's CPU convolution is slow for some shapes that are cheap when written another way (issue
11): a depthwise 3x3 at 112x112 trains several times slower than nine shifted multiply-adds; a
1x1 convolution runs below half the speed of the same product as a matrix multiplication. This
module computes the SAME function (same kernel layout HWIO, same names and parameters; only the
float32 summation order differs) by one of these paths, chosen per shape:

- "xla": `lax.conv_general_dilated` itself;
- "dot": a 1x1 convolution (any stride, no padding) as one matrix product over the channels,
  grouped convolutions as a batched product per group;
- "shift": a depthwise convolution (one filter per channel) as kh*kw shifted, strided
  multiply-adds of the padded input, accumulated in float32, with a backward pass of its own
  (the input gradient is again such a sum, over the dilated gradient with the kernel flipped).
- "grouped": a grouped kh x kw convolution with several channels per group (ResNeXt's 3x3s)
  as kh*kw shifted, strided windows of the padded input, each contracted per group by one
  batched matrix product, accumulated in float32; its gradients are those of that composition.
- "small": a full kh x kw convolution onto an output map of at most 2x2 (ResNet's last stages
  on 32x32 to 64x64 images) as one matrix product over the concatenated windows that read any
  input (im2col); XLA's is some fifty times slower there.

- max pooling ("shift"): the max of the kh*kw shifted, strided windows of the input padded with
  -inf, with a backward pass of its own that routes each output's gradient to the first
  maximum of its window, as XLA's `select_and_scatter` does, by kh*kw selects and one padded
  sum (XLA:CPU's own backward builds index arrays over the whole padded input).

- BatchNorm in training mode (`batch_norm_train`, which `layers.BatchNorm` calls): flax's
  forward, the same operations in the same order (the same bits), with a backward pass written
  out: two per-channel sums and one elementwise pass, where differentiating through the mean and
  the two-pass variance gave XLA about ten kernels per BatchNorm. Fewer kernels and passes
  over the activations: faster steps and shorter compiles (`choose_batch_norm` says by how much).

- full convolutions (the "xla" path) compiled with XLA's own CPU convolution kernels rather
  than YNNPACK's, which jaxlib 0.10 uses by default and which are slower here at most shapes:
  `cnnjax.runtime.compiler_options()`, passed to `jax.jit` of a model's step
  (`cnnjax.runtime.jit` does it).

`choose` holds the rule and says why (`choose_pool` for pooling, `choose_batch_norm` for
BatchNorm, `cnnjax.runtime.compiler_options` for the kernels); `set_impl("xla")` (or the
environment variable CNNJAX_CONV=xla) turns every fast path off for comparison; the choice is
made when a model is traced and jitted, so it applies to functions jitted after the call.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla")
_impl = {"value": os.environ.get("CNNJAX_CONV", "auto")}


def check_impl(value: str) -> str:
    if value not in IMPLS:
        raise ValueError(f"unknown convolution implementation {value!r}; expected one of "
                         f"{', '.join(IMPLS)} (set_impl, or the environment variable "
                         "CNNJAX_CONV)")
    return value


def get_impl() -> str:
    return check_impl(_impl["value"])


def set_impl(value: str) -> None:
    """"auto" (the default): the per-shape fast paths of `choose`; "xla": XLA's own convolution
    everywhere. Affects models traced afterwards."""
    _impl["value"] = check_impl(value)


@contextlib.contextmanager
def impl(value: str):
    """`with fastconv.impl("xla"): ...` traces the models inside with XLA's convolution."""
    before = get_impl()
    set_impl(value)
    try:
        yield
    finally:
        set_impl(before)


def choose(x_shape: Sequence[int], k_shape: Sequence[int], strides: Sequence[int],
           padding: Any, groups: int, dilated: bool) -> str:
    """The path for an NHWC input `x_shape` and HWIO kernel `k_shape` ("xla", "dot", "shift",
    "grouped" or "small": see SMALL_MAP).

    Measured on the project's 2-core Xeon (jaxlib 0.10.2, batch 8, one convolution jitted,
    forward / forward+backward, ms): depthwise 3x3 at 112x112x32 XLA 173 / 347, shifts 4 / 76;
    56x56x144 197 / 603 against 5 / 77; 7x7x960 19 / 95 against 1 / 4. 1x1 at 56x56,
    24->144: 3.2 / 39 against 1.3 / 14; 7x7, 320->1280: 2.6 / 11 against 1.6 / 6.3; grouped
    1x1 (ShuffleNet v1, 3 groups, 28x28x240): 8.9 / 106 against 4.7 / 6.5. Full 3x3
    convolutions were not faster as nine products (the kernel gradient, a contraction over the
    batch and the map, is slow either way), so they stay with XLA (its own kernels rather than
    YNNPACK's: `compiler_options`). Grouped 3x3s (ResNeXt-50's,
    32 groups, batch 8; 2-core EPYC): 56x56x128 XLA 131 / 7858 against 78 / 144; 28x28x256
    49 / 3947 against 33 / 94: XLA's grouped backward is some fifty times slower. Elsewhere
    than on the CPU every convolution stays with XLA, whose GPU and TPU convolutions are the
    fast ones.
    """
    if get_impl() == "xla" or dilated or jax.default_backend() != "cpu":
        return "xla"
    kh, kw, cin_g, cout = k_shape
    cin = x_shape[-1]
    if kh == kw == 1 and all(p == (0, 0) for p in padding):
        return "dot"
    if groups == cin and groups > 1 and cin_g == 1 and cout == cin:
        return "shift"
    if groups > 1 and cin_g > 1:
        return "grouped"
    if groups == 1 and kh * kw > 1 and all(lo >= 0 and hi >= 0 for lo, hi in padding):
        oh = _out_size(x_shape[1], padding[0], kh, strides[0])
        ow = _out_size(x_shape[2], padding[1], kw, strides[1])
        if oh >= 1 and ow >= 1 and oh * ow <= SMALL_MAP:  # an empty output: XLA's own error
            return "small"
    return "xla"


# Output maps of at most this many positions (2x2) take the "small" path: XLA:CPU's full
# convolution (YNNPACK's or its own) is pathologically slow there. Batch 32, 3x3, 512->512,
# forward / forward with both gradients, ms (2-core EPYC): 2x2 maps 266 / 541 against 3.6 /
# 10.4 as one product; 1x1 maps 10.3 / 25.8 against 1.0 / 4.2. ResNet-18 at 32x32 (the digits),
# batch 128: its 2x2 and 1x1 stages took 870 ms of a 1,090 ms step. At 4x4 maps neither way
# wins everywhere (4x4x512: 14.5 against 10.6 at batch 8, 39.0 against 39.1 at batch 32), so
# larger maps stay with XLA. `python -m experiments.benchmark --arch=NAME --convs` times each
# convolution of a model through its path.
SMALL_MAP = 4


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kw):
    """`lax.conv_general_dilated` with the fast paths of `choose` for NHWC/HWIO 2-D convs."""
    plain = lambda: lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision, **kw)
    if (kw or isinstance(padding, str) or lhs.ndim != 4
            or tuple(getattr(dimension_numbers, "lhs_spec", ())) != (0, 3, 1, 2)
            or tuple(getattr(dimension_numbers, "rhs_spec", ())) != (3, 2, 0, 1)
            or tuple(getattr(dimension_numbers, "out_spec", ())) != (0, 3, 1, 2)):
        return plain()
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    padding = tuple(tuple(p) for p in padding)
    path = choose(lhs.shape, rhs.shape, window_strides, padding, feature_group_count,
                  dilated)
    if path == "dot":
        return _pointwise(lhs, rhs, tuple(window_strides), feature_group_count, precision)
    if path == "shift":
        return _depthwise(lhs, rhs, tuple(window_strides), padding)
    if path == "grouped":
        return _grouped(lhs, rhs, tuple(window_strides), padding, feature_group_count,
                        precision)
    if path == "small":
        return _small_map(lhs, rhs, tuple(window_strides), padding, precision)
    return plain()


def _small_map(x, k, strides, padding, precision):
    """Full kh x kw convolution onto a small output map as one matrix product: the strided
    windows of the padded input that read any of the input (a window over padding alone adds
    only zeros: on a 1x1 map with padding 1, a 3x3 kernel's centre tap is the only one left),
    concatenated along the channels, contracted with those taps' kernels, in float32."""
    kh, kw, cin, f = k.shape
    h, w = x.shape[1:3]
    oh = _out_size(h, padding[0], kh, strides[0])
    ow = _out_size(w, padding[1], kw, strides[1])

    def reads_input(tap, size, pad, out, stride):
        # padded positions tap + stride * r, r < out; the input spans [pad, pad + size)
        return any(pad <= tap + stride * r < pad + size for r in range(out))
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    live = [(i, j, tap) for i, j, tap in _taps(xp, kh, kw, strides, oh, ow)
            if reads_input(i, h, padding[0][0], oh, strides[0])
            and reads_input(j, w, padding[1][0], ow, strides[1])]
    if not live:  # every window over padding alone (a stride longer than the input)
        return jnp.zeros((x.shape[0], oh, ow, f), x.dtype)
    cols = jnp.concatenate([tap for _, _, tap in live], axis=-1)
    kernel = jnp.concatenate([k[i, j] for i, j, _ in live], axis=0)  # (taps * cin, f)
    y = lax.dot_general(cols, kernel, (((3,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _grouped(x, k, strides, padding, groups, precision):
    """Grouped kh x kw convolution: per tap, the strided window of the padded input contracted
    with that tap's kernel, group by group (one batched product), summed in float32. XLA:CPU
    keeps more temporaries for it than for its own grouped convolution (ResNeXt-50 at batch 8:
    335 against 176 MiB an image; jax.checkpoint of this function changed nothing)."""
    kh, kw, cin_g, f = k.shape
    n = x.shape[0]
    oh = _out_size(x.shape[1], padding[0], kh, strides[0])
    ow = _out_size(x.shape[2], padding[1], kw, strides[1])
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out = None
    for i, j, tap in _taps(xp, kh, kw, strides, oh, ow):
        # batch dimension: the group; contraction: its input channels
        y = lax.dot_general(tap.reshape(n, oh, ow, groups, cin_g),
                            k[i, j].reshape(cin_g, groups, f // groups),
                            (((4,), (0,)), ((3,), (1,))), precision=precision,
                            preferred_element_type=jnp.float32)  # (groups, n, oh, ow, f/g)
        out = y if out is None else out + y
    return jnp.moveaxis(out, 0, 3).reshape(n, oh, ow, f).astype(x.dtype)


def _pointwise(x, k, strides, groups, precision):
    """1x1 convolution: subsample by the stride, then contract the channels (per group)."""
    if strides != (1, 1):
        x = x[:, ::strides[0], ::strides[1], :]
    n, h, w, c = x.shape
    f = k.shape[-1]
    acc = jnp.float32  # accumulate in float32 whatever the compute dtype, as XLA's conv does
    if groups == 1:
        # A product of 2-D matrices. For the 4-D form, whose kernel gradient contracts three
        # axes, XLA:CPU transposed the output gradient first, a copy written across the whole
        # activation: one 56x56 64->256 kernel gradient took 17.7 ms instead of 4.1.
        y = lax.dot_general(x.reshape(n * h * w, c), k[0, 0], (((1,), (0,)), ((), ())),
                            precision=precision, preferred_element_type=acc)
        return y.reshape(n, h, w, f).astype(x.dtype)
    xg = x.reshape(n, h, w, groups, c // groups)
    kg = k[0, 0].reshape(c // groups, groups, f // groups)
    # batch dimension: the group; contraction: the channels within it
    y = lax.dot_general(xg, kg, (((4,), (0,)), ((3,), (1,))), precision=precision,
                        preferred_element_type=acc)  # (groups, n, h, w, f/groups)
    return jnp.moveaxis(y, 0, 3).reshape(n, h, w, f).astype(x.dtype)


def _taps(x, kh: int, kw: int, strides, oh: int, ow: int):
    """The kh*kw strided windows of an already padded NHWC `x` that a kh x kw kernel reads."""
    n, _, _, c = x.shape
    sh, sw = strides
    for i in range(kh):
        for j in range(kw):
            yield i, j, lax.slice(x, (0, i, j, 0),
                                  (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c),
                                  (1, sh, sw, 1))


def _shift_sum(x, k, strides, oh, ow):
    """sum over taps of window(i, j) * k[i, j, 0, :], in float32 (x already padded)."""
    out = None
    for i, j, tap in _taps(x, k.shape[0], k.shape[1], strides, oh, ow):
        term = tap.astype(jnp.float32) * k[i, j, 0].astype(jnp.float32)
        out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, k, strides, padding):
    """Depthwise convolution (one kh x kw filter per channel, HWIO kernel (kh, kw, 1, C)) as
    kh*kw shifted multiply-adds of the padded input, accumulated in float32."""
    return _depthwise_fwd(x, k, strides, padding)[0]


def _out_size(size, pad, kernel, stride):
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def _depthwise_fwd(x, k, strides, padding):
    kh, kw = k.shape[:2]
    oh = _out_size(x.shape[1], padding[0], kh, strides[0])
    ow = _out_size(x.shape[2], padding[1], kw, strides[1])
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    return _shift_sum(xp, k, strides, oh, ow).astype(x.dtype), (x, k)


def _depthwise_bwd(strides, padding, res, g):
    """The input gradient is itself a depthwise convolution: of the gradient, dilated by the
    stride and padded so that every input pixel sees the taps that read it, with the kernel
    flipped (one fused pass instead of kh*kw padded copies). The kernel gradient is, per tap,
    the sum over the batch and the map of window(i, j) * gradient: the kh*kw sums as one
    reduction with kh*kw results, which XLA fuses with the windows it reads (kh*kw separate
    sums went each to a YNNPACK reduction that wrote its window out first: MobileNet v2's
    step took 445 ms instead of 340, ShuffleNet v2's 153 instead of 128)."""
    x, k = res
    kh, kw = k.shape[:2]
    (sh, sw), ((pt, _), (pl, _)) = strides, padding
    n, h, w, c = x.shape
    oh, ow = g.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    gp = lax.pad(g, zero, ((0, 0, 0),
                           (kh - 1 - pt, h + pt - (oh - 1) * sh - 1, sh - 1),
                           (kw - 1 - pl, w + pl - (ow - 1) * sw - 1, sw - 1),
                           (0, 0, 0)))
    gx = _shift_sum(gp, k[::-1, ::-1], (1, 1), h, w).astype(x.dtype)
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    g32 = g.astype(jnp.float32)
    products = tuple(tap.astype(jnp.float32) * g32
                     for _, _, tap in _taps(xp, kh, kw, strides, oh, ow))
    gk = jnp.stack(lax.reduce(products, (jnp.float32(0),) * len(products),
                              lambda a, b: tuple(u + v for u, v in zip(a, b)), (0, 1, 2)))
    return gx, gk.reshape(kh, kw, 1, c).astype(k.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def choose_pool(window: Sequence[int]) -> str:
    """The max-pooling path for a kh x kw window: "shift" or "xla".

    Measured on the project's 2-core EPYC (jaxlib 0.10.2, batch 8, one pooling jitted, forward /
    forward+backward, ms): ResNet's 3x3 stride 2 at 112x112x64 XLA 3.7 / 113 against 3.4 / 18;
    VGG's 2x2 stride 2 at 224x224x64 4.7 / 330 against 4.0 / 49; GoogLeNet's 3x3 stride 1 at
    28x28x256 6.7 / 83 against 0.8 / 3.6. Windows of more than 25 taps (none in the zoo) were
    not measured and stay with XLA, as does every pooling off the CPU.
    """
    if get_impl() == "xla" or jax.default_backend() != "cpu" or window[0] * window[1] > 25:
        return "xla"
    return "shift"


def max_pool(x, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]):
    """`flax.linen.max_pool(x, window, strides, padding)` for an NHWC `x` with explicit padding
    (padded positions are -inf, never the maximum), by the path of `choose_pool`. The outputs
    are the same bits; the input gradient is the same up to the order in which overlapping
    windows add their gradients into one input."""
    window, strides = tuple(window), tuple(strides)
    padding = tuple(tuple(p) for p in padding)
    if x.ndim != 4 or choose_pool(window) == "xla":
        return nn.max_pool(x, window, strides, padding=padding)
    return _max_pool(x, window, strides, padding)


def _pool_geometry(x, window, strides, padding):
    """The input padded with -inf and the output's height and width."""
    oh = _out_size(x.shape[1], padding[0], window[0], strides[0])
    ow = _out_size(x.shape[2], padding[1], window[1], strides[1])
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)), constant_values=-jnp.inf)
    return xp, oh, ow


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
    return _max_pool_fwd(x, window, strides, padding)[0]


def _max_pool_fwd(x, window, strides, padding):
    xp, oh, ow = _pool_geometry(x, window, strides, padding)
    out = None
    for _, _, tap in _taps(xp, *window, strides, oh, ow):
        out = tap if out is None else jnp.maximum(out, tap)
    return out, (x, out)


def _max_pool_bwd(window, strides, padding, res, g):
    """Each output's gradient goes to the first tap (row-major in its window) that equals the
    output, as `select_and_scatter` with `>=` picks it; each tap's share is put back where the
    tap reads (a pad, dilated by the stride) and the shares summed, then the padding cut off."""
    x, out = res
    xp, oh, ow = _pool_geometry(x, window, strides, padding)
    (sh, sw), (ph, pw) = strides, xp.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    taken = grad = None
    for i, j, tap in _taps(xp, *window, strides, oh, ow):
        hit = tap == out
        if taken is not None:
            hit = hit & ~taken
        taken = hit if taken is None else taken | hit
        share = lax.pad(jnp.where(hit, g, zero), zero,
                        ((0, 0, 0), (i, ph - i - (oh - 1) * sh - 1, sh - 1),
                         (j, pw - j - (ow - 1) * sw - 1, sw - 1), (0, 0, 0)))
        grad = share if grad is None else grad + share
    (top, _), (left, _) = padding
    return (lax.slice(grad, (0, top, left, 0), (x.shape[0], top + x.shape[1],
                                                left + x.shape[2], x.shape[3])),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def choose_batch_norm() -> str:
    """The train-mode BatchNorm path: "fast" (`batch_norm_train`) or "xla" (flax's own).

    Measured on the project's 2-core EPYC (jaxlib 0.10.2, batch 8, 224x224, float32, whole
    train steps, python -m experiments.benchmark --arch=NAME, two runs each, flax's / fast):
    ResNet-50 1319, 1328 / 1279, 1295 ms, compiled in 5.3 / 4.7 s; DenseNet-121 1227, 1308 /
    1190, 1133 ms, compiled in 18.2-18.4 / 14.9-15.3 s.
    Off the CPU flax's stays (not measured there).
    """
    if get_impl() == "xla" or jax.default_backend() != "cpu":
        return "xla"
    return "fast"


def _moments(x):
    """flax's float32 batch statistics over every axis but the last: the mean, then the mean
    squared deviation from it (two passes, as `use_fast_variance=False`)."""
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xf.mean(axes)
    return mean, lax.square(xf - mean).mean(axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, dtype):
    """(y, mean, var): `x` normalised over every axis but the last with its own batch
    statistics, scaled and shifted per channel, as `dtype`, and those statistics (float32).

    The forward is flax's `BatchNorm` (use_fast_variance=False, feature axis last), operation
    for operation; the backward is the closed form of its gradient (x-hat = (x - mean) * rstd,
    N elements per channel): d bias = sum dy, d scale = sum dy * x-hat, and
    dx = scale * rstd * (dy - d bias / N - x-hat * d scale / N) + (d mean + 2 d var (x - mean)) / N.
    """
    return _batch_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, dtype):
    mean, var = _moments(x)
    mul = lax.rsqrt(var + epsilon) * scale
    y = ((x - mean) * mul + bias).astype(dtype)
    return (y, mean, var), (x, mean, var, scale)


def _batch_norm_bwd(epsilon, dtype, res, cts):
    x, mean, var, scale = res
    dy, dmean, dvar = cts
    axes, n = tuple(range(x.ndim - 1)), math.prod(x.shape[:-1])
    dy = dy.astype(mean.dtype)
    rstd = lax.rsqrt(var + epsilon)
    centred = x - mean
    xhat = centred * rstd
    dbias, dscale = dy.sum(axes), (dy * xhat).sum(axes)
    dx = ((scale * rstd) * (dy - dbias / n - xhat * (dscale / n))
          + (dmean + 2 * dvar * centred) / n)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)
