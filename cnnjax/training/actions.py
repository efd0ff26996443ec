"""What a run does besides its steps: periodic actions, the monitors they consult, and output.

The loop (cnnjax.training.loop) calls its actions after every step, in order: `Log` (train
loss, learning rate, images/s to metrics.jsonl, TensorBoard and the progress line), `Evaluate`
(recalibrate BatchNorm, evaluate the test split, keep the best checkpoint), `Save` (the regular
checkpoint). Each is due every so many steps and at the last (`due`). They consult
`BlowUpMonitor` (a loss that jumps by an order of magnitude) and `BadSteps` (non-finite steps
the train step skipped), and time training with `Clock` (evals, saves and compilation left out).
"""
from __future__ import annotations

import contextlib
import io
import math
import pathlib
import sys
import time
from typing import Any, Callable, Iterator

import jax
import tqdm

from cnnjax import parallel
from cnnjax.training.rundir import JsonLines, Saver
from cnnjax.training.steps import TrainState


def due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action runs after `step`: every `every` steps and at the last."""
    return step % every == 0 or step == total


def _tensorboardx():
    """tensorboardX (TensorBoard event files without TensorFlow), imported without PyTorch:
    its writer imports torch whenever torch is installed (2.6 s of every run's start on a
    2-core EPYC), only to accept torch tensors, and cnnjax writes floats. While
    `sys.modules["torch"]` is None, `import torch` raises ImportError (Python's import system
    documents this), which tensorboardX catches; the entry is removed again at once."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        import tensorboardX
        return tensorboardX
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


