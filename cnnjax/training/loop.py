"""train_and_evaluate: build the parts, open the run directory, then steps and their actions.

One code path from a 2-core laptop to a TPU pod: the global batch is sharded over every device
of every process (cnnjax.parallel), the state is replicated, and batch k is the same rows and
augmentations whatever the topology, so results do not depend on it. Runs resume from their
workdir's latest checkpoint (params, optimizer state, batch stats, step, RNG, data position); a
fresh run can start from the layers of another run that fit (`init_from`, cnnjax.transfer).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cnnjax import checkpoint as ckpt
from cnnjax import data, parallel, runtime
from cnnjax.training.actions import (
    BadSteps,
    BlowUpMonitor,
    Clock,
    Evaluate,
    Log,
    MetricWriter,
    Progress,
    Save,
    TooManyBadSteps,
    resume_monitors,
)
from cnnjax.training.batchnorm import make_moments_step, recalibrate_batch_norm
from cnnjax.training.config import TrainConfig, check_image_size, default_workdir, min_image_size
from cnnjax.training.rundir import Saver, Start, checkpoint_records, lock_workdir, starting_state
from cnnjax.training.steps import (
    TrainState,
    evaluate,
    learning_rate_schedule,
    make_optimizer,
    make_steps,
)


class Parts(NamedTuple):
    """What a run is made of, before any state exists (a tuple: `info, model, *_ = parts`)."""
    info: Any                   # the dataset's DatasetInfo: classes, channels, split sizes
    model: nn.Module
    train_data: data.Loader
    eval_data: data.Loader
    total: int                  # train steps of the whole run
    tx: optax.GradientTransformation
    train_step: Callable        # pure (state, batch) -> (state, metrics); jit it
    eval_step: Callable         # pure (state, batch) -> masked sums


def build(config: TrainConfig, mesh: jax.sharding.Mesh) -> Parts:
    """Model, data loaders, optimizer and step functions for `config`."""
    config.validate()  # a no-op when the caller has validated it
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
    return Parts(info, model, train_data, eval_data, total, tx, train_step, eval_step)


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
    parts = build(config, mesh)
    config.workdir = config.workdir or default_workdir(config)
    workdir = pathlib.Path(config.workdir)
    start = starting_state(config, parts.model, parts.tx, parts.info.channels, mesh, workdir)
    lock = lock_workdir(workdir, parallel.is_main_process())  # from here on this run writes
    try:
        return _run(config, parts, mesh, workdir, start, stop_after, verbose)
    finally:
        if lock is not None:
            lock.release()


def _run(config: TrainConfig, parts: Parts, mesh, workdir: pathlib.Path, start: Start,
         stop_after: int | None, verbose: bool) -> dict[str, Any]:
    """The run, while the workdir's lock is held: its writers and actions, the steps, the end."""
    main, spe, info = parallel.is_main_process(), parts.train_data.steps_per_epoch, parts.info
    if main:
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    saver = Saver(workdir, checkpoint_records(config, info.num_classes, info.channels, spe,
                                              start.started_from))
    writer = MetricWriter(workdir, enabled=main)
    progress = Progress(parts.total, enabled=main and verbose, initial=start.step)
    progress.message(
        f"{config.arch} on {config.dataset} ({info.num_train} train / {info.num_test} test, "
        f"{config.image_size}x{config.image_size}x{info.channels}), batch {config.batch_size} "
        f"over {mesh.size} device(s) in {jax.process_count()} process(es), {parts.total} steps"
        + (f", resuming at step {start.step}" if start.step else "") + f"; workdir {workdir}")
    if start.line:
        progress.message(start.line)
    programs = Programs(parts, mesh, config.bn_recalibration_batches)
    clock, bad, monitor = Clock(start.step), BadSteps(config.max_bad_steps), \
        BlowUpMonitor(info.num_classes)
    max_eval_loss = resume_monitors(writer.history(upto=start.step), monitor, bad)
    save = Save(config.checkpoint_every or spe, parts.total, saver, bad, clock)
    evaluate = Evaluate(config.eval_every or spe, parts.total, programs.recalibrate,
                        programs.evaluate, writer, progress, monitor, bad, saver, clock,
                        max_eval_loss)
    # In this order: the log reads the step's flags first, and the state that the eval
    # recalibrated is the one the regular checkpoint saves.
    actions = [Log(config.log_every, parts.total, config.batch_size, writer, progress, monitor,
                   bad, clock), evaluate, save]
    end = parts.total if stop_after is None else min(parts.total, start.step + stop_after)
    try:
        state, done, preempted = _steps(start, end, parts, mesh, programs, actions, save,
                                        bad, clock, progress, workdir)
    finally:
        try:
            saver.close()  # waits for the last saves to commit
        finally:
            writer.close()
            progress.close()
    if done < parts.total:
        why = (f"preempted (SIGTERM): every process saved step {done}" if preempted
               else f"stopped at step {done}/{parts.total}")
        progress.message(f"{why}; checkpoint saved, rerun the same command to resume")
        return {"arch": config.arch, "dataset": config.dataset, "steps": done, "state": state,
                "preempted": preempted, "skipped_steps": bad.total}
    eval_metrics = evaluate.metrics
    if start.step >= parts.total:  # nothing left to train: report the finished run
        eval_metrics = programs.evaluate(state)
    summary = {"arch": config.arch, "dataset": config.dataset, "steps": parts.total,
               "wall_s": time.perf_counter() - clock.t0, **eval_metrics,
               "max_eval_loss": max(evaluate.max_loss, eval_metrics["eval_loss"]),
               **clock.totals(), "blowups": monitor.events, "skipped_steps": bad.total}
    if start.started_from:
        summary["init_from"] = start.started_from
    _report(summary, monitor, bad, progress, saver.directory)
    if main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return {**summary, "state": state}


