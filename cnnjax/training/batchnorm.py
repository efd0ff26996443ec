"""BatchNorm recalibration: population statistics from a few training batches before each eval.

PreciseBN (Wu & Johnson 2021): the running averages lag while the weights move fast, so before
an evaluation each BatchNorm's statistics are replaced by the mean of its batch statistics over
`TrainConfig.bn_recalibration_batches` training batches under the current weights.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.training.steps import TrainState, all_finite

_MOMENTS = "batch_moments"


def _sow_batch_moments(next_fun, args, kwargs, context):
    """A flax method interceptor: every BatchNorm that normalises with batch statistics sows
    the mean and variance it computes (float32, two-pass, over every axis but the features)."""
    bn = context.module
    if (isinstance(bn, nn.BatchNorm) and context.method_name == "__call__"
            and not nn.merge_param("use_running_average", bn.use_running_average,
                                   kwargs.get("use_running_average"))):
        x = jnp.asarray(args[0], jnp.promote_types(args[0].dtype, jnp.float32))
        features = {a % x.ndim for a in ((bn.axis,) if isinstance(bn.axis, int) else bn.axis)}
        axes = tuple(a for a in range(x.ndim) if a not in features)
        mean = x.mean(axes, keepdims=True)
        bn.sow(_MOMENTS, "mean", mean.squeeze(axes))
        bn.sow(_MOMENTS, "var", jnp.square(x - mean).mean(axes))
    return next_fun(*args, **kwargs)


def make_moments_step(model: nn.Module) -> Callable:
    """(state, batch) -> the BatchNorm statistics of this batch under state.params, in the
    layout of state.batch_stats: what train mode normalises with, whatever the BN momentum."""
    def moments_step(state: TrainState, batch: dict) -> Any:
        with nn.intercept_methods(_sow_batch_moments):
            _, cols = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                  batch["image"], train=True, mutable=["batch_stats", _MOMENTS],
                                  rngs={"dropout": jax.random.key(0)})
        return jax.tree_util.tree_map(lambda sown: sown[0], cols[_MOMENTS],
                                      is_leaf=lambda v: isinstance(v, tuple))
    return moments_step


def recalibrate_batch_norm(state: TrainState, moments_step: Callable, batches) -> TrainState:
    """Population statistics as PreciseBN computes them (Wu & Johnson 2021, "Rethinking 'Batch'
    in BatchNorm"): the mean over `batches` of each batch's mean and variance under the current
    weights, in place of the running averages.

    The exponential running average lags while the weights move fast: early in training each
    layer's eval-mode output here was 1.5x too large in scale, which compounds over ResNet-18's
    20 BatchNorms into logits of 10^4 and eval losses in the thousands; and with the TensorFlow
    momenta that torchvision keeps for MnasNet (0.9997) and MobileNetV3 (0.99), a run of a few
    hundred steps still holds most of the initial mean 0 / variance 1.

    A batch whose statistics are not finite (a NaN in the data) is left out; with none left
    the running averages stay. Works eagerly and under jit; eagerly, the sums are one program
    per batch, not one per statistic (on a multi-device CPU, hundreds of tiny programs queued
    behind the moments step filled XLA's per-device limit of programs in flight).
    """
    if not state.batch_stats:
        return state
    total = count = None
    for batch in batches:
        m = moments_step(state, batch)
        total, count = (_finite_part(m) if total is None else _add_finite_part(total, count, m))
    if total is None:
        return state
    return state.replace(batch_stats=_population(total, count, state.batch_stats))


@jax.jit
def _finite_part(moments: Any) -> tuple[Any, jax.Array]:
    """(`moments`, 1) if they are all finite, else (zeros, 0)."""
    ok = all_finite(moments)
    return jax.tree_util.tree_map(lambda v: jnp.where(ok, v, 0), moments), ok.astype(jnp.int32)


@jax.jit
def _add_finite_part(total: Any, count: jax.Array, moments: Any) -> tuple[Any, jax.Array]:
    part, ok = _finite_part(moments)
    return jax.tree_util.tree_map(jnp.add, total, part), count + ok


@jax.jit
def _population(total: Any, count: jax.Array, old: Any) -> Any:
    """The mean of the finite batches' moments; `old` where there were none."""
    return jax.tree_util.tree_map(lambda t, o: jnp.where(count > 0, t / jnp.maximum(count, 1), o),
                                  total, old)
