"""Counter-based randomness, crop boxes and a NumPy resampler: the per-example image work.

Every random number is a hash of (seed, epoch, example index, draw number), so an example's
augmentation is the same whichever process, thread or batch position handles it. The resampler
is PIL's BILINEAR filter written as two small matrices per example (rows, then columns), which
makes crop + resize one batched matmul and needs no image library.
"""
from __future__ import annotations

import math

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_key(*parts: int) -> np.ndarray:
    """One uint64, as a shape-(1,) array (NumPy scalars warn on wrapping), from some ints."""
    h = np.zeros(1, np.uint64)
    for p in parts:
        h = _mix(h ^ np.array([int(p) & _MASK], np.uint64))
    return h


def hash_indices(key: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """uint64 hash of each index under `key`."""
    return _mix(key ^ _mix(np.asarray(indices, np.uint64)))


def uniforms(key: np.ndarray, indices: np.ndarray, count: int) -> np.ndarray:
    """(len(indices), count) float64 in [0, 1): draw j of example i depends on (key, i, j) only."""
    base = hash_indices(key, indices)[:, None]
    draws = _mix(base + np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)
    return (draws >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def permutation(key: np.ndarray, n: int) -> np.ndarray:
    """A permutation of range(n) determined by `key` alone (no NumPy RNG version dependence)."""
    return np.argsort(hash_indices(key, np.arange(n)), kind="stable")


# --- crop boxes: (x0, y0, x1, y1) in source pixel coordinates, floats -------------------------

_ATTEMPTS = 10
NUM_DRAWS = 2 * _ATTEMPTS + 3  # (area, log-ratio) per attempt, x and y offsets, flip


def random_resized_crop_boxes(u: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                              scale: tuple[float, float], ratio: tuple[float, float]
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Inception-style random crops (Szegedy et al. 2015, as torchvision's RandomResizedCrop).

    u: (n, NUM_DRAWS) uniforms. Ten tries at an area fraction in `scale` and a log-uniform aspect
    ratio in `ratio`; the first that fits wins, else a centre crop clamped to `ratio`. Boxes are
    continuous (the resampler takes fractional boxes), so no rounding ties them to pixel grids.
    Returns boxes (n, 4) and flip draws (n,) in [0, 1).
    """
    h = np.asarray(heights, np.float64)[:, None]
    w = np.asarray(widths, np.float64)[:, None]
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, 0:2 * _ATTEMPTS:2])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 1:2 * _ATTEMPTS:2])
    cw, ch = np.sqrt(area * aspect), np.sqrt(area / aspect)
    fits = (cw <= w) & (ch <= h)
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(u))
    ok = fits[rows, first]
    # Fallback: the whole image, narrowed to the nearest allowed aspect ratio.
    h, w = h[:, 0], w[:, 0]
    in_ratio = w / h
    fw = np.where(in_ratio > ratio[1], h * ratio[1], w)
    fh = np.where(in_ratio < ratio[0], w / ratio[0], h)
    cw = np.where(ok, cw[rows, first], fw)
    ch = np.where(ok, ch[rows, first], fh)
    x0 = (w - cw) * np.where(ok, u[:, -3], 0.5)
    y0 = (h - ch) * np.where(ok, u[:, -2], 0.5)
    return np.stack([x0, y0, x0 + cw, y0 + ch], axis=1), u[:, -1]


def center_crop_boxes(heights: np.ndarray, widths: np.ndarray,
                      fraction: float | None) -> np.ndarray:
    """The central square of side `fraction` x the shorter side: resizing it to S is "resize the
    shorter side to S / fraction, then centre-crop S" in one resampling. fraction None: the
    whole image (aspect ratio not kept), for tiny fixed-size datasets."""
    h = np.asarray(heights, np.float64)
    w = np.asarray(widths, np.float64)
    if fraction is None:
        return np.stack([np.zeros_like(w), np.zeros_like(h), w, h], axis=1)
    side = fraction * np.minimum(h, w)
    x0, y0 = (w - side) / 2, (h - side) / 2
    return np.stack([x0, y0, x0 + side, y0 + side], axis=1)


# --- resampling --------------------------------------------------------------------------------

def _triangle(in_size: int, lo: np.ndarray, hi: np.ndarray, out_size: int, pixels):
    """PIL's BILINEAR filter: weight of source pixel `pixels` (broadcast against (n, S, 1)) for
    output pixel s of the span [lo, hi). Downscaling widens the triangle by the scale factor
    (antialiasing, as PIL); pixels outside the image weigh 0 and the rest are renormalised."""
    lo = np.asarray(lo, np.float64)[:, None, None]
    step = (np.asarray(hi, np.float64)[:, None, None] - lo) / out_size
    width = np.maximum(step, 1.0)
    centers = lo + (np.arange(out_size)[None, :, None] + 0.5) * step
    if pixels is None:  # the K-tap band around each centre
        # Taps for the widest possible span (the whole axis), so K, and with it the summation
        # order, never depends on which other examples share the batch.
        taps = int(math.ceil(2 * max(in_size / out_size, 1.0))) + 2
        pixels = np.floor(centers - width - 0.5).astype(np.int64) + np.arange(taps)
    w = np.maximum(0.0, 1.0 - np.abs((pixels + 0.5 - centers) / width))
    w = np.where((pixels >= 0) & (pixels < in_size), w, 0.0)
    total = w.sum(axis=2, keepdims=True)
    w = (w / np.where(total > 0, total, 1.0)).astype(np.float32)
    return np.clip(pixels, 0, in_size - 1), w


def resize_taps(in_size: int, lo: np.ndarray, hi: np.ndarray, out_size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(n, S, K) source indices and weights: output pixel s is a sum over K source pixels."""
    return _triangle(in_size, lo, hi, out_size, None)


def resize_matrix(in_size: int, lo: np.ndarray, hi: np.ndarray, out_size: int) -> np.ndarray:
    """The same filter as a dense (n, S, in_size) matrix."""
    return _triangle(in_size, lo, hi, out_size, np.arange(in_size))[1]


DENSE_MAX = 64  # sources up to this size resample by matmul; larger ones by K-tap gathers


def resize_batch(images: np.ndarray, boxes: np.ndarray, size: int,
                 flip: np.ndarray | None = None) -> np.ndarray:
    """Crop `boxes` out of same-sized images (n, H, W, C) and resize each to (size, size):
    float32 (n, size, size, C) on the input's 0..255 scale. `flip` mirrors chosen outputs.
    Small sources (digits, CIFAR) go through two batched matmuls; larger fixed-size images held
    in memory through K-tap gathers (photos of varying sizes are decoded on tf.data instead:
    `records`). The choice depends on the image size alone, so an example's result never
    depends on its batch."""
    n, h, w, c = images.shape
    if max(h, w) <= DENSE_MAX:
        wy = resize_matrix(h, boxes[:, 1], boxes[:, 3], size)             # (n, S, H)
        wx = resize_matrix(w, boxes[:, 0], boxes[:, 2], size)             # (n, S, W)
        if flip is not None and flip.any():
            wx[flip] = wx[flip, ::-1]
        rows = np.matmul(wy, images.astype(np.float32).reshape(n, h, w * c))
        # Contract W: (n, S, C, W) @ (n, 1, W, S) -> (n, S, C, S).
        out = np.matmul(rows.reshape(n, size, w, c).transpose(0, 1, 3, 2),
                        wx.transpose(0, 2, 1)[:, None])
        return out.transpose(0, 1, 3, 2)
    iy, wy = resize_taps(h, boxes[:, 1], boxes[:, 3], size)              # (n, S, K)
    ix, wx = resize_taps(w, boxes[:, 0], boxes[:, 2], size)
    if flip is not None and flip.any():
        ix[flip], wx[flip] = ix[flip, ::-1], wx[flip, ::-1]
    batch = np.arange(n)[:, None, None]
    rows = np.einsum("nskwc,nsk->nswc", images[batch, iy].astype(np.float32), wy)
    cols = rows[batch, :, ix]                                               # (n, S_x, K, S_y, C)
    return np.einsum("ntksc,ntk->nstc", cols, wx)
