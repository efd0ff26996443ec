"""Which datasets exist, how they are prepared without ever hanging on the network, and how a
split is opened for reading by index.

Named TFDS datasets are read through `as_data_source` (array_record: random access, no
TensorFlow). A dataset that is not prepared is downloaded only after a bounded probe of its
download host succeeds; otherwise `DatasetUnavailable` says how to prepare it. Preparation runs
under a file lock in the data dir, so processes that start together prepare it once.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import io
import math
import os
import socket
import threading
import urllib.parse
from typing import Any, Callable

import numpy as np

PROBE_TIMEOUT_S = 5.0  # DNS here retries for ~200 s; never wait on it longer than this
NUM_THREADS = min(16, os.cpu_count() or 1)
IN_MEMORY_BYTES = 1 << 30  # fixed-size splits up to this size are decoded once into RAM
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetUnavailable(ValueError):
    """The dataset is neither prepared in the data dir nor preparable here; says how to fix it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to build the model and count steps. image_size: native H = W if
    every image has it, else None."""
    name: str
    num_classes: int
    num_train: int
    num_test: int
    channels: int
    image_size: int | None


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one dataset is found, prepared and augmented."""
    tfds_name: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    test_split: str = "test"
    train_scale: tuple[float, float] = (0.08, 1.0)   # random-resized-crop area fraction
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    train_antialias: bool = False     # photos: antialias the train crop's resize (see records)
    eval_crop: float | None = 0.875   # None: resize the whole image (tiny fixed-size datasets)
    make_builder: Callable[[str], Any] | None = None  # default: tfds.builder(tfds_name, ...)
    offline: bool = False             # prepared from local files only (no probe, no download)
    manual_files: tuple[str, ...] = ()  # must lie in <data_dir>/downloads/manual
    manual_source: str = ""           # where a person gets them


def _digits_builder(data_dir: str):
    from cnnjax.data.digits import CnnjaxDigits
    return CnnjaxDigits(data_dir=data_dir)


DATASETS: dict[str, Spec] = {
    # Mean/std of digits' own train split (0..255 scale / 255), measured from the prepared data.
    # Milder crops and no flip: an 8x8 digit loses its identity under 0.08 crops or mirroring.
    "digits": Spec("cnnjax_digits", mean=(0.3056,), std=(0.3760,), train_scale=(0.5, 1.0),
                   flip=False, eval_crop=None, make_builder=_digits_builder, offline=True),
    "mnist": Spec("mnist", mean=(0.1307,), std=(0.3081,), train_scale=(0.5, 1.0), flip=False,
                  eval_crop=None),
    # 0.25, not 0.08: at 32x32 an 8%-area crop is 9x9 pixels of a 32x32 photo.
    "cifar10": Spec("cifar10", train_scale=(0.25, 1.0), eval_crop=None),
    "imagenette": Spec("imagenette", test_split="validation"),
    "imagenet2012": Spec("imagenet2012", test_split="validation",
                         manual_files=("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
                         manual_source="https://image-net.org/download-images, after registering"),
}
SYNTHETIC = "synthetic"
# ImageNet-1k sized by default; "synthetic:num_classes=10,channels=1,num_train=1000" overrides.
SYNTHETIC_DEFAULTS = {"num_classes": 1000, "channels": 3, "num_train": 1_281_167,
                      "num_test": 50_000}


def supported() -> list[str]:
    return sorted(DATASETS) + [SYNTHETIC]


def default_data_dir(data_dir: str | os.PathLike | None) -> str:
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR",
                                  os.path.join("~", "tensorflow_datasets"))
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def parse_synthetic(name: str) -> dict[str, int] | None:
    """The settings of a "synthetic[:k=v,...]" name, or None for any other name."""
    base, _, options = name.partition(":")
    if base != SYNTHETIC:
        return None
    settings = dict(SYNTHETIC_DEFAULTS)
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key not in settings or not value.isdigit() or int(value) < 1:
            raise ValueError(f"bad synthetic option {item!r}: use positive ints for "
                             f"{', '.join(settings)}, e.g. synthetic:num_classes=10,channels=1")
        settings[key] = int(value)
    return settings


def get_spec(name: str) -> Spec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; supported: {', '.join(supported())} "
                         "(synthetic takes options, e.g. synthetic:num_classes=10)")
    return DATASETS[name]


