"""The training system: TrainState, a pure jitted train step, exact eval, the loop.

One code path from a 2-core laptop to a TPU pod: the global batch is sharded over every device
of every process (cnnjax.parallel), the state is replicated, and batch k is the same rows and
augmentations whatever the topology, so results do not depend on it. Runs resume from their
workdir's latest checkpoint (params, optimizer state, batch stats, step, RNG, data position); a
fresh run can start from the layers of another run that fit (`init_from`, cnnjax.transfer).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from cnnjax import checkpoint as ckpt
from cnnjax import convert, data, flags, parallel, transfer
from cnnjax.data import sources
from cnnjax.models import fastconv
from cnnjax.models.registry import create_model


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; presets (experiments/configs) and flags override the defaults.

    The defaults are the default preset's; its per-architecture rows (zero-initialised residual
    branches, Adam for the networks without BatchNorm) come with
    `TrainConfig(**experiments.configs.load("default", arch=...))`, as on the command line."""
    arch: str = "resnet18"
    arch_spec: str | None = None        # a cnnjax.nas spec file (a search's best_spec.json):
                                        # train that network; arch becomes its name (nas_...)
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None       # default: what the dataset and the arch need
    batch_size: int = 64                # global, over all devices and processes
    num_epochs: float = 10.0
    num_steps: int | None = None        # overrides num_epochs
    optimizer: str = "sgd"              # sgd (Nesterov momentum) | adamw
    learning_rate: float = 0.2          # sgd: per 256 images (scaled by batch/256); adamw: as is
    momentum: float = 0.9
    weight_decay: float = 5e-4          # not applied to BatchNorm parameters and biases
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None
    max_bad_steps: int = 10             # non-finite steps in a row (each skipped: no update)
                                        # beyond which the run stops with exit status 1
    aux_loss_weight: float = 0.3        # GoogLeNet's auxiliary heads (Szegedy et al. 2015)
    dtype: str = "float32"              # compute dtype; bfloat16 keeps float32 params and loss
    model_overrides: dict = dataclasses.field(default_factory=dict)
    bn_recalibration_batches: int = 4   # train batches whose BatchNorm statistics replace the
                                        # running averages before each eval; 0 keeps the EMA
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None       # steps; default once per epoch
    checkpoint_every: int | None = None # steps; default once per epoch
    workdir: str | None = None          # default runs/ARCH-DATASET
    init_from: str | None = None        # an earlier run's workdir: a fresh run starts from the
                                        # layers of its latest checkpoint that fit (cnnjax.transfer)

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with its checkpoint: state structure and data stream.

        Not init_from: it only says how step 0 was made, and a resumed run continues from its
        own checkpoint (train_and_evaluate refuses to resume a run started from another source
        when --init_from names one)."""
        return {k: getattr(self, k) for k in ("arch", "dataset", "image_size", "batch_size",
                                              "optimizer", "seed", "model_overrides")}

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting as `--name=value` and what it must be.

        It only reads (the registry, the dataset table, the file system): nothing is prepared,
        built on a device or written. Divisibility of the batch by the devices is build's check.
        """
        flags.check(vars(self), _RULES)
        if sources.parse_synthetic(self.dataset) is None:
            sources.get_spec(self.dataset)
        taken = sorted(set(self.model_overrides) & {"name", "num_classes", "in_channels", "dtype"})
        if taken:
            raise ValueError(f"--model_overrides={flags.show(self.model_overrides)} cannot set "
                             f"{', '.join(taken)}: num_classes and in_channels follow --dataset, "
                             "dtype is --dtype")
        if self.arch_spec is not None:
            self.use_arch_spec()
        model = self.create_model()  # unknown arch or option, invalid spec: raises
        if self.image_size is not None:
            check_image_size(self.image_size, model)
        if self.data_dir is not None:
            flags.check_directory("data_dir", self.data_dir,
                                  sources.default_data_dir(self.data_dir))
        if self.init_from is not None:
            check_init_from(self.init_from, self.workdir)
        flags.check_directory("workdir", default_workdir(self) if self.workdir is None
                              else self.workdir)

    def use_arch_spec(self) -> None:
        """Reads --arch_spec (ValueError naming its first defect): the run's arch becomes the
        spec's name, so workdirs and checkpoints of different specs never mix, and the image
        size defaults to the size the spec was searched at."""
        from cnnjax import nas
        try:
            spec = nas.load_spec(self.arch_spec)
        except nas.SpecError as e:
            raise ValueError(f"--arch_spec: {e}") from None
        if self.model_overrides:
            raise ValueError(f"--model_overrides={flags.show(self.model_overrides)}: an "
                             "--arch_spec network has no options; edit its spec instead")
        self.arch = spec.name
        if self.image_size is None:
            self.image_size = spec.space.input_size

    def create_model(self, **kwargs: Any) -> nn.Module:
        """The run's model: the registered --arch with --model_overrides, or the network of
        --arch_spec (cnnjax.nas.build); `kwargs` as create_model's."""
        if self.arch_spec is None:
            return create_model(self.arch, **self.model_overrides, **kwargs)
        from cnnjax import nas
        return nas.build(nas.load_spec(self.arch_spec), **kwargs)


