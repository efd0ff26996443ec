"""Each periodic action of the training loop alone, driven by a fake step (no model, no jit):
what it writes, when it runs, what it keeps (cnnjax.training.actions)."""
import importlib.util
import io
import json
import math
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.training import actions
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
)


class FakeSaver:
    """A Saver's interface, recording what it was asked to save."""

    def __init__(self, best_top1=-math.inf):
        self.saved, self.best, self.best_top1 = [], [], best_top1

    def save(self, step, state):
        self.saved.append(step)

    def is_best(self, m):
        return m["eval_top1"] > self.best_top1

    def save_best(self, step, state, m):
        self.best_top1 = m["eval_top1"]
        self.best.append((step, m["eval_top1"]))


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def parts(tmp_path):
    stream = io.StringIO()
    return {"writer": MetricWriter(tmp_path, enabled=True), "stream": stream,
            "progress": Progress(10, enabled=True, stream=stream),
            "monitor": BlowUpMonitor(10), "bad": BadSteps(limit=2), "clock": Clock(0)}


def fake_steps(n, finite=lambda step: True, loss=lambda step: 1.0 / step):
    """(step, metrics) of n steps as the train step returns them."""
    for step in range(1, n + 1):
        yield step, {"loss": jnp.float32(loss(step)), "lr": jnp.float32(0.1),
                     "finite": jnp.bool_(finite(step))}


def test_due_every_so_many_steps_and_at_the_last():
    assert [s for s in range(1, 11) if actions.due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 4) if actions.due(s, 1, 3)] == [1, 2, 3]


