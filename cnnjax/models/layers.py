"""Layers shared by the families: input checks, pooling, LRN, squeeze-excite, channel shuffle,
feature maps.

Pooling and flattening are small modules (not bare functions) so that they appear as layers of
their own in `cnnjax.profile`, as they do in the lecture's tables. Padding is explicit and
symmetric, as in PyTorch, so shapes and weights line up with torchvision layer for layer.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax.models import fastconv

ModuleDef = Any

# Kaiming-normal with fan-out, the initialisation torchvision gives its ResNets, VGGs and others.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# The strides a `features_only=True` model reports, as detection and segmentation necks expect.
FEATURE_STRIDES = (4, 8, 16, 32)


def keep_feature(features: dict, stride: int, x: jax.Array) -> None:
    """Stores `x` as `features[f"stride{stride}"]` when `stride` is one of FEATURE_STRIDES.

    A family calls it after every layer (or block) with the stride of that layer's output, so a
    later map replaces an earlier one at the same stride: each entry ends as the LAST map at its
    resolution, the output of the last layer before the next downsampling (timm's choice for
    `features_only`). Strides count nominally (the product of the layer strides): an unpadded
    layer's map may be a pixel or two smaller than input / stride.
    """
    if stride in FEATURE_STRIDES:
        features[f"stride{stride}"] = x


def check_input(x: Any, *, model: str, in_channels: int, min_size: int) -> None:
    """Raises a ValueError that says what was expected before XLA sees a bad input."""
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 4:
        raise ValueError(f"{model} expects a batch of images of shape (N, H, W, {in_channels}) "
                         f"(NHWC); got an array of shape {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{model} expects floating-point images (normalise them first); "
                         f"got dtype {x.dtype}")
    n, h, w, c = shape
    if c != in_channels:
        hint = ("; the input looks channels-first (NCHW): transpose it to NHWC"
                if h == in_channels else "")
        raise ValueError(f"{model} expects {in_channels} input channels in the last axis (NHWC); "
                         f"got shape {shape}{hint}")
    if h < min_size or w < min_size:
        raise ValueError(f"{model} needs an input of at least {min_size}x{min_size} pixels; "
                         f"got {h}x{w}")


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _pool_padding(size: int, k: int, s: int, p: int, ceil_mode: bool) -> tuple[int, int]:
    """PyTorch's pooling arithmetic: extra right padding in ceil mode, windows start in the
    input."""
    if not ceil_mode:
        return (p, p)
    out = -(-(size + 2 * p - k) // s) + 1
    if (out - 1) * s >= size + p:  # the last window would start in the right padding
        out -= 1
    return (p, (out - 1) * s + k - size - p)


class MaxPool(nn.Module):
    """Max pooling with PyTorch's padding and `ceil_mode` (`fastconv.max_pool`: shifted windows on
    the CPU)."""
    window: int | tuple[int, int]
    stride: int | tuple[int, int]
    padding: int = 0
    ceil_mode: bool = False

    def __call__(self, x):
        (kh, kw), (sh, sw) = _pair(self.window), _pair(self.stride)
        pads = (_pool_padding(x.shape[1], kh, sh, self.padding, self.ceil_mode),
                _pool_padding(x.shape[2], kw, sw, self.padding, self.ceil_mode))
        return fastconv.max_pool(x, (kh, kw), (sh, sw), pads)


class AvgPool(nn.Module):
    """Average pooling; padded zeros count in the mean (PyTorch's default)."""
    window: int | tuple[int, int]
    stride: int | tuple[int, int]
    padding: int = 0
    ceil_mode: bool = False

    def __call__(self, x):
        (kh, kw), (sh, sw) = _pair(self.window), _pair(self.stride)
        pads = (_pool_padding(x.shape[1], kh, sh, self.padding, self.ceil_mode),
                _pool_padding(x.shape[2], kw, sw, self.padding, self.ceil_mode))
        return nn.avg_pool(x, (kh, kw), (sh, sw), padding=pads, count_include_pad=True)


def _adaptive_mean(x: jax.Array, axis: int, out: int) -> jax.Array:
    size = x.shape[axis]
    if size % out == 0:
        shape = x.shape[:axis] + (out, size // out) + x.shape[axis + 1:]
        return x.reshape(shape).mean(axis + 1)
    bins = [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]
    return jnp.stack([lax.slice_in_dim(x, a, b, axis=axis).mean(axis) for a, b in bins], axis)


class AdaptiveAvgPool(nn.Module):
    """Averages into a fixed (H, W) grid with PyTorch's bins; the identity when sizes agree."""
    output_size: int | tuple[int, int]

    def __call__(self, x):
        oh, ow = _pair(self.output_size)
        return _adaptive_mean(_adaptive_mean(x, 1, oh), 2, ow)


class GlobalAvgPool(nn.Module):
    """Mean over H and W: (N, H, W, C) -> (N, C)."""

    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2))


class Flatten(nn.Module):
    """(N, H, W, C) -> (N, H*W*C), in NHWC order (PyTorch flattens C, H, W)."""

    def __call__(self, x):
        return x.reshape(x.shape[0], -1)


