"""REINFORCE for the controller (Williams 1992, as Zoph & Le 2017, Sec. 3.2).

One step takes the m children sampled with the current parameters and their rewards R_k:

    grad = -(1/m) sum_k grad log P(a_k) (R_k - b)  -  beta * grad (1/m) sum_k H_k

with b an exponential moving average of past rewards (the baseline; it starts at the first
step's mean reward) and H_k the summed entropy of the distributions child k was drawn from (an
entropy bonus, as ENAS: Pham et al. 2018). The optimizer is optax (Adam by default).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from cnnjax.nas import controller as ctl


class ControllerState(struct.PyTreeNode):
    step: jax.Array       # controller steps taken
    params: Any
    opt_state: Any
    baseline: jax.Array   # EMA of the rewards (meaningful once step > 0)


def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


def init_state(controller: ctl.Controller, tx: optax.GradientTransformation,
               seed: int) -> ControllerState:
    params = ctl.init_params(controller, seed)
    return ControllerState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), baseline=jnp.zeros((), jnp.float32))


def make_update(controller: ctl.Controller, tx: optax.GradientTransformation, *,
                entropy_weight: float = 1e-3, baseline_decay: float = 0.9) -> Callable:
    """update(state, decisions [m, D], rewards [m]) -> (state, metrics), pure (jit it)."""

    def update(state: ControllerState, decisions: jax.Array, rewards: jax.Array):
        rewards = rewards.astype(jnp.float32)
        mean_reward = rewards.mean()
        baseline = jnp.where(state.step == 0, mean_reward, state.baseline)
        advantage = rewards - baseline

        def loss_fn(params):
            logp, entropy = jax.vmap(lambda d: ctl.log_prob(controller, params, d))(decisions)
            loss = -jnp.mean(logp * advantage) - entropy_weight * jnp.mean(entropy)
            return loss, (logp, entropy)

        (loss, (logp, entropy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            baseline=baseline_decay * baseline + (1 - baseline_decay) * mean_reward)
        return new, {"loss": loss, "mean_reward": mean_reward, "baseline": baseline,
                     "entropy": entropy.mean(), "logp": logp.mean()}

    return update


def step_key(seed: int, step: int | jax.Array) -> jax.Array:
    """The key controller step `step` samples its children with: a pure function of (seed,
    step), so a resumed search samples what an unbroken one would."""
    return jax.random.fold_in(jax.random.key(seed), step)
