"""The search: sample m children, get their rewards, take a REINFORCE step; repeat.

    summary = run(SearchConfig(workdir="runs/nas"))     # python -m experiments.nas

A child's reward is its accuracy (optionally cubed, as Zoph & Le 2017) on a validation split
held out of the dataset's TRAINING split (the test split is never read). Two ways to get it:
`train_children` trains each child from scratch with cnnjax.train's own step for `child_steps`
steps; `shared_weights` (ENAS, Pham et al. 2018; cnnjax.nas.shared) trains one supergraph
through the sampled children's paths and scores children with its weights, after a warm-up
(`shared_warmup` steps through uniformly random children) that trains every path before the
controller compares them.

WORKDIR gets children.jsonl (one row per child: controller_step, spec, reward, accuracy,
params, MACs from cnnjax.profile; in train_children mode also the process and device that
trained it), controller.jsonl (one row per controller step),
hand_designed.jsonl (registered models trained on the same data and budget), best_spec.json,
search_curves.png, search_children.png and orbax checkpoints of the controller (and the shared
weights). Every controller step is checkpointed; rerunning the same command resumes and writes
exactly what an unbroken run writes: rows past the checkpoint are dropped and redone, and each
step's sampling key, child seeds and batches are pure functions of (seed, step, child).
"""
from __future__ import annotations

import functools
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cnnjax import checkpoint as ckpt
from cnnjax import runtime
from cnnjax.models.nasnet import build
from cnnjax.models.nasspec import Space, decode
from cnnjax.nas import controller as ctl
from cnnjax.nas import reinforce, shared
from cnnjax.nas.children import ChildTrainer, Holdout, child_seed, hand_designed, holdout
from cnnjax.nas.config import SearchConfig
from cnnjax.profile import profile
from cnnjax.training import rundir
from cnnjax.training.actions import Progress


@functools.lru_cache(maxsize=8)
def controller_programs(space: Space, hidden: int, m: int, learning_rate: float,
                        entropy_weight: float, baseline_decay: float) -> tuple:
    """(controller, optimizer, jitted update, jitted sampler of m children), once a process."""
    controller = ctl.Controller(space, hidden)
    tx = reinforce.make_optimizer(learning_rate)
    device = jax.local_devices()[0]
    update = runtime.jit_on(device, reinforce.make_update(
        controller, tx, entropy_weight=entropy_weight, baseline_decay=baseline_decay))
    sampler = runtime.jit_on(device,
                             lambda params, key: ctl.sample_batch(controller, params, key, m))
    return controller, tx, update, sampler


# --------------------------------------------------------------------------------------------
# The loop


# Settings added after searches were saved, with the value those searches ran with.
LEGACY_IDENTITY = {"shared_warmup": 0}


def check_workdir(workdir: pathlib.Path, cfg: SearchConfig) -> None:
    """A workdir holding another search (other settings) is refused before anything is written."""
    path = workdir / "search_config.json"
    if path.exists():
        theirs = {**LEGACY_IDENTITY, **json.loads(path.read_text())}
        rundir.refuse_other(workdir, "search", "holds a different search", theirs,
                            cfg.identity())


def check_processes(mode: str, processes: int) -> None:
    """ValueError unless `mode` can run in `processes` processes (shared_weights trains one
    supergraph on one device: one process)."""
    if mode == "shared_weights" and processes > 1:
        raise ValueError(f"--mode=shared_weights runs in one process (one supergraph on one "
                         f"device), not {processes}: spread --mode=train_children over "
                         "processes, or run shared_weights without --num_processes")


def best_row(rows: list[dict]) -> dict | None:
    """The child with the highest reward; the earliest among equals."""
    return max(rows, key=lambda r: r["reward"], default=None)


