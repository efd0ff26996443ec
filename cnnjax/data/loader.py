"""Deterministic, topology-independent batches: `Loader.batch(step)` is a pure function of
(dataset, seed, step), so the step number is the whole data position a checkpoint must hold.

Train: epoch e = step // steps_per_epoch shuffles the split with a permutation keyed by (seed, e);
global batch `step` is the next global_batch_size rows of it (remainder dropped) and process p of
P takes its contiguous 1/P of them. Each example's crop and flip are keyed by (seed, e, example),
so concatenating the processes' batches gives exactly the one-process batch.
Eval: the split in order, every example once, the last batch padded with zeros and mask 0.

In-memory splits (digits, CIFAR) are cropped and resized in NumPy (`transforms`); photos are
decoded on tf.data (`records`) from the same per-example boxes.
"""
from __future__ import annotations

import math
import queue
import threading
from typing import Iterator

import numpy as np

from cnnjax.data import records, sources, transforms

_SYNTHETIC_POOL = 16  # distinct synthetic images; examples pick one by a hash of their index


def dataset_info(name: str, data_dir: str | None = None) -> sources.DatasetInfo:
    """Shape facts of `name`, preparing it in data_dir first when needed and possible (the
    embedded digits always are); else DatasetUnavailable within seconds, never a network hang."""
    return sources.dataset_info_cached(name, sources.default_data_dir(data_dir))


def default_image_size(info: sources.DatasetInfo, min_input_size: int = 1) -> int:
    """Native size for fixed-size datasets, at least 32 (8x8 digits are too small for any of
    the classic trunks) and at least the model's minimum; 224 for variable-size photos."""
    return max(info.image_size or 224, 32, min_input_size)


