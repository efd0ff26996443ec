"""A run's directory: its identity, lock, checkpoints, resumption and --init_from.

WORKDIR holds config.json, metrics.jsonl, summary.json, tensorboard/, checkpoints/ (the latest
few) and best/ (the best eval top-1). A workdir belongs to one run: `check_workdir` refuses
another run's, `lock_workdir` a second process on it, and `starting_state` resumes the run's own
latest checkpoint or starts fresh (from --init_from's layers where given). `load_checkpoint`
reads a finished run back for inference or fine-tuning.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import checkpoint as ckpt
from cnnjax import convert, flags, transfer
from cnnjax.models import nasnet, nasspec
from cnnjax.pretrained import directory as pretrained_directory
from cnnjax.pretrained import named
from cnnjax.training.config import TrainConfig, init_source
from cnnjax.training.steps import TrainState, init_state

BEST = "best"  # WORKDIR/best: the checkpoint of the best eval top-1 so far


def check_workdir(workdir: pathlib.Path, config: TrainConfig) -> None:
    """A workdir whose config.json describes another run is refused, checkpoints or not."""
    path = workdir / "config.json"
    if path.exists():
        theirs = TrainConfig(**json.loads(path.read_text())).identity()
        refuse_other(workdir, "run", "belongs to a different run", theirs,
                     config.identity())


def refuse_other(workdir: pathlib.Path, kind: str, what: str, theirs: dict,
                 mine: dict) -> None:
    """checkpoint.CheckpointMismatch naming each setting where the identity saved in `workdir`
    (`theirs`) differs from this `kind`'s (`mine`: a run, a search); nothing when they agree."""
    diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if diff:
        where = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in sorted(diff.items()))
        raise ckpt.CheckpointMismatch(
            f"{workdir} {what} ({where}). Use another --workdir, or repeat that {kind}'s "
            "settings to resume it; nothing was overwritten.")


class JsonLines:
    """A file of one JSON object per line (metrics.jsonl, a search's children.jsonl): appended
    as a run goes, read back when it resumes."""

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def write(self, rows: list[dict]) -> None:
        """Replaces the file's rows (a resumed run drops those past its checkpoint)."""
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))


def check_started_from(record: dict | None, config: TrainConfig, workdir: pathlib.Path) -> None:
    """A run asked to start from --init_from=RUN must not silently resume one started otherwise
    (a from-scratch run in the same workdir would stand in for the measurement)."""
    if config.init_from is None or record is None:
        return
    theirs = (record.get("init_from") or {}).get("run")
    if theirs != init_source(config):
        how = f"from {theirs}" if theirs else "from scratch"
        raise ckpt.CheckpointMismatch(
            f"{workdir} holds a run started {how}, not from --init_from="
            f"{flags.show(config.init_from)}. Use another --workdir, or leave --init_from out "
            "to resume it; nothing was overwritten.")


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


@dataclasses.dataclass
class Start:
    """Where a run starts: its state, the step, and what --init_from copied (JSON, kept in its
    checkpoints and summary.json) with the line the run prints about it."""
    state: TrainState
    step: int = 0
    started_from: dict | None = None
    line: str = ""


def starting_state(config: TrainConfig, model: nn.Module, tx, channels: int,
                   mesh: jax.sharding.Mesh, workdir: pathlib.Path) -> Start:
    """The run's own latest checkpoint if WORKDIR has one, else a fresh state (with the layers of
    --init_from that fit). Another run's workdir or checkpoints are refused before any work."""
    check_workdir(workdir, config)  # before anything is written
    resuming = bool(ckpt.saved_steps(workdir))
    if resuming:
        checkpoints = ckpt.Checkpointer(workdir, create=False)
        checkpoints.check_identity(config.identity())
        check_started_from(checkpoints.record(), config, workdir)
    elif named(config.init_from) is not None:  # published weights: fetched before JAX work
        pretrained_directory(config.arch, named(config.init_from))
    state = init_state(model, tx, config, channels, mesh)
    if not resuming:
        if config.init_from is None:
            return Start(state)
        return Start(*start_from(state, config))  # before the workdir is made: a misfit
                                                  # leaves none
    state, record = checkpoints.restore(ckpt.abstract_like(state))
    checkpoints.close()
    start = Start(state, int(record["data_position"]["step"]), record.get("init_from"))
    if start.started_from:
        s = start.started_from
        how = (f"step {s['step']}" if s["step"] is not None
               else f"converted from {s.get('converted_from')}")
        start.line = (f"started from {s['run']} ({s['arch']}, {how}): "
                      f"{s['copied_tensors']} tensors of {', '.join(s['copied_layers'])} copied "
                      "at step 0")
    return start


