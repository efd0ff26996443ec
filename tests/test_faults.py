"""Training that survives faults, caused for real: non-finite steps, SIGTERM (one process and
two), a process killed mid-run, a checkpoint moved to another topology, two runs on one workdir.

A tiny searched network (cnnjax.nas, two conv layers on 8x8 digits) stands in for a model: what
is tested is the training system, and its steps cost milliseconds, so the faults land mid-run."""
import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from cnnjax import checkpoint, data, parallel, train

from helpers import SAME_THREADS, cli, env, finish, read_metrics, start

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = {"space": {"num_layers": 2, "input_size": 8},
        "layers": [{"filters": 8, "kernel": [3, 3], "stride": 1, "skips": []},
                   {"filters": 16, "kernel": [3, 3], "stride": 2, "skips": []}]}


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "tiny.json"
    path.write_text(json.dumps(SPEC))
    return str(path)


def losses(workdir) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(workdir) if "loss" in m]


def saved_state(workdir, step=None) -> dict:
    return checkpoint.Checkpointer(workdir, create=False).restore_on_host(step)[0]


def assert_trees_equal(a, b) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


@contextlib.contextmanager
def poisoned(steps):
    """Train batches of `steps` get NaN pixels, as a corrupt record would give them."""
    original = data.Loader.batch

    def batch(self, step):
        out = original(self, step)
        if self.train and step in steps:
            out = {**out, "image": np.full_like(out["image"], np.nan)}
        return out
    data.Loader.batch = batch
    try:
        yield
    finally:
        data.Loader.batch = original


# ----- non-finite steps ----------------------------------------------------------------------

def test_a_non_finite_step_changes_nothing_but_the_step(spec_file, data_dir):
    config = train.TrainConfig(arch_spec=spec_file, data_dir=data_dir, num_steps=10)
    mesh = parallel.make_mesh(jax.devices()[:1])
    info, model, train_data, _, _, tx, train_step, _ = train.build(config, mesh)
    state = train.init_state(model, tx, config, info.channels, mesh)
    step = jax.jit(train_step)
    good = {k: jnp.asarray(v) for k, v in train_data.batch(0).items()}
    state, metrics = step(state, good)  # step 0's learning rate is 0 (warmup): take another
    state, metrics = step(state, {k: jnp.asarray(v) for k, v in train_data.batch(1).items()})
    assert bool(metrics["finite"])
    for bad in (np.nan, np.inf):
        poison = {**good, "image": good["image"].at[3, 2, 2, 0].set(bad)}  # one pixel
        after, metrics = step(state, poison)
        # The loss itself can stay finite (XLA's ReLU maps NaN to 0 here: the loss was
        # ln 10) while the gradients and BatchNorm statistics are NaN: all are checked.
        assert not bool(metrics["finite"])
        assert int(after.step) == int(state.step) + 1  # the data position moves on
        for key in ("params", "batch_stats", "opt_state", "rng"):
            assert_trees_equal(getattr(after, key), getattr(state, key))
    moved, _ = step(state, good)
    assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(moved.params)[0]),
                              np.asarray(jax.tree_util.tree_leaves(state.params)[0]))


def test_recalibration_leaves_out_a_batch_that_is_not_finite(spec_file, data_dir):
    config = train.TrainConfig(arch_spec=spec_file, data_dir=data_dir, num_steps=10)
    mesh = parallel.make_mesh(jax.devices()[:1])
    info, model, train_data, _, _, tx, _, _ = train.build(config, mesh)
    state = train.init_state(model, tx, config, info.channels, mesh)
    moments = jax.jit(train.make_moments_step(model))
    a, b = train_data.batch(0), train_data.batch(1)
    nan = {**b, "image": np.full_like(b["image"], np.nan)}
    clean = train.recalibrate_batch_norm(state, moments, [a])
    assert_trees_equal(train.recalibrate_batch_norm(state, moments, [a, nan]).batch_stats,
                       clean.batch_stats)
    assert_trees_equal(train.recalibrate_batch_norm(state, moments, [nan]).batch_stats,
                       state.batch_stats)  # nothing finite: the running averages stay