def test_log_writes_every_log_every_steps_and_the_last(tmp_path, parts):
    log = Log(3, 10, 64, parts["writer"], parts["progress"], parts["monitor"], parts["bad"],
              parts["clock"])
    state = jnp.zeros(3)
    for step, metrics in fake_steps(10):
        parts["bad"].add(step, metrics["finite"])
        assert log(step, state, metrics) is state
    rows = records(tmp_path)
    assert [r["step"] for r in rows] == [3, 6, 9, 10]
    assert rows[0]["loss"] == pytest.approx(1 / 3) and rows[0]["lr"] == pytest.approx(0.1)
    assert all(r["img_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in rows)
    lines = parts["stream"].getvalue().splitlines()
    assert len(lines) == 4 and "10/10" in lines[-1] and "loss 0.1000" in lines[-1]


def test_log_leaves_out_a_skipped_steps_loss_and_counts_the_skips(tmp_path, parts):
    log = Log(2, 6, 8, parts["writer"], parts["progress"], parts["monitor"], parts["bad"],
              parts["clock"])
    for step, metrics in fake_steps(6, finite=lambda s: s != 4):
        parts["bad"].add(step, metrics["finite"])
        log(step, None, metrics)
    rows = {r["step"]: r for r in records(tmp_path)}
    assert "loss" in rows[2] and "skipped_steps" not in rows[2]
    assert "loss" not in rows[4] and rows[4]["skipped_steps"] == 1
    assert rows[6]["skipped_steps"] == 1 and "loss" in rows[6]
    assert "skipped 1 non-finite step(s)" in parts["stream"].getvalue()


def test_log_flags_a_blown_up_train_loss(tmp_path, parts):
    log = Log(1, 3, 8, parts["writer"], parts["progress"], parts["monitor"], parts["bad"],
              parts["clock"])
    for step, metrics in fake_steps(3, loss=lambda s: [0.1, 0.12, 50.0][s - 1]):
        parts["bad"].add(step, metrics["finite"])
        log(step, None, metrics)
    rows = records(tmp_path)
    assert {"step": 3, "blowup_train_loss": 50.0} in rows
    assert not any("blowup_train_loss" in r for r in rows if r["step"] < 3)
    assert "BLOW-UP: train loss 50 > 2.3" in parts["stream"].getvalue()


def evaluate_action(parts, results, saver, every=2, total=5):
    """An Evaluate whose eval returns `results[step]` and whose recalibration marks the state."""
    calls = []

    def recalibrate(step, state):
        calls.append(("recalibrate", step))
        return state + 1

    def run_eval(state):
        step = calls[-1][1]
        calls.append(("evaluate", step))
        top1, loss = results[step]
        return {"eval_loss": loss, "eval_top1": top1, "eval_top5": 1.0, "eval_count": 10}

    action = Evaluate(every, total, recalibrate, run_eval, parts["writer"], parts["progress"],
                      parts["monitor"], parts["bad"], saver, parts["clock"])
    return action, calls


def test_evaluate_recalibrates_evaluates_and_keeps_the_best(tmp_path, parts):
    saver = FakeSaver()
    results = {2: (0.5, 1.0), 4: (0.4, 0.9), 5: (0.7, 0.8)}
    evaluate, calls = evaluate_action(parts, results, saver)
    state = jnp.zeros(())
    for step in range(1, 6):
        state = evaluate(step, state, {})
    assert calls == [("recalibrate", 2), ("evaluate", 2), ("recalibrate", 4), ("evaluate", 4),
                     ("recalibrate", 5), ("evaluate", 5)]
    assert float(state) == 3  # the recalibrated state is what the loop carries on with
    assert saver.best == [(2, 0.5), (5, 0.7)]  # step 4's 40% was no better
    assert [r["step"] for r in records(tmp_path)] == [2, 4, 5]
    assert evaluate.metrics["eval_top1"] == 0.7 and evaluate.max_loss == 1.0


def test_evaluate_flags_a_blown_up_eval_loss(tmp_path, parts):
    evaluate, _ = evaluate_action(parts, {2: (0.9, 0.2), 4: (0.1, 30.0)}, FakeSaver(),
                                  total=4)
    for step in range(1, 5):
        evaluate(step, jnp.zeros(()), {})
    assert {"step": 4, "blowup_eval_loss": 30.0} in records(tmp_path)
    assert "step 4: BLOW-UP: eval loss 30 > 2.3 (top-1 10.00%)" in parts["stream"].getvalue()


def test_a_best_checkpoint_waits_for_the_bad_steps_to_be_known(parts):
    evaluate, _ = evaluate_action(parts, {2: (0.9, 0.2)}, FakeSaver(), total=2)
    for step, metrics in fake_steps(2, finite=lambda s: False):
        parts["bad"].pending.append((step, metrics["finite"]))
    parts["bad"].limit = 1
    with pytest.raises(TooManyBadSteps, match="2 non-finite steps in a row"):
        evaluate(2, jnp.zeros(()), {})


def test_save_every_checkpoint_every_steps_and_the_last(parts):
    saver = FakeSaver()
    save = Save(4, 10, saver, parts["bad"], parts["clock"])
    for step in range(1, 11):
        save(step, jnp.zeros(()), {})
    assert saver.saved == [4, 8, 10]


def test_save_stops_past_the_bad_step_limit_without_saving(parts):
    saver, bad = FakeSaver(), parts["bad"]
    save = Save(3, 9, saver, bad, parts["clock"])
    for step, metrics in fake_steps(3, finite=lambda s: False):
        bad.add(step, metrics["finite"])  # resolved one step late: the last is pending
    with pytest.raises(TooManyBadSteps, match="3 non-finite steps in a row.*max_bad_steps=2"):
        save(3, jnp.zeros(()), {})
    assert saver.saved == []


def test_bad_steps_counts_runs_and_resets_on_a_good_step():
    bad = BadSteps(limit=2)
    for step, ok in enumerate([True, False, False, True, False, True], start=1):
        bad.add(step, jnp.bool_(ok))
    bad.resolve()
    assert bad.total == 3 and bad.run == [] and not bad.skipped(6)


def test_blow_up_monitor_threshold_is_ten_times_the_best_and_above_chance():
    monitor = BlowUpMonitor(num_classes=10)
    chance = math.log(10)
    assert monitor.check("eval", 1, 0.2) == ""
    assert monitor.check("eval", 2, chance - 0.01) == ""  # 10 x 0.2 = 2 < chance: chance rules
    assert monitor.check("eval", 3, chance + 0.01).startswith("BLOW-UP: eval loss")
    assert monitor.check("train", 3, float("nan")).startswith("BLOW-UP: train loss nan")
    assert [e["step"] for e in monitor.events] == [3, 3]


def test_resume_monitors_replays_a_runs_past():
    monitor, bad = BlowUpMonitor(10), BadSteps(2)
    past = [{"step": 5, "loss": 0.3}, {"step": 5, "eval_loss": 0.5},
            {"step": 10, "loss": 0.2, "skipped_steps": 2}, {"step": 10, "eval_loss": 0.7}]
    assert actions.resume_monitors(past, monitor, bad) == 0.7
    assert bad.total == 2 and monitor.best == {"train": 0.2, "eval": 0.5}


def test_clock_counts_only_windows_after_the_compiling_step_and_leaves_pauses_out():
    clock = Clock(0)
    rate, wait = clock.window(1, 8)  # a window that holds the first (compiling) step
    assert rate > 0 and 0 <= wait <= 1 and clock.totals()["img_per_s"] is None
    clock.restart(1)
    clock.window(5, 8)
    assert clock.images == 32 and clock.totals()["img_per_s"] > 0
    before = clock.t
    with clock.paused(np.zeros(1)):
        pass
    assert clock.t > before  # the pause moved the window's start: it is not training time


def test_progress_in_a_log_writes_one_line_per_update_and_nothing_when_disabled():
    stream = io.StringIO()
    progress = Progress(4, enabled=True, stream=stream)
    progress.message("hello")
    progress.update(2, 0.5, 100.0)
    assert stream.getvalue().splitlines()[0] == "hello"
    assert "2/4" in stream.getvalue().splitlines()[1] and "\r" not in stream.getvalue()
    quiet = io.StringIO()
    off = Progress(4, enabled=False, stream=quiet)
    off.message("x")
    off.update(1, 0.5, 1.0)
    off.close()
    assert quiet.getvalue() == ""


def test_the_metric_writer_leaves_pytorch_unimported_and_importable(tmp_path):
    """tensorboardX imports torch when it can (2.6 s of a run's start): the writer imports it
    without, writes its events all the same, and a later `import torch` still works. In a
    fresh interpreter: this one may have imported either already."""
    code = textwrap.dedent(f"""
        import importlib.util, pathlib, sys
        from cnnjax.training.actions import MetricWriter
        writer = MetricWriter(pathlib.Path({str(tmp_path)!r}), enabled=True)
        writer.write({{"step": 1, "loss": 0.5}})
        writer.close()
        assert "torch" not in sys.modules, "the metric writer imported PyTorch"
        if importlib.util.find_spec("torch") is not None:
            import torch
            assert torch.ones(2).sum().item() == 2.0
            print("torch imported afterwards")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    if importlib.util.find_spec("torch") is not None:  # CI installs it (the torch extra)
        assert "torch imported afterwards" in out.stdout
    assert records(tmp_path) == [{"step": 1, "loss": 0.5}]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