_RULES: dict[str, flags.Rule] = {  # TrainConfig.validate's per-field checks
    "arch": flags.TEXT, "arch_spec": flags.optional(flags.PATH), "dataset": flags.TEXT,
    "image_size": flags.optional(flags.POSITIVE_INT), "batch_size": flags.POSITIVE_INT,
    "num_epochs": flags.POSITIVE, "num_steps": flags.optional(flags.POSITIVE_INT),
    "optimizer": flags.one_of("sgd", "adamw"), "learning_rate": flags.POSITIVE,
    "momentum": flags.FRACTION, "weight_decay": flags.NON_NEGATIVE,
    "warmup_epochs": flags.NON_NEGATIVE, "label_smoothing": flags.FRACTION,
    "grad_clip_norm": flags.optional(flags.POSITIVE), "max_bad_steps": flags.NON_NEGATIVE_INT,
    "aux_loss_weight": flags.NON_NEGATIVE,
    "dtype": flags.one_of("float32", "bfloat16"), "model_overrides": flags.JSON_OBJECT,
    "seed": flags.UINT32, "log_every": flags.POSITIVE_INT,
    "bn_recalibration_batches": flags.NON_NEGATIVE_INT,
    "eval_every": flags.optional(flags.POSITIVE_INT),
    "checkpoint_every": flags.optional(flags.POSITIVE_INT),
    "init_from": flags.optional(flags.PATH),  # then check_init_from
}


def check_init_from(init_from: str | os.PathLike, workdir: str | os.PathLike | None) -> None:
    """--init_from must be weights converted by cnnjax.convert or an earlier run's workdir with
    a checkpoint, not this run's own."""
    what = ("the workdir of an earlier run, whose latest checkpoint is read, or weights "
            "written by python -m cnnjax.convert")
    flags.check_existing_directory("init_from", init_from, what)
    if convert.is_converted(init_from):
        convert.read_meta(init_from, flag="init_from")
        return
    ckpt.require_saved(init_from, f"--init_from={flags.show(init_from)}")
    if workdir is not None and os.path.realpath(init_from) == os.path.realpath(workdir):
        raise ValueError(f"--init_from={flags.show(init_from)} is this run's own --workdir; "
                         "leave --init_from out to resume that run")


def min_image_size(model: nn.Module) -> int:
    """The smallest H = W `model` trains on (GoogLeNet's auxiliary heads can need more)."""
    aux = model.aux_min_input_size if getattr(model, "aux_logits", False) else 1
    return max(model.min_input_size, aux)


def check_image_size(size: int, model: nn.Module) -> None:
    need = min_image_size(model)
    what = model.arch + (" with aux_logits" if need > model.min_input_size else "")
    if size < need:
        raise ValueError(f"--image_size={size} is too small for {what}: it needs at least "
                         f"{need}x{need} pixels")


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

    def eval_step(state: TrainState, batch: dict) -> dict:
        logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                             batch["image"], train=False).astype(jnp.float32)
        mask, labels = batch["mask"], batch["label"]
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        return {"loss": jnp.sum(cross_entropy(logits, labels) * mask),
                "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
                "top5": jnp.sum(jnp.any(top5 == labels[:, None], -1) * mask),
                "count": jnp.sum(mask)}

    return train_step, eval_step


