"""Fake copies of named TFDS datasets, written where and as the real ones would be: the offline
stand-in that runs the real TFDS path end to end.

    python -m cnnjax.data.fake imagenet2012 --data_dir=/tmp/fake_in [--num_train=2000]
        [--num_test=500] [--seed=0] [--overwrite]
    python -m experiments.train --dataset=imagenet2012 --data_dir=/tmp/fake_in ...
    python -m experiments.benchmark --mode=input --dataset=imagenet2012 --data_dir=/tmp/fake_in ...

Each fake is prepared by a subclass of the real builder (`tfds.builder_cls(name)`) that replaces
only where examples come from. Name, version, config, features, label names and file format
(array_record) are the real ones, so `tfds.builder(name, data_dir=DIR)` and
`cnnjax.data.dataset_info(name, data_dir=DIR)` find the dataset prepared and read it exactly as
they would the real one. Nothing is downloaded and no manual files are needed.

Photos (imagenet2012, imagenette) are JPEG at quality 90 in ImageNet's usual sizes (mostly
500x375): soft-edged shapes on a smooth colour field, with texture and grain of random strength,
so that they compress like photos (~80 KB on average, most 55-100 KB; flat colour would be far
smaller, white noise far larger). CIFAR-10's are 32x32 PNG. Example i of a split has class
i % num_classes; the bytes written depend only on (name, sizes, seed).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import os
import shutil
import sys
import time
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageChops, ImageDraw

from cnnjax import flags
from cnnjax.data import sources

JPEG_QUALITY = 90
# (height, width) of ImageNet's commonest shapes and how often each is drawn; the rest of the
# time each side is drawn uniformly from RANDOM_SIDE.
PHOTO_SHAPES = ((375, 500), (500, 375), (333, 500), (500, 333), (500, 500))
PHOTO_SHAPE_P = (0.45, 0.12, 0.15, 0.04, 0.06)
RANDOM_SIDE = (300, 500)
CHUNK = 64  # examples made in parallel at a time
MODULE = "cnnjax.data.fake"  # also when run as __main__
# What the real cifar10 builder reads from batches.meta.txt in the download.
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")


# --- pictures ------------------------------------------------------------------------------------

def _field(rng: np.random.Generator, height: int, width: int, cell: int,
           channels: int) -> np.ndarray:
    """float32 (height, width, channels) in [-1, 1]: random values every `cell` pixels,
    interpolated smoothly (bicubic) in between."""
    grid = rng.integers(0, 256, (max(2, height // cell), max(2, width // cell), channels),
                        np.uint8)
    small = Image.fromarray(grid[..., 0] if channels == 1 else grid)
    big = np.asarray(small.resize((width, height), Image.BICUBIC), np.float32)
    return big.reshape(height, width, channels) / 127.5 - 1.0


def picture(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """An RGB picture with a photo's structure: ellipses and polygons over a smooth colour field,
    drawn at a random 40-80% scale and enlarged (soft edges), then fine texture and grain whose
    strength varies between pictures."""
    scale = rng.uniform(0.4, 0.8)
    h, w = max(2, round(height * scale)), max(2, round(width * scale))
    image = Image.fromarray(np.uint8(127.5 * (_field(rng, h, w, 75, 3) + 1.0)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(10, 40)):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(1, w / 3), rng.uniform(1, h / 3)
        colour = tuple(rng.integers(0, 256, 3).tolist())
        if rng.random() < 0.5:
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 7)))
            draw.polygon(list(zip((cx + rx * np.cos(angles)).tolist(),
                                  (cy + ry * np.sin(angles)).tolist())), fill=colour)
    image = image.resize((width, height), Image.BILINEAR)
    grain = rng.integers(0, 256, (height, width), np.uint8) / np.float32(127.5) - 1
    detail = rng.uniform(0.5, 2.0) * (20 * _field(rng, height, width, 3, 1)[..., 0] + 12 * grain)
    grey = Image.fromarray(np.uint8(np.clip(detail + 128, 0, 255)))
    return ImageChops.add(image, Image.merge("RGB", (grey,) * 3), offset=-128)


def photo_shape(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) drawn like ImageNet's: see PHOTO_SHAPES."""
    k = rng.choice(len(PHOTO_SHAPES) + 1, p=PHOTO_SHAPE_P + (1 - sum(PHOTO_SHAPE_P),))
    if k < len(PHOTO_SHAPES):
        return PHOTO_SHAPES[k]
    height, width = rng.integers(RANDOM_SIDE[0], RANDOM_SIDE[1] + 1, 2).tolist()
    return height, width


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _photo_jpeg(rng: np.random.Generator) -> bytes:
    return _encode(picture(rng, *photo_shape(rng)), "JPEG", quality=JPEG_QUALITY)


