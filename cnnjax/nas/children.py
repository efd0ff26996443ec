"""Children trained from scratch: the held-out validation split of the training data, and
`ChildTrainer`, which trains models with the trainer's own optimizer, step and BatchNorm
recalibration and returns their validation accuracies (hand-designed models too)."""
from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import SingleDeviceSharding

from cnnjax import data, runtime, train
from cnnjax.data import transforms
from cnnjax.models.nasnet import NASNet
from cnnjax.models.registry import create_model
from cnnjax.nas.config import SearchConfig
from cnnjax.profile import profile
from cnnjax.training import rundir

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
                runtime.jit_on(device, self._init(model), fast,
                       out_shardings=SingleDeviceSharding(device)),
                runtime.jit_on(device, train_step, False), runtime.jit_on(device, score, fast))
        return _PROGRAMS[key]

    def _init(self, model):
        """seed -> a fresh TrainState, as cnnjax.train.init_state makes it (one device)."""
        shape = (1, self.image_size, self.image_size, self.split.channels)
        return train.make_init(model, self.tx, shape)


_PROGRAMS: dict[tuple, tuple] = {}  # ChildTrainer._programs: compiled child programs


def hand_designed(cfg: SearchConfig, split: Holdout, image_size: int, workdir: pathlib.Path,
                  say, done: list[dict] | None = None) -> list[dict]:
    """The registered models of --hand_designed trained as a child is (same data, steps,
    optimizer, BN recalibration), once per workdir: hand_designed.jsonl (`done`: its rows,
    read by the caller; process 0 appends)."""
    path = rundir.JsonLines(workdir / "hand_designed.jsonl")
    rows = {r["arch"]: r for r in (path.read() if done is None else done)}
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
            path.append([rows[name]])
        say(f"hand-designed {name}: validation accuracy {acc:.2%} after {cfg.child_steps} steps, "
            f"{prof.params:,} params, {prof.macs:,} MACs ({time.perf_counter() - t0:.1f} s)")
    return [rows[n] for n in cfg.hand_designed_names() if n in rows]
