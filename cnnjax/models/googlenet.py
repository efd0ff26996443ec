"""GoogLeNet / Inception v1 (Szegedy et al. 2014, "Going deeper with convolutions"), two ways.

`googlenet` is torchvision's network, count for count: every conv is conv (no bias) -> BatchNorm
(eps 1e-3) -> ReLU, the branch the paper calls 5x5 is a 3x3 conv (a bug torchvision keeps for
its weights, pytorch/vision#906), the max-pool before inception5a is 2x2, dropout 0.2 before the
FC, and the auxiliary heads pool adaptively to 4x4. `googlenet_v1` is the paper's Table 1 /
Fig. 3: a true 5x5 branch, convs with biases and no BatchNorm, Local Response Normalization in
the stem (after pool1 and after conv3, with BVLC Caffe's constants: the paper gives none), a 3x3
max-pool before inception5a, dropout 0.4, and auxiliary heads that average-pool 5x5 with stride 3.
The 5x5 branch is the whole difference in cost: +84.3M MACs (1.582 vs 1.498 G at 224) and
+380,928 weights, less one parameter a channel for biases in place of BN's scale and offset.

Both take `aux_logits=True` (Sec. 5's two auxiliary classifiers on 4a and 4d): train mode then
returns (logits, aux1_logits, aux2_logits) and eval mode the logits alone; the heads are built at
init in either mode, so one set of variables serves both. The paper adds the aux losses with
weight 0.3; that is the training loop's choice. (torchvision's namedtuple orders the heads the
other way: logits, aux2, aux1.) torchvision's `transform_input` is not reproduced.

`features_only=True` returns the last map at each stride instead of logits (channels, size at
224): stride4 conv3 (192, 56x56; googlenet_v1: lrn2, after conv3), stride8 inception3b (480,
28x28), stride16 inception4e (832, 14x14), stride32 inception5b (1024, 7x7). Neither the head
(avgpool, dropout, fc) nor the auxiliary heads are built, whatever `aux_logits` says.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.registry import register

ModuleDef = Any


class ConvReLU(nn.Module):
    """Conv with bias -> ReLU, the paper's unit (GoogLeNet predates BatchNorm)."""
    conv: ModuleDef
    features: int
    kernel: int = 3
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        return nn.relu(self.conv(self.features, self.kernel, self.stride, use_bias=True,
                                 name="conv")(x))


class Inception(nn.Module):
    """Four parallel branches, concatenated on channels: the Inception module of Fig. 2(b)."""
    widths: Sequence[int]  # Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj
    unit: ModuleDef
    kernel5x5: int = 5

    @nn.compact
    def __call__(self, x):
        c1, c3_reduce, c3, c5_reduce, c5, proj = self.widths
        b1 = self.unit(features=c1, kernel=1, name="branch1x1")(x)
        b2 = self.unit(features=c3_reduce, kernel=1, name="branch3x3_reduce")(x)
        b2 = self.unit(features=c3, kernel=3, name="branch3x3")(b2)
        b3 = self.unit(features=c5_reduce, kernel=1, name="branch5x5_reduce")(x)
        # Named for the paper's branch even when its kernel is torchvision's 3x3.
        b3 = self.unit(features=c5, kernel=self.kernel5x5, name="branch5x5")(b3)
        b4 = layers.MaxPool(3, 1, padding=1, ceil_mode=True, name="branch_pool")(x)
        b4 = self.unit(features=proj, kernel=1, name="branch_pool_proj")(b4)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionAux(nn.Module):
    """Auxiliary classifier (Sec. 5): pool to 4x4, 1x1 conv 128, FC 1024, dropout 0.7, FC."""
    num_classes: int
    unit: ModuleDef
    pool: ModuleDef
    dense: ModuleDef

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = self.pool(name="pool")(x)
        x = self.unit(features=128, kernel=1, name="conv")(x)
        x = layers.Flatten(name="flatten")(x)
        x = nn.relu(self.dense(1024, name="fc1")(x))
        x = nn.Dropout(0.7, deterministic=not train, name="dropout")(x)
        return self.dense(self.num_classes, name="fc2")(x)


# Table 1's columns per Inception module: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
WIDTHS = {"3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
          "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
          "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
          "4e": (256, 160, 320, 32, 128, 128), "5a": (256, 160, 320, 32, 128, 128),
          "5b": (384, 192, 384, 48, 128, 128)}


def _inception(*keys: str) -> tuple:
    return tuple(("inception", f"inception{k}", WIDTHS[k]) for k in keys)


# ("conv", name, filters, kernel, stride) | ("pool", name, window): stride 2, ceil mode (Caffe's
# and torchvision's rounding) | ("lrn", name) | ("inception", name, widths) | ("aux", name): an
# auxiliary head on the current map.
TORCHVISION_TRUNK = (
    ("conv", "conv1", 64, 7, 2), ("pool", "maxpool1", 3),
    ("conv", "conv2", 64, 1, 1), ("conv", "conv3", 192, 3, 1), ("pool", "maxpool2", 3),
    *_inception("3a", "3b"), ("pool", "maxpool3", 3),
    *_inception("4a"), ("aux", "aux1"), *_inception("4b", "4c", "4d"), ("aux", "aux2"),
    *_inception("4e"), ("pool", "maxpool4", 2),
    *_inception("5a", "5b"),
)