class MetricWriter:
    """metrics.jsonl (one JSON object per record) and TensorBoard events; process 0 only."""

    def __init__(self, workdir: pathlib.Path, enabled: bool):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if enabled:
            import tensorboardX  # event files without importing TensorFlow
            self.tb = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step":
                self.tb.add_scalar(k, v, record["step"])
        self.tb.flush()

    def history(self, upto: int) -> list[dict[str, Any]]:
        """The records of steps <= `upto` already in metrics.jsonl (a resumed run's past)."""
        if not self.path.exists() or upto <= 0:
            return []
        with open(self.path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        return [r for r in records if r.get("step", 0) <= upto]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """One status line (steps, loss, images/s, ETA), redrawn in place on a terminal."""

    def __init__(self, total: int, enabled: bool, stream=None):
        stream = sys.stderr if stream is None else stream  # looked up now: it may be redirected
        self.total, self.enabled, self.stream = total, enabled, stream
        self.tty = stream.isatty()

    def update(self, step: int, loss: float, img_per_s: float, seconds_per_step: float,
               flag: str = "", data_wait: float = 0.0) -> None:
        if not self.enabled:
            return
        eta = time.strftime("%H:%M:%S", time.gmtime(max(self.total - step, 0) * seconds_per_step))
        width = 24
        done = int(width * step / max(self.total, 1))
        line = (f"[{'#' * done}{'.' * (width - done)}] step {step}/{self.total}  loss {loss:.4f}"
                f"  {img_per_s:,.0f} img/s  data {data_wait:.0%}  ETA {eta}"
                + (f"  {flag}" if flag else ""))
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()


class BlowUpMonitor:
    """Flags a loss that jumps by an order of magnitude, so a diverging run cannot pass silently.

    A training or eval loss is a blow-up when it is not finite, or when it exceeds 10x the
    lowest loss of its kind seen so far and also exceeds chance level, ln(num_classes): with
    10 classes, a run whose best eval loss was 0.2 is flagged above 2.30, and a first eval
    above 23. Small noisy jumps below chance (0.01 -> 0.15 on one batch) are not flagged.
    """
    FACTOR = 10.0

    def __init__(self, num_classes: int):
        self.chance = math.log(max(num_classes, 2))
        self.best = {"train": math.inf, "eval": math.inf}
        self.events: list[dict[str, Any]] = []

    def check(self, kind: str, step: int, loss: float) -> str:
        """Records `loss`; returns a short warning when it is a blow-up, else ''."""
        ref = min(self.best[kind], self.chance)
        threshold = max(self.FACTOR * ref, self.chance)
        self.best[kind] = min(self.best[kind], loss) if math.isfinite(loss) else self.best[kind]
        if math.isfinite(loss) and loss <= threshold:
            return ""
        self.events.append({"step": step, "kind": kind, "loss": loss, "threshold": threshold})
        return f"BLOW-UP: {kind} loss {loss:,.4g} > {threshold:.3g}"

    def summary(self) -> str:
        if not self.events:
            return ""
        where = ", ".join(f"{e['kind']} {e['loss']:,.4g} at step {e['step']}"
                          for e in self.events[:6])
        more = f" and {len(self.events) - 6} more" if len(self.events) > 6 else ""
        return (f"warning: the loss blew up {len(self.events)} time(s) (>10x its best and above "
                f"chance, ln {math.exp(self.chance):.0f} = {self.chance:.2f}): {where}{more}")


def default_workdir(config: TrainConfig) -> str:
    """runs/ARCH-DATASET, and -from-RUN for a run started from another (so it cannot land in,
    and resume, the from-scratch run of the same arch)."""
    name = f"{config.arch}-{config.dataset}"
    if config.init_from is not None:
        name += "-from-" + pathlib.Path(config.init_from).resolve().name
    return str(pathlib.Path("runs") / name)


def build(config: TrainConfig, mesh: jax.sharding.Mesh):
    """Model, data loaders, optimizer and step functions for `config` (validated)."""
    config.validate()
    parallel.check_batch_size(config.batch_size, mesh.size)
    info = data.dataset_info(config.dataset, data_dir=config.data_dir)
    model = config.create_model(num_classes=info.num_classes, dtype=jnp.dtype(config.dtype),
                                in_channels=info.channels)
    if config.image_size is None:
        config.image_size = data.default_image_size(info, min_image_size(model))
    check_image_size(config.image_size, model)
    loader_kw = dict(data_dir=config.data_dir, image_size=config.image_size,
                     global_batch_size=config.batch_size, seed=config.seed,
                     process_index=jax.process_index(), process_count=jax.process_count())
    train_data = data.Loader(config.dataset, "train", train=True, **loader_kw)
    eval_data = data.Loader(config.dataset, "test", train=False, **loader_kw)
    spe = train_data.steps_per_epoch
    total = (config.num_steps if config.num_steps is not None
             else max(1, math.ceil(config.num_epochs * spe)))
    schedule = learning_rate_schedule(config, spe, total)
    tx = make_optimizer(config, schedule)
    train_step, eval_step = make_steps(model, tx, config, schedule)
    return info, model, train_data, eval_data, total, tx, train_step, eval_step


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


def start_from(state: TrainState, config: TrainConfig) -> tuple[TrainState, dict, str]:
    """A fresh `state` with the layers of run `config.init_from` that fit copied in, on the
    state's shardings: VGG deepening from vgg11 to a deeper VGG, name and shape otherwise (see
    cnnjax.transfer). The optimizer state, step and RNG stay fresh.

    Returns the state, what was copied (JSON, kept in the checkpoints and summary.json) and the
    line the run prints. ValueError, naming --init_from, when nothing fits."""
    if convert.is_converted(config.init_from):
        _, source, meta = convert.load_pretrained(config.init_from)
        source_arch, step, origin = meta["arch"], None, meta.get("source", {}).get("file")
    else:
        _, source, record = load_checkpoint(config.init_from)
        source_arch, step = record["config"]["arch"], int(record["data_position"]["step"])
        origin = None
    target = {"params": state.params, "batch_stats": state.batch_stats}
    try:
        variables, report = transfer.init_from(target, source, source_arch=source_arch,
                                               target_arch=config.arch)
    except ValueError as e:
        raise ValueError(f"--init_from={flags.show(config.init_from)}: {e}") from None
    started = {"run": str(pathlib.Path(config.init_from).resolve()), "arch": source_arch,
               "step": step, **report.to_json()}
    if origin is not None:
        started["converted_from"] = origin
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    how = f"step {step}" if step is not None else f"converted from {origin}"
    return state, started, report.summary(f"{config.init_from} ({source_arch}, {how})")


def check_started_from(record: dict | None, config: TrainConfig, workdir: pathlib.Path) -> None:
    """A run asked to start from --init_from=RUN must not silently resume one started otherwise
    (a from-scratch run in the same workdir would stand in for the measurement)."""
    if config.init_from is None or record is None:
        return
    theirs = (record.get("init_from") or {}).get("run")
    if theirs != str(pathlib.Path(config.init_from).resolve()):
        how = f"from {theirs}" if theirs else "from scratch"
        raise ckpt.CheckpointMismatch(
            f"{workdir} holds a run started {how}, not from --init_from="
            f"{flags.show(config.init_from)}. Use another --workdir, or leave --init_from out "
            "to resume it; nothing was overwritten.")


BEST = "best"  # WORKDIR/best: the checkpoint of the best eval top-1 so far

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


def check_workdir(workdir: pathlib.Path, config: TrainConfig) -> None:
    """A workdir whose config.json describes another run is refused, checkpoints or not."""
    path = workdir / "config.json"
    if not path.exists():
        return
    theirs = TrainConfig(**json.loads(path.read_text())).identity()
    diff = {k: (theirs[k], v) for k, v in config.identity().items() if theirs[k] != v}
    if diff:
        what = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in sorted(diff.items()))
        raise ckpt.CheckpointMismatch(
            f"{workdir} belongs to a different run ({what}). Use another --workdir, or repeat "
            f"that run's settings to resume it; nothing was overwritten.")