class Loader:
    """Batches of one split for one process. See the module docstring for the exact order."""

    def __init__(self, name: str, split: str = "train", *, data_dir: str | None = None,
                 image_size: int | None = None, global_batch_size: int = 128,
                 train: bool | None = None, seed: int = 0, process_index: int = 0,
                 process_count: int = 1, prefetch: int = 2, workers: int | None = None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive "
                             f"multiple of process_count {process_count}")
        if seed < 0:
            raise ValueError("seed must be >= 0")
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        self.name, self.split, self.seed = name, split, int(seed)
        self.data_dir = sources.default_data_dir(data_dir)
        self.info = dataset_info(name, self.data_dir)
        self.image_size = int(image_size or default_image_size(self.info))
        self.train = split == "train" if train is None else bool(train)
        self.global_batch_size = global_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = global_batch_size // process_count
        self.prefetch = max(1, prefetch)
        self.workers = workers or records.default_workers()

        settings = sources.parse_synthetic(name)
        if settings is not None:
            self._spec = None
            self.num_examples = settings["num_train" if split == "train" else "num_test"]
            self._pool = self._synthetic_pool(settings["channels"])
        else:
            self._spec = sources.get_spec(name)
            self._source = sources.open_split(
                name, self.data_dir, "train" if split == "train" else self._spec.test_split)
            self.num_examples = len(self._source)
            std = np.asarray(self._spec.std, np.float32)
            self._scale = 1.0 / (255.0 * std)            # (x / 255 - mean) / std = x*scale + offset
            self._offset = -np.asarray(self._spec.mean, np.float32) / std
        if self.train:
            self.steps_per_epoch = self.num_examples // global_batch_size
            if self.steps_per_epoch == 0:
                raise ValueError(f"global_batch_size {global_batch_size} exceeds the "
                                 f"{self.num_examples} examples of {name}/{split}")
        else:
            self.steps_per_epoch = math.ceil(self.num_examples / global_batch_size)
        self._perms: dict[int, np.ndarray] = {}

    # --- which examples ---------------------------------------------------------------------

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = transforms.permutation(transforms.hash_key(self.seed, epoch, 0),
                                          self.num_examples)
            self._perms = {epoch: perm}  # one epoch at a time; rebinding is thread-safe
        return perm

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices of the whole global batch `step` (all processes), -1 for padding."""
        if step < 0:
            raise IndexError(f"step {step} < 0")
        b = self.global_batch_size
        if self.train:
            epoch, pos = divmod(step, self.steps_per_epoch)
            return self._permutation(epoch)[pos * b:(pos + 1) * b].astype(np.int64)
        if step >= self.steps_per_epoch:
            raise IndexError(f"eval step {step} >= steps_per_epoch {self.steps_per_epoch}")
        rows = np.arange(step * b, (step + 1) * b, dtype=np.int64)
        return np.where(rows < self.num_examples, rows, -1)

    def indices(self, step: int) -> np.ndarray:
        """This process's rows of global batch `step`: example indices, -1 for padding."""
        lo = self.process_index * self.local_batch_size
        return self.global_indices(step)[lo:lo + self.local_batch_size]

    # --- batches ----------------------------------------------------------------------------

    @property
    def decodes_records(self) -> bool:
        """Whether batches are decoded on tf.data (encoded photos) rather than in NumPy."""
        return isinstance(getattr(self, "_source", None), sources.EncodedSource)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`: image float32 (b, S, S, C) normalised,
        label int32 (b,), mask float32 (b,) (0 on eval padding)."""
        if self.decodes_records:
            return next(self._decoded(range(step, step + 1)))[1]
        idx = self.indices(step)
        valid = idx >= 0
        s, b = self.image_size, self.local_batch_size
        image = np.zeros((b, s, s, self.info.channels), np.float32)
        label = np.zeros(b, np.int32)
        rows = idx[valid]
        if self._spec is None:
            image[valid], label[valid] = self._synthetic(rows)
        else:
            u = None
            if self.train:
                key = transforms.hash_key(self.seed, step // self.steps_per_epoch, 1)
                u = transforms.uniforms(key, rows, transforms.NUM_DRAWS)
            image[valid], label[valid] = self._load(rows, u)
        return {"image": image, "label": label, "mask": valid.astype(np.float32)}

    def _load(self, rows: np.ndarray, u: np.ndarray | None):
        """Crop, resize and normalise in-memory examples."""
        images, labels = self._source.images[rows], self._source.labels[rows]
        n, h, w, _ = images.shape
        boxes, flip = self._boxes(np.full(n, h), np.full(n, w), u)
        out = transforms.resize_batch(images, boxes, self.image_size, flip)
        return out * self._scale + self._offset, labels

    def plan(self, step: int) -> tuple[np.ndarray, ...]:
        """What the record path decodes for `step`, one row per local example: encoded images
        (object array of bytes, b"" for padding), geometry int32 (train: the crop window
        (y, x, h, w); eval: `records.eval_geometry`), flips, labels and mask."""
        idx = self.indices(step)
        valid = idx >= 0
        rows = idx[valid]
        b = self.local_batch_size
        encoded = np.full(b, b"", object)
        geometry = np.zeros((b, 4), np.int32)
        flip = np.zeros(b, bool)
        label = np.zeros(b, np.int32)
        if len(rows):
            images, label[valid] = self._source.read(rows)
            encoded[valid] = images
            hw = np.array([records.image_size_of(im) for im in images])
            if self.train:
                key = transforms.hash_key(self.seed, step // self.steps_per_epoch, 1)
                u = transforms.uniforms(key, rows, transforms.NUM_DRAWS)
                boxes, flips = self._boxes(hw[:, 0], hw[:, 1], u)
                geometry[valid] = records.windows(boxes, hw[:, 0], hw[:, 1])
                if flips is not None:
                    flip[valid] = flips
            else:
                geometry[valid] = records.eval_geometry(hw[:, 0], hw[:, 1], self.image_size,
                                                        self._spec.eval_crop)
        return encoded, geometry, flip, label, valid.astype(np.float32)

    def _decoded(self, steps: range) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        return records.iterate(
            self.plan, steps, size=self.image_size, channels=self.info.channels,
            train=self.train, antialias=self._spec.train_antialias,
            batch_size=self.local_batch_size, scale=self._scale,
            offset=self._offset, workers=self.workers, prefetch=self.prefetch,
            describe=lambda step: f"{self.name}/{self.split} step {step}")

    def _boxes(self, heights, widths, u):
        spec = self._spec
        if u is None:
            return transforms.center_crop_boxes(heights, widths, spec.eval_crop), None
        boxes, flip_draw = transforms.random_resized_crop_boxes(
            u, heights, widths, spec.train_scale, spec.train_ratio)
        return boxes, (flip_draw < 0.5) if spec.flip else None

    def _synthetic_pool(self, channels: int) -> np.ndarray:
        """A few fixed random uint8 images at the output size, normalised to [-1, 1]."""
        rng = np.random.default_rng(0)
        shape = (_SYNTHETIC_POOL, self.image_size, self.image_size, channels)
        return rng.integers(0, 256, shape, np.uint8).astype(np.float32) / 127.5 - 1.0

    def _synthetic(self, rows: np.ndarray):
        """Example i: image pool[h(i) % 16] and label h'(i) % num_classes; one gather, no
        per-pixel work, the same for any seed or topology."""
        h = transforms.hash_indices(transforms.hash_key(0x5EED), rows)
        pick = (h % np.uint64(_SYNTHETIC_POOL)).astype(np.intp)
        label = ((h >> np.uint64(32)) % np.uint64(self.info.num_classes)).astype(np.int32)
        return self._pool[pick], label

    # --- iteration --------------------------------------------------------------------------

    def iterate(self, start_step: int = 0, num_steps: int | None = None
                ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(step, batch(step)) from start_step: num_steps of them, or forever (train) / to the
        end of the split (eval) when None; built `prefetch` steps ahead in a daemon thread."""
        stop = None if num_steps is None else start_step + num_steps
        if not self.train:
            stop = self.steps_per_epoch if stop is None else min(stop, self.steps_per_epoch)
        if self.decodes_records:
            yield from self._decoded(range(start_step, (1 << 62) if stop is None else stop))
            return
        q: queue.Queue = queue.Queue(self.prefetch)
        done = threading.Event()

        def put(item) -> bool:
            while not done.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():
            step = start_step
            try:
                while stop is None or step < stop:
                    if not put((step, self.batch(step))):
                        return
                    step += 1
                put(None)
            except BaseException as e:  # re-raised in the consumer
                put(e)

        threading.Thread(target=produce, name="cnnjax-prefetch", daemon=True).start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            done.set()
