"""Weight sharing (ENAS, Pham et al. 2018): one supergraph holds the weights of every child.

Layer i of the supergraph has one kernel of the largest height x width, over input slots for
every possible input (layer i-1, and each skip source j <= i-2, max-filters channels apiece),
with max-filters outputs; BatchNorm over those outputs; one classifier over max-filters
features. A child is a path through it, selected by masks that are functions of the
controller's decisions: its kernel is the centre kh x kw of the shared one (a 3x3 child reads
the middle of the 5x5), its f filters the first f outputs, its skips the slots of their
sources. Masks keep the shapes static, so one compiled step serves every child; that needs
every map at one size, hence spaces with strides [1] only.

`extract(space, variables, decisions)` cuts a child's own variables out of the supergraph:
`build(decode(space, decisions))` applied to them gives the supergraph's logits for that child.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax import runtime, train
from cnnjax.models import layers
from cnnjax.models.nasspec import Space, decode, uniform_decisions
from cnnjax.nas import controller as ctl


def positions(space: Space) -> dict[tuple, int]:
    """Where each decision sits in a decisions vector: (layer, kind, source) -> index."""
    return {key: d for d, key in enumerate(space.layout())}


class SuperNet(nn.Module):
    """Every child of `space` (strides [1]) in one module: `__call__(x, decisions, train=)`."""
    space: Space
    num_classes: int = 1000
    in_channels: int = 3
    bn_momentum: float = 0.9  # 0 in the calibration pass: the statistics of that batch alone
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, decisions, *, train: bool):
        space = self.space
        if space.strides != (1,):
            raise ValueError(f"a supergraph needs a space with strides [1]; got {space.strides}")
        layers.check_input(x, model="supernet", in_channels=self.in_channels, min_size=1)
        pos = positions(space)
        F, KH, KW = max(space.filters), max(space.kernel_heights), max(space.kernel_widths)
        filters = jnp.asarray(space.filters)
        heights, widths = jnp.asarray(space.kernel_heights), jnp.asarray(space.kernel_widths)
        norm = layers.batch_norm(train, self.dtype, self.param_dtype, momentum=self.bn_momentum)
        x = x.astype(self.dtype)
        outs: list[jax.Array] = []
        for i in range(space.num_layers):
            slots = [x if i == 0 else outs[-1]]
            for j in range(i - 1) if space.skips else ():
                slots.append(outs[j] * decisions[pos[(i, "skip", j)]].astype(x.dtype))
            h = jnp.concatenate(slots, axis=-1)
            f = filters[decisions[pos[(i, "filters", None)]]]
            kh = heights[decisions[pos[(i, "kernel_h", None)]]]
            kw = widths[decisions[pos[(i, "kernel_w", None)]]]
            taps = ((jnp.abs(jnp.arange(KH) - KH // 2) <= kh // 2)[:, None]
                    & (jnp.abs(jnp.arange(KW) - KW // 2) <= kw // 2)[None, :])
            h = MaskedConv(F, (KH, KW), self.dtype, self.param_dtype,
                           name=f"layer{i}_conv")(h, taps)
            h = norm(name=f"layer{i}_bn")(h)
            outs.append(nn.relu(h) * (jnp.arange(F) < f).astype(h.dtype))
        x = layers.GlobalAvgPool(name="avgpool")(outs[-1])
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="fc")(x)


class MaskedConv(nn.Module):
    """A stride-1 conv, no bias, padded by k // 2, whose kernel taps outside `taps` (KH, KW
    bools) are zero for this call: a child's kh x kw kernel is its centre."""
    features: int
    kernel_size: tuple[int, int]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, taps):
        kh, kw = self.kernel_size
        kernel = self.param("kernel", layers.conv_kernel_init, (kh, kw, x.shape[-1],
                                                                 self.features), self.param_dtype)
        kernel = kernel * taps[:, :, None, None].astype(kernel.dtype)
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (1, 1),
            ((kh // 2, kh // 2), (kw // 2, kw // 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def extract(space: Space, variables: dict, decisions: Any, in_channels: int) -> dict:
    """The child's own variables (NASNet layout) cut out of the supergraph's."""
    spec = decode(space, decisions)
    F, KH, KW = max(space.filters), max(space.kernel_heights), max(space.kernel_widths)
    params, stats = variables["params"], variables.get("batch_stats", {})
    out_p, out_s = {}, {}
    for i, layer in enumerate(spec.layers):
        first = in_channels if i == 0 else F
        rows = list(range(in_channels if i == 0 else spec.layers[i - 1].filters))
        for j in layer.skips:
            rows += [first + j * F + c for c in range(spec.layers[j].filters)]
        kh, kw = layer.kernel
        r0, c0 = KH // 2 - kh // 2, KW // 2 - kw // 2
        kernel = params[f"layer{i}_conv"]["kernel"][r0:r0 + kh, c0:c0 + kw]
        kernel = jnp.take(kernel, jnp.asarray(rows), axis=2)[..., :layer.filters]
        bn = params[f"layer{i}_bn"]
        out_p[f"layer{i}"] = {"conv": {"kernel": kernel},
                              "bn": {k: v[:layer.filters] for k, v in bn.items()}}
        if stats:
            out_s[f"layer{i}"] = {"bn": {k: v[:layer.filters]
                                         for k, v in stats[f"layer{i}_bn"].items()}}
    last = spec.layers[-1].filters
    out_p["fc"] = {"kernel": params["fc"]["kernel"][:last], "bias": params["fc"]["bias"]}
    return {"params": out_p, **({"batch_stats": out_s} if stats else {})}


class SharedWeights:
    """The shared_weights mode of cnnjax.nas.search: trains the supergraph through children
    the controller samples, and scores children with its weights (BatchNorm statistics of one
    training batch, as each child sees it, then the held-out validation split)."""

    CALIBRATION_BATCH = 256

    def __init__(self, cfg, split, space: Space, controller: ctl.Controller):
        self.cfg, self.split, self.space, self.controller = cfg, split, space, controller
        peak = cfg.child_learning_rate * cfg.child_batch_size / 256  # as train's SGD
        self.model, self.tx, self._step, self._score = _programs(
            space, split.num_classes, split.channels, peak)

    def init_state(self) -> train.TrainState:
        s = self.space.input_size
        x = jnp.zeros((1, s, s, self.split.channels), jnp.float32)
        d = jnp.zeros(len(self.space.layout()), jnp.int32)
        variables = self.model.init(jax.random.key(self.cfg.seed), x, d, train=False)
        return train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                batch_stats=variables["batch_stats"],
                                opt_state=self.tx.init(variables["params"]),
                                rng=jax.random.key_data(jax.random.key(0)))

    def train(self, state: train.TrainState, children: np.ndarray, t: int):
        """`shared_steps` SGD steps, step i through child i (decisions sampled by the
        controller, one per step, as ENAS)."""
        cfg = self.cfg
        return self._steps(state, children[:cfg.shared_steps], (cfg.seed, 0x5EA5ED),
                           t * cfg.shared_steps)

    def warm_up(self, state: train.TrainState) -> train.TrainState:
        """`shared_warmup` SGD steps, each through a child drawn uniformly from the space, so
        that every path is trained before the controller compares them (without it the first
        rewards are near chance, and the controller can commit to whichever paths happened to
        learn first)."""
        cfg = self.cfg
        children = uniform_decisions(self.space, cfg.seed, cfg.shared_warmup)
        return self._steps(state, children, (cfg.seed, 0x3A53), 0)

    def _steps(self, state, children, stream: tuple[int, ...], first: int):
        """One SGD step through each child, on batches first, first + 1, ... of `stream`."""
        for i, child in enumerate(children):
            batch = self.split.batch(stream, first + i, self.cfg.child_batch_size)
            state = self._step(state, batch, child)
        return state

    def accuracies(self, state: train.TrainState, decisions: np.ndarray, t: int) -> list[float]:
        size = min(self.CALIBRATION_BATCH, len(self.split.train_y))
        calib = self.split.batch((self.cfg.seed, 0xCA11B), t, size)
        val = self.split.validation()
        out = []
        for d in decisions:
            sums = jax.device_get(self._score(state, calib, val, jnp.asarray(d)))
            out.append(int(sums["top1"]) / int(sums["count"]))
        return out


@functools.lru_cache(maxsize=4)
def _programs(space: Space, num_classes: int, channels: int, learning_rate: float) -> tuple:
    """(supergraph, its optimizer, jitted train step, jitted score), compiled once a process
    (a resumed or repeated search in the same process compiles nothing again)."""
    model = SuperNet(space, num_classes, channels)
    tx = optax.chain(optax.add_decayed_weights(5e-4, train.decay_mask),
                     optax.sgd(learning_rate, momentum=0.9, nesterov=True))
    device = jax.local_devices()[0]
    return (model, tx, runtime.jit_on(device, make_shared_step(model, tx), False),  # runs often
            runtime.jit_on(device, make_score(model, model.clone(bn_momentum=0.0)), False))


def make_shared_step(model: SuperNet, tx: optax.GradientTransformation):
    """(state, batch, decisions) -> state: one SGD step of the supergraph through one child."""
    def step(state: train.TrainState, batch: dict, decisions: jax.Array):
        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                          batch["image"], decisions, train=True,
                                          mutable=["batch_stats"])
            return train.cross_entropy(logits, batch["label"]).mean(), updates["batch_stats"]

        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             batch_stats=stats, opt_state=opt_state)
    return step


def make_score(model: SuperNet, calibrator: SuperNet):
    """(state, calibration batch, validation set, decisions) -> {"top1", "count"} sums, with
    the child's BatchNorm statistics taken from the calibration batch alone."""
    def score(state: train.TrainState, calib: dict, val: dict, decisions: jax.Array):
        _, updates = calibrator.apply({"params": state.params, "batch_stats": state.batch_stats},
                                      calib["image"], decisions, train=True,
                                      mutable=["batch_stats"])
        logits = model.apply({"params": state.params, "batch_stats": updates["batch_stats"]},
                             val["image"], decisions, train=False)
        right = (jnp.argmax(logits, -1) == val["label"]) * val["mask"]
        return {"top1": right.sum(), "count": val["mask"].sum()}
    return score