def train_and_evaluate(config: TrainConfig, *, verbose: bool = True,
                       stop_after: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) the run `config` describes; returns the final summary and state.

    `stop_after` ends this call after that many steps with a checkpoint (a session with a time
    limit); calling again with the same config continues. Ctrl-C also checkpoints before exiting.
    """
    config.validate()  # before any JAX work, dataset preparation or write
    if config.init_from is not None:
        config.init_from = os.fspath(config.init_from)  # config.json holds it as text
    mesh = parallel.make_mesh()
    info, model, train_data, eval_data, total, tx, train_step, eval_step = build(config, mesh)
    config.workdir = config.workdir or default_workdir(config)
    workdir = pathlib.Path(config.workdir)
    main = parallel.is_main_process()
    check_workdir(workdir, config)  # before anything is written
    resuming = bool(ckpt.saved_steps(workdir))
    if resuming:  # another run's checkpoints are refused before any work
        checkpoints = ckpt.Checkpointer(workdir, create=False)
        checkpoints.check_identity(config.identity())
        check_started_from(checkpoints.record(), config, workdir)
    state = init_state(model, tx, config, info.channels, mesh)
    start, started_from, started_line = 0, None, ""  # started_from: what --init_from copied
    if resuming:
        state, record = checkpoints.restore(ckpt.abstract_like(state))
        checkpoints.close()
        start = int(record["data_position"]["step"])
        started_from = record.get("init_from")
        if started_from:
            layers = ", ".join(started_from["copied_layers"])
            started_line = (f"started from {started_from['run']} ({started_from['arch']}, step "
                            f"{started_from['step']}): {started_from['copied_tensors']} tensors "
                            f"of {layers} copied at step 0")
    elif config.init_from is not None:  # before the workdir is made, so a misfit leaves none
        state, started_from, started_line = start_from(state, config)
    lock = lock_workdir(workdir, main)  # from here on this run writes to the workdir
    try:
        return _train(config, stop_after, verbose, mesh, info, model, train_data, eval_data,
                      total, train_step, eval_step, workdir, state, start, started_from,
                      started_line)
    finally:
        if lock is not None:
            lock.release()


def lock_workdir(workdir: pathlib.Path, main: bool) -> ckpt.WorkdirLock | None:
    """Process 0 takes the workdir's lock and tells the others whether it could: a second run
    on a workdir in use is refused, on every process, before it writes anything."""
    lock, error = None, None
    if main:
        try:
            lock = ckpt.WorkdirLock(workdir)
        except ckpt.WorkdirBusy as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        busy = int(multihost_utils.broadcast_one_to_all(jnp.int32(error is not None)))
        if busy and error is None:
            error = ckpt.WorkdirBusy(f"--workdir={workdir} is in use by another run (process 0 "
                                     "found its lock held): nothing was changed")
    if error is not None:
        raise error
    return lock


class TooManyBadSteps(RuntimeError):
    """More non-finite steps in a row than --max_bad_steps allows."""


class BadSteps:
    """Counts the steps the train step skipped (non-finite loss, gradients or update), reading
    each step's flag one step late so the device always has the next step queued."""

    def __init__(self, limit: int):
        self.limit, self.total, self.run = limit, 0, []
        self.pending: list[tuple[int, jax.Array]] = []

    def add(self, step: int, finite: jax.Array) -> None:
        self.pending.append((step, finite))
        self.resolve(keep=1)

    def resolve(self, keep: int = 0) -> None:
        """Reads all but the last `keep` flags; TooManyBadSteps past the limit."""
        while len(self.pending) > keep:
            step, finite = self.pending.pop(0)
            if bool(parallel.to_host(finite)):
                self.run = []
                continue
            self.total += 1
            self.run.append(step)
            if len(self.run) > self.limit:
                raise TooManyBadSteps(
                    f"step {step}: {len(self.run)} non-finite steps in a row (steps "
                    f"{self.run[0]}-{step}: NaN or Inf in the loss, gradients or update), more "
                    f"than --max_bad_steps={self.limit}. Stopped without saving: the last "
                    "checkpoint holds the last good state. Check the data, lower "
                    "--learning_rate or set --grad_clip_norm, then rerun to resume")

    def skipped(self, step: int) -> bool:
        """Whether `step` (resolved) was skipped."""
        return bool(self.run) and self.run[-1] == step


