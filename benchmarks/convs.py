"""--convs: each distinct convolution of a model timed alone, through the path the model takes
and with the step's compiler options; and the measured matrix-product rate of a device."""
from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax import runtime
from cnnjax.models import fastconv

CONV_KINDS = ("conv", "dwconv", "gconv")  # cnnjax.profile's kinds of convolution layer


def conv_shapes(prof) -> list[tuple[tuple, list[str]]]:
    """The distinct convolutions of a profile, in order of first use: ((input shape without the
    batch, kernel (kh, kw), output channels, strides, explicit padding, groups), their layers'
    names)."""
    found: dict[tuple, list[str]] = {}
    for layer in prof.layers:
        if layer.kind not in CONV_KINDS:
            continue
        padding = layer.padding
        if padding is None:  # a string padding: the explicit one the output size implies
            padding = []
            for size, out, k, s in zip(layer.input_shape[1:3], layer.output_shape[1:3],
                                       layer.kernel, layer.stride):
                total = max((out - 1) * s + k - size, 0)
                padding.append((total // 2, total - total // 2))
        key = (layer.input_shape[1:], tuple(layer.kernel), layer.output_shape[-1],
               tuple(layer.stride), tuple(tuple(p) for p in padding), layer.groups)
        found.setdefault(key, []).append(layer.name)
    return list(found.items())


def time_jitted(fun, *operands, repeats: int) -> float:
    """Median milliseconds of a compiled `fun(*operands)` after a warm-up call."""
    compiled = fun.lower(*operands).compile()
    jax.block_until_ready(compiled(*operands))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*operands))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def print_conv_times(args, prof, step_ms: float) -> float:
    """--convs: each distinct convolution of the model timed alone at the step's batch size and
    dtype, through the path the model takes (cnnjax.models.fastconv, with the step's compiler
    options); the table goes to stderr. Returns the convolutions' summed milliseconds per step."""
    out = sys.stderr
    repeats = max(args.steps, 3)
    timed = "forward with both gradients" if args.mode == "train" else "forward"
    print(f"Convolutions of {args.arch} alone, batch {args.batch_size}, {args.dtype}, ms "
          f"(median of {repeats}); {timed} is what a step spends on each", file=out)
    print(f"{'count':>5}  {'input':<14} {'kernel':<12} {'stride':<6} {'groups':>6} "
          f"{'path':<8} {'fwd':>7} {'fwd+grads':>9} {'x count':>8} {'GFLOP/s':>8}  first layer",
          file=out)
    total = sum(print_conv_row(args, prof, shape, names, repeats)
                for shape, names in conv_shapes(prof))
    print(f"the convolutions alone: {total:.0f} ms of the {step_ms:.0f} ms step "
          f"({100 * total / step_ms:.0f}%)", file=out)
    return total


def print_conv_row(args, prof, convolution: tuple, names: list[str], repeats: int) -> float:
    """Times one distinct convolution (a key of `conv_shapes`) and prints its row; returns the
    milliseconds a step spends on all its layers."""
    shape, kernel, cout, strides, padding, groups = convolution
    train = args.mode == "train"
    dtype = jnp.dtype(args.dtype)
    x = jnp.full((args.batch_size, *shape), 0.5, dtype)
    k = jnp.full((*kernel, shape[-1] // groups, cout), 0.01, dtype)
    numbers = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    conv = functools.partial(fastconv.conv_general_dilated, window_strides=strides,
                             padding=padding, dimension_numbers=numbers,
                             feature_group_count=groups)

    def both(x, k):
        y, pullback = jax.vjp(conv, x, k)
        return pullback(y)
    fwd = time_jitted(runtime.jit(conv), x, k, repeats=repeats)
    grads = time_jitted(runtime.jit(both), x, k, repeats=repeats) if train else None
    per_step = (grads if train else fwd) * len(names)
    macs = sum(layer.macs for layer in prof.layers if layer.name in names) // len(names)
    flops = 2 * (3 if train else 1) * macs * args.batch_size
    path = fastconv.choose(x.shape, k.shape, strides, padding, groups, dilated=False)
    print(f"{len(names):>5}  {'x'.join(map(str, shape)):<14} "
          f"{'x'.join(map(str, (*kernel, shape[-1] // groups, cout))):<12} "
          f"{'x'.join(map(str, strides)):<6} {groups:>6} {path:<8} {fwd:7.2f} "
          f"{grads if grads is not None else float('nan'):9.2f} {per_step:8.2f} "
          f"{flops / (grads if train else fwd) / 1e6:8.1f}  {names[0]}", file=sys.stderr)
    return per_step


def matmul_tflop_per_s(n: int = 8192, repeats: int = 10) -> float:
    """Measured bfloat16 matrix-product rate of this process's first device (random operands,
    median of `repeats` after a warm-up): the ceiling a model's TFLOP/s is read against."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (0, 1))
    ms = time_jitted(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2 * n**3 / (ms / 1e3) / 1e12