class Programs:
    """The run's jitted programs: the train step (state donated), the eval step and the
    BatchNorm moments step, with the batch sharded over the mesh and the state replicated."""

    def __init__(self, parts: Parts, mesh, recalibration_batches: int):
        self.parts, self.mesh, self.recalibration_batches = parts, mesh, recalibration_batches
        batch, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
        self.train = runtime.jit(parts.train_step, in_shardings=(repl, batch),
                                 out_shardings=(repl, repl), donate_argnums=0)
        self.eval = runtime.jit(parts.eval_step, in_shardings=(repl, batch), out_shardings=repl)
        self.moments = runtime.jit(make_moments_step(parts.model), in_shardings=(repl, batch),
                                   out_shardings=repl)

    def recalibrate(self, step: int, state: TrainState) -> TrainState:
        """Fresh BatchNorm statistics from the training batches after `step` (a pure function
        of the step, so a resumed run recalibrates exactly as an unbroken one)."""
        batches = (parallel.global_batch(b, self.mesh)
                   for _, b in self.parts.train_data.iterate(step, self.recalibration_batches))
        return recalibrate_batch_norm(state, self.moments, batches)

    def evaluate(self, state: TrainState) -> dict[str, float]:
        return evaluate(state, self.eval, self.parts.eval_data, self.mesh)


def _steps(start: Start, end: int, parts: Parts, mesh, programs: Programs, actions: list,
           save: Save, bad: BadSteps, clock: Clock, progress: Progress,
           workdir: pathlib.Path) -> tuple[TrainState, int, bool]:
    """Steps start.step+1 .. `end`, each followed by the actions; stops early, with a
    checkpoint, on SIGTERM (every process at the same step) or Ctrl-C. Returns the state, the
    last step done and whether it was preempted."""
    state, done, preempted = start.state, start.step, False
    preemption = parallel.Preemption()
    try:
        batches = parallel.prefetch_to_device(parts.train_data.iterate(done, end - done), mesh)
        for step, batch in clock.timed(batches):
            try:
                state, metrics = programs.train(state, batch)
                done = step + 1
                bad.add(done, metrics["finite"])
                for action in actions:
                    state = action(done, state, metrics)
            except (TooManyBadSteps, KeyboardInterrupt, ckpt.CheckpointError):
                raise
            except Exception as e:  # a collective that failed: is a process gone?
                parallel.raise_if_peer_lost(e, done + 1, workdir)
                raise
            if done == start.step + 1:  # keep compilation out of later images/s figures
                jax.block_until_ready(metrics)
                progress.message(f"first step (with compilation): "
                                 f"{time.perf_counter() - clock.t0:.1f} s")
                clock.restart(done)
            if done < parts.total and preemption.reached(done):
                preempted = True
                break
        if done < parts.total:  # preempted, or stopped on request (stop_after)
            save.now(done, state)
        return state, done, preempted
    except KeyboardInterrupt:
        try:
            save.now(done, state)
            progress.message(f"interrupted: checkpoint at step {done}; rerun to resume")
        except Exception:  # noqa: BLE001 - the step in flight had consumed the state
            progress.message("interrupted mid-step: the last periodic checkpoint is kept")
        raise
    finally:
        preemption.close()


def _report(summary: dict, monitor: BlowUpMonitor, bad: BadSteps, progress: Progress,
            checkpoints: pathlib.Path) -> None:
    """The run's last lines: warnings, then the final eval."""
    if monitor.events:
        progress.message(monitor.summary())
    if bad.total:
        progress.message(f"warning: {bad.total} step(s) skipped for a non-finite loss, "
                         "gradient or update (see skipped_steps in metrics.jsonl)")
    progress.message(
        f"done: {summary['arch']} step {summary['steps']}: eval top-1 "
        f"{summary.get('eval_top1', 0):.2%}, top-5 {summary.get('eval_top5', 0):.2%}, loss "
        f"{summary.get('eval_loss', 0):.4f} over {summary.get('eval_count', 0)} test images; "
        f"{summary['wall_s']:.0f} s; checkpoints in {checkpoints}")
