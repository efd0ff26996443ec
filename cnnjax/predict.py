"""Classify photos with converted weights, the way torchvision users expect.

    python -m cnnjax.predict --arch=resnet50 dog.jpg cat.png     # torchvision's DEFAULT weights
    python -m cnnjax.predict --arch=resnet50 --weights=IMAGENET1K_V1 dog.jpg
    python -m cnnjax.convert --arch=resnet50 --checkpoint=resnet50-11ad3fa6.pth --out=weights/r50
    python -m cnnjax.predict --weights=weights/r50 dog.jpg cat.png

    model, variables, meta = convert.load_pretrained("weights/r50")
    predict(model, variables, ["dog.jpg"], meta=meta)   # [[("golden retriever", 0.81), ...]]

`preprocess` is torchvision's ImageNet evaluation transform on a PIL image, computed with PIL and
NumPy only: any mode to RGB, the shorter side resized to 256 (PIL's own antialiased bilinear
filter, as torchvision uses for PIL input), the centre 224x224 cropped, scaled to [0, 1] and
normalised by the ImageNet mean and std, channels last. `imagenet_classes` reads the 1000
ImageNet-1k names, in index order, from a file shipped with cnnjax (no PyTorch needed).
"""
from __future__ import annotations

import functools
import importlib.resources
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from cnnjax import flags
from cnnjax.convert import IMAGENET_MEAN, IMAGENET_STD

NUM_IMAGENET_CLASSES = 1000

# torchvision's InterpolationMode names -> PIL's filters (what torchvision passes for PIL input).
INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
                  "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}

ImageLike = Any  # a PIL image, a path, or an (H, W[, C]) uint8 array


# --- images --------------------------------------------------------------------------------------

def load_image(path: str | os.PathLike) -> Image.Image:
    """The image file at `path`, decoded (all of it) and converted to RGB; ValueError saying what
    is wrong (missing, a directory, unreadable, not an image, damaged) otherwise."""
    shown = os.fspath(path)
    if not os.path.lexists(path):
        raise ValueError(f"image {shown} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"image {shown} is a directory, not an image file")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except PermissionError as e:
        raise ValueError(f"image {shown} cannot be read: {e.strerror}") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{shown} is not an image (PIL recognises no image format in it)") \
            from None
    except Exception as e:  # noqa: BLE001 -- damaged files fail in format-specific ways
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"image {shown} cannot be decoded: {reason}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in mode RGB: grey levels repeated, alpha dropped (as torchvision's image loader
    does), palettes and CMYK converted by PIL."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette's transparency goes to RGB
    return image.convert("RGB")


def _as_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 (0..255); got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            raise ValueError("an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4);"
                             f" got shape {image.shape}")
        if 0 in image.shape:
            raise ValueError(f"an image array must not be empty; got shape {image.shape}")
        return to_rgb(Image.fromarray(np.ascontiguousarray(image)))
    raise TypeError(f"expected a PIL image, a path or a uint8 array; got {type(image).__name__}")


def check_preprocess(resize: Any, crop: Any, mean: Any, std: Any,
                     interpolation: Any = "bilinear") -> None:
    """ValueError unless these are settings `preprocess` can use."""
    flags.POSITIVE_INT.check("resize", resize)
    flags.POSITIVE_INT.check("crop", crop)
    for name, value in (("mean", mean), ("std", std)):
        if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
                or len(value) != 3 or not all(flags.is_finite(v) for v in value)):
            raise ValueError(f"{name} must be 3 finite numbers (one per RGB channel); "
                             f"got {flags.show(value)}")
    if not all(v > 0 for v in std):
        raise ValueError(f"std must be positive; got {flags.show(std)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}; "
                         f"got {flags.show(interpolation)}")


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) with the shorter side `resize` and the aspect kept, the longer side
    truncated as torchvision's Resize(int) computes it."""
    short, long = min(width, height), max(width, height)
    other = int(resize * long / short)
    return (resize, other) if width <= height else (other, resize)


