"""VGG (Simonyan & Zisserman 2015), configurations A, B, D, E as vgg11/13/16/19, with or without BN.

Every conv is 3x3, stride 1, pad 1; every pool 2x2, stride 2; channels double after each pool
(up to 512). As in torchvision, the `_bn` variants keep the conv bias, and an adaptive 7x7 pool
sits before the 4096-4096-classes classifier. `widths` and `fc_features` shrink a VGG to CPU size
for tests (layer names, and so checkpoints and cnnjax.transfer's mappings, stay the same).

`features_only=True` returns the last map at each stride instead of logits: the ReLU right
before pool3, pool4 and pool5 as stride4, stride8 and stride16 (256, 512, 512 channels), and
pool5 itself as stride32 (512, 7x7 at 224). The classifier (avgpool, fc6-fc8) is not built.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.registry import register

WIDTHS = (64, 128, 256, 512, 512)
# Convolutions per stage (VGG paper Table 1: A=11, B=13, D=16, E=19 weight layers).
STAGE_SIZES = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


class VGG(nn.Module):
    """VGG: five stages of 3x3 convs, each closed by a 2x2 max-pool, then three FC layers."""
    arch: str = "vgg16"
    stage_sizes: Sequence[int] = STAGE_SIZES[16]
    batch_norm: bool = False
    widths: Sequence[int] = WIDTHS      # conv channels per stage
    fc_features: int = 4096             # width of fc6 and fc7
    num_classes: int = 1000
    features_only: bool = False  # return {"stride4": ..., "stride32": ...}; no classifier
    dropout_rate: float = 0.5
    in_channels: int = 3
    min_input_size: int = 32  # five halvings
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        layers.check_input(x, model=self.arch, in_channels=self.in_channels,
                           min_size=self.min_input_size)
        conv = layers.conv(self.dtype, self.param_dtype)
        norm = layers.batch_norm(train, self.dtype, self.param_dtype)
        x = x.astype(self.dtype)
        features = {}
        for s, (size, width) in enumerate(zip(self.stage_sizes, self.widths), start=1):
            for i in range(1, size + 1):
                x = conv(width, 3, use_bias=True, name=f"conv{s}_{i}")(x)
                if self.batch_norm:
                    x = norm(name=f"bn{s}_{i}")(x)
                x = nn.relu(x)
            layers.keep_feature(features, 2**(s - 1), x)
            x = layers.MaxPool(2, 2, name=f"pool{s}")(x)
            layers.keep_feature(features, 2**s, x)
        if self.features_only:
            return features
        x = layers.AdaptiveAvgPool(7, name="avgpool")(x)
        x = layers.Flatten(name="flatten")(x)
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=nn.initializers.normal(0.01))
        for name in ("fc6", "fc7"):
            x = nn.relu(dense(self.fc_features, name=name)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"drop_{name}")(x)
        return dense(self.num_classes, name="fc8")(x)


for _depth, _sizes in STAGE_SIZES.items():
    for _bn in (False, True):
        _name = f"vgg{_depth}" + ("_bn" if _bn else "")
        register(_name, functools.partial(VGG, stage_sizes=_sizes, batch_norm=_bn), reference=_name)