# --- preparation -------------------------------------------------------------------------------

def _builder(spec: Spec, data_dir: str):
    if spec.make_builder is not None:
        return spec.make_builder(data_dir)
    import tensorflow_datasets as tfds
    return tfds.builder(spec.tfds_name, data_dir=data_dir)


def _is_prepared(builder) -> bool:
    # builder.is_prepared() also works but logs a warning for every missing variant folder.
    # dataset_info.json is written last, inside a temp dir that TFDS renames into place.
    return (builder.data_path / "dataset_info.json").exists()


def _download_host(builder) -> tuple[str, int]:
    urls = list(builder.url_infos or ())
    url = urllib.parse.urlparse(urls[0] if urls else "https://storage.googleapis.com")
    return url.hostname or "storage.googleapis.com", url.port or (
        80 if url.scheme == "http" else 443)


def reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds. Name resolution
    cannot be given a timeout, so the attempt runs in a daemon thread that is abandoned."""
    ok = threading.Event()

    def attempt():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.set()
        except OSError:
            pass

    threading.Thread(target=attempt, name="cnnjax-net-probe", daemon=True).start()
    return ok.wait(timeout)


@contextlib.contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # waits while another process prepares
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _silenced():
    """TFDS prints banners to stdout and progress bars to stderr; the library prints nothing."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _build_command(spec: Spec, data_dir: str) -> str:
    return f"tfds build {spec.tfds_name} --data_dir={data_dir} --file_format=array_record"


def prepared_builder(name: str, spec: Spec, data_dir: str):
    """A builder whose data is prepared in data_dir, preparing it first when that is possible
    here; else DatasetUnavailable. Never calls download_and_prepare without the network."""
    builder = _builder(spec, data_dir)
    if _is_prepared(builder):
        return builder
    manual_dir = os.path.join(data_dir, "downloads", "manual")
    if spec.manual_files:
        missing = [f for f in spec.manual_files
                   if not os.path.exists(os.path.join(manual_dir, f))]
        if missing:
            raise DatasetUnavailable(
                f"dataset {name!r} is not prepared in {data_dir} and needs a manual download: "
                f"put {' and '.join(spec.manual_files)} (from {spec.manual_source}) in "
                f"{manual_dir} (missing: {', '.join(missing)}), "
                f"then prepare it with\n  {_build_command(spec, data_dir)}\n(or run again: "
                "it is prepared on first use once the files are there).")
    elif not spec.offline:
        host, port = _download_host(builder)
        if not reachable(host, port):
            raise DatasetUnavailable(
                f"dataset {name!r} is not prepared in {data_dir} and cannot be downloaded: "
                f"{host}:{port} is unreachable from here. On a machine with network access run"
                f"\n  {_build_command(spec, data_dir)}\nand copy {data_dir}/{spec.tfds_name} "
                "to the same place here, or pass --data_dir=DIR where it is already prepared "
                "(array_record format).")
    import tensorflow_datasets as tfds

    with _file_lock(os.path.join(data_dir, f".{spec.tfds_name}.cnnjax-lock")):
        builder = _builder(spec, data_dir)
        if not _is_prepared(builder):  # else another process finished it while we waited
            config = tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=manual_dir)
            with _silenced():
                builder.download_and_prepare(file_format="array_record",
                                             download_config=config)
    return _builder(spec, data_dir)


def _random_access(builder) -> bool:
    from tensorflow_datasets.core import file_adapters
    formats = builder.info.available_file_formats()
    return bool(formats & file_adapters.FileFormat.with_random_access())


def _fixed_shape(builder) -> tuple[int, ...] | None:
    shape = tuple(builder.info.features["image"].shape)
    return shape if None not in shape else None


def _split_bytes(builder, split: str) -> float:
    shape = _fixed_shape(builder)
    n = builder.info.splits[split].num_examples
    return math.prod(shape) * n if shape else math.inf