def test_poisoned_batches_are_skipped_and_counted_and_too_many_stop_the_run(
        spec_file, data_dir, tmp_path):
    common = [f"--arch_spec={spec_file}", f"--data_dir={data_dir}", "--num_steps=12",
              "--log_every=1", "--eval_every=4", "--checkpoint_every=4", "--max_bad_steps=2"]
    with poisoned({4}):  # the batch of step 4 makes step 5
        code, err = cli(*common, f"--workdir={tmp_path / 'one'}")
    assert code == 0, err
    assert "skipped 1 non-finite step(s)" in err and "warning: 1 step(s) skipped" in err
    records = {r["step"]: r for r in read_metrics(tmp_path / "one") if "lr" in r}
    assert "loss" not in records[5] and records[5]["skipped_steps"] == 1
    assert "skipped_steps" not in records[4] and records[12]["skipped_steps"] == 1
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["blowups"] == []

    with poisoned({5, 6, 7}):  # steps 6, 7, 8: three in a row, more than 2
        code, err = cli(*common, f"--workdir={tmp_path / 'three'}")
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(
        "error: step 8: 3 non-finite steps in a row (steps 6-8: NaN or Inf in the loss"), err
    assert "more than --max_bad_steps=2. Stopped without saving" in err
    assert checkpoint.saved_steps(tmp_path / "three") == [4]
    assert all_finite(saved_state(tmp_path / "three"))
    code, err = cli(*common, f"--workdir={tmp_path / 'three'}")  # clean data: resumes at 4
    assert code == 0 and "resuming at step 4" in err, err


# ----- preemption ----------------------------------------------------------------------------

def test_sigterm_saves_and_the_rerun_continues_as_if_unbroken(spec_file, data_dir, tmp_path):
    common = [f"--arch_spec={spec_file}", f"--data_dir={data_dir}", "--num_steps=40",
              "--log_every=1", "--eval_every=20"]
    code, err = cli(*common, f"--workdir={tmp_path / 'whole'}")
    assert code == 0, err
    before = signal.getsignal(signal.SIGTERM)
    original = data.Loader.batch

    def batch(self, step):  # a real SIGTERM, sent to this process while it reads batch 12
        if self.train and step == 12:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step)
    data.Loader.batch = batch
    try:
        code, err = cli(*common, f"--workdir={tmp_path / 'parts'}")
    finally:
        data.Loader.batch = original
    assert code == 0, err
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the run's only
    stopped = checkpoint.saved_steps(tmp_path / "parts")[-1]
    assert 0 < stopped < 40
    assert f"preempted (SIGTERM): every process saved step {stopped}" in err
    code, err = cli(*common, f"--workdir={tmp_path / 'parts'}")
    assert code == 0 and f"resuming at step {stopped}" in err, err
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    assert_trees_equal(saved_state(tmp_path / "parts"), saved_state(tmp_path / "whole"))
    # The best eval top-1 is kept as well as the latest checkpoints, across the resume.
    evals = [r for r in read_metrics(tmp_path / "whole") if "eval_top1" in r]
    top = max(evals, key=lambda r: r["eval_top1"])  # the first of equals: a tie is no gain
    for run in ("whole", "parts"):
        _, variables, record = train.load_checkpoint(tmp_path / run, best=True)
        assert record["data_position"]["step"] == top["step"], run
        assert record["eval"]["eval_top1"] == top["eval_top1"]
        assert checkpoint.saved_steps(tmp_path / run, "best") == [top["step"]]


def test_a_failed_save_is_one_clear_error_and_the_last_checkpoint_stays(
        spec_file, data_dir, tmp_path):
    """A real write error: the run resumes in a process whose files may not grow past 4 KiB
    (RLIMIT_FSIZE binds root too; write() then fails with EFBIG, as on a full disk)."""
    import resource
    common = [f"--arch_spec={spec_file}", f"--data_dir={data_dir}", "--log_every=1",
              "--checkpoint_every=2", "--eval_every=100", f"--workdir={tmp_path}"]
    code, err = cli(*common, "--num_steps=4")
    assert code == 0, err
    before = saved_state(tmp_path)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    out = subprocess.run([sys.executable, "-m", "experiments.train", *common, "--num_steps=8"],
                         env=env(1), cwd=ROOT, capture_output=True, text=True, timeout=600,
                         preexec_fn=small_files)
    assert out.returncode == 1, out.stderr[-3000:]
    # orbax's background thread logs its own traceback too, possibly after cnnjax's line
    last = [l for l in out.stderr.splitlines() if l.startswith("error: ")][-1]
    kept = checkpoint.saved_steps(tmp_path)[-1]
    assert re.match(rf"error: saving step (\d+) in {re.escape(str(tmp_path.resolve()))}"
                    r"/checkpoints failed \(ValueError: .*File too large", last), last
    assert last.endswith(f"; the checkpoint of step {kept} is intact. Free space or make the "
                         "directory writable, then rerun to resume"), last
    assert int(re.match(r"error: saving step (\d+)", last).group(1)) > kept >= 4
    if kept == 4:
        assert_trees_equal(saved_state(tmp_path), before)
    code, err = cli(*common, "--num_steps=8")  # space again: it resumes from there
    assert code == 0 and f"resuming at step {kept}" in err, err
    assert not list((tmp_path / "checkpoints").glob("*tmp*"))  # the failed save is cleaned up


# ----- real processes ------------------------------------------------------------------------

