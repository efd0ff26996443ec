"""The training system: TrainState, a pure jitted train step, exact eval, the loop.

One code path from a 2-core laptop to a TPU pod: the global batch is sharded over every device
of every process (cnnjax.parallel), the state is replicated, and batch k is the same rows and
augmentations whatever the topology, so results do not depend on it. Runs resume from their
workdir's latest checkpoint (params, optimizer state, batch stats, step, RNG, data position).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from cnnjax import checkpoint as ckpt
from cnnjax import data, parallel
from cnnjax.models.registry import create_model


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; presets (experiments/configs) and flags override the defaults."""
    arch: str = "resnet18"
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None       # default: what the dataset and the arch need
    batch_size: int = 64                # global, over all devices and processes
    num_epochs: float = 10.0
    num_steps: int | None = None        # overrides num_epochs
    optimizer: str = "sgd"              # sgd (Nesterov momentum) | adamw
    learning_rate: float = 0.1          # sgd: per 256 images (scaled by batch/256); adamw: as is
    momentum: float = 0.9
    weight_decay: float = 5e-4          # not applied to BatchNorm parameters and biases
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None
    aux_loss_weight: float = 0.3        # GoogLeNet's auxiliary heads (Szegedy et al. 2015)
    dtype: str = "float32"              # compute dtype; bfloat16 keeps float32 params and loss
    model_overrides: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None       # steps; default once per epoch
    checkpoint_every: int | None = None # steps; default once per epoch
    workdir: str | None = None          # default runs/ARCH-DATASET

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with its checkpoint: state structure and data stream."""
        return {k: getattr(self, k) for k in ("arch", "dataset", "image_size", "batch_size",
                                              "optimizer", "seed", "model_overrides")}


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
        new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
        return new, {"loss": loss, "lr": schedule(state.step)}

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

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """One status line (steps, loss, images/s, ETA), redrawn in place on a terminal."""

    def __init__(self, total: int, enabled: bool, stream=sys.stderr):
        self.total, self.enabled, self.stream = total, enabled, stream
        self.tty = stream.isatty()

    def update(self, step: int, loss: float, img_per_s: float, seconds_per_step: float) -> None:
        if not self.enabled:
            return
        eta = time.strftime("%H:%M:%S", time.gmtime(max(self.total - step, 0) * seconds_per_step))
        width = 24
        done = int(width * step / max(self.total, 1))
        line = (f"[{'#' * done}{'.' * (width - done)}] step {step}/{self.total}  loss {loss:.4f}"
                f"  {img_per_s:,.0f} img/s  ETA {eta}")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()


def default_workdir(config: TrainConfig) -> str:
    return str(pathlib.Path("runs") / f"{config.arch}-{config.dataset}")


def build(config: TrainConfig, mesh: jax.sharding.Mesh):
    """Model, data loaders, optimizer and step functions for `config` (validated)."""
    parallel.check_batch_size(config.batch_size, mesh.size)
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16; got {config.dtype!r}")
    info = data.dataset_info(config.dataset, data_dir=config.data_dir)
    model = create_model(config.arch, num_classes=info.num_classes, dtype=jnp.dtype(config.dtype),
                         in_channels=info.channels, **config.model_overrides)
    if config.image_size is None:
        config.image_size = data.default_image_size(info, model.min_input_size)
    if config.image_size < model.min_input_size:
        raise ValueError(f"--image_size={config.image_size} is too small for {config.arch}: it "
                         f"needs at least {model.min_input_size}x{model.min_input_size} pixels")
    loader_kw = dict(data_dir=config.data_dir, image_size=config.image_size,
                     global_batch_size=config.batch_size, seed=config.seed,
                     process_index=jax.process_index(), process_count=jax.process_count())
    train_data = data.Loader(config.dataset, "train", train=True, **loader_kw)
    eval_data = data.Loader(config.dataset, "test", train=False, **loader_kw)
    spe = train_data.steps_per_epoch
    total = config.num_steps or max(1, math.ceil(config.num_epochs * spe))
    schedule = learning_rate_schedule(config, spe, total)
    tx = make_optimizer(config, schedule)
    train_step, eval_step = make_steps(model, tx, config, schedule)
    return info, model, train_data, eval_data, total, tx, train_step, eval_step


def init_state(model: nn.Module, tx: optax.GradientTransformation, config: TrainConfig,
               channels: int, mesh: jax.sharding.Mesh) -> TrainState:
    """A fresh state, built replicated on every device by one jitted init."""
    shape = (1, config.image_size, config.image_size, channels)

    def init(seed):
        params_rng, state_rng = jax.random.split(jax.random.key(seed))
        variables = model.init(params_rng, jnp.zeros(shape, jnp.float32), train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                          rng=jax.random.key_data(state_rng))

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
    mesh = parallel.make_mesh()
    info, model, train_data, eval_data, total, tx, train_step, eval_step = build(config, mesh)
    config.workdir = config.workdir or default_workdir(config)
    workdir = pathlib.Path(config.workdir)
    main = parallel.is_main_process()
    spe = train_data.steps_per_epoch
    eval_every = config.eval_every or spe
    checkpoint_every = config.checkpoint_every or spe

    check_workdir(workdir, config)  # before anything is written
    checkpoints = ckpt.Checkpointer(workdir)
    checkpoints.check_identity(config.identity())
    state = init_state(model, tx, config, info.channels, mesh)
    start = 0
    if checkpoints.latest_step() is not None:
        state, record = checkpoints.restore(ckpt.abstract_like(state))
        start = int(record["data_position"]["step"])
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    writer = MetricWriter(workdir, enabled=main)
    progress = Progress(total, enabled=main and verbose)
    progress.message(
        f"{config.arch} on {config.dataset} ({info.num_train} train / {info.num_test} test, "
        f"{config.image_size}x{config.image_size}x{info.channels}), batch {config.batch_size} "
        f"over {mesh.size} device(s) in {jax.process_count()} process(es), {total} steps"
        + (f", resuming at step {start}" if start else "") + f"; workdir {workdir}")

    batch_sh, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    p_train = jax.jit(train_step, in_shardings=(repl, batch_sh), out_shardings=(repl, repl),
                      donate_argnums=0)
    p_eval = jax.jit(eval_step, in_shardings=(repl, batch_sh), out_shardings=repl)

    def save(step: int) -> None:
        checkpoints.save(step, state, {"identity": config.identity(),
                                       "data_position": {"step": step, "seed": config.seed,
                                                         "epoch": step // spe},
                                       "config": dataclasses.asdict(config),
                                       "model": {"num_classes": info.num_classes,
                                                 "in_channels": info.channels}})

    t_start = time.perf_counter()
    clock = {"t": t_start, "step": start}
    eval_metrics: dict[str, float] = {}

    def periodic(done: int, metrics: dict) -> None:
        nonlocal eval_metrics
        if done % config.log_every == 0 or done == total:
            metrics = parallel.to_host(metrics)
            now = time.perf_counter()
            dt, steps = max(now - clock["t"], 1e-9), max(done - clock["step"], 1)
            img_per_s = steps * config.batch_size / dt
            writer.write({"step": done, "loss": float(metrics["loss"]),
                          "lr": float(metrics["lr"]), "img_per_s": img_per_s})
            progress.update(done, float(metrics["loss"]), img_per_s, dt / steps)
            clock.update(t=now, step=done)
        if done % eval_every == 0 or done == total:
            eval_metrics = evaluate(state, p_eval, eval_data, mesh)
            writer.write({"step": done, **{k: eval_metrics[k] for k in
                                           ("eval_loss", "eval_top1", "eval_top5")}})
        if done % checkpoint_every == 0 or done == total:
            save(done)

    end = total if stop_after is None else min(total, start + stop_after)
    done = start
    try:
        for step, local in train_data.iterate(start, end - start):
            state, metrics = p_train(state, parallel.global_batch(local, mesh))
            done = step + 1
            periodic(done, metrics)
            if done == start + 1:  # keep compilation out of later images/s figures
                jax.block_until_ready(metrics)
                progress.message(f"first step (with compilation): "
                                 f"{time.perf_counter() - t_start:.1f} s")
                clock.update(t=time.perf_counter(), step=done)
        if done < total:  # stopped early on request
            save(done)
    except KeyboardInterrupt:
        try:
            save(done)
            progress.message(f"interrupted: checkpoint at step {done}; rerun to resume")
        except Exception:  # noqa: BLE001 - the step in flight had consumed the state
            progress.message("interrupted mid-step: the last periodic checkpoint is kept")
        raise
    finally:
        checkpoints.close()
        writer.close()
    if done < total:
        progress.message(f"stopped at step {done}/{total}; checkpoint saved, rerun to resume")
        return {"arch": config.arch, "dataset": config.dataset, "steps": done, "state": state}
    if start >= total:  # nothing left to train: report the finished run
        eval_metrics = evaluate(state, p_eval, eval_data, mesh)
    summary = {"arch": config.arch, "dataset": config.dataset, "steps": total,
               "wall_s": time.perf_counter() - t_start, **eval_metrics}
    progress.message(
        f"done: {config.arch} step {total}: eval top-1 {summary.get('eval_top1', 0):.2%}, "
        f"top-5 {summary.get('eval_top5', 0):.2%}, loss {summary.get('eval_loss', 0):.4f} "
        f"over {summary.get('eval_count', 0)} test images; {summary['wall_s']:.0f} s; "
        f"checkpoints in {checkpoints.directory}")
    if main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return {**summary, "state": state}


def load_checkpoint(workdir: str | pathlib.Path, step: int | None = None
                    ) -> tuple[nn.Module, dict, dict]:
    """(model, variables, record) of a run's checkpoint, for inference or fine-tuning:
    `model.apply(variables, x, train=False)`. Works on any machine, whatever trained it."""
    state, record = ckpt.Checkpointer(workdir).restore_on_host(step)
    config = TrainConfig(**record["config"])
    model = create_model(config.arch, dtype=jnp.dtype(config.dtype), **record["model"],
                         **config.model_overrides)
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return model, variables, record
