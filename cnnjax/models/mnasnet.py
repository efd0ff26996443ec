"""MnasNet (Tan et al. 2019): the mobile network found by platform-aware architecture search.

The B1 variant, as torchvision's mnasnet*: no squeeze-excite (the paper's MnasNet-A1 adds it and
uses other stacks). A 3x3/2 stem, a depthwise-separable block, six stacks of MobileNet v2
inverted residuals (MBConv) with 3x3 or 5x5 kernels, a 1x1 conv to 1280, global pool, dropout,
FC. Parameters, BatchNorm statistics and MACs equal torchvision's for each depth multiplier.

`features_only=True` returns the last block of the last stack at each stride instead of logits:
stack 1, 2, 4 as stride4, stride8, stride16, and the 1x1 `conv_last` (after stack 6) as stride32
(torchvision's weights have it; timm leaves it out): 24, 40, 96, 1280 channels for mnasnet1_0.
The head (global pool, dropout, fc) is not built.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.mobilenet import DepthwiseSeparable, InvertedResidual
from cnnjax.models.registry import register

# Channels of the stem, the separable block and the six stacks, at depth multiplier 1.
DEPTHS = (32, 16, 24, 40, 80, 96, 192, 320)
# (kernel, first stride, expansion, repeats) of the six MBConv stacks of B1.
STACKS = ((3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1))


class MNASNet(nn.Module):
    """MnasNet (Tan et al. 2019), as torchvision's mnasnet0_5 ... mnasnet1_3 (`width_mult` is
    torchvision's `alpha`)."""
    arch: str = "mnasnet1_0"
    num_classes: int = 1000
    features_only: bool = False  # return {"stride4": ..., "stride32": ...}; no pool, no fc
    width_mult: float = 1.0
    stacks: Sequence[tuple[int, int, int, int]] = STACKS
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
        # TensorFlow's BN decay 0.9997, which torchvision keeps (its momentum 1 - 0.9997).
        norm = layers.batch_norm(train, self.dtype, self.param_dtype, momentum=0.9997)
        # torchvision's _round_to_multiple_of(d * alpha, 8, round_up_bias=0.9) is make_divisible:
        # nearest multiple of 8, bumped up one step when that loses more than 10%.
        depths = [layers.make_divisible(d * self.width_mult, 8) for d in DEPTHS]
        if len(self.stacks) != len(depths) - 2:
            raise ValueError(f"{self.arch}: {len(depths) - 2} stacks expected; "
                             f"got {len(self.stacks)}")
        x = layers.ConvNormAct(conv, norm, depths[0], 3, 2, name="stem")(x)
        # Depthwise-separable with a linear projection and no shortcut, even when widths agree.
        x = DepthwiseSeparable(depths[1], 1, conv, norm, project_act=None, name="sepconv")(x)
        total_stride, features = 2, {}
        for i, ((k, s, t, n), out) in enumerate(zip(self.stacks, depths[2:])):
            for j in range(n):
                x = InvertedResidual(x.shape[-1] * t, out, k, s if j == 0 else 1, conv, norm,
                                     nn.relu, name=f"stage{i + 1}_block{j + 1}")(x)
            total_stride *= s
            layers.keep_feature(features, total_stride, x)
        x = layers.ConvNormAct(conv, norm, 1280, 1, name="conv_last")(x)
        layers.keep_feature(features, total_stride, x)
        if self.features_only:
            return features
        x = layers.GlobalAvgPool(name="avgpool")(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="fc")(x)


register("mnasnet0_5", functools.partial(MNASNet, width_mult=0.5), reference="mnasnet0_5")
register("mnasnet1_0", functools.partial(MNASNet, width_mult=1.0), reference="mnasnet1_0")
