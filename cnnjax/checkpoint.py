"""Orbax checkpoints of everything a resumed run needs, and a guard against mixing runs.

A checkpoint holds the train state (params, batch stats, optimizer state, step, RNG) and a small
JSON record: the run's identity (the settings that fix the state's structure and the data
stream) and the data position. The data position is the step: batch k is a pure function of
(seed, k), so a resumed run continues the same sequence of batches.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import socket
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
    """The workdir holds another run's checkpoints."""


class NoCheckpoint(FileNotFoundError, ValueError):
    """A directory that should be a run's workdir holds no finished checkpoint (a ValueError so
    a command's flag check reports it as one line, a FileNotFoundError for Python callers)."""


class WorkdirBusy(ValueError):
    """Another run holds the workdir's lock."""


class WorkdirLock:
    """One run per workdir: an exclusive `flock` on WORKDIR/lock, held while the run writes.

    The kernel drops the lock when its holder exits, however it exits (SIGKILL included), so a
    killed run leaves nothing stuck; the file itself stays, naming the last holder."""

    def __init__(self, workdir: str | os.PathLike):
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            try:
                h = json.loads(holder)
                holder = f"pid {h['pid']} on {h['host']}, started {h['started']}"
            except (ValueError, KeyError, TypeError):
                holder = holder or "a run that has just started"
            raise WorkdirBusy(f"--workdir={workdir} is in use by another run ({holder}): wait "
                              "for it to end or use another --workdir; nothing was "
                              "changed") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}).encode())
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class CheckpointError(RuntimeError):
    """A save that failed (no space, a read-only directory); the earlier checkpoints stay."""


class Checkpointer:
    """Saves and restores (state, record) under WORKDIR/SUBDIR, keeping the last few.

    Every save is atomic (orbax writes a temporary folder and renames it when complete), so a
    kill at any moment leaves the earlier checkpoints whole. `asynchronous=True` writes in the
    background: `save` returns once the state is copied off the devices, and the next save,
    `wait` or `close` waits for the write to commit and raises CheckpointError if it failed."""

    def __init__(self, workdir: str | pathlib.Path, max_to_keep: int = 3, create: bool = True,
                 subdir: str = "checkpoints", asynchronous: bool = False,
                 cleanup: bool = False):
        """`create=False` for reading: a workdir without checkpoints is left as it is.
        `cleanup=True` deletes the temporary folders of saves a kill interrupted (only for the
        run that holds the workdir's lock: another's save in progress looks the same)."""
        self.directory = pathlib.Path(workdir).resolve() / subdir
        self.asynchronous = asynchronous
        self.last_saved: int | None = None  # this object's latest save, committed or not
        self._pending: int | None = None
        # Orbax names its cross-process barriers by purpose only ("set_value_start", ...); two
        # managers of one run (checkpoints/ and best/) would wait at each other's barriers.
        # The subdir keeps each manager's barriers its own.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=create, enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=cleanup,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=subdir))
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "record": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def record(self, step: int | None = None) -> dict[str, Any] | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(
            record=ocp.args.JsonRestore()))
        return restored["record"]

    def check_identity(self, identity: dict[str, Any],
                       missing: dict[str, Any] | None = None) -> None:
        """Refuses to touch a workdir whose checkpoints were written by a different run
        (`missing`: the values of settings its record may predate)."""
        record = self.record()
        if record is None:
            return
        theirs = {**(missing or {}), **record.get("identity", {})}
        diff = {k: (theirs.get(k), v) for k, v in identity.items() if theirs.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: checkpoint has {a!r}, this run {b!r}"
                             for k, (a, b) in sorted(diff.items()))
            raise CheckpointMismatch(
                f"{self.directory} holds checkpoints of a different run ({what}). Use another "
                f"--workdir, or repeat that run's settings to resume it; nothing was overwritten.")

    def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
        if step in (self.last_saved, self.manager.latest_step()):
            return
        self.wait()  # the previous save is committed (or its failure reported) first
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                record=ocp.args.JsonSave(json.loads(json.dumps(record)))))
        except Exception as e:  # noqa: BLE001 - orbax and the file system raise many kinds
            raise self._failed(step, e) from e
        self.last_saved = self._pending = step
        if not self.asynchronous:
            self.wait()

    def wait(self) -> None:
        """Until the last save is committed; CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._failed(self._pending, e) from e
        self._pending = None

    def _failed(self, step: int | None, error: BaseException) -> CheckpointError:
        steps = saved_steps(self.directory.parent, self.directory.name)
        kept = (f"the checkpoint of step {steps[-1]} is intact" if steps else
                "no earlier checkpoint exists")
        reason = " ".join(str(error).split()) or repr(error)
        if len(reason) > 400:  # the OS's reason comes last, after the paths
            reason = reason[:150] + " ... " + reason[-200:]
        return CheckpointError(f"saving step {step} in {self.directory} failed "
                               f"({type(error).__name__}: {reason}); {kept}. Free space or "
                               "make the directory writable, then rerun to resume")

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores onto the shardings of `abstract_state` (jax.ShapeDtypeStruct leaves)."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
        return restored["state"], restored["record"]

    def restore_on_host(self, step: int | None = None) -> tuple[dict, dict]:
        """The state as saved (nested dicts), on this process's first device, whatever topology
        wrote it: a pod-trained checkpoint opens on a laptop."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        metadata = self.manager.item_metadata(step)["state"]
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()))
        return restored["state"], restored["record"]

    def close(self) -> None:
        """Waits for a save in flight to commit (CheckpointError if it failed), then closes."""
        try:
            self.wait()
        finally:
            self.manager.close()


def saved_steps(workdir: str | os.PathLike, subdir: str = "checkpoints") -> list[int]:
    """The steps of the finished checkpoints under WORKDIR/SUBDIR, from the file system
    alone (nothing is created, unlike `Checkpointer`): for checks before any JAX work. Orbax
    names a finished step's folder by the step; a save in progress has a temporary name."""
    directory = pathlib.Path(workdir) / subdir
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdecimal() and p.is_dir())


def require_saved(workdir: str | os.PathLike, label: str | None = None) -> list[int]:
    """`saved_steps(workdir)`, or NoCheckpoint when there are none; `label` names the directory
    in the message (a flag such as "--init_from='runs/x'"; default: the path)."""
    steps = saved_steps(workdir)
    if not steps:
        label = label or repr(os.fspath(workdir))
        raise NoCheckpoint(f"{label} holds no checkpoint (no "
                           f"{os.path.join(os.fspath(workdir), 'checkpoints', 'STEP')}): expected "
                           "the --workdir of a run of python -m experiments.train that saved at "
                           "least one step")
    return steps


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `tree`, the target a restore fills in."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