class LocalResponseNorm(nn.Module):
    """Local Response Normalization across channels, AlexNet (Krizhevsky et al. 2012, Sec. 3.3).

    b = a / (k + alpha * sum of a^2 over `size` neighbouring channels)^beta, with the paper's
    k=2, n=5, alpha=1e-4, beta=0.75. (PyTorch's nn.LocalResponseNorm divides alpha by n.)
    """
    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0

    def __call__(self, x):
        half = self.size // 2
        sq = lax.reduce_window(jnp.square(x), np.zeros((), x.dtype), lax.add,
                               (1, 1, 1, self.size), (1, 1, 1, 1),
                               ((0, 0), (0, 0), (0, 0), (half, self.size - 1 - half)))
        return x / (self.k + self.alpha * sq) ** self.beta


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al. 2018): global pool, FC-act-FC-gate, rescale channels.

    The bottleneck has `channels // reduction` units (SENet, r=16) unless `squeeze_channels` is
    given (MobileNetV3 rounds its own).
    """
    reduction: int = 16
    squeeze_channels: int | None = None
    act: Callable = nn.relu
    gate: Callable = nn.sigmoid
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        squeeze = self.squeeze_channels or max(1, c // self.reduction)
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                         name=name)
        s = jnp.mean(x, axis=(1, 2))
        s = self.gate(dense(c, "fc_expand")(self.act(dense(squeeze, "fc_squeeze")(s))))
        return x * s[:, None, None, :].astype(x.dtype)


class ConvNormAct(nn.Module):
    """Conv (no bias) -> BatchNorm -> activation, the unit of GoogLeNet and the mobile networks.

    `conv` and `norm` are the factories a family builds once in its `__call__` (`conv(...)` and
    `batch_norm(...)` below); `groups=channels` makes the conv depthwise; `act=None` skips it.
    """
    conv: ModuleDef
    norm: ModuleDef
    features: int
    kernel: int | tuple[int, int] = 3
    stride: int = 1
    groups: int = 1
    padding: int | None = None
    act: Callable | None = nn.relu

    @nn.compact
    def __call__(self, x):
        x = self.conv(self.features, self.kernel, self.stride, self.padding, self.groups,
                      name="conv")(x)
        x = self.norm(name="bn")(x)
        return x if self.act is None else self.act(x)


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """ShuffleNet's channel shuffle (Zhang et al. 2018, Sec. 3.1).

    Channels viewed as (groups, C/groups), transposed, flattened: channel g*n + i moves to
    position i*groups + g, so every group of the next grouped conv sees every group of this one.
    """
    *lead, c = x.shape
    if c % groups:
        raise ValueError(f"channel_shuffle: {c} channels do not split into {groups} groups")
    x = x.reshape(*lead, groups, c // groups)
    return jnp.swapaxes(x, -1, -2).reshape(*lead, c)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Rounds a channel count to a multiple of `divisor`, never more than 10% below `value`.

    The rounding MobileNet v2/v3 and MnasNet use for their width multipliers.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


_FLAX_BATCH_NORM = nn.BatchNorm.__call__.__wrapped__  # the function flax wraps as the method


class BatchNorm(nn.BatchNorm):
    """flax's `nn.BatchNorm`, the same variables, names and forward bits; in training mode (batch
    statistics, feature axis last, two-pass variance, scale and bias, as cnnjax builds them)
    through `fastconv.batch_norm_train`, whose backward pass is written out, where
    `fastconv.choose_batch_norm` picks it. Any other setting is flax's own code."""

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        running = nn.merge_param("use_running_average", self.use_running_average,
                                 use_running_average)
        if (running or mask is not None or self.axis_name is not None or self.use_fast_variance
                or self.axis not in (-1, x.ndim - 1) or not self.use_scale or not self.use_bias
                or not self.force_float32_reductions or fastconv.choose_batch_norm() == "xla"):
            # flax's own body, not `super().__call__`: that is flax's wrapped method, which
            # method interceptors (cnnjax.profile, summaries) would see as a second BatchNorm
            return _FLAX_BATCH_NORM(self, x, use_running_average, mask=mask)
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                                features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        y, mean, var = fastconv.batch_norm_train(x, scale, bias, self.epsilon, jnp.dtype(dtype))
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


def batch_norm(train: bool, dtype: Any, param_dtype: Any, **kw) -> ModuleDef:
    """BatchNorm with PyTorch's defaults: momentum 0.1 (0.9 here), epsilon 1e-5; `kw` overrides.

    The variance is computed in two passes, E[(x - mean)^2], not E[x^2] - mean^2: the one-pass
    form cancels catastrophically and made results depend on how the batch was sharded. The
    module is `BatchNorm` above: flax's, with its training-mode gradient written out.
    """
    options = {"momentum": 0.9, "epsilon": 1e-5, "use_fast_variance": False, **kw}
    return functools.partial(BatchNorm, use_running_average=not train, dtype=dtype,
                             param_dtype=param_dtype, **options)


def conv(dtype: Any, param_dtype: Any, **kw) -> ModuleDef:
    """A Conv factory with the compute/storage dtypes and torchvision's initialisation; the
    convolution itself is `fastconv.conv_general_dilated` (per-shape fast paths on the CPU)."""
    def make(features: int, kernel: int | tuple[int, int], stride: int = 1,
             padding: int | None = None, groups: int = 1, use_bias: bool = False, **k):
        kh, kw_ = _pair(kernel)
        ph, pw = (kh // 2, kw_ // 2) if padding is None else _pair(padding)
        return nn.Conv(features, (kh, kw_), _pair(stride), padding=((ph, ph), (pw, pw)),
                       feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                       param_dtype=param_dtype, kernel_init=conv_kernel_init,
                       conv_general_dilated=fastconv.conv_general_dilated, **{**kw, **k})
    return make
