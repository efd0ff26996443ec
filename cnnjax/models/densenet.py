"""DenseNet-BC (Huang et al. 2017, "Densely connected convolutional networks"), as torchvision.

Every layer of a dense block sees the concatenation of all earlier maps in the block and adds
`growth_rate` channels: BN-ReLU-1x1 conv (`bn_size` x growth, the "B" bottleneck), BN-ReLU-3x3
conv. Transitions between blocks halve channels and resolution (the "C" compression, 0.5):
BN-ReLU-1x1 conv-2x2 average pool. The ImageNet stem is a 7x7/2 conv and a 3x3/2 max-pool.

`memory_efficient=True` recomputes each layer's concatenation-BN-ReLU-1x1 bottleneck in the
backward pass (`flax.linen.remat`) instead of keeping it, torchvision's option after Pleiss et al.
2017: the stored concatenations grow quadratically with block depth, the recomputation costs one
more 1x1 conv a layer. The same variables serve both settings (the parameter names agree).

`features_only=True` returns the last map at each stride instead of logits, as timm: the
concatenated output of dense blocks 1-3 (the transition after each counts as the downsampling
layer) as stride4, stride8 and stride16, and the last block after norm5 and its ReLU as stride32
(DenseNet-121: 256, 512, 1024, 1024 channels). The head (global pool, fc) is not built.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.registry import register

ModuleDef = Any


class Bottleneck(nn.Module):
    """Concatenate the block's maps, BN, ReLU, 1x1 conv: the part `memory_efficient` recomputes."""
    features: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, inputs: Sequence[Any]):
        x = jnp.concatenate(inputs, axis=-1)
        return self.conv(self.features, 1, name="conv1")(nn.relu(self.norm(name="norm1")(x)))


class DenseLayer(nn.Module):
    """One layer of a dense block: bottleneck, then BN-ReLU-3x3 conv to `growth_rate` channels."""
    growth_rate: int
    bn_size: int
    conv: ModuleDef
    norm: ModuleDef
    drop_rate: float = 0.0
    memory_efficient: bool = False

    @nn.compact
    def __call__(self, inputs: Sequence[Any], *, train: bool):
        # A remat'd submodule keeps its name (and its params' paths) and its scope in the traced
        # name stack, so cnnjax.profile still charges its conv to `.../bottleneck/conv1`.
        bottleneck = nn.remat(Bottleneck) if self.memory_efficient else Bottleneck
        y = bottleneck(self.bn_size * self.growth_rate, self.conv, self.norm,
                       name="bottleneck")(inputs)
        y = self.conv(self.growth_rate, 3, name="conv2")(nn.relu(self.norm(name="norm2")(y)))
        if self.drop_rate:  # torchvision's drop_rate: dropout on each layer's new maps
            y = nn.Dropout(self.drop_rate, deterministic=not train, name="dropout")(y)
        return y


class Transition(nn.Module):
    """BN-ReLU-1x1 conv to `features` channels, 2x2/2 average pool: between two dense blocks."""
    features: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        x = self.conv(self.features, 1, name="conv")(nn.relu(self.norm(name="norm")(x)))
        return layers.AvgPool(2, 2, name="pool")(x)


class DenseNet(nn.Module):
    """DenseNet-BC for ImageNet: 7x7 stem, dense blocks joined by transitions, BN-ReLU, pool, FC."""
    arch: str = "densenet121"
    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    drop_rate: float = 0.0
    memory_efficient: bool = False
    num_classes: int = 1000
    features_only: bool = False  # return {"stride4": ..., "stride32": ...}; no pool, no fc
    in_channels: int = 3
    min_input_size: int = 29  # the third transition's 2x2 pool needs a 2x2 map
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        layers.check_input(x, model=self.arch, in_channels=self.in_channels,
                           min_size=self.min_input_size)
        conv = layers.conv(self.dtype, self.param_dtype)
        norm = layers.batch_norm(train, self.dtype, self.param_dtype)
        x = x.astype(self.dtype)
        x = nn.relu(norm(name="norm0")(conv(self.num_init_features, 7, 2, name="conv0")(x)))
        x = layers.MaxPool(3, 2, padding=1, name="pool0")(x)
        features = {}
        for i, size in enumerate(self.block_config, start=1):
            # The block's maps stay a list; each layer concatenates them itself (in its
            # bottleneck), so with remat no concatenation outlives the forward pass.
            maps = [x]
            for j in range(1, size + 1):
                maps.append(DenseLayer(self.growth_rate, self.bn_size, conv, norm,
                                       self.drop_rate, self.memory_efficient,
                                       name=f"denseblock{i}_layer{j}")(maps, train=train))
            x = jnp.concatenate(maps, axis=-1)
            if i < len(self.block_config):
                layers.keep_feature(features, 2**(i + 1), x)  # block 1 runs at stride 4
                x = Transition(x.shape[-1] // 2, conv, norm, name=f"transition{i}")(x)
        x = nn.relu(norm(name="norm5")(x))
        layers.keep_feature(features, 2**(len(self.block_config) + 1), x)
        if self.features_only:
            return features
        x = layers.GlobalAvgPool(name="avgpool")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="fc")(x)


# depth: (growth rate, layers per block, stem width); Huang et al. Table 1, torchvision's widths.
CONFIGS = {121: (32, (6, 12, 24, 16), 64), 161: (48, (6, 12, 36, 24), 96),
           169: (32, (6, 12, 32, 32), 64), 201: (32, (6, 12, 48, 32), 64)}

for _depth, (_growth, _blocks, _stem) in CONFIGS.items():
    register(f"densenet{_depth}", functools.partial(DenseNet, growth_rate=_growth,
                                                    block_config=_blocks,
                                                    num_init_features=_stem),
             reference=f"densenet{_depth}")