def wait_for_step(workdir, step, procs, timeout=300) -> None:
    """Until metrics.jsonl shows `step` (the run is in its loop, past compilation)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and any(json.loads(l).get("step", 0) >= step
                                 for l in path.read_text().splitlines() if l.strip()):
            return
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {path} after {timeout} s")


def wait_until_stopped(proc, timeout=30) -> None:
    """Until every thread of `proc` is stopped. SIGSTOP takes effect when a thread next leaves
    the kernel, so a file write under way when it is sent still lands after `send_signal`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for stat in pathlib.Path(f"/proc/{proc.pid}/task").glob("*/stat"):
            try:
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
                pass
        if states and all(s in "tT" for s in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {proc.pid} not stopped after {timeout} s: {states}")


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_one_step_on_both(spec_file, data_dir, tmp_path):
    """SIGTERM to process 1 only: both processes stop at the same step, save it, exit 0 within
    30 s; the run resumed in one process (two devices: the same SPMD program with as many
    threads, bitwise, see test_two_processes_equal_one_process_with_as_many_devices) equals an
    unbroken run."""
    common = [f"--arch_spec={spec_file}", f"--data_dir={data_dir}", "--num_steps=300",
              "--log_every=1", "--eval_every=100", "--checkpoint_every=100"]
    whole = start(common + [f"--workdir={tmp_path / 'whole'}"], devices=2, threads=SAME_THREADS)
    finish(whole)
    procs = start(common + [f"--workdir={tmp_path / 'parts'}"], processes=2,
                  threads=SAME_THREADS)
    wait_for_step(tmp_path / "parts", 10, procs)
    procs[1].send_signal(signal.SIGTERM)
    sent = time.monotonic()
    errs = finish(procs, timeout=120)
    assert time.monotonic() - sent < 30
    saved = checkpoint.saved_steps(tmp_path / "parts")  # one save, on both: else it hangs
    assert len(saved) == 1 and 10 < saved[0] < 100, saved
    assert f"preempted (SIGTERM): every process saved step {saved[0]}" in errs[0], errs[0]
    err, = finish(start(common + [f"--workdir={tmp_path / 'parts'}"], devices=2,
                        threads=SAME_THREADS))
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    assert_trees_equal(saved_state(tmp_path / "parts"), saved_state(tmp_path / "whole"))


@pytest.mark.slow
def test_a_killed_process_stops_the_other_with_a_message(spec_file, data_dir, tmp_path):
    """SIGKILL to process 1: process 0 learns which process is gone from JAX's coordination
    service (after the heartbeat timeout, 30 s) and stops naming it: with exit status 1 and
    cnnjax's message when its next collective failed, or aborted by JAX with JAX's message when
    it was waiting at a checkpoint's barrier (see parallel.HEARTBEAT_TIMEOUT_S)."""
    procs = start([f"--arch_spec={spec_file}", f"--data_dir={data_dir}",
                   "--num_steps=100000", "--log_every=1", "--checkpoint_every=5",
                   "--eval_every=1000", f"--workdir={tmp_path}"], processes=2)
    wait_for_step(tmp_path, 12, procs)
    procs[1].kill()
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=parallel.HEARTBEAT_TIMEOUT_S + 90)
    assert time.monotonic() - killed < parallel.HEARTBEAT_TIMEOUT_S + 30
    procs[1].communicate()
    step = checkpoint.saved_steps(tmp_path)[-1]
    assert step >= 5  # 10 too, unless process 1 died before committing it (saves are async)
    if procs[0].returncode == 1:  # a collective failed first: cnnjax's message
        last = [l for l in err.splitlines() if l.startswith("error: ")][-1]
        assert re.match(r"error: process 1 of 2 lost during step \d+; process 0 stops too",
                        last), last
        assert f"The last committed checkpoint is step {step}: restart every process" in last
    else:  # it was waiting (a checkpoint's barrier): JAX's abort names the lost process
        assert procs[0].returncode == -signal.SIGABRT, err[-3000:]
        assert re.search(r"The following tasks are unhealthy \(stopped sending heartbeats\):"
                         r"\s+1\s", err), err[-3000:]
    assert all_finite(saved_state(tmp_path))