def waiting(iterator: Iterator, clock: dict) -> Iterator:
    """The items of `iterator`, adding the seconds spent waiting for each to clock["wait"]."""
    iterator = iter(iterator)
    while True:
        t = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        finally:
            clock["wait"] += time.perf_counter() - t
        yield item


def _train(config, stop_after, verbose, mesh, info, model, train_data, eval_data, total,
           train_step, eval_step, workdir, state, start, started_from, started_line):
    """train_and_evaluate's loop, run while the workdir's lock is held."""
    main = parallel.is_main_process()
    spe = train_data.steps_per_epoch
    eval_every = config.eval_every or spe
    checkpoint_every = config.checkpoint_every or spe
    # Saves write in the background while training goes on; the best eval top-1 is kept too.
    checkpoints = ckpt.Checkpointer(workdir, asynchronous=True, cleanup=True)
    best = ckpt.Checkpointer(workdir, max_to_keep=1, subdir=BEST, asynchronous=True,
                             cleanup=True)
    best_record = best.record() if best.latest_step() is not None else None
    best_top1 = best_record["eval"]["eval_top1"] if best_record else -math.inf
    if main:
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    writer = MetricWriter(workdir, enabled=main)
    progress = Progress(total, enabled=main and verbose)
    progress.message(
        f"{config.arch} on {config.dataset} ({info.num_train} train / {info.num_test} test, "
        f"{config.image_size}x{config.image_size}x{info.channels}), batch {config.batch_size} "
        f"over {mesh.size} device(s) in {jax.process_count()} process(es), {total} steps"
        + (f", resuming at step {start}" if start else "") + f"; workdir {workdir}")
    if started_line:
        progress.message(started_line)

    batch_sh, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    p_train = fastconv.jit(train_step, in_shardings=(repl, batch_sh),
                           out_shardings=(repl, repl), donate_argnums=0)
    p_eval = fastconv.jit(eval_step, in_shardings=(repl, batch_sh), out_shardings=repl)
    p_moments = fastconv.jit(make_moments_step(model), in_shardings=(repl, batch_sh),
                             out_shardings=repl)

    def recalibrate(done: int) -> TrainState:
        """Fresh BatchNorm statistics from the next training batches (a pure function of the
        step, so a resumed run recalibrates exactly as an unbroken one)."""
        n = config.bn_recalibration_batches
        batches = (parallel.global_batch(b, mesh) for _, b in train_data.iterate(done, n))
        return recalibrate_batch_norm(state, p_moments, batches)

    bad = BadSteps(config.max_bad_steps)

    # an --arch_spec network is kept with its spec: its checkpoints load without the spec file
    spec = None if config.arch_spec is None else nas_spec_json(config.arch_spec)

    def checkpoint_record(step: int) -> dict:
        return {"identity": config.identity(),
                "data_position": {"step": step, "seed": config.seed, "epoch": step // spe},
                "config": dataclasses.asdict(config), "init_from": started_from,
                "model": {"num_classes": info.num_classes, "in_channels": info.channels},
                **({"spec": spec} if spec else {})}

    # One save in flight at a time across both managers: their background threads then never
    # meet at cross-process barriers in different orders on different processes.
    def save(step: int) -> None:
        bad.resolve()  # a run past --max_bad_steps stops before it saves
        best.wait()
        checkpoints.save(step, state, checkpoint_record(step))

    def save_if_best(step: int) -> None:
        nonlocal best_top1
        if eval_metrics["eval_top1"] > best_top1:
            bad.resolve()
            best_top1 = eval_metrics["eval_top1"]
            checkpoints.wait()
            best.save(step, state, {**checkpoint_record(step), "eval": eval_metrics})

    t_start = time.perf_counter()
    clock = {"t": t_start, "step": start, "wait": 0.0}  # wait: seconds spent waiting for data
    train_time = {"s": 0.0, "images": 0, "wait": 0.0}  # steady state: no compile, eval, saves
    eval_metrics: dict[str, float] = {}
    monitor = BlowUpMonitor(info.num_classes)
    past = writer.history(upto=start)  # a resumed run keeps the losses it has seen
    for record in past:
        for kind, key in (("train", "loss"), ("eval", "eval_loss")):
            if key in record:
                monitor.check(kind, record["step"], record[key])
    bad.total = max((r.get("skipped_steps", 0) for r in past), default=0)
    max_eval_loss = max((r["eval_loss"] for r in past if "eval_loss" in r), default=-math.inf)

    def periodic(done: int, metrics: dict) -> None:
        nonlocal state, eval_metrics, max_eval_loss
        if done % config.log_every == 0 or done == total:
            metrics = parallel.to_host(metrics)
            bad.resolve()
            now = time.perf_counter()
            dt, steps = max(now - clock["t"], 1e-9), max(done - clock["step"], 1)
            img_per_s = steps * config.batch_size / dt
            data_wait = min(clock["wait"] / dt, 1.0)
            if clock["step"] > start:  # the window after the first (compiling) step
                train_time["s"] += dt
                train_time["images"] += steps * config.batch_size
                train_time["wait"] += clock["wait"]
            loss = float(metrics["loss"])
            record = {"step": done, "loss": loss, "lr": float(metrics["lr"]),
                      "img_per_s": img_per_s, "data_wait": data_wait}
            if bad.skipped(done):  # its loss is not finite; its update was not applied
                del record["loss"]
                flag = ""
            else:
                flag = monitor.check("train", done, loss)
            if bad.total:
                record["skipped_steps"] = bad.total
                flag = " ".join(filter(None, [flag, f"skipped {bad.total} non-finite step(s)"]))
            writer.write(record)
            if flag.startswith("BLOW-UP"):
                writer.write({"step": done, "blowup_train_loss": loss})
            progress.update(done, loss, img_per_s, dt / steps, flag, data_wait)
            clock.update(t=now, step=done, wait=0.0)
        evaluating = done % eval_every == 0 or done == total
        if evaluating or done % checkpoint_every == 0:
            jax.block_until_ready(state)  # the steps in flight are training time, not the pause
        paused = time.perf_counter()
        if evaluating:
            state = recalibrate(done)
            eval_metrics = evaluate(state, p_eval, eval_data, mesh)
            writer.write({"step": done, **{k: eval_metrics[k] for k in
                                           ("eval_loss", "eval_top1", "eval_top5")}})
            max_eval_loss = max(max_eval_loss, eval_metrics["eval_loss"])
            save_if_best(done)
            flag = monitor.check("eval", done, eval_metrics["eval_loss"])
            if flag:
                writer.write({"step": done, "blowup_eval_loss": eval_metrics["eval_loss"]})
                progress.message(f"step {done}: {flag} (top-1 {eval_metrics['eval_top1']:.2%})")
        if done % checkpoint_every == 0 or done == total:
            save(done)
        clock["t"] += time.perf_counter() - paused  # evals and saves are not training time

    end = total if stop_after is None else min(total, start + stop_after)
    done, stopped = start, ""
    preemption = parallel.Preemption()
    try:
        batches = parallel.prefetch_to_device(train_data.iterate(start, end - start), mesh)
        for step, batch in waiting(batches, clock):
            try:
                state, metrics = p_train(state, batch)
                done = step + 1
                bad.add(done, metrics["finite"])
                periodic(done, metrics)
            except (TooManyBadSteps, KeyboardInterrupt, ckpt.CheckpointError):
                raise
            except Exception as e:  # a collective that failed: is a process gone?
                parallel.raise_if_peer_lost(e, done + 1, workdir)
                raise
            if done == start + 1:  # keep compilation out of later images/s figures
                jax.block_until_ready(metrics)
                progress.message(f"first step (with compilation): "
                                 f"{time.perf_counter() - t_start:.1f} s")
                clock.update(t=time.perf_counter(), step=done, wait=0.0)
            if done < total and preemption.reached(done):
                stopped = "preempted"
                break
        if done < total:  # stopped early: on request, or preempted
            save(done)
    except KeyboardInterrupt:
        try:
            save(done)
            progress.message(f"interrupted: checkpoint at step {done}; rerun to resume")
        except Exception:  # noqa: BLE001 - the step in flight had consumed the state
            progress.message("interrupted mid-step: the last periodic checkpoint is kept")
        raise
    finally:
        preemption.close()
        try:
            checkpoints.close()  # waits for the last save to commit
        finally:
            best.close()
            writer.close()
    if done < total:
        why = ("preempted (SIGTERM): every process saved step " + str(done) if stopped
               else f"stopped at step {done}/{total}")
        progress.message(f"{why}; checkpoint saved, rerun the same command to resume")
        return {"arch": config.arch, "dataset": config.dataset, "steps": done, "state": state,
                "preempted": bool(stopped), "skipped_steps": bad.total}
    if start >= total:  # nothing left to train: report the finished run
        eval_metrics = evaluate(state, p_eval, eval_data, mesh)
    summary = {"arch": config.arch, "dataset": config.dataset, "steps": total,
               "wall_s": time.perf_counter() - t_start, **eval_metrics,
               "max_eval_loss": max(max_eval_loss, eval_metrics["eval_loss"]),
               "img_per_s": (train_time["images"] / train_time["s"]) if train_time["s"] else None,
               "data_wait": (train_time["wait"] / train_time["s"]) if train_time["s"] else None,
               "blowups": monitor.events, "skipped_steps": bad.total}
    if started_from:
        summary["init_from"] = started_from
    if monitor.events:
        progress.message(monitor.summary())
    if bad.total:
        progress.message(f"warning: {bad.total} step(s) skipped for a non-finite loss, "
                         "gradient or update (see skipped_steps in metrics.jsonl)")
    progress.message(
        f"done: {config.arch} step {total}: eval top-1 {summary.get('eval_top1', 0):.2%}, "
        f"top-5 {summary.get('eval_top5', 0):.2%}, loss {summary.get('eval_loss', 0):.4f} "
        f"over {summary.get('eval_count', 0)} test images; {summary['wall_s']:.0f} s; "
        f"checkpoints in {checkpoints.directory}")
    if main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return {**summary, "state": state}


def nas_spec_json(path: str | os.PathLike) -> dict:
    """The JSON object of the cnnjax.nas spec file at `path`, validated."""
    from cnnjax import nas
    return nas.load_spec(path).to_json()


def load_checkpoint(workdir: str | pathlib.Path, step: int | None = None, *,
                    best: bool = False) -> tuple[nn.Module, dict, dict]:
    """(model, variables, record) of a run's checkpoint, for inference or fine-tuning:
    `model.apply(variables, x, train=False)`. Works on any machine, whatever trained it.
    `best=True` reads the checkpoint of the run's best eval top-1 (its record["eval"] holds
    that eval) instead of the latest.

    checkpoint.NoCheckpoint (a FileNotFoundError) when WORKDIR holds no finished checkpoint,
    ValueError for a step it did not save (the message lists those it did); nothing is created
    or changed in WORKDIR."""
    steps = ckpt.require_saved(workdir)
    subdir = "checkpoints"
    if best:
        subdir = BEST
        steps = ckpt.saved_steps(workdir, BEST)
        if not steps:
            raise ckpt.NoCheckpoint(f"{workdir} holds no best checkpoint (no {BEST}/STEP): the "
                                    "run has not evaluated yet")
    where = pathlib.Path(workdir).resolve() / subdir
    if step is not None and step not in steps:
        raise ValueError(f"{where} has no checkpoint of step {step}; saved steps: "
                         f"{', '.join(map(str, steps))}")
    state, record = ckpt.Checkpointer(workdir, create=False, subdir=subdir).restore_on_host(step)
    config = TrainConfig(**record["config"])
    if "spec" in record:  # an --arch_spec run: its network from the spec saved with it
        from cnnjax import nas
        model = nas.build(record["spec"], dtype=jnp.dtype(config.dtype), **record["model"])
    else:
        model = config.create_model(dtype=jnp.dtype(config.dtype), **record["model"])
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return model, variables, record