# Fig. 3: LocalRespNorm after the first max-pool and after the 3x3 conv; Table 1's 3x3/2 pool
# before inception5a (at 224 both variants' pools give 7x7; only the smallest input differs).
PAPER_TRUNK = (
    ("conv", "conv1", 64, 7, 2), ("pool", "maxpool1", 3), ("lrn", "lrn1"),
    ("conv", "conv2", 64, 1, 1), ("conv", "conv3", 192, 3, 1), ("lrn", "lrn2"),
    ("pool", "maxpool2", 3),
    *_inception("3a", "3b"), ("pool", "maxpool3", 3),
    *_inception("4a"), ("aux", "aux1"), *_inception("4b", "4c", "4d"), ("aux", "aux2"),
    *_inception("4e"), ("pool", "maxpool4", 3),
    *_inception("5a", "5b"),
)


class GoogLeNet(nn.Module):
    """GoogLeNet from a layer table: stem, nine Inception modules, global pool, dropout, FC."""
    arch: str = "googlenet"
    trunk: Sequence[tuple] = TORCHVISION_TRUNK
    batch_norm: bool = True
    kernel5x5: int = 3
    dropout_rate: float = 0.2
    aux_pool: ModuleDef = functools.partial(layers.AdaptiveAvgPool, 4)
    aux_min_input_size: int = 1  # the smallest H/W the auxiliary heads take (adaptive: any)
    aux_logits: bool = False
    num_classes: int = 1000
    features_only: bool = False  # return {"stride4": ..., "stride32": ...}; no heads at all
    in_channels: int = 3
    min_input_size: int = 15  # maxpool3's 3x3 window needs a 2x2 map (ceil mode)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        layers.check_input(x, model=self.arch, in_channels=self.in_channels,
                           min_size=self.min_input_size)
        if self.aux_logits and not self.features_only:
            layers.check_input(x, model=f"{self.arch} with aux_logits=True",
                               in_channels=self.in_channels, min_size=self.aux_min_input_size)
        conv = layers.conv(self.dtype, self.param_dtype)
        if self.batch_norm:  # torchvision's BasicConv2d: BatchNorm eps 1e-3
            norm = layers.batch_norm(train, self.dtype, self.param_dtype, epsilon=1e-3)
            unit = functools.partial(layers.ConvNormAct, conv=conv, norm=norm)
        else:
            unit = functools.partial(ConvReLU, conv=conv)
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        # The heads run in training only, but are created at init in either mode so that their
        # parameters exist whichever mode initialised the model.
        run_aux = self.aux_logits and not self.features_only and (train or self.is_initializing())

        x = x.astype(self.dtype)
        aux, total_stride, feature_maps = [], 1, {}
        for kind, name, *args in self.trunk:
            if kind == "conv":
                features, kernel, stride = args
                x = unit(features=features, kernel=kernel, stride=stride, name=name)(x)
                total_stride *= stride
            elif kind == "pool":
                x = layers.MaxPool(args[0], 2, ceil_mode=True, name=name)(x)
                total_stride *= 2
            elif kind == "lrn":  # BVLC Caffe: n=5, alpha=1e-4 (divided by n), beta=0.75, k=1
                x = layers.LocalResponseNorm(5, alpha=1e-4 / 5, beta=0.75, k=1.0, name=name)(x)
            elif kind == "inception":
                x = Inception(args[0], unit, self.kernel5x5, name=name)(x)
            elif kind == "aux" and run_aux:
                aux.append(InceptionAux(self.num_classes, unit, self.aux_pool, dense,
                                        name=name)(x, train=train))
            layers.keep_feature(feature_maps, total_stride, x)
        if self.features_only:
            return feature_maps
        x = layers.GlobalAvgPool(name="avgpool")(x)  # the paper's 7x7 average pool at 224
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
        x = dense(self.num_classes, name="fc")(x)
        return (x, *aux) if self.aux_logits and train else x


register("googlenet", GoogLeNet, reference="googlenet")
# The paper's aux pool takes 4a's 14x14 map to 4x4 at 224 and needs a 5x5 map (input 79): the
# aux FC1's input size then follows the input (4x4x128 from 223 to 270), as the paper's network,
# defined at 224 only, would.
register("googlenet_v1", functools.partial(
    GoogLeNet, trunk=PAPER_TRUNK, batch_norm=False, kernel5x5=5, dropout_rate=0.4,
    aux_pool=functools.partial(layers.AvgPool, 5, 3), aux_min_input_size=79,
    min_input_size=31))  # maxpool4's 3x3 window needs a 2x2 map
