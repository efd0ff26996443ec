"""ShuffleNet v1 (Zhang et al. 2018) and ShuffleNet v2 (Ma et al. 2018), one channel shuffle.

v1 is the paper's Table 1 at 1x for g = 1, 2, 3, 4, 8 (torchvision has no v1); g=3 has 1,865,728
params and 137,460,672 MACs at 224, Table 1's 137M. Table 1 leaves out the final FC: with it,
g=2/4/8 come to 141/134/138M (the table: 140/133/137M). v2 follows torchvision's
shufflenet_v2_* layer for layer. Both shuffle with `layers.channel_shuffle`.

`features_only=True` returns the last map at each stride instead of logits: the stem's max-pool
as stride4 (24 channels: no unit runs at stride 4), the last unit of stages 2, 3, 4 as stride8,
stride16, stride32, v2 with its 1x1 `conv_last` in stride32 (torchvision's weights have it).
Channels: v1 g3 24, 240, 480, 960; v2 x1_0 24, 116, 232, 1024. The head (global pool, fc) is
not built.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.registry import register

ModuleDef = Any


class ShuffleUnit(nn.Module):
    """ShuffleNet v1 unit (Fig. 2b/c): 1x1 GConv, shuffle, 3x3 DWConv, 1x1 GConv, add or concat.

    A stride-2 unit concatenates a 3x3/2 average-pooled shortcut, so its residual branch makes
    only `features - in_channels` channels (Sec. 3.2); the bottleneck is a quarter of `features`.
    """
    features: int
    stride: int
    groups: int
    first_groups: int  # 1 for the first unit of stage 2: its 24 input channels are too few
    conv: ModuleDef
    norm: ModuleDef
    zero_init_last: bool = False  # stride 1: the last BN scale starts at 0, the unit at ReLU(x)

    @nn.compact
    def __call__(self, x):
        unit = functools.partial(layers.ConvNormAct, self.conv, self.norm)
        branch = self.features - x.shape[-1] if self.stride == 2 else self.features
        mid = self.features // 4
        y = unit(mid, 1, groups=self.first_groups, name="gconv1")(x)
        if self.first_groups > 1:  # after an ungrouped conv a shuffle would mix nothing new
            y = layers.channel_shuffle(y, self.first_groups)
        # No ReLU after the depthwise conv or the second GConv (Sec. 3.2): ReLU follows the merge.
        y = unit(mid, 3, self.stride, groups=mid, act=None, name="dw")(y)
        last_norm = self.norm
        if self.zero_init_last and self.stride == 1:  # only an added branch can start at zero
            last_norm = functools.partial(self.norm, scale_init=nn.initializers.zeros)
        y = layers.ConvNormAct(self.conv, last_norm, branch, 1, groups=self.groups, act=None,
                               name="gconv2")(y)
        if self.stride == 2:
            shortcut = layers.AvgPool(3, 2, padding=1, name="pool_shortcut")(x)
            return nn.relu(jnp.concatenate([shortcut, y], axis=-1))
        return nn.relu(x + y)


# Table 1, 1x: output channels of stages 2-4 per number of groups g.
V1_STAGE_CHANNELS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960),
                     4: (272, 544, 1088), 8: (384, 768, 1536)}


class ShuffleNetV1(nn.Module):
    """ShuffleNet v1 (Zhang et al. 2018, Table 1): 24-channel 3x3/2 stem, 3x3/2 max-pool, stages
    of 4/8/4 shuffle units, global pool, FC. `width_mult` is the paper's "ShuffleNet s x"."""
    arch: str = "shufflenet_v1_g3"
    groups: int = 3
    stage_repeats: Sequence[int] = (4, 8, 4)
    num_classes: int = 1000
    features_only: bool = False  # return {"stride4": ..., "stride32": ...}; no pool, no fc
    width_mult: float = 1.0
    stem_channels: int | None = None  # None: 24 x width_mult (the authors' 1.5x model keeps 24)
    in_channels: int = 3
    min_input_size: int = 1  # every conv and pool is padded: any size reaches a 1x1 map
    zero_init_residual: bool = False  # as ResNet's (Goyal et al. 2017), for the added units
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        layers.check_input(x, model=self.arch, in_channels=self.in_channels,
                           min_size=self.min_input_size)
        x = x.astype(self.dtype)
        if self.groups not in V1_STAGE_CHANNELS:
            raise ValueError(f"{self.arch}: groups must be one of {sorted(V1_STAGE_CHANNELS)} "
                             f"(Table 1); got {self.groups}")
        conv = layers.conv(self.dtype, self.param_dtype)
        norm = layers.batch_norm(train, self.dtype, self.param_dtype)
        g = self.groups
        # Other widths are rounded so that every grouped conv divides evenly (1x is Table 1):
        # the stem to a multiple of g, the stages to a multiple of 4g (the bottleneck is out/4).
        stem = self.stem_channels or layers.make_divisible(24 * self.width_mult, g, min_value=g)
        stages = [layers.make_divisible(c * self.width_mult, 4 * g) for c in V1_STAGE_CHANNELS[g]]
        if stem % g:  # the first unit's branch makes stages[0] - stem channels in g groups
            raise ValueError(f"{self.arch}: stem_channels must be a multiple of groups={g}; "
                             f"got {stem}")
        x = layers.ConvNormAct(conv, norm, stem, 3, 2, name="stem")(x)
        x = layers.MaxPool(3, 2, padding=1, name="pool")(x)
        features = {}
        layers.keep_feature(features, 4, x)  # no unit runs at stride 4
        for i, (repeats, out) in enumerate(zip(self.stage_repeats, stages)):
            for j in range(repeats):
                x = ShuffleUnit(out, 2 if j == 0 else 1, g, 1 if i == j == 0 else g, conv, norm,
                                self.zero_init_residual, name=f"stage{i + 2}_block{j + 1}")(x)
            layers.keep_feature(features, 8 * 2**i, x)
        if self.features_only:
            return features
        x = layers.GlobalAvgPool(name="avgpool")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="fc")(x)


