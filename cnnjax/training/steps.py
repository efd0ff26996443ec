"""The pure functions of training: state, optimizer, loss, the finite guard, the steps.

`make_steps` gives the train step (forward, loss, gradients, optimizer update; a non-finite loss,
gradient or result leaves the state as it was) and the eval step (masked sums over a padded
batch); `evaluate` runs the eval step over a whole test split. Nothing here reads a flag or
touches a file: the loop (cnnjax.training.loop) jits these and feeds them batches.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from cnnjax import parallel
from cnnjax.training.config import TrainConfig


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays


def decay_mask(params: Any) -> Any:
    """Weight decay on kernels only: not on BatchNorm scales/offsets nor biases (ndim 1)."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
    peak = config.learning_rate
    if config.optimizer == "sgd":
        peak *= config.batch_size / 256  # Goyal et al. 2017's linear scaling rule
    warmup = min(int(config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1))


def make_optimizer(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
    if config.optimizer == "sgd":
        parts += [optax.add_decayed_weights(config.weight_decay, decay_mask),
                  optax.sgd(schedule, momentum=config.momentum, nesterov=True)]
    elif config.optimizer == "adamw":
        parts += [optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)]
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; expected sgd or adamw")
    return optax.chain(*parts)


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy in float32, with label smoothing."""
    logits = logits.astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


# Leaves of up to this many elements are checked together, as one concatenation; larger ones of
# one shape in groups of up to LARGE_GROUP, by one elementwise `and` and one reduction a group.
SMALL_LEAF = 4096
LARGE_GROUP = 8


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every floating leaf of `tree` is finite (a scalar bool).

    A reduction per leaf made XLA:CPU compile a few kernels per leaf: for DenseNet-201's train
    step (2,215 leaves in the loss, gradients, new parameters, BatchNorm statistics and
    optimizer state) that was half of the compile time (87 s; 42 s without the check). So the
    small leaves (biases, BatchNorm scales and statistics: most leaves of a deep network) are
    checked as one concatenated vector, and large leaves of the same shape (a kernel, its
    gradient, its new value and momentum) a group at a time, without copying them.
    """
    leaves = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    small = [x.ravel() for x in leaves if x.size <= SMALL_LEAF]
    checks = [jnp.all(jnp.isfinite(jnp.concatenate(small)))] if small else []
    by_shape: dict[tuple, list] = {}
    for x in leaves:
        if x.size > SMALL_LEAF:
            by_shape.setdefault(x.shape, []).append(x)
    for same in by_shape.values():
        for i in range(0, len(same), LARGE_GROUP):
            checks.append(jnp.all(functools.reduce(
                jnp.logical_and, [jnp.isfinite(x) for x in same[i:i + LARGE_GROUP]])))
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the scalar `ok` is true, else `old` (two trees of one structure).

    On the CPU one conditional picks the whole tree: a `jnp.where` per leaf made XLA:CPU compile
    a select kernel per leaf, and compile time grows with kernels: DenseNet-201's train step
    (1,610 leaves in the parameters, BatchNorm statistics and momentum) compiled in 41.3 s
    instead of 44.9 (the update alone, jitted apart: 3.5 s instead of 7.7). The conditional's
    branches only forward buffers (copies, no kernels). Elsewhere the per-leaf select stays: a
    GPU reads a conditional's predicate back to the host each step.
    """
    if jax.default_backend() != "cpu":
        return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
    return jax.lax.cond(ok, lambda n, o: n, lambda n, o: o, new, old)


def make_steps(model: nn.Module, tx: optax.GradientTransformation, config: TrainConfig,
               schedule: optax.Schedule) -> tuple[Callable, Callable]:
    """The pure train and eval steps (not yet jitted). Settings are read now, not at trace time."""
    smoothing, aux_weight = config.label_smoothing, config.aux_loss_weight

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params):
            out, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                       batch["image"], train=True, mutable=["batch_stats"],
                                       rngs={"dropout": dropout_rng})
            logits, *aux = out if isinstance(out, tuple) else (out,)
            loss = cross_entropy(logits, batch["label"], smoothing).mean()
            for a in aux:
                loss += aux_weight * cross_entropy(a, batch["label"], smoothing).mean()
            return loss, updates.get("batch_stats", {})

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss, gradient or result skips the update: params, optimizer state and
        # BatchNorm statistics stay as they were (optax.apply_if_finite leaves BN out); only
        # the step, and with it the data position, moves on.
        finite = all_finite((loss, grads, params, batch_stats, opt_state))
        params, batch_stats, opt_state = keep_if(
            finite, (params, batch_stats, opt_state),
            (state.params, state.batch_stats, state.opt_state))
        new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
        return new, {"loss": loss, "lr": schedule(state.step), "finite": finite}

    return train_step, make_eval_step(model)


def make_eval_step(model: nn.Module) -> Callable:
    """The pure eval step: (state, batch) -> the masked sums of loss, top-1, top-5 and count.
    It reads only state.params and state.batch_stats (any object holding them serves)."""
    def eval_step(state: TrainState, batch: dict) -> dict:
        logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                             batch["image"], train=False).astype(jnp.float32)
        mask, labels = batch["mask"], batch["label"]
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        return {"loss": jnp.sum(cross_entropy(logits, labels) * mask),
                "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
                "top5": jnp.sum(jnp.any(top5 == labels[:, None], -1) * mask),
                "count": jnp.sum(mask)}
    return eval_step


def make_init(model: nn.Module, tx: optax.GradientTransformation,
              input_shape: tuple[int, ...]) -> Callable[[int], TrainState]:
    """seed -> a fresh TrainState for inputs of `input_shape` (pure; jit it)."""
    def init(seed):
        params_rng, state_rng = jax.random.split(jax.random.key(seed))
        variables = model.init(params_rng, jnp.zeros(input_shape, jnp.float32), train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                          rng=jax.random.key_data(state_rng))
    return init


def init_state(model: nn.Module, tx: optax.GradientTransformation, config: TrainConfig,
               channels: int, mesh: jax.sharding.Mesh) -> TrainState:
    """A fresh state, built replicated on every device by one jitted init."""
    init = make_init(model, tx, (1, config.image_size, config.image_size, channels))
    return jax.jit(init, static_argnums=0, out_shardings=parallel.replicated(mesh))(config.seed)


def evaluate(state: TrainState, eval_step: Callable, eval_data, mesh) -> dict[str, float]:
    """Every test example exactly once (the last batch is padded and masked)."""
    totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
    for _, local in eval_data.iterate(0, eval_data.steps_per_epoch):
        sums = parallel.to_host(eval_step(state, parallel.global_batch(local, mesh)))
        for k in totals:
            totals[k] += float(sums[k])
    n = max(totals["count"], 1.0)
    return {"eval_loss": totals["loss"] / n, "eval_top1": totals["top1"] / n,
            "eval_top5": totals["top5"] / n, "eval_count": int(totals["count"])}
