"""A child of the search space as an ordinary cnnjax Flax module (NHWC, BatchNorm, `train=`)."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.nasspec import Spec, SpecError, load_spec, parse_spec


def concat_padded(xs: Sequence[jax.Array]) -> jax.Array:
    """Channel concatenation of maps of different sizes, the smaller ones zero-padded at the
    bottom and right to the largest (Zoph & Le 2017, Sec. 3.3). Bottom-right: a stride-s conv
    padded by k // 2 centres output pixel p on input pixel s*p, so the maps stay aligned at the
    top left."""
    h = max(x.shape[1] for x in xs)
    w = max(x.shape[2] for x in xs)
    return jnp.concatenate([jnp.pad(x, ((0, 0), (0, h - x.shape[1]), (0, w - x.shape[2]), (0, 0)))
                            for x in xs], axis=-1)


class NASNet(nn.Module):
    """A child network of cnnjax.nas: conv-BN-ReLU layers with skip inputs, global average
    pooling, a dense classifier. Layer i's parameters are `layer{i}/conv` and `layer{i}/bn`."""
    spec: Spec
    arch: str = "nas"
    num_classes: int = 1000
    in_channels: int = 3
    min_input_size: int = 1  # the smallest side every stride can take (Spec.min_input_size)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        layers.check_input(x, model=self.arch, in_channels=self.in_channels,
                           min_size=self.min_input_size)
        conv = layers.conv(self.dtype, self.param_dtype)
        norm = layers.batch_norm(train, self.dtype, self.param_dtype)
        x = x.astype(self.dtype)
        outs: list[jax.Array] = []
        for i, layer in enumerate(self.spec.layers):
            inputs = [x if i == 0 else outs[-1]] + [outs[j] for j in layer.skips]
            h = inputs[0] if len(inputs) == 1 else concat_padded(inputs)
            outs.append(layers.ConvNormAct(conv, norm, layer.filters, layer.kernel, layer.stride,
                                           name=f"layer{i}")(h))
        x = layers.GlobalAvgPool(name="avgpool")(outs[-1])
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="fc")(x)


def as_spec(spec: Spec | dict | str | os.PathLike) -> Spec:
    """A validated Spec from a Spec, its JSON object, JSON text or a JSON file's path."""
    if isinstance(spec, Spec):
        return parse_spec(spec)
    if isinstance(spec, dict):
        return parse_spec(spec)
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            return parse_spec(json.loads(spec))
        except json.JSONDecodeError as e:
            raise SpecError(f"the spec is not JSON ({e})") from None
    return load_spec(spec)


def build(spec: Spec | dict | str | os.PathLike, *, num_classes: int = 1000,
          in_channels: int = 3, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
          name: str | None = None) -> NASNet:
    """The child network of `spec` (validated first: SpecError names the defect), as an unbound
    Module like `cnnjax.create_model`'s; its `arch` is the spec's name (nas_ + hash)."""
    spec = as_spec(spec)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    return NASNet(spec=spec, arch=name or spec.name, num_classes=num_classes,
                  in_channels=in_channels, min_input_size=spec.min_input_size(), dtype=dtype,
                  param_dtype=param_dtype)
