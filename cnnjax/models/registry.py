"""The model registry: `register`, `create_model`, `list_models` (lowercase, unique names)."""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.models.layers import FEATURE_STRIDES


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one name: how to build it and where its numbers come from."""
    name: str
    builder: Callable[..., nn.Module]
    input_size: int = 224         # the size its reference numbers are quoted at (alexnet_v1: 227)
    reference: str | None = None  # torchvision's name for the same architecture, if it has one


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, builder: Callable[..., nn.Module], *, input_size: int = 224,
             reference: str | None = None) -> None:
    """Registers `builder` (a Module class or a `functools.partial` of one) under `name`."""
    if name != name.lower():
        raise ValueError(f"model names are lowercase; got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelSpec(name, builder, input_size, reference)


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by an fnmatch pattern such as 'resnet*'."""
    names = sorted(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def closest_names(name: str, n: int = 5) -> list[str]:
    """Registered names that look like `name`: close spellings first, then names it starts."""
    names = sorted(_REGISTRY)
    key = str(name).lower()
    close = difflib.get_close_matches(key, names, n=n, cutoff=0.6)
    prefixed = [m for m in names if m.startswith(key) and m not in close]
    return (close + prefixed)[:n]


def model_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; an unknown name raises ValueError listing the closest ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        hint = closest_names(name)
        msg = f"unknown model {name!r}"
        msg += f"; did you mean {', '.join(hint)}?" if hint else "."
        raise ValueError(msg + " cnnjax.list_models() lists every name.") from None


def option_names(builder: Callable[..., nn.Module]) -> set[str]:
    """The fields a registered builder accepts as keyword overrides."""
    cls = getattr(builder, "func", builder)
    reserved = ("parent", "name", "arch", "num_classes", "dtype", "param_dtype")
    return {f.name for f in dataclasses.fields(cls) if f.init and f.name not in reserved}


def create_model(name: str, *, num_classes: int = 1000, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, **overrides: Any) -> nn.Module:
    """Builds the registered model `name` as an unbound `flax.linen.Module`.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of the parameters; `overrides`
    set any other field of the family module (e.g. `zero_init_residual=True`, `in_channels=1`).
    """
    spec = model_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    fields = option_names(spec.builder)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(map(repr, unknown))}; "
                         f"its options are: {', '.join(sorted(fields))}")
    return spec.builder(arch=name, num_classes=num_classes, dtype=dtype, param_dtype=param_dtype,
                        **overrides)


def feature_info(name: str, input_size: int | tuple[int, int] = 224,
                 **overrides: Any) -> list[dict[str, Any]]:
    """The maps `create_model(name, features_only=True, **overrides)` returns, by stride:
    [{"name": "stride4", "stride": 4, "channels": ...}, ...]; traced (jax.eval_shape), not run."""
    model = create_model(name, features_only=True, **overrides)
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    x = jax.ShapeDtypeStruct((1, h, w, model.in_channels), jnp.float32)
    maps, _ = jax.eval_shape(functools.partial(model.init_with_output, train=False),
                             jax.random.key(0), x)
    return [{"name": f"stride{s}", "stride": s, "channels": maps[f"stride{s}"].shape[-1]}
            for s in FEATURE_STRIDES if f"stride{s}" in maps]


def strip_head(variables: Mapping, backbone: Mapping) -> dict:
    """A full model's `variables` (converted weights, a checkpoint) cut down to the tree of its
    `features_only=True` variables `backbone` (arrays, or shapes from jax.eval_shape of its init):
    the head's entries are dropped. A module the backbone has and `variables` lacks: KeyError."""
    return {k: strip_head(variables[k], v) if isinstance(v, Mapping) else variables[k]
            for k, v in backbone.items()}