@pytest.mark.slow
def test_a_checkpoint_moves_between_topologies(spec_file, data_dir, tmp_path):
    """Written on 8 devices at step 6, it restores bitwise on 1 device, and the next step run on
    1 device, on 4, and on 2 processes equals the 8-device run's step 7 (to float32 summation
    order: the devices split the batch differently)."""
    common = [f"--arch_spec={spec_file}", f"--data_dir={data_dir}", "--num_steps=7",
              "--log_every=1", "--eval_every=100", "--checkpoint_every=6"]
    eight = tmp_path / "eight"
    finish(start(common + [f"--workdir={eight}"], devices=8))
    assert checkpoint.saved_steps(eight) == [6, 7]

    config = train.TrainConfig(arch_spec=spec_file, data_dir=data_dir)
    mesh = parallel.make_mesh(jax.devices()[:1])
    info, model, *_, tx, _, _ = train.build(config, mesh)
    target = checkpoint.abstract_like(train.init_state(model, tx, config, info.channels, mesh))
    restored, _ = checkpoint.Checkpointer(eight, create=False).restore(target, step=6)
    assert int(restored.step) == 6 and restored.params["layer0"]["conv"]["kernel"].sharding == (
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert_trees_equal(serialization.to_state_dict(restored), saved_state(eight, step=6))

    def resumed_copy(name):  # the 8-device run as it stood at step 6
        import shutil
        shutil.copytree(eight, tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "7")
        return tmp_path / name

    runs = {"one": resumed_copy("one"), "four": resumed_copy("four"),
            "two_processes": resumed_copy("two_processes")}
    code, err = cli(*common, f"--workdir={runs['one']}")  # this process has 1 device
    assert code == 0 and "over 1 device(s)" in err and "resuming at step 6" in err, err
    finish(start(common + [f"--workdir={runs['four']}"], devices=4))
    finish(start(common + [f"--workdir={runs['two_processes']}"], processes=2))
    reference = saved_state(eight, step=7)
    loss7 = dict(losses(eight))[7]
    for name, workdir in runs.items():
        assert losses(workdir)[-1][0] == 7
        np.testing.assert_allclose(losses(workdir)[-1][1], loss7, rtol=1e-5, err_msg=name)
        state = saved_state(workdir, step=7)
        assert int(state["step"]) == 7
        for x, y in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(reference)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6,
                                       err_msg=name)


def test_one_run_per_workdir_and_a_killed_run_leaves_no_stuck_lock(spec_file, data_dir,
                                                                   tmp_path):
    common = [f"--arch_spec={spec_file}", f"--data_dir={data_dir}", "--log_every=1",
              "--checkpoint_every=10", "--eval_every=1000", f"--workdir={tmp_path}"]
    first, = start(common + ["--num_steps=100000"])
    wait_for_step(tmp_path, 25, [first])
    first.send_signal(signal.SIGSTOP)  # frozen mid-run, holding its lock
    try:
        wait_until_stopped(first)  # a write in flight when the signal came ends first
        files = lambda: {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}  # noqa
        before = files()
        code, err = cli(*common, "--num_steps=100000")
        assert code == 2
        assert err.strip() == (f"error: --workdir={tmp_path} is in use by another run (pid "
                               f"{first.pid} on {os.uname().nodename}, started "
                               f"{json.loads((tmp_path / 'lock').read_text())['started']}): "
                               "wait for it to end or use another --workdir; nothing was "
                               "changed"), err
        after = files()
        assert after == before, sorted(str(p) for p in before.keys() | after.keys()
                                       if before.get(p) != after.get(p))
    finally:
        first.kill()
        first.communicate()
    step = checkpoint.saved_steps(tmp_path)[-1]
    code, err = cli(*common, f"--num_steps={step + 3}")  # the stale lock file does not block
    assert code == 0 and f"resuming at step {step}" in err, err


@pytest.mark.slow
def test_kills_during_background_saves_lose_nothing(spec_file, data_dir, tmp_path):
    """SIGKILL while a checkpoint is being written (its temporary folder on disk), twice:
    every rerun resumes from the last committed save, and the end equals an unbroken run bit
    for bit. Saves run in the background, one per step here, so most moments are mid-save."""
    common = [f"--arch_spec={spec_file}", f"--data_dir={data_dir}", "--num_steps=60",
              "--log_every=1", "--checkpoint_every=1", "--eval_every=30"]
    code, err = cli(*common, f"--workdir={tmp_path / 'whole'}")
    assert code == 0, err
    parts, kills = tmp_path / "parts", 0
    while kills < 2:
        proc, = start(common + [f"--workdir={parts}"])
        while proc.poll() is None:
            saving = [p.name for p in (parts / "checkpoints").glob("*tmp*")] if (
                parts / "checkpoints").is_dir() else []
            if saving and checkpoint.saved_steps(parts):
                proc.kill()
                kills += 1
                break
            time.sleep(0.005)
        proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL)
        assert proc.returncode != 0, "the run ended before a kill landed mid-save"
    finish(start(common + [f"--workdir={parts}"]))
    assert not list((parts / "checkpoints").glob("*tmp*"))  # interrupted saves cleaned up
    assert_trees_equal(saved_state(parts), saved_state(tmp_path / "whole"))
    reference = dict(losses(tmp_path / "whole"))
    assert all(loss == reference[step] for step, loss in losses(parts))  # reruns repeat them