def _cifar_png(rng: np.random.Generator) -> bytes:
    return _encode(picture(rng, 32, 32), "PNG")


# --- records -------------------------------------------------------------------------------------

def _ilsvrc_file(split: str, index: int, synset: str) -> str:
    """Named as ILSVRC2012's files: n01440764_10026.JPEG (train), ILSVRC2012_val_00000001.JPEG."""
    return f"{synset}_{index}.JPEG" if split == "train" else f"ILSVRC2012_val_{index + 1:08d}.JPEG"


def _imagenet_record(split: str, index: int, example: dict, label_name: str
                     ) -> tuple[str, dict]:
    file_name = _ilsvrc_file(split, index, label_name)
    return file_name, {**example, "file_name": file_name}


def _imagenette_record(split: str, index: int, example: dict, label_name: str
                       ) -> tuple[str, dict]:
    return _ilsvrc_file(split, index, label_name), example


def _cifar_record(split: str, index: int, example: dict, label_name: str) -> tuple[int, dict]:
    return index, {**example, "id": f"{split}_{index:05d}"}


@dataclasses.dataclass(frozen=True)
class Fake:
    """How one dataset's fake examples are made."""
    splits: tuple[str, str]     # (train, test) split names of the real builder
    defaults: tuple[int, int]   # examples per split unless told otherwise
    image: Callable[[np.random.Generator], bytes]  # encoded as the real files are
    # (split, index, {"image", "label"}, label name) -> (key, record with the real features)
    record: Callable[[str, int, dict, str], tuple[str | int, dict]]
    label_names: tuple[str, ...] = ()  # set on the label feature as the real builder does


_FAKES = {
    "cifar10": Fake(("train", "test"), (1000, 200), _cifar_png, _cifar_record, CIFAR10_NAMES),
    "imagenet2012": Fake(("train", "validation"), (2000, 500), _photo_jpeg, _imagenet_record),
    "imagenette": Fake(("train", "validation"), (500, 200), _photo_jpeg, _imagenette_record),
}
FAKES = tuple(sorted(_FAKES))


@functools.cache
def _builder_cls(dataset: str) -> type:
    """The real builder of `dataset` with fake examples. Same name and metadata folder, so it
    writes exactly where, and what, the real one would; unregistered, so tfds.builder(dataset)
    still means the real one."""
    real = tfds.builder_cls(dataset)
    fake = _FAKES[dataset]

    class FakeBuilder(real, skip_registration=True):
        name = real.name
        pkg_dir_path = real._get_pkg_dir_path()
        __module__ = MODULE  # dataset_info.json's moduleName: how a fake is told from the real

        def __init__(self, *, counts: dict[str, int], seed: int, **kwargs):
            self._counts, self._seed = counts, seed
            super().__init__(**kwargs)

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download, no manual files
            if fake.label_names:
                self.info.features["label"].names = list(fake.label_names)
            return {split: self._generate_examples(split) for split in fake.splits}

        def _generate_examples(self, split: str):
            label = self.info.features["label"]
            split_id = fake.splits.index(split)

            def example(index: int) -> tuple[str | int, dict]:
                rng = np.random.default_rng((self._seed, split_id, index))
                y = index % label.num_classes
                return fake.record(split, index, {"image": fake.image(rng), "label": y},
                                   label.int2str(y))

            n = self._counts[split]
            for start in range(0, n, CHUNK):
                yield from sources.thread_pool().map(example, range(start, min(n, start + CHUNK)))

    return FakeBuilder