def center_crop(pixels: np.ndarray, crop: int) -> np.ndarray:
    """The centre crop x crop of an (H, W, C) array, torchvision's way: an image smaller than the
    crop is first padded with zeros ((crop - size) // 2 before, the rest after), and the offset
    of a crop is round((size - crop) / 2) (Python's rounding, halves to even)."""
    h, w = pixels.shape[:2]
    pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
    if pad_h or pad_w:
        pixels = np.pad(pixels, ((pad_h // 2, pad_h - pad_h // 2),
                                 (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        h, w = pixels.shape[:2]
    top = int(round((h - crop) / 2.0))
    left = int(round((w - crop) / 2.0))
    return pixels[top:top + crop, left:left + crop]


def preprocess(image: ImageLike, *, resize: int = 256, crop: int = 224,
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
               interpolation: str = "bilinear") -> np.ndarray:
    """torchvision's `Compose([Resize(resize), CenterCrop(crop), ToTensor(), Normalize(mean,
    std)])` on `image` (a PIL image, a path or an (H, W[, C]) uint8 array; any mode is converted
    to RGB first), as a (crop, crop, 3) float32 array: channels last, ready for a cnnjax model.

    No EXIF rotation is applied, as torchvision applies none."""
    check_preprocess(resize, crop, mean, std, interpolation)
    pil = _as_pil(image)
    size = resized_size(*pil.size, resize)
    if size != pil.size:
        pil = pil.resize(size, INTERPOLATIONS[interpolation])
    pixels = center_crop(np.asarray(pil, dtype=np.uint8), crop)
    x = pixels.astype(np.float32) / np.float32(255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# --- class names -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _imagenet_classes() -> tuple[str, ...]:
    text = importlib.resources.files("cnnjax").joinpath(
        "data", "imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(text.splitlines())
    if len(names) != NUM_IMAGENET_CLASSES or not all(names):
        raise RuntimeError(f"cnnjax/data/imagenet_classes.txt is damaged: {len(names)} lines, "
                           f"expected {NUM_IMAGENET_CLASSES} non-empty class names")
    return names


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard index order (torchvision's spelling)."""
    return list(_imagenet_classes())


def class_names(num_classes: int) -> list[str]:
    """ImageNet's names for a 1000-class model, "class N" otherwise."""
    if num_classes == NUM_IMAGENET_CLASSES:
        return imagenet_classes()
    return [f"class {i}" for i in range(num_classes)]


# --- prediction --------------------------------------------------------------------------------

def _softmax_apply(model, variables, x):
    import jax
    import jax.numpy as jnp
    logits = model.apply(variables, x, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


@functools.lru_cache(maxsize=1)
def _jitted():
    from cnnjax import runtime
    return runtime.jit(_softmax_apply, static_argnums=0)


def _probability_fn(model):
    """A jitted (variables, x) -> softmax probabilities; compiled once per model and shape."""
    try:
        hash(model)
    except TypeError:  # a module with an unhashable field: jit it on its own
        from cnnjax import runtime
        return runtime.jit(functools.partial(_softmax_apply, model))
    return functools.partial(_jitted(), model)


def _as_batch(images: Any, settings: Mapping[str, Any]) -> np.ndarray:
    """(N, H, W, 3) float32 from preprocessed arrays or images to preprocess with `settings`."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype.kind == "f":
        return np.asarray(images, np.float32)
    if isinstance(images, np.ndarray) and images.ndim == 4:  # (N, H, W, C) uint8 images
        images = list(images)
    elif isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    arrays = []
    for image in images:
        if isinstance(image, np.ndarray) and image.dtype.kind == "f":  # already preprocessed
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError("a preprocessed image must be (H, W, 3) float; got shape "
                                 f"{image.shape}")
            arrays.append(np.asarray(image, np.float32))
        else:
            arrays.append(preprocess(image, **settings))
    if not arrays:
        return np.zeros((0, 0, 0, 3), np.float32)
    if len({a.shape for a in arrays}) > 1:
        raise ValueError("the images must all have one size; got "
                         f"{sorted({a.shape for a in arrays})}")
    return np.stack(arrays)


def _settings(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    pre = dict((meta or {}).get("preprocess") or {})
    keys = ("resize", "crop", "mean", "std", "interpolation")
    return {k: pre[k] for k in keys if k in pre}


def probabilities(model, variables, images: Any, *, meta: Mapping[str, Any] | None = None,
                  batch_size: int = 32) -> np.ndarray:
    """(N, num_classes) softmax probabilities of `images` (see `predict`), `batch_size` at a time;
    the last batch is padded so every batch compiles to the same program."""
    flags.POSITIVE_INT.check("batch_size", batch_size)
    batch = _as_batch(images, _settings(meta))
    if len(batch) == 0:
        return np.zeros((0, int((meta or {}).get("num_classes", 0))), np.float32)
    import jax
    fn = _probability_fn(model)
    variables = jax.device_put(variables)
    size = min(batch_size, len(batch))
    out = []
    for start in range(0, len(batch), size):
        chunk = batch[start:start + size]
        n = len(chunk)
        if n < size:
            chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(fn(variables, chunk))[:n])
    return np.concatenate(out)


def top_classes(probs: np.ndarray, top_k: int) -> list[list[tuple[str, float]]]:
    """Per row of `probs`, the `top_k` (class name, probability) pairs, most probable first
    (ties: the lower class index first)."""
    num_classes = probs.shape[-1]
    flags.POSITIVE_INT.check("top_k", top_k)
    if top_k > num_classes:
        raise ValueError(f"--top_k={top_k} must be at most the model's {num_classes} classes")
    names = class_names(num_classes)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    return [[(names[i], float(row[i])) for i in idx] for row, idx in zip(probs, order)]


def predict(model, variables, images: Any, *, top_k: int = 5,
            meta: Mapping[str, Any] | None = None,
            batch_size: int = 32) -> list[list[tuple[str, float]]]:
    """Per image, its `top_k` (class name, probability) pairs, most probable first.

    `images`: PIL images, paths or uint8 arrays (a sequence, or one (N, H, W, C) uint8 array),
    preprocessed with `meta["preprocess"]` (`convert.load_pretrained`'s) or else torchvision's
    ImageNet defaults; (H, W, 3) float arrays already preprocessed; or one (N, H, W, 3) float
    batch. Probabilities are the softmax of the logits of `model.apply(variables, x,
    train=False)`, run jitted `batch_size` images at a time. Names are ImageNet's for a
    1000-class model, else "class N".
    """
    flags.POSITIVE_INT.check("top_k", top_k)
    if meta is not None and flags.is_int(meta.get("num_classes")) and \
            top_k > meta["num_classes"]:
        raise ValueError(f"--top_k={top_k} must be at most the model's "
                         f"{meta['num_classes']} classes")
    probs = probabilities(model, variables, images, meta=meta, batch_size=batch_size)
    return top_classes(probs, top_k)


# --- the command -------------------------------------------------------------------------------

def _checked_meta(weights: str) -> dict:
    """pretrained.json of --weights, checked to be what `load_pretrained` and `preprocess` need."""
    from cnnjax import convert
    what = "a directory written by python -m cnnjax.convert"
    flags.check_existing_directory("weights", weights, what)
    shown = f"--weights={flags.show(weights)}"
    meta = convert.read_meta(weights, flag="weights")
    pre = dict(meta["preprocess"])
    missing = [k for k in ("resize", "crop", "mean", "std") if k not in pre]
    if missing:
        raise ValueError(f"{shown}: its {convert.META_FILE} preprocess lacks {', '.join(missing)}")
    try:
        check_preprocess(**_settings(meta))
    except ValueError as e:
        raise ValueError(f"{shown}: its {convert.META_FILE} preprocess is unusable: {e}") from None
    return meta


def published(arch: str | None, weights: str | None) -> str | None:
    """The name of the published weights that --arch/--weights ask for (cnnjax.pretrained), or
    None for a converted directory; ValueError for an unknown name or a missing --arch."""
    from cnnjax.pretrained import named, weights_entry
    name = "DEFAULT" if weights is None else named(weights)
    if name is None:
        return None
    if arch is None:
        raise ValueError("--weights=DIR (converted weights) or --arch=ARCH (torchvision's "
                         "published weights) is required" if weights is None else
                         f"--weights={flags.show(weights)} names published weights: add "
                         "--arch=ARCH (or give a directory written by python -m cnnjax.convert)")
    return weights_entry(arch, name)[0]


def load_weights(arch: str | None, weights: str | None):
    """(model, variables, meta) of --arch/--weights: published weights through
    cnnjax.pretrained (downloaded and converted on first use), or a converted directory.
    ValueError or pretrained.DownloadError, each one line, when that fails."""
    from cnnjax import convert
    from cnnjax.pretrained import pretrained
    name = published(arch, weights)
    if name is not None:
        return pretrained(arch, name)
    try:
        return convert.load_pretrained(weights)
    except Exception as e:  # noqa: BLE001 -- orbax reports a damaged checkpoint many ways
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"--weights={flags.show(weights)}: its variables could not be "
                         f"restored ({type(e).__name__}: {reason})") from None


def weights_meta(arch: str | None, weights: str | None) -> dict:
    """What the weights promise before they are loaded (no download): arch, class count and
    preprocessing, from the registry or the directory's pretrained.json."""
    name = published(arch, weights)
    if name is None:
        meta = _checked_meta(weights)
        if arch is not None and arch != meta["arch"]:
            raise ValueError(f"--arch={flags.show(arch)} does not match --weights="
                             f"{flags.show(weights)}, which holds {meta['arch']!r} weights")
        return meta
    from cnnjax.pretrained import preprocessing, weights_entry
    return {"arch": arch, "num_classes": NUM_IMAGENET_CLASSES,
            "preprocess": preprocessing(arch, weights_entry(arch, name)[1])}


def main(argv: list[str] | None = None) -> int:
    parser = flags.ArgumentParser(
        prog="python -m cnnjax.predict",
        description="Prints the top classes of each image under published or converted weights.")
    parser.add_argument("--arch", default=None,
                        help="alone: torchvision's published DEFAULT weights for it (downloaded "
                             "once into the cache); with --weights=DIR: a check")
    parser.add_argument("--weights", default=None,
                        help="a directory written by python -m cnnjax.convert, or with --arch "
                             "a published weights name (IMAGENET1K_V1, pretrained:NAME)")
    parser.add_argument("--top_k", type=int, default=5, help="classes printed per image")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any PIL format)")
    args = parser.parse_args(argv)
    from cnnjax.pretrained import DownloadError
    try:
        flags.POSITIVE_INT.check("top_k", args.top_k)
        meta = weights_meta(args.arch, args.weights)
        if args.top_k > meta["num_classes"]:
            raise ValueError(f"--top_k={args.top_k} must be at most the model's "
                             f"{meta['num_classes']} classes")
        settings = _settings(meta)
        # Every image is read before any download or JAX work, so a bad one fails fast.
        batch = np.stack([preprocess(path, **settings) for path in args.images])
        model, variables, meta = load_weights(args.arch, args.weights)
    except (ValueError, DownloadError) as e:
        return flags.fail(str(e).replace("\n", " "))
    results = predict(model, variables, batch, top_k=args.top_k, meta=meta)
    for path, top in zip(args.images, results):
        print(path)
        for name, p in top:
            print(f"  {p:.4f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
