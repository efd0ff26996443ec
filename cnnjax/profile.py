"""Per-layer parameters, multiply-adds and activation memory, read off the traced computation.

`profile` traces one forward pass (eval mode, batch 1 by default) without running it. Each leaf
module called becomes a row (its input and output shape, its own parameters, the bytes of its
output); multiply-adds come from the jaxpr itself: every `conv_general_dilated` and `dot_general`
is counted exactly from its operand shapes and charged to the module whose name scope it ran in.
A new architecture is therefore counted with no new code. Conventions follow the lecture and
torchvision's "GFLOPS": one FLOP is one multiply-add (MAC), only convolutions and matrix
products count, and memory is output elements x bytes per element.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core

from cnnjax.models import fastconv
from cnnjax.models.registry import create_model

# Modules that are the identity in eval mode: not rows of the table.
_SKIP = (nn.Dropout,)
_KINDS = {"Conv": "conv", "Dense": "linear", "BatchNorm": "batchnorm", "MaxPool": "maxpool",
          "AvgPool": "avgpool", "AdaptiveAvgPool": "adaptive_avgpool",
          "GlobalAvgPool": "global_avgpool", "Flatten": "flatten", "LocalResponseNorm": "lrn"}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One row: a leaf module call. Shapes are NHWC (or (N, features) after flattening)."""
    name: str
    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    kernel: tuple[int, ...] | None
    stride: tuple[int, ...] | None
    padding: tuple[tuple[int, int], ...] | None
    groups: int
    params: int
    macs: int
    out_bytes: int


@dataclasses.dataclass(frozen=True)
class Profile:
    """Totals and rows of one model at one input size. `macs` counts multiply-adds."""
    name: str
    input_shape: tuple[int, ...]
    params: int        # trainable parameters
    batch_stats: int   # BatchNorm running-statistic elements
    macs: int
    activation_bytes: int
    layers: tuple[Layer, ...]
    _apply: Callable = dataclasses.field(repr=False, compare=False, default=None)
    _args: tuple = dataclasses.field(repr=False, compare=False, default=())

    def xla_cost(self) -> dict[str, float]:
        """XLA's own cost analysis of the compiled forward pass: a cross-check of `macs`.

        XLA counts 2 FLOPs per multiply-add plus elementwise work (BN, activations, pooling),
        but skips the kernel taps that fall on zero padding: at ImageNet sizes `flops / 2` is
        within a few percent of `macs`; on tiny inputs, where padding dominates, it is far below.
        """
        with fastconv.impl("xla"):  # the convolutions as convolutions, as in `macs`
            compiled = jax.jit(self._apply).lower(*self._args).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return {k: float(cost[k]) for k in ("flops", "bytes accessed") if k in cost}

    def rows(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(layer) for layer in self.layers]


