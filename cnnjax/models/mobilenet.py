"""MobileNet v1 (Howard et al. 2017), v2 (Sandler et al. 2018) and v3 (Howard et al. 2019).

v1 is the paper's Table 1 (torchvision has no v1): 4,231,976 params and 568,740,352 MACs at 224,
the paper's 4.2M and 569M. v2 and v3 follow torchvision layer for layer (same parameters,
BatchNorm statistics and MACs). All three scale their widths with `width_mult` (the paper's
alpha); v2/v3 round to multiples of 8 as torchvision does, v1 takes int(alpha * C) as the paper.
`InvertedResidual` and `DepthwiseSeparable` are also MnasNet's blocks (mnasnet.py).

`features_only=True` returns the last block output at each stride instead of logits (the block
before the next stride-2 one), with the 1x1 `conv_last` of v2/v3 in stride32 (torchvision's
weights have it; timm leaves it out). Channels at width 1: v1 blocks 3, 5, 11, 13 (128, 256,
512, 1024); v2 stage2, stage3, stage5, conv_last (24, 32, 96, 1280); v3 Large blocks 3, 6, 12,
conv_last (24, 40, 112, 960); v3 Small blocks 1, 3, 8, conv_last (16, 24, 48, 576). The
classifier (global pool, v3's fc_hidden, dropout, fc) is not built.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.registry import register

ModuleDef = Any


class DepthwiseSeparable(nn.Module):
    """A 3x3 depthwise conv then a 1x1 pointwise conv, each with BN (MobileNet v1, Fig. 3)."""
    features: int
    stride: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    project_act: Callable | None = nn.relu  # MnasNet's first block leaves the projection linear

    @nn.compact
    def __call__(self, x):
        unit = functools.partial(layers.ConvNormAct, self.conv, self.norm)
        x = unit(x.shape[-1], 3, self.stride, groups=x.shape[-1], act=self.act, name="dw")(x)
        return unit(self.features, 1, act=self.project_act, name="pw")(x)


class InvertedResidual(nn.Module):
    """1x1 expand, kxk depthwise, optional SE, linear 1x1 project, identity shortcut when the
    shape is kept (MobileNet v2 Fig. 3b; v3 adds SE and h-swish; MnasNet's MBConv)."""
    expanded: int
    features: int
    kernel: int
    stride: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu6
    attention: ModuleDef | None = None

    @nn.compact
    def __call__(self, x):
        unit = functools.partial(layers.ConvNormAct, self.conv, self.norm)
        y = x
        if self.expanded != x.shape[-1]:  # v2's t=1 block and v3's first block skip the expansion
            y = unit(self.expanded, 1, act=self.act, name="expand")(y)
        y = unit(self.expanded, self.kernel, self.stride, groups=self.expanded, act=self.act,
                 name="dw")(y)
        if self.attention is not None:
            y = self.attention(name="se")(y)
        y = unit(self.features, 1, act=None, name="project")(y)  # linear bottleneck: no ReLU
        return x + y if self.stride == 1 and x.shape[-1] == self.features else y


def _classifier(module: nn.Module, x, hidden: int | None, act: Callable, train: bool):
    """Global pool, [FC-act] (v3's head), dropout, FC."""
    dense = functools.partial(nn.Dense, dtype=module.dtype, param_dtype=module.param_dtype)
    x = layers.GlobalAvgPool(name="avgpool")(x)
    if hidden:
        x = act(dense(hidden, name="fc_hidden")(x))
    if module.dropout_rate:
        x = nn.Dropout(module.dropout_rate, deterministic=not train, name="dropout")(x)
    return dense(module.num_classes, name="fc")(x)


# MobileNet v1, Table 1: (pointwise output channels, depthwise stride) of the 13 separable blocks.
# The paper's table prints "s2" for the 13th depthwise conv, but its output stays 7x7: stride 1.
V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5,
             (1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
    """MobileNet v1 (Howard et al. 2017, Table 1): 3x3/2 conv then 13 depthwise-separable blocks."""
    arch: str = "mobilenet_v1"
    num_classes: int = 1000
    features_only: bool = False  # return {"stride4": ..., "stride32": ...}; no classifier
    width_mult: float = 1.0
    dropout_rate: float = 0.001  # TF-slim's reference trains with keep_prob 0.999
    in_channels: int = 3
    min_input_size: int = 1  # every conv is padded: any size reaches a 1x1 map
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        layers.check_input(x, model=self.arch, in_channels=self.in_channels,
                           min_size=self.min_input_size)
        x = x.astype(self.dtype)
        conv = layers.conv(self.dtype, self.param_dtype)
        norm = layers.batch_norm(train, self.dtype, self.param_dtype)
        width = lambda c: max(1, int(c * self.width_mult))  # Sec. 3.3: alpha M channels
        x = layers.ConvNormAct(conv, norm, width(32), 3, 2, name="stem")(x)
        total_stride, features = 2, {}
        for i, (c, s) in enumerate(V1_BLOCKS):
            x = DepthwiseSeparable(width(c), s, conv, norm, name=f"block{i + 1}")(x)
            total_stride *= s
            layers.keep_feature(features, total_stride, x)
        if self.features_only:
            return features
        return _classifier(self, x, None, nn.relu, train)


# MobileNet v2, Table 2: (expansion t, output channels c, repeats n, first stride s) per stage.
V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNet v2 (Sandler et al. 2018, Table 2), as torchvision's mobilenet_v2."""
    arch: str = "mobilenet_v2"
    num_classes: int = 1000
    features_only: bool = False  # return {"stride4": ..., "stride32": ...}; no classifier
    width_mult: float = 1.0
    dropout_rate: float = 0.2
    in_channels: int = 3
    min_input_size: int = 1  # every conv is padded: any size reaches a 1x1 map
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        layers.check_input(x, model=self.arch, in_channels=self.in_channels,
                           min_size=self.min_input_size)
        x = x.astype(self.dtype)
        conv = layers.conv(self.dtype, self.param_dtype)
        norm = layers.batch_norm(train, self.dtype, self.param_dtype)
        width = lambda c: layers.make_divisible(c * self.width_mult, 8)
        x = layers.ConvNormAct(conv, norm, width(32), 3, 2, act=nn.relu6, name="stem")(x)
        total_stride, features = 2, {}
        for i, (t, c, n, s) in enumerate(V2_STAGES):
            for j in range(n):
                expanded = int(round(x.shape[-1] * t))
                x = InvertedResidual(expanded, width(c), 3, s if j == 0 else 1, conv, norm,
                                     nn.relu6, name=f"stage{i + 1}_block{j + 1}")(x)
            total_stride *= s
            layers.keep_feature(features, total_stride, x)
        # The last conv never shrinks below 1280 (the paper: not for multipliers < 1).
        last = layers.make_divisible(1280 * max(1.0, self.width_mult), 8)
        x = layers.ConvNormAct(conv, norm, last, 1, act=nn.relu6, name="conv_last")(x)
        layers.keep_feature(features, total_stride, x)
        if self.features_only:
            return features
        return _classifier(self, x, None, nn.relu6, train)


# MobileNet v3, Tables 1 and 2: (kernel, expanded, out, SE, activation, stride) per block.
_RE, _HS = nn.relu, nn.hard_swish
V3_LARGE = ((3, 16, 16, False, _RE, 1), (3, 64, 24, False, _RE, 2), (3, 72, 24, False, _RE, 1),
            (5, 72, 40, True, _RE, 2), (5, 120, 40, True, _RE, 1), (5, 120, 40, True, _RE, 1),
            (3, 240, 80, False, _HS, 2), (3, 200, 80, False, _HS, 1),
            (3, 184, 80, False, _HS, 1), (3, 184, 80, False, _HS, 1),
            (3, 480, 112, True, _HS, 1), (3, 672, 112, True, _HS, 1),
            (5, 672, 160, True, _HS, 2), (5, 960, 160, True, _HS, 1), (5, 960, 160, True, _HS, 1))
V3_SMALL = ((3, 16, 16, True, _RE, 2), (3, 72, 24, False, _RE, 2), (3, 88, 24, False, _RE, 1),
            (5, 96, 40, True, _HS, 2), (5, 240, 40, True, _HS, 1), (5, 240, 40, True, _HS, 1),
            (5, 120, 48, True, _HS, 1), (5, 144, 48, True, _HS, 1), (5, 288, 96, True, _HS, 2),
            (5, 576, 96, True, _HS, 1), (5, 576, 96, True, _HS, 1))


class MobileNetV3(nn.Module):
    """MobileNet v3 Large / Small (Howard et al. 2019), as torchvision's mobilenet_v3_*."""
    arch: str = "mobilenet_v3_large"
    blocks: Sequence[tuple] = V3_LARGE
    head_channels: int = 1280  # the hidden FC of the classifier (1024 for Small)
    num_classes: int = 1000
    features_only: bool = False  # return {"stride4": ..., "stride32": ...}; no classifier
    width_mult: float = 1.0
    dropout_rate: float = 0.2
    in_channels: int = 3
    min_input_size: int = 1  # every conv is padded: any size reaches a 1x1 map
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        layers.check_input(x, model=self.arch, in_channels=self.in_channels,
                           min_size=self.min_input_size)
        x = x.astype(self.dtype)
        conv = layers.conv(self.dtype, self.param_dtype)
        # TensorFlow's BN settings, which torchvision keeps for v3: eps 1e-3, momentum 0.01.
        norm = layers.batch_norm(train, self.dtype, self.param_dtype, epsilon=1e-3,
                                 momentum=0.99)
        width = lambda c: layers.make_divisible(c * self.width_mult, 8)
        x = layers.ConvNormAct(conv, norm, width(16), 3, 2, act=_HS, name="stem")(x)
        total_stride, features = 2, {}
        for i, (k, expanded, out, se, act, s) in enumerate(self.blocks):
            expanded = width(expanded)
            attention = None
            if se:  # squeeze to a quarter of the expanded width, gate with a hard sigmoid
                attention = functools.partial(
                    layers.SqueezeExcite, squeeze_channels=layers.make_divisible(expanded // 4, 8),
                    act=nn.relu, gate=nn.hard_sigmoid, dtype=self.dtype,
                    param_dtype=self.param_dtype)
            x = InvertedResidual(expanded, width(out), k, s, conv, norm, act, attention,
                                 name=f"block{i + 1}")(x)
            total_stride *= s
            layers.keep_feature(features, total_stride, x)
        x = layers.ConvNormAct(conv, norm, 6 * x.shape[-1], 1, act=_HS, name="conv_last")(x)
        layers.keep_feature(features, total_stride, x)
        if self.features_only:
            return features
        return _classifier(self, x, width(self.head_channels), _HS, train)


register("mobilenet_v1", MobileNetV1)
register("mobilenet_v2", MobileNetV2, reference="mobilenet_v2")
register("mobilenet_v3_large", functools.partial(MobileNetV3, blocks=V3_LARGE, head_channels=1280),
         reference="mobilenet_v3_large")
register("mobilenet_v3_small", functools.partial(MobileNetV3, blocks=V3_SMALL, head_channels=1024),
         reference="mobilenet_v3_small")