def start_from(state: TrainState, config: TrainConfig) -> tuple[TrainState, int, dict, str]:
    """A fresh `state` with the layers of run `config.init_from` that fit copied in, on the
    state's shardings: VGG deepening from vgg11 to a deeper VGG, name and shape otherwise (see
    cnnjax.transfer). The optimizer state, step and RNG stay fresh.

    Published weights ("pretrained[:NAME]") are downloaded and converted into cnnjax's cache
    first (pretrained.DownloadError, one line, when that fails), then read like converted ones.
    Returns the state, step 0, what was copied (JSON, kept in the checkpoints and summary.json)
    and the line the run prints. ValueError, naming --init_from, when nothing fits."""
    directory = config.init_from
    if named(directory) is not None:  # published weights: the converted cache, made if need be
        directory = pretrained_directory(config.arch, named(directory))
    if convert.is_converted(directory):
        _, source, meta = convert.load_pretrained(directory)
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
    started = {"run": init_source(config), "arch": source_arch, "step": step,
               **report.to_json()}
    if origin is not None:
        started["converted_from"] = origin
    if directory != config.init_from:
        started["converted"] = str(directory)
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    how = f"step {step}" if step is not None else f"converted from {origin}"
    return state, 0, started, report.summary(f"{config.init_from} ({source_arch}, {how})")


def checkpoint_records(config: TrainConfig, num_classes: int, channels: int,
                       steps_per_epoch: int, started_from: dict | None) -> Callable[[int], dict]:
    """step -> the JSON record saved beside a checkpoint: what resuming needs to check and where
    the data stream stands. An --arch_spec network keeps its spec: its checkpoints load
    without the spec file."""
    spec = None if config.arch_spec is None else spec_json(config.arch_spec)
    model = {"num_classes": num_classes, "in_channels": channels}

    def record(step: int) -> dict:
        return {"identity": config.identity(),
                "data_position": {"step": step, "seed": config.seed,
                                  "epoch": step // steps_per_epoch},
                "config": dataclasses.asdict(config), "init_from": started_from,
                "model": model, **({"spec": spec} if spec else {})}
    return record


class Saver:
    """The run's two checkpoint series, written in the background while training goes on: the
    latest ones (WORKDIR/checkpoints) and the one of the best eval top-1 (WORKDIR/best).

    One save is in flight at a time across both: their background threads then never meet at
    cross-process barriers in different orders on different processes."""

    def __init__(self, workdir: pathlib.Path, record: Callable[[int], dict]):
        self.record = record
        self.latest = ckpt.Checkpointer(workdir, asynchronous=True, cleanup=True)
        self.best = ckpt.Checkpointer(workdir, max_to_keep=1, subdir=BEST, asynchronous=True,
                                      cleanup=True)
        best = self.best.record() if self.best.latest_step() is not None else None
        self.best_top1 = best["eval"]["eval_top1"] if best else -math.inf

    @property
    def directory(self) -> pathlib.Path:
        return self.latest.directory

    def save(self, step: int, state: TrainState) -> None:
        self.best.wait()
        self.latest.save(step, state, self.record(step))

    def is_best(self, eval_metrics: dict) -> bool:
        return eval_metrics["eval_top1"] > self.best_top1

    def save_best(self, step: int, state: TrainState, eval_metrics: dict) -> None:
        self.best_top1 = eval_metrics["eval_top1"]
        self.latest.wait()
        self.best.save(step, state, {**self.record(step), "eval": eval_metrics})

    def close(self) -> None:
        """Waits for the last saves to commit."""
        try:
            self.latest.close()
        finally:
            self.best.close()


def spec_json(path: str | os.PathLike) -> dict:
    """The JSON object of the searched network's spec file at `path`, validated."""
    return nasspec.load_spec(path).to_json()


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
        model = nasnet.build(record["spec"], dtype=jnp.dtype(config.dtype), **record["model"])
    else:
        model = config.create_model(dtype=jnp.dtype(config.dtype), **record["model"])
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return model, variables, record