def _size(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def _subtree(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return {}
        tree = tree[key]
    return tree if isinstance(tree, dict) else {"": tree}


def eqn_macs(eqn: core.JaxprEqn) -> int:
    """Multiply-adds of one convolution or matrix product, from its operand shapes; else 0."""
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        per_output = math.prod(rhs) // rhs[out_feature_dim]  # kernel taps x input channels/group
        return math.prod(eqn.outvars[0].aval.shape) * per_output
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    return 0


def _sub_jaxprs(eqn: core.JaxprEqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, core.Jaxpr):
                yield v


def jaxpr_macs(jaxpr: core.Jaxpr, scope: tuple[str, ...] = ()):
    """Yields (name-scope components, MACs) for every conv / matmul, recursing into sub-jaxprs."""
    for eqn in jaxpr.eqns:
        stack = scope + tuple(s for s in str(eqn.source_info.name_stack).split("/") if s)
        macs = eqn_macs(eqn)
        if macs:
            yield stack, macs
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in _sub_jaxprs(eqn):
            for s, m in jaxpr_macs(sub, stack):
                yield s, m * times


def _layer(path, module, x, y, params: Any, macs: int) -> Layer:
    kind = _KINDS.get(type(module).__name__, type(module).__name__.lower())
    kernel = stride = padding = None
    groups = 1
    if isinstance(module, nn.Conv):
        n = len(y.shape) - 2
        as_tuple = lambda v, default: (v,) * n if isinstance(v, int) else tuple(v or default)
        kernel, stride = as_tuple(module.kernel_size, ()), as_tuple(module.strides, (1,) * n)
        pad = module.padding
        if isinstance(pad, int):
            padding = ((pad, pad),) * n
        elif isinstance(pad, (tuple, list)):
            padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)
        groups = module.feature_group_count
        if groups > 1:
            kind = "dwconv" if groups == x.shape[-1] else "gconv"
    elif hasattr(module, "window"):
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
        kernel, stride = pair(module.window), pair(module.stride)
        padding = ((module.padding, module.padding),) * 2
    return Layer("/".join(path), kind, tuple(x.shape), tuple(y.shape), kernel, stride, padding,
                 groups, _size(params), macs, math.prod(y.shape) * jnp.dtype(y.dtype).itemsize)


def profile(name_or_module: str | nn.Module, input_size: int | tuple[int, int] = 224, *,
            batch_size: int = 1, **create_kwargs: Any) -> Profile:
    """Profiles a registered model (by name, built with `create_kwargs`) or a Module instance."""
    if isinstance(name_or_module, str):
        model, name = create_model(name_or_module, **create_kwargs), name_or_module
    else:
        if create_kwargs:
            raise ValueError("create_kwargs apply only when profiling a model by name")
        model, name = name_or_module, type(name_or_module).__name__
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    x = jax.ShapeDtypeStruct((batch_size, h, w, getattr(model, "in_channels", 3)), jnp.float32)
    kwargs = {"train": False} if "train" in inspect.signature(model.__call__).parameters else {}
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs), x)

    calls: list[tuple] = []

    def record(f, args, kw, context):
        y = f(*args, **kw)
        if context.method_name == "__call__" and args and hasattr(args[0], "shape"):
            calls.append((context.module.path, context.module, args[0], y))
        return y

    def apply(variables, x):
        return model.apply(variables, x, **kwargs)

    def traced(variables, x):
        with nn.intercept_methods(record):
            return apply(variables, x)

    with fastconv.impl("xla"):  # a depthwise conv stays one conv, not nine multiply-adds
        jaxpr = jax.make_jaxpr(traced)(variables, x).jaxpr
    paths = [c[0] for c in calls]
    leaves = [c for c in calls if not any(p[:len(c[0])] == c[0] and p != c[0] for p in paths)
              and not isinstance(c[1], _SKIP) and hasattr(c[3], "shape")]

    # Charge each conv / matmul to the deepest leaf whose path prefixes its name scope (the first
    # scope component is the root module's class name).
    leaf_paths = {c[0] for c in leaves}
    macs_by_path: dict[tuple, int] = {}
    total_macs = 0
    for stack, macs in jaxpr_macs(jaxpr):
        total_macs += macs
        stack = stack[1:]
        owner = next((stack[:k] for k in range(len(stack), 0, -1) if stack[:k] in leaf_paths), ())
        macs_by_path[owner] = macs_by_path.get(owner, 0) + macs

    params = variables.get("params", {})
    rows, seen = [], set()
    for path, module, xin, y in leaves:
        macs = 0 if path in seen else macs_by_path.get(path, 0)  # a reused module counts once
        seen.add(path)
        rows.append(_layer(path, module, xin, y, _subtree(params, path), macs))
    if macs_by_path.get(()):
        rows.append(Layer("(other)", "ops", (), (), None, None, None, 1, 0, macs_by_path[()], 0))
    return Profile(name=name, input_shape=x.shape, params=_size(params),
                   batch_stats=_size(variables.get("batch_stats", {})), macs=total_macs,
                   activation_bytes=sum(r.out_bytes for r in rows), layers=tuple(rows),
                   _apply=apply, _args=(variables, x))
