"""AlexNet (torchvision's and the 2012 paper's two-GPU network) and ZFNet, as one family.

The three differ only in their convolutional trunk, so each is a table of layers fed to one module;
all share the classifier: adaptive 6x6 average pool, flatten, dropout-FC-ReLU twice, FC.

`features_only=True` returns the trunk's last map at each stride instead of logits (alexnet's
channels, sizes at 224): stride4 conv1 (64, 55x55; alexnet_v1: lrn1), stride8 conv2 (192, 27x27;
alexnet_v1: lrn2), stride16 conv5 (256, 13x13), stride32 pool5 (256, 6x6). ZFNet's conv1 has
stride 2: its stride4 is lrn1 (after pool1), stride8 conv2 (26x26: unpadded), stride16 conv5,
stride32 pool5. Outputs are after the ReLU; the classifier (avgpool, fc6-fc8) is not built.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.registry import register

# ("conv", name, filters, kernel, stride, pad, groups) | ("pool", name, kernel, stride, ceil_mode)
# | ("lrn", name). ReLU follows every conv.

# torchvision's AlexNet ("one weird trick", Krizhevsky 2014): 64-192-384-256-256, no LRN, no groups.
ALEXNET = (
    ("conv", "conv1", 64, 11, 4, 2, 1), ("pool", "pool1", 3, 2, False),
    ("conv", "conv2", 192, 5, 1, 2, 1), ("pool", "pool2", 3, 2, False),
    ("conv", "conv3", 384, 3, 1, 1, 1), ("conv", "conv4", 256, 3, 1, 1, 1),
    ("conv", "conv5", 256, 3, 1, 1, 1), ("pool", "pool5", 3, 2, False),
)

# Krizhevsky et al. 2012, Sec. 3.5 / Fig. 2: 96-256-384-384-256 on 227x227 (the paper's "224" does
# not give its 55x55 conv1 map). conv2, conv4 and conv5 see only their own GPU's half of the
# channels (groups=2); LRN follows conv1 and conv2 (after their ReLU), max-pool follows the LRNs.
ALEXNET_V1 = (
    ("conv", "conv1", 96, 11, 4, 0, 1), ("lrn", "lrn1"), ("pool", "pool1", 3, 2, False),
    ("conv", "conv2", 256, 5, 1, 2, 2), ("lrn", "lrn2"), ("pool", "pool2", 3, 2, False),
    ("conv", "conv3", 384, 3, 1, 1, 1), ("conv", "conv4", 384, 3, 1, 1, 2),
    ("conv", "conv5", 256, 3, 1, 1, 2), ("pool", "pool5", 3, 2, False),
)

# Zeiler & Fergus 2014, Fig. 3: 7x7 stride-2 conv1 (224 -> 110, pad 1), 5x5 stride-2 conv2
# (55 -> 26), 3x3 max-pools with ceil mode (110 -> 55, 26 -> 13), contrast normalisation across
# feature maps after the first two pools; dense (one-GPU) convolutions.
ZFNET = (
    ("conv", "conv1", 96, 7, 2, 1, 1), ("pool", "pool1", 3, 2, True), ("lrn", "lrn1"),
    ("conv", "conv2", 256, 5, 2, 0, 1), ("pool", "pool2", 3, 2, True), ("lrn", "lrn2"),
    ("conv", "conv3", 384, 3, 1, 1, 1), ("conv", "conv4", 384, 3, 1, 1, 1),
    ("conv", "conv5", 256, 3, 1, 1, 1), ("pool", "pool5", 3, 2, True),
)


class AlexNet(nn.Module):
    """A five-conv trunk from a layer table, then AlexNet's three-layer classifier."""
    arch: str = "alexnet"
    trunk: Sequence[tuple] = ALEXNET
    num_classes: int = 1000
    features_only: bool = False  # return {"stride4": ..., "stride32": ...}; no classifier
    dropout_rate: float = 0.5
    in_channels: int = 3
    min_input_size: int = 63  # smallest H/W whose feature map survives pool5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        layers.check_input(x, model=self.arch, in_channels=self.in_channels,
                           min_size=self.min_input_size)
        conv = layers.conv(self.dtype, self.param_dtype)
        x = x.astype(self.dtype)
        total_stride, features = 1, {}
        for kind, name, *args in self.trunk:
            if kind == "conv":
                filters, kernel, stride, pad, groups = args
                x = nn.relu(conv(filters, kernel, stride, pad, groups, use_bias=True, name=name)(x))
                total_stride *= stride
            elif kind == "pool":
                window, stride, ceil_mode = args
                x = layers.MaxPool(window, stride, ceil_mode=ceil_mode, name=name)(x)
                total_stride *= stride
            else:
                x = layers.LocalResponseNorm(name=name)(x)
            layers.keep_feature(features, total_stride, x)
        if self.features_only:
            return features
        x = layers.AdaptiveAvgPool(6, name="avgpool")(x)
        x = layers.Flatten(name="flatten")(x)
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        for name in ("fc6", "fc7"):
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"drop_{name}")(x)
            x = nn.relu(dense(4096, name=name)(x))
        return dense(self.num_classes, name="fc8")(x)


register("alexnet", functools.partial(AlexNet, trunk=ALEXNET, min_input_size=63),
         reference="alexnet")
register("alexnet_v1", functools.partial(AlexNet, trunk=ALEXNET_V1, min_input_size=67),
         input_size=227)
register("zfnet", functools.partial(AlexNet, trunk=ZFNET, min_input_size=47))
