"""ResNet (He et al. 2016), ResNeXt (Xie et al. 2017), Wide ResNet and SE-ResNet, as one family.

ResNet v1.5 by default, as torchvision: a downsampling bottleneck puts its stride on the 3x3 conv
(`stride_in_1x1=True` gives the paper's v1, 3.86 instead of 4.09 GMACs for ResNet-50). ResNeXt
and Wide ResNet are the bottleneck with other `groups` / `width_per_group`; SE-ResNet is the same
network with a squeeze-excite `attention` on every residual branch (Hu et al. 2018, r=16).

`remat=True` recomputes each residual block in the backward pass (`flax.linen.remat`, gradient
checkpointing) instead of keeping its activations: the train step keeps little more than the
blocks' inputs, for about one more forward pass of compute; parameters, their names and the
outputs do not change.

`features_only=True` returns the last block of each stage instead of logits (ResNet-50's
channels): stride4 stage1 (256), stride8 stage2 (512), stride16 stage3 (1024), stride32 stage4
(2048); the head (global pool, fc) is not built.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.registry import register

ModuleDef = Any


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""
    planes: int
    stride: int
    conv: ModuleDef
    norm: ModuleDef
    attention: ModuleDef | None = None
    zero_init_last: bool = False
    expansion = 1

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.norm(name="bn1")(self.conv(self.planes, 3, self.stride, name="conv1")(x)))
        y = self.conv(self.planes, 3, name="conv2")(y)
        y = self.norm(name="bn2", **_last_scale(self.zero_init_last))(y)
        return _merge(self, x, y, self.planes)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand by 4 (ResNet-50 and deeper)."""
    planes: int
    stride: int
    conv: ModuleDef
    norm: ModuleDef
    attention: ModuleDef | None = None
    zero_init_last: bool = False
    groups: int = 1
    width_per_group: int = 64
    stride_in_1x1: bool = False
    expansion = 4

    @nn.compact
    def __call__(self, x):
        width = int(self.planes * self.width_per_group / 64) * self.groups
        s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        y = nn.relu(self.norm(name="bn1")(self.conv(width, 1, s1, name="conv1")(x)))
        y = self.conv(width, 3, s3, groups=self.groups, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.planes * 4, 1, name="conv3")(y)
        y = self.norm(name="bn3", **_last_scale(self.zero_init_last))(y)
        return _merge(self, x, y, self.planes * 4)


def _last_scale(zero: bool) -> dict:
    # Goyal et al. 2017: a zero-initialised last BN scale makes each block start as the identity.
    return {"scale_init": nn.initializers.zeros} if zero else {}


def _merge(block: nn.Module, x, y, out_channels: int):
    """Attention on the residual branch, projection shortcut when the shape changes, add, ReLU."""
    if block.attention is not None:
        y = block.attention(name="se")(y)
    if block.stride != 1 or x.shape[-1] != out_channels:
        x = block.conv(out_channels, 1, block.stride, name="conv_proj")(x)
        x = block.norm(name="bn_proj")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet: 7x7/2 stem and 3x3/2 max-pool, four stages of residual blocks, global pool, FC."""
    arch: str = "resnet50"
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: Callable[..., nn.Module] = Bottleneck
    num_classes: int = 1000
    features_only: bool = False  # return {"stride4": ..., "stride32": ...}; no pool, no fc
    groups: int = 1
    width_per_group: int = 64
    se_reduction: int | None = None
    stride_in_1x1: bool = False
    zero_init_residual: bool = False
    remat: bool = False  # recompute each block in the backward pass instead of keeping it
    in_channels: int = 3
    min_input_size: int = 1  # every conv and pool is padded: any size reaches a 1x1 map
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        layers.check_input(x, model=self.arch, in_channels=self.in_channels,
                           min_size=self.min_input_size)
        conv = layers.conv(self.dtype, self.param_dtype)
        norm = layers.batch_norm(train, self.dtype, self.param_dtype)
        attention = None
        if self.se_reduction:
            attention = functools.partial(layers.SqueezeExcite, reduction=self.se_reduction,
                                          dtype=self.dtype, param_dtype=self.param_dtype)
        block = self.block
        if block is Bottleneck:
            # a remat'd block keeps its name, its parameters' paths and its scope in the trace
            block = functools.partial(nn.remat(Bottleneck) if self.remat else Bottleneck,
                                      groups=self.groups,
                                      width_per_group=self.width_per_group,
                                      stride_in_1x1=self.stride_in_1x1)
        elif self.groups != 1 or self.width_per_group != 64:
            raise ValueError(f"{self.arch}: BasicBlock supports only groups=1, width_per_group=64")
        elif self.remat:
            block = nn.remat(block)

        x = x.astype(self.dtype)
        x = nn.relu(norm(name="bn_init")(conv(64, 7, 2, name="conv_init")(x)))
        x = layers.MaxPool(3, 2, padding=1, name="pool_init")(x)
        features = {}
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                x = block(planes=64 * 2**i, stride=2 if i > 0 and j == 0 else 1, conv=conv,
                          norm=norm, attention=attention, zero_init_last=self.zero_init_residual,
                          name=f"stage{i + 1}_block{j + 1}")(x)
            layers.keep_feature(features, 4 * 2**i, x)  # the stem's conv and pool: stride 4
        if self.features_only:
            return features
        x = layers.GlobalAvgPool(name="avgpool")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="fc")(x)


STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
               152: (3, 8, 36, 3)}


def _resnet(depth: int, **kw) -> Callable[..., nn.Module]:
    block = BasicBlock if depth < 50 else Bottleneck
    return functools.partial(ResNet, stage_sizes=STAGE_SIZES[depth], block=block, **kw)


for _depth in STAGE_SIZES:
    register(f"resnet{_depth}", _resnet(_depth), reference=f"resnet{_depth}")
    register(f"se_resnet{_depth}", _resnet(_depth, se_reduction=16))
register("resnext50_32x4d", _resnet(50, groups=32, width_per_group=4), reference="resnext50_32x4d")
register("resnext101_32x8d", _resnet(101, groups=32, width_per_group=8),
         reference="resnext101_32x8d")
register("wide_resnet50_2", _resnet(50, width_per_group=128), reference="wide_resnet50_2")
