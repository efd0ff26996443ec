"""Orbax checkpoints of everything a resumed run needs, and a guard against mixing runs.

A checkpoint holds the train state (params, batch stats, optimizer state, step, RNG) and a small
JSON record: the run's identity (the settings that fix the state's structure and the data
stream) and the data position. The data position is the step: batch k is a pure function of
(seed, k), so a resumed run continues the same sequence of batches.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
    """The workdir holds another run's checkpoints."""


class NoCheckpoint(FileNotFoundError, ValueError):
    """A directory that should be a run's workdir holds no finished checkpoint (a ValueError so
    a command's flag check reports it as one line, a FileNotFoundError for Python callers)."""


class Checkpointer:
    """Saves and restores (state, record) under WORKDIR/checkpoints, keeping the last few."""

    def __init__(self, workdir: str | pathlib.Path, max_to_keep: int = 3, create: bool = True):
        """`create=False` for reading: a workdir without checkpoints is left as it is."""
        self.directory = pathlib.Path(workdir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                               enable_async_checkpointing=False)
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

    def check_identity(self, identity: dict[str, Any]) -> None:
        """Refuses to touch a workdir whose checkpoints were written by a different run."""
        record = self.record()
        if record is None:
            return
        theirs = record.get("identity", {})
        diff = {k: (theirs.get(k), v) for k, v in identity.items() if theirs.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: checkpoint has {a!r}, this run {b!r}"
                             for k, (a, b) in sorted(diff.items()))
            raise CheckpointMismatch(
                f"{self.directory} holds checkpoints of a different run ({what}). Use another "
                f"--workdir, or repeat that run's settings to resume it; nothing was overwritten.")

    def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
        if self.manager.latest_step() == step:
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            record=ocp.args.JsonSave(json.loads(json.dumps(record)))))
        self.manager.wait_until_finished()

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
        self.manager.close()


def saved_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of the finished checkpoints under WORKDIR/checkpoints, from the file system
    alone (nothing is created, unlike `Checkpointer`): for checks before any JAX work. Orbax
    names a finished step's folder by the step; a save in progress has a temporary name."""
    directory = pathlib.Path(workdir) / "checkpoints"
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