class ShuffleV2Unit(nn.Module):
    """ShuffleNet v2 unit (Fig. 3c/d): split (or copy, for stride 2), 1x1-dw3x3-1x1 on one half,
    concat, shuffle the two halves."""
    features: int
    stride: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        unit = functools.partial(layers.ConvNormAct, self.conv, self.norm)
        half = self.features // 2
        if self.stride == 1:
            left, right = jnp.split(x, 2, axis=-1)
        else:  # both branches see the whole input; the left one downsamples it
            c = x.shape[-1]
            left = unit(c, 3, self.stride, groups=c, act=None, name="left_dw")(x)
            left = unit(half, 1, name="left_pw")(left)
            right = x
        right = unit(half, 1, name="right_pw1")(right)
        right = unit(half, 3, self.stride, groups=half, act=None, name="right_dw")(right)
        right = unit(half, 1, name="right_pw2")(right)
        return layers.channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


# torchvision's stage output channels (stages 2-4, then conv5) per width; Table 5 of the paper.
V2_STAGE_CHANNELS = {"x0_5": (48, 96, 192, 1024), "x1_0": (116, 232, 464, 1024),
                     "x1_5": (176, 352, 704, 1024), "x2_0": (244, 488, 976, 2048)}


class ShuffleNetV2(nn.Module):
    """ShuffleNet v2 (Ma et al. 2018, Table 5), as torchvision's shufflenet_v2_*."""
    arch: str = "shufflenet_v2_x1_0"
    stage_channels: Sequence[int] = V2_STAGE_CHANNELS["x1_0"]
    stage_repeats: Sequence[int] = (4, 8, 4)
    num_classes: int = 1000
    features_only: bool = False  # return {"stride4": ..., "stride32": ...}; no pool, no fc
    in_channels: int = 3
    min_input_size: int = 1  # every conv and pool is padded: any size reaches a 1x1 map
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        layers.check_input(x, model=self.arch, in_channels=self.in_channels,
                           min_size=self.min_input_size)
        x = x.astype(self.dtype)
        conv = layers.conv(self.dtype, self.param_dtype)
        norm = layers.batch_norm(train, self.dtype, self.param_dtype)
        *stages, last = self.stage_channels
        x = layers.ConvNormAct(conv, norm, 24, 3, 2, name="stem")(x)
        x = layers.MaxPool(3, 2, padding=1, name="pool")(x)
        features = {}
        layers.keep_feature(features, 4, x)  # no unit runs at stride 4
        for i, (repeats, out) in enumerate(zip(self.stage_repeats, stages)):
            for j in range(repeats):
                x = ShuffleV2Unit(out, 2 if j == 0 else 1, conv, norm,
                                  name=f"stage{i + 2}_block{j + 1}")(x)
            layers.keep_feature(features, 8 * 2**i, x)
        x = layers.ConvNormAct(conv, norm, last, 1, name="conv_last")(x)
        layers.keep_feature(features, 4 * 2**len(stages), x)
        if self.features_only:
            return features
        x = layers.GlobalAvgPool(name="avgpool")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="fc")(x)


for _g in V1_STAGE_CHANNELS:
    register(f"shufflenet_v1_g{_g}", functools.partial(ShuffleNetV1, groups=_g))
for _w, _channels in V2_STAGE_CHANNELS.items():
    register(f"shufflenet_v2_{_w}", functools.partial(ShuffleNetV2, stage_channels=_channels),
             reference=f"shufflenet_v2_{_w}")
