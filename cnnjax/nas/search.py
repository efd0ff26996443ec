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

import dataclasses
import functools
import json
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import SingleDeviceSharding

from cnnjax import checkpoint as ckpt
from cnnjax import data, flags, train
from cnnjax.data import sources, transforms
from cnnjax.models import fastconv
from cnnjax.models.registry import create_model, model_spec
from cnnjax.nas import controller as ctl
from cnnjax.nas import reinforce
from cnnjax.nas.net import NASNet, build
from cnnjax.nas.space import Space, SpecError, decode
from cnnjax.profile import profile

MODES = ("train_children", "shared_weights")


@dataclasses.dataclass
class SearchConfig:
    """Every setting of a search; the defaults finish in about ten minutes on a 2-core CPU."""
    workdir: str = "runs/nas"
    mode: str = "train_children"
    dataset: str = "digits"
    data_dir: str | None = None
    space: dict = dataclasses.field(default_factory=dict)  # Space fields over the mode's default
    seed: int = 0
    controller_steps: int | None = None  # default: 12 (train_children), 60 (shared_weights)
    children_per_step: int = 4          # m
    child_steps: int = 200              # train_children: SGD steps per child, from scratch
    child_batch_size: int = 32
    child_learning_rate: float = 0.2    # SGD with Nesterov momentum, per 256 images (as train)
    shared_steps: int = 40              # shared_weights: supergraph steps per controller step
    shared_warmup: int = 400            # shared_weights: supergraph steps through uniformly
                                        # random children before the controller's first step
    val_fraction: float = 0.2           # of the training split, held out for the rewards
    reward_power: float = 1.0           # 3: the cubed accuracy of Zoph & Le 2017
    entropy_weight: float = 1e-3
    baseline_decay: float = 0.8
    controller_learning_rate: float = 0.05
    controller_hidden: int = 32
    hand_designed: str = "resnet18,mobilenet_v2"  # registered models drawn beside the children

    def identity(self) -> dict[str, Any]:
        """What a resumed search must share with its checkpoints: all but where and how long,
        and the shared_* settings in train_children mode (they change nothing there)."""
        skip = {"workdir", "controller_steps", "hand_designed", "data_dir"}
        if self.mode != "shared_weights":
            skip |= {"shared_steps", "shared_warmup"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def total_steps(self) -> int:
        """Controller steps: --controller_steps, else the mode's default (a shared-weights
        step costs a fraction of a second, a train_children step m trainings)."""
        if self.controller_steps is not None:
            return self.controller_steps
        return 60 if self.mode == "shared_weights" else 12

    def make_space(self) -> Space:
        base = Space().to_json()
        if self.mode == "shared_weights":  # one supergraph shape: every map at the input size
            base["strides"] = [1]
        try:
            return Space.from_json({**base, **self.space})
        except SpecError as e:
            raise ValueError(f"--space={flags.show(self.space)}: {e}") from None

    def hand_designed_names(self) -> list[str]:
        return [n for n in self.hand_designed.split(",") if n]

    def validate(self) -> None:
        """ValueError naming the first bad setting; reads only (nothing is built or written)."""
        flags.check(vars(self), _RULES)
        if sources.parse_synthetic(self.dataset) is None:
            sources.get_spec(self.dataset)
        space = self.make_space()
        if self.mode == "shared_weights" and space.strides != (1,):
            raise ValueError(f"--space={flags.show(self.space)}: --mode=shared_weights needs "
                             "strides [1] (the supergraph holds one map size per layer)")
        for name in self.hand_designed_names():
            model_spec(name)  # unknown names: the registry's message, closest names listed
        if self.data_dir is not None:
            flags.check_directory("data_dir", self.data_dir,
                                  sources.default_data_dir(self.data_dir))
        flags.check_directory("workdir", self.workdir)


_RULES: dict[str, flags.Rule] = {
    "workdir": flags.PATH, "mode": flags.one_of(*MODES), "dataset": flags.TEXT,
    "space": flags.JSON_OBJECT, "seed": flags.UINT32,
    "controller_steps": flags.optional(flags.POSITIVE_INT),
    "children_per_step": flags.POSITIVE_INT,
    "child_steps": flags.POSITIVE_INT, "child_batch_size": flags.POSITIVE_INT,
    "child_learning_rate": flags.POSITIVE, "shared_steps": flags.POSITIVE_INT,
    "shared_warmup": flags.NON_NEGATIVE_INT,
    "val_fraction": flags.Rule("a number in (0, 1)",
                               lambda v: flags.is_finite(v) and 0 < v < 1),
    "reward_power": flags.POSITIVE, "entropy_weight": flags.NON_NEGATIVE,
    "baseline_decay": flags.FRACTION, "controller_learning_rate": flags.POSITIVE,
    "controller_hidden": flags.POSITIVE_INT, "hand_designed": flags.TEXT,
}


# --------------------------------------------------------------------------------------------
# Data: the training split, with a validation part held out of it


@dataclasses.dataclass
class Holdout:
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    num_classes: int
    channels: int

    def batch(self, parts: tuple[int, ...], step: int, size: int) -> dict[str, np.ndarray]:
        """Training batch `step` of the stream keyed by `parts`: an epoch is a permutation
        keyed by (parts, epoch), batches its consecutive slices (remainder dropped)."""
        per_epoch = len(self.train_y) // size
        epoch, pos = divmod(step, per_epoch)
        order = transforms.permutation(transforms.hash_key(*parts, epoch), len(self.train_y))
        idx = order[pos * size:(pos + 1) * size]
        return {"image": self.train_x[idx], "label": self.train_y[idx]}

    def validation(self) -> dict[str, np.ndarray]:
        n = len(self.val_y)
        return {"image": self.val_x, "label": self.val_y, "mask": np.ones(n, np.float32)}


def holdout(dataset: str, data_dir: str | None, image_size: int, val_fraction: float) -> Holdout:
    """The training split at `image_size` (normalised, not augmented), with `val_fraction` of
    every class held out by a fixed hash of the example index (the same for every seed)."""
    info = data.dataset_info(dataset, data_dir=data_dir)
    loader = data.Loader(dataset, "train", data_dir=data_dir, image_size=image_size,
                         global_batch_size=256, train=False)
    images, labels = [], []
    for _, b in loader.iterate(0):
        keep = b["mask"] > 0
        images.append(b["image"][keep])
        labels.append(b["label"][keep])
    x, y = np.concatenate(images), np.concatenate(labels)
    order = transforms.permutation(transforms.hash_key(0x4E4153, len(y)), len(y))
    held = np.zeros(len(y), bool)
    for c in range(info.num_classes):
        members = order[y[order] == c]
        held[members[:int(round(val_fraction * len(members)))]] = True
    return Holdout(x[~held], y[~held], x[held], y[held], info.num_classes, info.channels)


# --------------------------------------------------------------------------------------------
# Training a child (or a hand-designed model) from scratch with cnnjax.train's step


def placement(m: int, processes: int, process: int, devices: int) -> list[tuple[int, int]]:
    """(model, local device index) for each of the `m` models that `process` trains: model k
    on process k % processes, the i-th of a process's models on its device i % devices."""
    return [(k, i % devices) for i, k in enumerate(range(process, m, processes))]


def child_seed(seed: int, step: int, child: int) -> int:
    return int(transforms.hash_key(seed, step, child)[0] % np.uint64(2**31))


# Compiling a child's programs takes longer than running them once: XLA's CPU backend without
# its LLVM optimisations compiles in half the time (same accuracies on the children tried), but
# its code runs many times slower (a 6-layer child's 200 train steps took ~50 s, not ~1 s), so
# only the programs that run once (init, score, the controller's) get it. CPU only.
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_on(device, fun, fast: bool = True, **kw):
    """jax.jit for a child's functions on `device` (fast compilation on a CPU, unless `fast`
    is False: the unoptimised code of a big hand-designed model runs many times slower)."""
    if fast and device.platform == "cpu":
        kw["compiler_options"] = FAST_CPU_COMPILE
    return fastconv.jit(fun, **kw)


class ChildTrainer:
    """Trains models from scratch for `child_steps` SGD steps (cnnjax.train's optimizer and
    step) on the held-in part of the training split and returns their validation accuracies,
    BatchNorm statistics recomputed from 4 training batches first, as cnnjax.train does before
    every eval.

    The models of one call are spread over the processes and their devices (`placement`):
    each process trains its share, stepping its models in turn (JAX dispatches asynchronously,
    so models on different devices train at the same time), and every process gets every
    accuracy back. A model trains on one device, so its numbers do not depend on where it ran:
    one process with 8 devices, or 2 processes, write the same children.jsonl as 1 device."""

    def __init__(self, cfg: SearchConfig, split: Holdout, image_size: int):
        self.cfg, self.split, self.image_size = cfg, split, image_size
        steps_per_epoch = max(1, len(split.train_y) // cfg.child_batch_size)
        # Warm up over the first tenth of the budget (train's default is 2 epochs of 10).
        self.config = train.TrainConfig(
            arch="nas", dataset=cfg.dataset, batch_size=cfg.child_batch_size,
            num_steps=cfg.child_steps, optimizer="sgd", learning_rate=cfg.child_learning_rate,
            warmup_epochs=0.1 * cfg.child_steps / steps_per_epoch, image_size=image_size)
        self.schedule = train.learning_rate_schedule(self.config, steps_per_epoch,
                                                     cfg.child_steps)
        self.tx = train.make_optimizer(self.config, self.schedule)
        self.devices = jax.local_devices()
        self.process, self.processes = jax.process_index(), jax.process_count()
        self.where: list[dict] = []  # the last call's models: the process and device of each

    def __call__(self, models: list, seeds: list[int]) -> list[float]:
        cfg, split = self.cfg, self.split
        runs = []
        for k, d in placement(len(models), self.processes, self.process, len(self.devices)):
            device = self.devices[d]
            init, step, score = self._programs(models[k], device)
            runs.append({"child": k, "device": device, "state": init(seeds[k]), "step": step,
                         "score": score, "parts": (cfg.seed, seeds[k])})
        for s in range(cfg.child_steps):
            for run in runs:
                batch = jax.device_put(split.batch(run["parts"], s, cfg.child_batch_size),
                                       run["device"])
                run["state"], _ = run["step"](run["state"], batch)
        # per model: correct, scored, and the process and device that trained it
        counts = np.zeros((len(models), 4), np.int32)
        for run in runs:
            calib = [split.batch(run["parts"], cfg.child_steps + i, cfg.child_batch_size)
                     for i in range(4)]
            args = jax.device_put((calib, split.validation()), run["device"])
            sums = jax.device_get(run["score"](run["state"], *args))
            counts[run["child"]] = (int(sums["top1"]), int(sums["count"]), self.process,
                                    run["device"].id)
        if self.processes > 1:  # each model was scored by one process, zeros elsewhere
            counts = multihost_utils.process_allgather(counts).sum(axis=0)
        self.where = [{"process": int(p), "device": int(d)} for _, _, p, d in counts]
        return [int(c) / int(n) for c, n, _, _ in counts]

    def _programs(self, model, device) -> tuple:
        """The jitted init, train step and score of `model` on `device`, compiled once per
        process: a child sampled again (as the controller converges) costs no compilation."""
        cfg = self.cfg
        key = (type(model).__name__, getattr(model, "spec", None), model.arch, model.num_classes,
               model.in_channels, device.id, self.image_size, self.split.channels,
               len(self.split.train_y), cfg.child_steps, cfg.child_batch_size,
               cfg.child_learning_rate)
        if key not in _PROGRAMS:
            if len(_PROGRAMS) >= 256:
                _PROGRAMS.pop(next(iter(_PROGRAMS)))
            train_step, eval_step = train.make_steps(model, self.tx, self.config, self.schedule)
            moments = train.make_moments_step(model)

            def score(state, calib, val):
                return eval_step(train.recalibrate_batch_norm(state, moments, calib), val)

            fast = isinstance(model, NASNet)
            _PROGRAMS[key] = (
                jit_on(device, self._init(model), fast,
                       out_shardings=SingleDeviceSharding(device)),
                jit_on(device, train_step, False), jit_on(device, score, fast))
        return _PROGRAMS[key]

    def _init(self, model):
        """seed -> a fresh TrainState, as cnnjax.train.init_state makes it (one device)."""
        shape = (1, self.image_size, self.image_size, self.split.channels)
        return train.make_init(model, self.tx, shape)


_PROGRAMS: dict[tuple, tuple] = {}  # ChildTrainer._programs: compiled child programs


@functools.lru_cache(maxsize=8)
def controller_programs(space: Space, hidden: int, m: int, learning_rate: float,
                        entropy_weight: float, baseline_decay: float) -> tuple:
    """(controller, optimizer, jitted update, jitted sampler of m children), once a process."""
    controller = ctl.Controller(space, hidden)
    tx = reinforce.make_optimizer(learning_rate)
    device = jax.local_devices()[0]
    update = jit_on(device, reinforce.make_update(controller, tx, entropy_weight=entropy_weight,
                                                  baseline_decay=baseline_decay))
    sampler = jit_on(device, lambda params, key: ctl.sample_batch(controller, params, key, m))
    return controller, tx, update, sampler


# --------------------------------------------------------------------------------------------
# The loop


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _append_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


# Settings added after searches were saved, with the value those searches ran with.
LEGACY_IDENTITY = {"shared_warmup": 0}


def check_workdir(workdir: pathlib.Path, cfg: SearchConfig) -> None:
    """A workdir holding another search (other settings) is refused before anything is written."""
    path = workdir / "search_config.json"
    if not path.exists():
        return
    theirs = {**LEGACY_IDENTITY, **json.loads(path.read_text())}
    mine = cfg.identity()
    diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in sorted(diff.items()))
        raise ckpt.CheckpointMismatch(
            f"{workdir} holds a different search ({what}). Use another --workdir, or repeat "
            "that search's settings to resume it; nothing was overwritten.")


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


def run(cfg: SearchConfig, *, verbose: bool = True, stop_after: int | None = None,
        stream=None) -> dict[str, Any]:
    """Runs (or resumes) the search `cfg` describes; returns a summary. `stop_after` ends this
    call after that many controller steps (as a kill would, but cleanly)."""
    cfg.validate()
    main = jax.process_index() == 0  # reads as every process does; the only one that writes
    check_processes(cfg.mode, jax.process_count())
    total = cfg.total_steps()
    stream = sys.stderr if stream is None else stream
    say = ((lambda text: print(text, file=stream, flush=True)) if verbose and main
           else (lambda text: None))
    t_start = time.perf_counter()
    space = cfg.make_space()
    workdir = pathlib.Path(cfg.workdir)
    check_workdir(workdir, cfg)
    image_size = space.input_size
    split = holdout(cfg.dataset, cfg.data_dir, image_size, cfg.val_fraction)
    m = cfg.children_per_step

    # Shared weights: the children that train the supergraph this step come from the same
    # controller parameters as the m scored ones, so one call samples them all.
    extra = cfg.shared_steps if cfg.mode == "shared_weights" else 0
    controller, tx, update, sampler = controller_programs(
        space, cfg.controller_hidden, extra + m, cfg.controller_learning_rate,
        cfg.entropy_weight, cfg.baseline_decay)
    state: dict[str, Any] = {"controller": reinforce.init_state(controller, tx, cfg.seed)}
    if cfg.mode == "shared_weights":
        from cnnjax.nas import shared
        rewarder = shared.SharedWeights(cfg, split, space, controller)
        state["shared"] = rewarder.init_state()
    else:
        rewarder = None
        trainer = ChildTrainer(cfg, split, image_size)

    # Checkpoints hold the state as host arrays: each process's copy lives on its own first
    # device, which a multi-process save could not name; process 0 writes them.
    start = 0
    checkpoints = ckpt.Checkpointer(workdir)
    if checkpoints.latest_step() is not None:
        checkpoints.check_identity(cfg.identity(), missing=LEGACY_IDENTITY)
        state, record = checkpoints.restore(jax.device_get(state))
        state = jax.device_put(state, jax.local_devices()[0])
        start = int(record["controller_step"])
    children_path, steps_path = workdir / "children.jsonl", workdir / "controller.jsonl"
    # Rows of steps after the checkpoint (a kill between writing them and saving) are redone.
    children = [r for r in _read_jsonl(children_path) if r["controller_step"] < start]
    steps = [r for r in _read_jsonl(steps_path) if r["controller_step"] < start]
    hand_rows = _read_jsonl(workdir / "hand_designed.jsonl")
    if jax.process_count() > 1:  # every process has read before process 0 writes
        multihost_utils.sync_global_devices("cnnjax.nas: workdir read")
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "search_config.json").write_text(json.dumps(cfg.identity(), indent=1))
        _write_jsonl(children_path, children)
        _write_jsonl(steps_path, steps)

    num_classes, channels = split.num_classes, split.channels
    say(f"NAS ({cfg.mode}) on {cfg.dataset}: {len(split.train_y)} train / {len(split.val_y)} "
        f"validation images held out of the training split, {image_size}x{image_size}x"
        f"{channels}; {space.num_layers} layers, {space.num_children():.3g} children in the "
        f"space; {total} controller steps x {m} children"
        + (f", resuming at step {start}" if start else "") + f"; workdir {workdir}")

    hand = hand_designed(cfg, split, image_size, workdir, say, hand_rows) if start < total \
        else hand_rows
    end = total if stop_after is None else min(total, start + stop_after)
    if rewarder is not None and start == 0 and end > 0 and cfg.shared_warmup:
        t0 = time.perf_counter()  # saved with step 1's checkpoint: a kill before it redoes it
        state["shared"] = rewarder.warm_up(state["shared"])
        say(f"warm-up: {cfg.shared_warmup} supergraph steps through uniformly random children "
            f"({time.perf_counter() - t0:.1f} s)")
    try:
        for t in range(start, end):
            t0 = time.perf_counter()
            cstate = state["controller"]
            decisions, _, _ = sampler(cstate.params, reinforce.step_key(cfg.seed, t))
            decisions = np.asarray(decisions)
            if rewarder is not None:
                state["shared"] = rewarder.train(state["shared"], decisions[:extra], t)
            decisions = decisions[extra:]
            specs = [decode(space, d) for d in decisions]
            if rewarder is not None:
                accuracies = rewarder.accuracies(state["shared"], decisions, t)
            else:
                accuracies = trainer([build(s, num_classes=num_classes, in_channels=channels)
                                      for s in specs],
                                     [child_seed(cfg.seed, t, k) for k in range(len(specs))])
            rewards = [float(a) ** cfg.reward_power for a in accuracies]
            state["controller"], metrics = update(cstate, jnp.asarray(decisions),
                                                  jnp.asarray(rewards, jnp.float32))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            rows = []
            for k, (spec, acc, reward) in enumerate(zip(specs, accuracies, rewards)):
                prof = profile(build(spec, num_classes=num_classes, in_channels=channels),
                               image_size)
                rows.append({"controller_step": t, "child": k, "name": spec.name,
                             "reward": reward, "accuracy": acc, "params": prof.params,
                             "macs": prof.macs, "spec": spec.to_json(),
                             **(trainer.where[k] if rewarder is None else {})})
            children += rows
            best = best_row(children)
            step_row = {"controller_step": t, "mean_reward": float(np.mean(rewards)),
                        "baseline": metrics["baseline"], "entropy": metrics["entropy"],
                        "best_reward": best["reward"], "best": best["name"]}
            steps.append(step_row)
            if main:
                _append_jsonl(children_path, rows)
                _append_jsonl(steps_path, [step_row])
                (workdir / "best_spec.json").write_text(json.dumps(best["spec"], indent=1)
                                                        + "\n")
            checkpoints.save(t + 1, jax.device_get(state),
                             {"identity": cfg.identity(), "controller_step": t + 1})
            say(f"step {t + 1}/{total}  mean reward {step_row['mean_reward']:.4f}"
                f"  baseline {metrics['baseline']:.4f}  entropy {metrics['entropy']:.2f}  best "
                f"{best['reward']:.4f} ({best['name']}, {best['macs'] / 1e6:.3f}M MACs)  "
                f"{time.perf_counter() - t0:.1f} s")
    finally:
        checkpoints.close()
    if main:
        draw(workdir, children, steps, hand, cfg)
    best = best_row(children)
    summary = {"mode": cfg.mode, "controller_steps": len(steps), "children": len(children),
               "wall_s": time.perf_counter() - t_start, "best": best,
               "first_mean_reward": steps[0]["mean_reward"] if steps else None,
               "last_mean_reward": steps[-1]["mean_reward"] if steps else None,
               "hand_designed": hand, "workdir": str(workdir)}
    if len(steps) < total:
        say(f"stopped at controller step {len(steps)}/{total}; rerun to resume")
    elif best is not None:
        say(f"done: best child {best['name']} reward {best['reward']:.4f} (validation accuracy "
            f"{best['accuracy']:.2%}), {best['params']:,} params, {best['macs']:,} MACs; "
            f"{summary['wall_s']:.0f} s; {workdir / 'best_spec.json'}")
    return summary


