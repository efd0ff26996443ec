"""Photos (variable-size, encoded) decoded on tf.data: the record path of `Loader`.

What each example becomes is decided in NumPy, per step, exactly as for in-memory data: its
row of the global batch, its crop box and flip from the counter-based uniforms of
`transforms` (keyed by seed, epoch and example index). tf.data then does the pixel work in
parallel. Train: `decode_and_crop_jpeg` decodes only the random-resized-crop window (PNG and
other formats are decoded whole, then cropped), `tf.image.resize` (bilinear) brings it to S x S,
then the flip. Like the Flax and TensorFlow ImageNet recipes, and unlike PIL, the train resize
does not antialias by default: on 500x375 JPEGs that filter cost 1 ms an image, 40% of the
pipeline's time (Spec.train_antialias turns it on). Eval, as torchvision's Resize +
CenterCrop with PIL: the shorter side resized to S / eval_crop (256 for 224) with antialiasing,
then the centred S x S. JPEGs are decoded with the accurate integer DCT, which gives PIL's
pixels exactly. Every op is a deterministic function of its inputs and the parallel map keeps
order, so a batch is bitwise the same for any worker count, and `Loader.batch(step)` stays a
pure function of (dataset, seed, step).
"""
from __future__ import annotations

import io
import os
from typing import Callable, Iterator

import numpy as np

PLAN_DTYPES = ("string", "int32", "bool", "int32", "float32")  # bytes, geometry, flip, label, mask
DCT = "INTEGER_ACCURATE"  # libjpeg's ISLOW, as PIL: the same pixels


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def tensorflow():
    """TensorFlow, imported on first use (the digits path never needs it), kept off any GPU
    so that it takes no accelerator memory from JAX."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised: set once, earlier
        pass
    return tf


def image_size_of(encoded: bytes) -> tuple[int, int]:
    """(height, width) from an encoded image's header, without decoding its pixels."""
    from PIL import Image
    with Image.open(io.BytesIO(encoded)) as im:
        width, height = im.size
    return height, width


def windows(boxes: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Continuous (x0, y0, x1, y1) boxes as whole-pixel crop windows (y, x, h, w), int32,
    rounded to the nearest pixel edge, at least one pixel, inside the image."""
    def axis(lo, hi, size):
        start = np.clip(np.floor(lo + 0.5), 0, size - 1)
        stop = np.clip(np.floor(hi + 0.5), start + 1, size)
        return start, stop - start
    x, w = axis(boxes[:, 0], boxes[:, 2], widths)
    y, h = axis(boxes[:, 1], boxes[:, 3], heights)
    return np.stack([y, x, h, w], axis=1).astype(np.int32)


def eval_geometry(heights: np.ndarray, widths: np.ndarray, size: int,
                  fraction: float | None) -> np.ndarray:
    """torchvision's Resize(round(size / fraction)) + CenterCrop(size) as (resized height,
    resized width, top, left), int32: the shorter side scaled, the longer truncated, offsets
    rounded. fraction None: the whole image resized to size x size."""
    h, w = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    if fraction is None:
        nh = nw = np.full(len(h), size)
    else:
        short = int(round(size / fraction))
        nh = np.where(h <= w, short, (short * h / np.minimum(h, w)).astype(np.int64))
        nw = np.where(w <= h, short, (short * w / np.minimum(h, w)).astype(np.int64))
    top, left = np.round((nh - size) / 2.0), np.round((nw - size) / 2.0)
    return np.stack([nh, nw, top, left], axis=1).astype(np.int32)


def make_decoder(size: int, channels: int, train: bool, antialias: bool = False) -> Callable:
    """The per-example graph: (bytes, geometry, flip, label, mask) -> (image 0..255 float32
    S x S x C, label, mask). geometry: train, the crop window (y, x, h, w); eval, see
    `eval_geometry`. `antialias`: of the train resize (eval always antialiases). Padding rows
    (mask 0) are zeros, never decoded."""
    tf = tensorflow()

    def whole(encoded):
        return tf.cond(
            tf.io.is_jpeg(encoded),
            lambda: tf.io.decode_jpeg(encoded, channels=channels, dct_method=DCT),
            lambda: tf.io.decode_image(encoded, channels=channels, expand_animations=False))

    def crop_resize(encoded, window):
        def jpeg():
            return tf.image.decode_and_crop_jpeg(encoded, window, channels=channels,
                                                 dct_method=DCT)

        def other():
            image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
            return tf.image.crop_to_bounding_box(image, window[0], window[1], window[2],
                                                 window[3])
        image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
        return tf.image.resize(image, (size, size), method="bilinear", antialias=antialias)

    def resize_crop(encoded, geometry):
        image = tf.image.resize(whole(encoded), geometry[:2], method="bilinear",
                                antialias=True)
        return image[geometry[2]:geometry[2] + size, geometry[3]:geometry[3] + size]

    decode = crop_resize if train else resize_crop

    def example(encoded, geometry, flip, label, mask):
        image = tf.cond(mask > 0, lambda: decode(encoded, geometry),
                        lambda: tf.zeros((size, size, channels), tf.float32))
        image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
        return tf.ensure_shape(image, (size, size, channels)), label, mask

    return example


def iterate(plan: Callable[[int], tuple], steps: range, *, size: int, channels: int,
            train: bool, antialias: bool, batch_size: int, scale: np.ndarray,
            offset: np.ndarray, workers: int, prefetch: int, describe: Callable[[int], str]
            ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(step, batch) for each step of `steps`. `plan(step)` gives that step's encoded images,
    geometries, flips, labels and mask (NumPy); tf.data decodes `workers` examples at a time and
    keeps `prefetch` batches ready. Errors name the step (`describe`) and what went wrong."""
    tf = tensorflow()
    dtypes = [tf.as_dtype(d) for d in PLAN_DTYPES]

    def planned(step):
        out = tf.numpy_function(lambda s: plan(int(s)), [step], dtypes, stateful=False)
        shapes = [(batch_size,), (batch_size, 4), (batch_size,), (batch_size,), (batch_size,)]
        return tuple(tf.ensure_shape(t, s) for t, s in zip(out, shapes))

    scale_t, offset_t = tf.constant(scale, tf.float32), tf.constant(offset, tf.float32)
    ds = (tf.data.Dataset.range(steps.start, steps.stop)
          .map(planned)
          .unbatch()
          .map(make_decoder(size, channels, train, antialias), num_parallel_calls=workers,
               deterministic=True)
          .batch(batch_size, drop_remainder=True)
          .map(lambda image, label, mask: (  # padding rows stay exactly zero
              (image * scale_t + offset_t) * mask[:, None, None, None], label, mask))
          .prefetch(prefetch))
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = workers
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False  # `workers` means what it says
    ds = ds.with_options(options)
    step = steps.start
    it = iter(ds)
    while step < steps.stop:
        try:
            image, label, mask = next(it)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            raise ValueError(f"reading {describe(step)} failed: {e.message}") from None
        yield step, {"image": image.numpy(), "label": label.numpy(), "mask": mask.numpy()}
        step += 1
