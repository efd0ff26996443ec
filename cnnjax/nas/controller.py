"""The controller (Zoph & Le 2017, Sec. 3.1-3.3): an LSTM that emits a child's decisions one
after another, each step fed the embedding of the previous decision.

Categorical choices (filters, kernel height and width, stride) are a softmax over the space's
choices; the skips of layer i are anchor points, one sigmoid per earlier layer j <= i-2,
P(j feeds i) = sigmoid(v . tanh(W_prev h_j + W_curr h_i) + b), h_j the controller's state at
layer j's anchor. A stride that needs more pixels than its layer's input has is masked out, so
every sample builds. Everything is a pure function of (params, key) and jit/vmap-able:

    controller = Controller(space)
    params = controller.init(jax.random.key(0), jax.random.key(1))["params"]
    decisions, logp, entropy = sample(controller, params, key)     # spec: space.decode(...)
    logp, entropy = log_prob(controller, params, decisions)        # the same, teacher-forced
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.models.nasspec import KINDS, Space

_MASKED = -1e9  # logit of a choice a sample may not take


def uniform(scale: float = 0.08):
    """U(-scale, scale): "the controller's weights are initialized uniformly between -0.08 and
    0.08" (Zoph & Le 2017, Sec. 4.1)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


def _categorical(logits: jax.Array, mask: jax.Array, key: jax.Array, forced: jax.Array | None):
    """(choice, its log-probability, the distribution's entropy) of a masked softmax."""
    logits = jnp.where(mask, logits, _MASKED)
    logp = jax.nn.log_softmax(logits)
    choice = jax.random.categorical(key, logits) if forced is None else forced
    entropy = -jnp.sum(jnp.where(mask, jnp.exp(logp) * logp, 0.0))
    return choice.astype(jnp.int32), logp[choice], entropy


def _bernoulli(logit: jax.Array, key: jax.Array, forced: jax.Array | None):
    """(bit, its log-probability, the entropy) of one anchor-point sigmoid."""
    bit = (jax.random.uniform(key) < jax.nn.sigmoid(logit)) if forced is None else forced
    bit = bit.astype(jnp.int32)
    log_on, log_off = jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit)
    p = jax.nn.sigmoid(logit)
    return bit, jnp.where(bit == 1, log_on, log_off), -(p * log_on + (1 - p) * log_off)


class Controller(nn.Module):
    """The LSTM controller of one search space; `__call__(key, forced=None)` samples a child
    (or scores `forced` decisions) and returns (decisions, summed log-prob, summed entropy)."""
    space: Space
    hidden: int = 32

    @nn.compact
    def __call__(self, key: jax.Array, forced: Any = None):
        space, H = self.space, self.hidden
        init = uniform()
        cell = nn.LSTMCell(H, kernel_init=init, recurrent_kernel_init=init, bias_init=init,
                           name="lstm")
        go = self.param("go", init, (H,))                 # the first step's input
        anchor_embed = self.param("anchor_embed", init, (H,))  # the step after an anchor point
        # Tables, not nn.Embed: Embed broadcasts its table when it has one row (strides [1]).
        embed = {k: self.param(f"embed_{k}", init, (len(space.choices(k)), H)) for k in KINDS}
        head = {k: nn.Dense(len(space.choices(k)), kernel_init=init, name=f"head_{k}")
                for k in KINDS}
        attn_prev = nn.Dense(H, use_bias=False, kernel_init=init, name="attn_prev")
        attn_curr = nn.Dense(H, use_bias=False, kernel_init=init, name="attn_curr")
        attn_v = nn.Dense(1, kernel_init=init, name="attn_v")  # its bias: b above
        strides = jnp.asarray(space.strides, jnp.int32)

        carry = (jnp.zeros(H), jnp.zeros(H))
        x = go
        decisions, total_logp, total_entropy = [], jnp.zeros(()), jnp.zeros(())
        anchors, keys_of, sizes = [], [], []  # per layer: anchor state, its projection, out size
        d = 0  # decision index: its key is fold_in(key, d)

        def take(kind_fn, *args):
            nonlocal d, total_logp, total_entropy
            k = jax.random.fold_in(key, d)
            f = None if forced is None else jnp.asarray(forced)[d]
            choice, logp, ent = kind_fn(*args, k, f)
            decisions.append(choice)
            total_logp, total_entropy = total_logp + logp, total_entropy + ent
            d += 1
            return choice

        for i in range(space.num_layers):
            carry, h = cell(carry, x)  # the anchor point of layer i
            n_in = jnp.asarray(space.input_size if i == 0 else sizes[i - 1], jnp.int32)
            x = anchor_embed
            if space.skips and i >= 2:
                query = attn_curr(h)
                bits = [take(_bernoulli, attn_v(jnp.tanh(keys_of[j] + query))[0])
                        for j in range(i - 1)]
                on = jnp.stack(bits).astype(jnp.float32)
                # The next step sees which layers were chosen: the mean of their anchor states.
                x = x + (on @ jnp.stack(anchors[:i - 1])) / jnp.maximum(on.sum(), 1.0)
                n_in = jnp.maximum(n_in, jnp.max(jnp.stack(bits) * jnp.stack(sizes[:i - 1])))
            anchors.append(h)
            keys_of.append(attn_prev(h))
            chosen = {}
            for kind in KINDS:
                carry, h = cell(carry, x)
                n = len(space.choices(kind))
                mask = jnp.ones(n, bool) if kind != "stride" else (strides == 1) | (strides <= n_in)
                chosen[kind] = take(_categorical, head[kind](h), mask)
                x = embed[kind][chosen[kind]]
            s = strides[chosen["stride"]]
            sizes.append((n_in + s - 1) // s)
        return jnp.stack(decisions), total_logp, total_entropy


def init_params(controller: Controller, seed: int | jax.Array) -> Any:
    key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    # Eager: a fraction of a second, where compiling the unrolled steps takes seconds.
    return controller.init(key, jax.random.key(0))["params"]


def sample(controller: Controller, params: Any, key: jax.Array):
    """(decisions int32 [D], summed log-prob, summed entropy) of one child drawn with `key`."""
    return controller.apply({"params": params}, key)


def log_prob(controller: Controller, params: Any, decisions: jax.Array):
    """(summed log-prob, summed entropy of the distributions met) of given decisions."""
    _, logp, entropy = controller.apply({"params": params}, jax.random.key(0), decisions)
    return logp, entropy


def sample_batch(controller: Controller, params: Any, key: jax.Array, m: int):
    """m children at once: decisions [m, D], log-probs [m], entropies [m]."""
    keys = jax.random.split(key, m)
    return jax.vmap(lambda k: sample(controller, params, k))(keys)
