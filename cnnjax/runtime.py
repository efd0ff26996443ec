"""The runtime: how cnnjax compiles a model's programs, in one place.

`jit` is `jax.jit` with the XLA options that make a cnnjax model's convolutions fast on the CPU
(`compiler_options`); `jit_on` places a program on one device (a NAS child's) and compiles the
programs that run once quickly. The train loop, evaluation, prediction, ensembles, the search
and the benchmarks all compile through here. Device layout (mesh, shardings, processes) is its
neighbour `cnnjax.parallel`; the per-shape convolution paths themselves are an op of the model
layer (`cnnjax.models.fastconv`), which this module reads and never the other way round.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from cnnjax.models import fastconv

# jaxlib 0.10's XLA:CPU hands every float32 2-D convolution in NHWC/HWIO form to YNNPACK
# (its default list of library fusions: individual dots, individual convolutions, reductions).
# Its convolutions were slower than XLA's own (Eigen) ones on the project's 2-core EPYC: batch
# 8, one jitted convolution, YNNPACK / Eigen ms, forward, input gradient, kernel gradient:
# 3x3 56x56x64 18.6 / 10.7, 18.3 / 10.9, 22.4 / 13.2; 28x28x128 9.9 / 9.1, 9.6 / 9.4,
# 11.3 / 10.2; 14x14x256 13.8 / 9.0, 9.8 / 9.6, 9.9 / 10.2; 7x7x512 11.4 / 10.5, 15.2 / 13.2,
# 10.1 / 9.5; ResNet's 7x7 stem 20.8 / 15.3 (forward), 32.2 / 18.1 (kernel gradient). Whole
# train steps (python -m experiments.benchmark --arch=NAME): VGG-16 7.3 -> 5.0 s, DenseNet-121
# 2.01 -> 1.79, ResNet-18 0.76 -> 0.68, MobileNet v2 0.76 -> 0.67; ResNet-50 and ShuffleNet v2
# unchanged. Dots and reductions stay with YNNPACK (without them ResNet-50's step took 3.2 s
# instead of 2.1: its BatchNorm gradients' reductions).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options() -> dict[str, Any]:
    """XLA options for `jax.jit` of a model's step: on the CPU under "auto", full convolutions
    by XLA's own kernels instead of YNNPACK's (see CPU_COMPILER_OPTIONS); otherwise none, as
    with a jaxlib that does not know the option."""
    if fastconv.get_impl() == "xla" or jax.default_backend() != "cpu" or not _options_known():
        return {}
    return dict(CPU_COMPILER_OPTIONS)


@functools.lru_cache(maxsize=None)
def _options_known() -> bool:
    """Whether this jaxlib's CPU compiler accepts CPU_COMPILER_OPTIONS (its option and values)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
            jnp.zeros((), jnp.float32)).compile()
    except Exception:  # noqa: BLE001 - XLA reports an unknown option as a runtime error
        return False
    return True


def jit(fun, **kwargs):
    """`jax.jit(fun, **kwargs)` with `compiler_options()` added (the caller's options win)."""
    options = {**compiler_options(), **(kwargs.pop("compiler_options", None) or {})}
    return jax.jit(fun, compiler_options=options or None, **kwargs)


# Compiling a child's programs takes longer than running them once: XLA's CPU backend without
# its LLVM optimisations compiles in half the time (same accuracies on the children tried), but
# its code runs many times slower (a 6-layer child's 200 train steps took ~50 s, not ~1 s), so
# only the programs that run once (init, score, the controller's) get it. CPU only.
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_on(device, fun, fast: bool = True, **kw):
    """`jit` for a program on `device` (fast compilation on a CPU, unless `fast` is False: the
    unoptimised code of a big model runs many times slower)."""
    if fast and device.platform == "cpu":
        kw["compiler_options"] = FAST_CPU_COMPILE
    return jit(fun, **kw)