class MetricWriter:
    """metrics.jsonl (one JSON object per record) and TensorBoard events; process 0 only."""

    def __init__(self, workdir: pathlib.Path, enabled: bool):
        self.enabled = enabled
        self.lines = JsonLines(workdir / "metrics.jsonl")
        self.tb = None
        if enabled:
            self.tb = _tensorboardx().SummaryWriter(str(workdir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.lines.append([record])
        for k, v in record.items():
            if k != "step":
                self.tb.add_scalar(k, v, record["step"])
        self.tb.flush()

    def history(self, upto: int) -> list[dict[str, Any]]:
        """The records of steps <= `upto` already in metrics.jsonl (a resumed run's past)."""
        if upto <= 0:
            return []
        return [r for r in self.lines.read() if r.get("step", 0) <= upto]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """The progress line and the run's messages, printed above it; silent when not enabled
    (processes other than the first, --quiet). tqdm draws the line: redrawn in place on a
    terminal; in a log (a file, a pipe) each update is a line of its own."""

    def __init__(self, total: int, enabled: bool, initial: int = 0, stream=None,
                 log_updates: bool = True):
        stream = sys.stderr if stream is None else stream  # looked up now: it may be redirected
        self.enabled, self.stream, self.tty = enabled, stream, stream.isatty()
        self.log_updates = log_updates  # False: in a log, only the messages (they say it all)
        self.bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                             file=stream if self.tty else io.StringIO(), dynamic_ncols=True,
                             mininterval=0)

    def update(self, step: int, loss: float, img_per_s: float, flag: str = "",
               data_wait: float = 0.0) -> None:
        self.advance(step, f"loss {loss:.4f}, {img_per_s:,.0f} img/s, data {data_wait:.0%}"
                     + (f", {flag}" if flag else ""))

    def advance(self, step: int, postfix: str) -> None:
        """The line at `step`, with `postfix` after tqdm's count, rate and ETA."""
        if not self.enabled:
            return
        self.bar.n = step
        self.bar.set_postfix_str(postfix, refresh=self.tty)
        if not self.tty and self.log_updates:
            self.stream.write(f"{self.bar}\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        self.bar.close()


class Clock:
    """Training time: wall time less compilation, evaluations and saves, and the part of it
    spent waiting for data. `window` reads and restarts the time since its last call."""

    def __init__(self, step: int):
        self.t0 = self.t = time.perf_counter()
        self.first, self.step, self.wait = step, step, 0.0
        self.seconds, self.images, self.waited = 0.0, 0, 0.0  # after the first window

    def restart(self, step: int) -> None:
        self.t, self.step, self.wait = time.perf_counter(), step, 0.0

    def window(self, step: int, batch_size: int) -> tuple[float, float]:
        """(images/s, fraction of the time waiting for data) since the last window."""
        now = time.perf_counter()
        dt, steps = max(now - self.t, 1e-9), max(step - self.step, 1)
        rate, data_wait = steps * batch_size / dt, min(self.wait / dt, 1.0)
        if self.step > self.first:  # the window after the first (compiling) step
            self.seconds += dt
            self.images += steps * batch_size
            self.waited += self.wait
        self.t, self.step, self.wait = now, step, 0.0
        return rate, data_wait

    @contextlib.contextmanager
    def paused(self, state: Any):
        """Time spent inside is not training time; the steps in flight before it are."""
        jax.block_until_ready(state)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t += time.perf_counter() - t

    def timed(self, iterator: Iterator) -> Iterator:
        """The items of `iterator`, counting the time spent waiting for each."""
        iterator = iter(iterator)
        while True:
            t = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.wait += time.perf_counter() - t
            yield item

    def totals(self) -> dict[str, float | None]:
        """images/s and data wait over the steady state (None before a second window)."""
        if not self.seconds:
            return {"img_per_s": None, "data_wait": None}
        return {"img_per_s": self.images / self.seconds, "data_wait": self.waited / self.seconds}


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


def resume_monitors(past: list[dict], monitor: BlowUpMonitor, bad: BadSteps) -> float:
    """Feeds a resumed run's past records (metrics.jsonl) to its monitors: the losses seen and
    the steps skipped so far. Returns the largest eval loss among them."""
    for record in past:
        for kind, key in (("train", "loss"), ("eval", "eval_loss")):
            if key in record:
                monitor.check(kind, record["step"], record[key])
    bad.total = max((r.get("skipped_steps", 0) for r in past), default=0)
    return max((r["eval_loss"] for r in past if "eval_loss" in r), default=-math.inf)


class Log:
    """Every `every` steps: the train loss, learning rate, images/s and data wait to
    metrics.jsonl and the progress line. A blown-up loss and skipped steps are flagged; a
    skipped step's loss (not finite, its update not applied) is left out."""

    def __init__(self, every: int, total: int, batch_size: int, writer: MetricWriter,
                 progress: Progress, monitor: BlowUpMonitor, bad: BadSteps, clock: Clock):
        self.every, self.total, self.batch_size = every, total, batch_size
        self.writer, self.progress, self.monitor, self.bad, self.clock = (
            writer, progress, monitor, bad, clock)

    def __call__(self, step: int, state: TrainState, metrics: dict) -> TrainState:
        if not due(step, self.every, self.total):
            return state
        metrics = parallel.to_host(metrics)
        self.bad.resolve()
        img_per_s, data_wait = self.clock.window(step, self.batch_size)
        loss = float(metrics["loss"])
        record = {"step": step, "loss": loss, "lr": float(metrics["lr"]),
                  "img_per_s": img_per_s, "data_wait": data_wait}
        flag = ""
        if self.bad.skipped(step):
            del record["loss"]
        else:
            flag = self.monitor.check("train", step, loss)
        if self.bad.total:
            record["skipped_steps"] = self.bad.total
            flag = " ".join(filter(None, [flag, f"skipped {self.bad.total} non-finite step(s)"]))
        self.writer.write(record)
        if flag.startswith("BLOW-UP"):
            self.writer.write({"step": step, "blowup_train_loss": loss})
        self.progress.update(step, loss, img_per_s, flag, data_wait)
        return state


class Evaluate:
    """Every `every` steps: BatchNorm recalibrated, the test split evaluated and written, the
    best eval top-1 checkpointed, a blown-up eval loss flagged. `metrics` holds the last eval,
    `max_loss` the largest eval loss of the run (a resumed run's past included)."""

    def __init__(self, every: int, total: int, recalibrate: Callable, evaluate: Callable,
                 writer: MetricWriter, progress: Progress, monitor: BlowUpMonitor,
                 bad: BadSteps, saver: Saver, clock: Clock, max_loss: float = -math.inf):
        self.every, self.total = every, total
        self.recalibrate, self.evaluate = recalibrate, evaluate
        self.writer, self.progress, self.monitor, self.bad, self.saver, self.clock = (
            writer, progress, monitor, bad, saver, clock)
        self.metrics: dict[str, float] = {}
        self.max_loss = max_loss

    def __call__(self, step: int, state: TrainState, metrics: dict) -> TrainState:
        if not due(step, self.every, self.total):
            return state
        with self.clock.paused(state):
            state = self.recalibrate(step, state)
            m = self.metrics = self.evaluate(state)
            self.writer.write({"step": step, **{k: m[k] for k in
                                                ("eval_loss", "eval_top1", "eval_top5")}})
            self.max_loss = max(self.max_loss, m["eval_loss"])
            if self.saver.is_best(m):
                self.bad.resolve()  # a run past --max_bad_steps stops before it saves
                self.saver.save_best(step, state, m)
            flag = self.monitor.check("eval", step, m["eval_loss"])
            if flag:
                self.writer.write({"step": step, "blowup_eval_loss": m["eval_loss"]})
                self.progress.message(f"step {step}: {flag} (top-1 {m['eval_top1']:.2%})")
        return state


class Save:
    """Every `every` steps: the regular checkpoint, once the steps before it are known good."""

    def __init__(self, every: int, total: int, saver: Saver, bad: BadSteps, clock: Clock):
        self.every, self.total, self.saver, self.bad, self.clock = every, total, saver, bad, clock

    def __call__(self, step: int, state: TrainState, metrics: dict | None = None) -> TrainState:
        if due(step, self.every, self.total):
            with self.clock.paused(state):
                self.now(step, state)
        return state

    def now(self, step: int, state: TrainState) -> None:
        self.bad.resolve()  # a run past --max_bad_steps stops before it saves
        self.saver.save(step, state)