def _counts(name: str, num_train: int | None, num_test: int | None) -> dict[str, int]:
    """Examples per split of the fake of `name`; ValueError for an unknown name or size < 1."""
    if name not in _FAKES:
        raise ValueError(f"no fake of dataset {name!r}; fakes exist of {', '.join(FAKES)}")
    fake = _FAKES[name]
    counts = {}
    for what, split, n, default in zip(("num_train", "num_test"), fake.splits,
                                       (num_train, num_test), fake.defaults):
        n = default if n is None else n
        if not flags.POSITIVE_INT.ok(n):
            raise ValueError(f"{what}={n!r} must be a positive integer")
        counts[split] = n
    return counts


def _describe(builder) -> str:
    """What the builder's data_path holds, in words, for the refusal to overwrite it."""
    if not sources._is_prepared(builder):
        return "a folder that is not a prepared dataset (no dataset_info.json)"
    splits = ", ".join(f"{s.num_examples} {s.name}" for s in builder.info.splits.values())
    kind = "fake" if builder.info.module_name == MODULE else "real"
    return f"a prepared {kind} {builder.name} {builder.version} ({splits} examples)"


def write_fake(name: str, data_dir: str, *, num_train: int | None = None,
               num_test: int | None = None, seed: int = 0, overwrite: bool = False) -> str:
    """Prepares the fake of `name` (one of FAKES) in data_dir as the real builder would and
    returns its directory, data_dir/<name>/[<config>/]<version>. num_test counts the test split
    (validation for the ImageNets); None means the dataset's default. ValueError for a bad
    argument, and for a dataset already there unless `overwrite` (which replaces that directory
    and nothing else)."""
    counts = _counts(name, num_train, num_test)
    if not flags.NON_NEGATIVE_INT.ok(seed):
        raise ValueError(f"seed={seed!r} must be an integer >= 0")
    flags.check_directory("data_dir", data_dir)
    data_dir = sources.default_data_dir(data_dir)

    def builder():
        return _builder_cls(name)(counts=counts, seed=seed, data_dir=data_dir)

    with sources._file_lock(os.path.join(data_dir, f".{name}.cnnjax-lock")):  # as the real path
        fake = builder()
        if fake.data_path.exists():
            if not overwrite:
                raise ValueError(f"{fake.data_path} already holds {_describe(fake)}; pass "
                                 "overwrite=True (--overwrite) to replace it")
            shutil.rmtree(fake.data_path)
            fake = builder()
        config = tfds.download.DownloadConfig(try_download_gcs=False)
        with sources._silenced():
            fake.download_and_prepare(file_format="array_record", download_config=config)
    return os.fspath(fake.data_path)


def main(argv: list[str] | None = None) -> int:
    p = flags.ArgumentParser(prog="python -m cnnjax.data.fake", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help=f"one of {', '.join(FAKES)}")
    p.add_argument("--data_dir", required=True, help="written to DATA_DIR/NAME/...")
    def defaults(i: int) -> str:
        return ", ".join(f"{k} {f.defaults[i]}" for k, f in _FAKES.items())

    p.add_argument("--num_train", type=int, help=f"train examples (default: {defaults(0)})")
    p.add_argument("--num_test", type=int,
                   help=f"test examples, validation for the ImageNets (default: {defaults(1)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset if one of that name and version is there")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        counts = _counts(args.name, args.num_train, args.num_test)
        path = write_fake(args.name, args.data_dir, num_train=args.num_train,
                          num_test=args.num_test, seed=args.seed, overwrite=args.overwrite)
    except ValueError as e:
        return flags.fail(e)
    splits = " + ".join(f"{n} {split}" for split, n in counts.items())
    print(f"wrote a fake {args.name} ({splits} examples, seed {args.seed}) to {path} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