class Search:
    """The controller and what rewards its children (a ChildTrainer, or the shared supergraph),
    with their state; `step(t)` is one controller step: sample, reward, update."""

    def __init__(self, cfg: SearchConfig, space: Space, split: Holdout):
        self.cfg, self.space, self.split = cfg, space, split
        # Shared weights: the children that train the supergraph this step come from the same
        # controller parameters as the m scored ones, so one call samples them all.
        self.extra = cfg.shared_steps if cfg.mode == "shared_weights" else 0
        controller, tx, self.update, self.sampler = controller_programs(
            space, cfg.controller_hidden, self.extra + cfg.children_per_step,
            cfg.controller_learning_rate, cfg.entropy_weight, cfg.baseline_decay)
        self.state: dict[str, Any] = {"controller": reinforce.init_state(controller, tx,
                                                                         cfg.seed)}
        self.rewarder = self.trainer = None
        if cfg.mode == "shared_weights":
            self.rewarder = shared.SharedWeights(cfg, split, space, controller)
            self.state["shared"] = self.rewarder.init_state()
        else:
            self.trainer = ChildTrainer(cfg, split, space.input_size)

    def resume(self, checkpoints: ckpt.Checkpointer) -> int:
        """The controller step to start at: the checkpoint's, whose state is restored, or 0.
        Checkpoints hold the state as host arrays: each process's copy lives on its own first
        device, which a multi-process save could not name; process 0 writes them."""
        if checkpoints.latest_step() is None:
            return 0
        checkpoints.check_identity(self.cfg.identity(), missing=LEGACY_IDENTITY)
        state, record = checkpoints.restore(jax.device_get(self.state))
        self.state = jax.device_put(state, jax.local_devices()[0])
        return int(record["controller_step"])

    def warm_up(self) -> None:
        self.state["shared"] = self.rewarder.warm_up(self.state["shared"])

    def step(self, t: int) -> tuple[list[dict], dict]:
        """Controller step `t`: (the children's rows, the controller's metrics)."""
        cfg, heads = self.cfg, {"num_classes": self.split.num_classes,
                                "in_channels": self.split.channels}
        cstate = self.state["controller"]
        decisions, _, _ = self.sampler(cstate.params, reinforce.step_key(cfg.seed, t))
        decisions = np.asarray(decisions)
        if self.rewarder is not None:
            self.state["shared"] = self.rewarder.train(self.state["shared"],
                                                       decisions[:self.extra], t)
        decisions = decisions[self.extra:]
        specs = [decode(self.space, d) for d in decisions]
        if self.rewarder is not None:
            accuracies = self.rewarder.accuracies(self.state["shared"], decisions, t)
        else:
            accuracies = self.trainer([build(s, **heads) for s in specs],
                                      [child_seed(cfg.seed, t, k) for k in range(len(specs))])
        rewards = [float(a) ** cfg.reward_power for a in accuracies]
        self.state["controller"], metrics = self.update(cstate, jnp.asarray(decisions),
                                                        jnp.asarray(rewards, jnp.float32))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        rows = []
        for k, (spec, acc, reward) in enumerate(zip(specs, accuracies, rewards)):
            prof = profile(build(spec, **heads), self.space.input_size)
            rows.append({"controller_step": t, "child": k, "name": spec.name,
                         "reward": reward, "accuracy": acc, "params": prof.params,
                         "macs": prof.macs, "spec": spec.to_json(),
                         **(self.trainer.where[k] if self.trainer is not None else {})})
        return rows, {**metrics, "mean_reward": float(np.mean(rewards))}  # ours: float64


class Records:
    """A search's files: children.jsonl and controller.jsonl (rows of steps past the checkpoint,
    left by a kill between writing them and saving, are dropped and redone), best_spec.json,
    search_config.json. Every process reads; process 0 writes."""

    def __init__(self, workdir: pathlib.Path, cfg: SearchConfig, start: int, main: bool):
        self.workdir, self.main = workdir, main
        self.children_file = rundir.JsonLines(workdir / "children.jsonl")
        self.steps_file = rundir.JsonLines(workdir / "controller.jsonl")
        self.children = [r for r in self.children_file.read() if r["controller_step"] < start]
        self.steps = [r for r in self.steps_file.read() if r["controller_step"] < start]
        self.hand = rundir.JsonLines(workdir / "hand_designed.jsonl").read()
        if jax.process_count() > 1:  # every process has read before process 0 writes
            multihost_utils.sync_global_devices("cnnjax.nas: workdir read")
        if main:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "search_config.json").write_text(json.dumps(cfg.identity(), indent=1))
            self.children_file.write(self.children)
            self.steps_file.write(self.steps)

    def add(self, t: int, rows: list[dict], metrics: dict) -> dict:
        """Step `t`'s rows; returns its controller row (with the best child so far)."""
        self.children += rows
        best = best_row(self.children)
        step_row = {"controller_step": t, "mean_reward": metrics["mean_reward"],
                    "baseline": metrics["baseline"], "entropy": metrics["entropy"],
                    "best_reward": best["reward"], "best": best["name"]}
        self.steps.append(step_row)
        if self.main:
            self.children_file.append(rows)
            self.steps_file.append([step_row])
            (self.workdir / "best_spec.json").write_text(json.dumps(best["spec"], indent=1)
                                                         + "\n")
        return step_row