def check_readable(name: str, spec: Spec, builder, data_dir: str) -> None:
    """Sequential-only files (tfrecord) are fine when small and fixed-size (read into RAM once
    with TensorFlow); otherwise ask for array_record."""
    if _random_access(builder):
        return
    if max(_split_bytes(builder, s) for s in ("train", spec.test_split)) <= IN_MEMORY_BYTES:
        return
    raise DatasetUnavailable(
        f"dataset {name!r} in {data_dir} is prepared as {builder.info.file_format.value}, "
        "which has no random access; it is too large to read into memory. Prepare it again "
        f"with --file_format=array_record into another data dir:\n  "
        f"{_build_command(spec, '<new_data_dir>')}\n(or move {builder.data_path} aside and "
        "run again with network access).")


@functools.lru_cache(maxsize=32)
def dataset_info_cached(name: str, data_dir: str) -> DatasetInfo:
    settings = parse_synthetic(name)
    if settings is not None:
        return DatasetInfo(name, settings["num_classes"], settings["num_train"],
                           settings["num_test"], settings["channels"], None)
    spec = get_spec(name)
    builder = prepared_builder(name, spec, data_dir)
    check_readable(name, spec, builder, data_dir)
    info = builder.info
    shape = info.features["image"].shape
    size = shape[0] if shape[0] is not None and shape[0] == shape[1] else None
    return DatasetInfo(name, info.features["label"].num_classes,
                       info.splits["train"].num_examples,
                       info.splits[spec.test_split].num_examples, shape[-1], size)


# --- reading -----------------------------------------------------------------------------------

class ArraySource:
    """A whole split in memory: uint8 (N, H, W, C) images and int32 labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)


class RecordSource:
    """Random access to a split through TFDS (array_record); images decoded on read."""

    def __init__(self, data_source, channels: int):
        self.source, self.channels = data_source, channels

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        records = self.source.__getitems__([int(i) for i in indices])
        images = [self._hwc(r["image"]) for r in records]
        return images, np.array([r["label"] for r in records], np.int32)

    def _hwc(self, image: np.ndarray) -> np.ndarray:
        """(H, W, channels) whatever the file held (a grey or RGBA image in an RGB set)."""
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] == self.channels:
            return image
        if image.shape[-1] == 1:
            return np.repeat(image, self.channels, axis=-1)
        return image[..., :self.channels]


class EncodedSource:
    """Random access to a split through TFDS (array_record), images left encoded (bytes):
    the record path decodes them on tf.data, cropping while it decodes."""

    def __init__(self, data_source):
        self.source = data_source

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        records = self.source.__getitems__([int(i) for i in indices])
        return [r["image"] for r in records], np.array([r["label"] for r in records], np.int32)


@functools.lru_cache(maxsize=1)
def thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    """For decoding a small split into memory once: PIL decoding releases the GIL."""
    return concurrent.futures.ThreadPoolExecutor(NUM_THREADS, thread_name_prefix="cnnjax-data")


@functools.lru_cache(maxsize=4)
def _array_split(name: str, data_dir: str, split: str) -> ArraySource:
    """Decode a small fixed-size split once (cached: train and eval loaders share it)."""
    spec = get_spec(name)
    builder = prepared_builder(name, spec, data_dir)
    if not _random_access(builder):  # small tfrecord split: TensorFlow reads it in one go
        import tensorflow_datasets as tfds
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TF's C++ INFO lines on stderr
        with _silenced():
            arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                                      shuffle_files=False))
        return ArraySource(np.asarray(arrays["image"], np.uint8).reshape(
            -1, *_fixed_shape(builder)), np.asarray(arrays["label"], np.int32))
    source = RecordSource(builder.as_data_source(split=split), _fixed_shape(builder)[-1])
    chunks = np.array_split(np.arange(len(source)), max(1, len(source) // 2048))
    parts = list(thread_pool().map(source.read, chunks))
    images = np.stack([im for part in parts for im in part[0]]) if parts else None
    return ArraySource(images, np.concatenate([p[1] for p in parts]))


def open_split(name: str, data_dir: str, split: str) -> ArraySource | EncodedSource:
    """Small fixed-size splits decoded into memory; the rest read by index, still encoded."""
    spec = get_spec(name)
    builder = prepared_builder(name, spec, data_dir)
    check_readable(name, spec, builder, data_dir)
    if _split_bytes(builder, split) <= IN_MEMORY_BYTES:
        return _array_split(name, data_dir, split)
    import tensorflow_datasets as tfds
    return EncodedSource(builder.as_data_source(
        split=split, decoders={"image": tfds.decode.SkipDecoding()}))