def hand_designed(cfg: SearchConfig, split: Holdout, image_size: int, workdir: pathlib.Path,
                  say, done: list[dict] | None = None) -> list[dict]:
    """The registered models of --hand_designed trained as a child is (same data, steps,
    optimizer, BN recalibration), once per workdir: hand_designed.jsonl (`done`: its rows,
    read by the caller; process 0 appends)."""
    path = workdir / "hand_designed.jsonl"
    rows = {r["arch"]: r for r in (_read_jsonl(path) if done is None else done)}
    trainer = None
    for name in cfg.hand_designed_names():
        if name in rows:
            continue
        trainer = trainer or ChildTrainer(cfg, split, image_size)
        model = create_model(name, num_classes=split.num_classes, in_channels=split.channels)
        if model.min_input_size > image_size:
            say(f"{name} needs {model.min_input_size}x{model.min_input_size} inputs; left out")
            continue
        t0 = time.perf_counter()
        acc = trainer([model], [child_seed(cfg.seed, -1, len(rows))])[0]
        prof = profile(model, image_size)
        rows[name] = {"arch": name, "accuracy": acc, "params": prof.params, "macs": prof.macs,
                      "steps": cfg.child_steps}
        if jax.process_index() == 0:
            _append_jsonl(path, [rows[name]])
        say(f"hand-designed {name}: validation accuracy {acc:.2%} after {cfg.child_steps} steps, "
            f"{prof.params:,} params, {prof.macs:,} MACs ({time.perf_counter() - t0:.1f} s)")
    return [rows[n] for n in cfg.hand_designed_names() if n in rows]


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