def run(cfg: SearchConfig, *, verbose: bool = True, stop_after: int | None = None,
        stream=None) -> dict[str, Any]:
    """Runs (or resumes) the search `cfg` describes; returns a summary. `stop_after` ends this
    call after that many controller steps (as a kill would, but cleanly)."""
    cfg.validate()
    main = jax.process_index() == 0  # reads as every process does; the only one that writes
    check_processes(cfg.mode, jax.process_count())
    total, space, workdir = cfg.total_steps(), cfg.make_space(), pathlib.Path(cfg.workdir)
    t_start = time.perf_counter()
    check_workdir(workdir, cfg)
    split = holdout(cfg.dataset, cfg.data_dir, space.input_size, cfg.val_fraction)
    search = Search(cfg, space, split)
    checkpoints = ckpt.Checkpointer(workdir)
    start = search.resume(checkpoints)
    records = Records(workdir, cfg, start, main)
    progress = Progress(total, enabled=verbose and main, initial=start, stream=stream,
                        log_updates=False)
    size = space.input_size
    progress.message(
        f"NAS ({cfg.mode}) on {cfg.dataset}: {len(split.train_y)} train / {len(split.val_y)} "
        f"validation images held out of the training split, {size}x{size}x{split.channels}; "
        f"{space.num_layers} layers, {space.num_children():.3g} children in the space; "
        f"{total} controller steps x {cfg.children_per_step} children"
        + (f", resuming at step {start}" if start else "") + f"; workdir {workdir}")
    hand = (hand_designed(cfg, split, size, workdir, progress.message, records.hand)
            if start < total else records.hand)
    end = total if stop_after is None else min(total, start + stop_after)
    if search.rewarder is not None and start == 0 and end > 0 and cfg.shared_warmup:
        t0 = time.perf_counter()  # saved with step 1's checkpoint: a kill before it redoes it
        search.warm_up()
        progress.message(f"warm-up: {cfg.shared_warmup} supergraph steps through uniformly "
                         f"random children ({time.perf_counter() - t0:.1f} s)")
    try:
        for t in range(start, end):
            t0 = time.perf_counter()
            rows, metrics = search.step(t)
            row = records.add(t, rows, metrics)
            checkpoints.save(t + 1, jax.device_get(search.state),
                             {"identity": cfg.identity(), "controller_step": t + 1})
            best = best_row(records.children)
            progress.advance(t + 1, f"best {best['reward']:.4f}")
            progress.message(
                f"step {t + 1}/{total}  mean reward {row['mean_reward']:.4f}  baseline "
                f"{row['baseline']:.4f}  entropy {row['entropy']:.2f}  best {best['reward']:.4f} "
                f"({best['name']}, {best['macs'] / 1e6:.3f}M MACs)  "
                f"{time.perf_counter() - t0:.1f} s")
    finally:
        checkpoints.close()
        progress.close()
    if main:
        draw(workdir, records.children, records.steps, hand, cfg)
    return _finish(cfg, records, hand, workdir, total, time.perf_counter() - t_start,
                   progress)


def _finish(cfg: SearchConfig, records: Records, hand: list[dict], workdir: pathlib.Path,
            total: int, wall_s: float, progress: Progress) -> dict[str, Any]:
    """The search's summary, and its last line."""
    steps, best = records.steps, best_row(records.children)
    summary = {"mode": cfg.mode, "controller_steps": len(steps),
               "children": len(records.children), "wall_s": wall_s, "best": best,
               "first_mean_reward": steps[0]["mean_reward"] if steps else None,
               "last_mean_reward": steps[-1]["mean_reward"] if steps else None,
               "hand_designed": hand, "workdir": str(workdir)}
    if len(steps) < total:
        progress.message(f"stopped at controller step {len(steps)}/{total}; rerun to resume")
    elif best is not None:
        progress.message(
            f"done: best child {best['name']} reward {best['reward']:.4f} (validation "
            f"accuracy {best['accuracy']:.2%}), {best['params']:,} params, {best['macs']:,} "
            f"MACs; {summary['wall_s']:.0f} s; {workdir / 'best_spec.json'}")
    return summary


def draw(workdir: pathlib.Path, children: list[dict], steps: list[dict], hand: list[dict],
         cfg: SearchConfig) -> None:
    from cnnjax import plots
    if not steps:
        return
    what = (f"{cfg.dataset}, {cfg.mode}, seed {cfg.seed}, {cfg.children_per_step} children per "
            "step, " + (f"{cfg.child_steps} training steps each" if cfg.mode == "train_children"
                        else f"{cfg.shared_steps} shared-weight steps per controller step"))
    plots.search_curves(children, steps, workdir / "search_curves.png", title=what)
    plots.search_children(children, hand, workdir / "search_children.png", title=what,
                          budget=cfg.child_steps)
