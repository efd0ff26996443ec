"""torchvision's published ImageNet weights in one line: the registry, download, verify, cache.

    model, variables, meta = cnnjax.pretrained("resnet50")      # torchvision's DEFAULT (V2)
    model, variables, meta = cnnjax.pretrained("resnet50", weights="IMAGENET1K_V1")
    x = cnnjax.predict.preprocess("dog.jpg", **meta["preprocess"])[None]
    logits = model.apply(variables, x, train=False)             # meta["categories"][i]: names

The registry (cnnjax/data/pretrained_weights.json, written by `python -m
experiments.weight_registry` from torchvision's weight enums) holds, per architecture cnnjax
shares with torchvision, each set of ImageNet-1k weights: its URL, the SHA-256 prefix its file
name carries, the published top-1/top-5, the evaluation transform and the parameter count.

The first call downloads the file with pooch (a progress bar; a temporary name in the cache,
verified, then renamed, so no half-written or unverified file is ever under the final name),
converts it (`cnnjax.convert`; a `.pth` needs torch) and caches the converted variables, again
built under a temporary name and renamed; the second call reads that cache: no download, no
conversion. As torch.hub, a hash that only the file name carries is checked by prefix; a full
digest (`sha256=`) is checked in full.

    CNNJAX_CACHE=DIR             the cache (default ~/.cache/cnnjax): DIR/downloads/<file>,
                                 DIR/converted/<arch>/<file stem>/ (pretrained.json, variables)
    CNNJAX_WEIGHTS_MIRROR=URL|DIR  where torchvision's file names are fetched from instead of
                                 download.pytorch.org: an http(s) base URL or a local directory
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
from typing import Any

from cnnjax import flags

# cnnjax.convert is imported in the functions that use it: `import cnnjax` imports this module,
# and a cnnjax.convert imported with it would make `python -m cnnjax.convert` warn that the
# module it runs had been imported before (runpy's RuntimeWarning, a second stderr line).

REGISTRY_FILE = "pretrained_weights.json"
CACHE_ENV = "CNNJAX_CACHE"
MIRROR_ENV = "CNNJAX_WEIGHTS_MIRROR"
# (connect, read) seconds: a host that is unreachable or never answers fails fast, not hangs.
TIMEOUT = (5.0, 30.0)
HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's rule: the hex after the last "-"
_NAME = re.compile(r"[A-Z][A-Z0-9_]*")  # torchvision's weight names: IMAGENET1K_V1, DEFAULT


class DownloadError(OSError):
    """The weights could not be fetched or did not verify; the message is one line saying what
    to do (with no internet: the mirror variable or the cache path)."""


class _Mismatch(ValueError):  # a ValueError, so pooch removes its temporary file
    pass


# --- the registry --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def registry() -> dict[str, Any]:
    """The weight registry: {"architectures": {arch: {"default", "weights": {name: entry}}}}."""
    text = importlib.resources.files("cnnjax").joinpath("data", REGISTRY_FILE).read_text()
    return json.loads(text)


@functools.lru_cache(maxsize=1)
def _categories() -> tuple[str, ...]:
    name = registry()["categories"]
    text = importlib.resources.files("cnnjax").joinpath("data", name).read_text(encoding="utf-8")
    return tuple(text.splitlines())


def list_weights(arch: str) -> list[str]:
    """The names of `arch`'s published weights ("IMAGENET1K_V1", ...); ValueError naming the
    architectures that have some."""
    return list(_arch_entry(arch)["weights"])


def _arch_entry(arch: str) -> dict[str, Any]:
    archs = registry()["architectures"]
    if arch not in archs:
        raise ValueError(f"no pretrained weights for {arch!r}; torchvision publishes weights for "
                         f"these cnnjax architectures: {', '.join(sorted(archs))}")
    return archs[arch]


def weights_entry(arch: str, weights: str | None = None) -> tuple[str, dict[str, Any]]:
    """(name, registry entry) of `arch`'s weights `weights` (None or "DEFAULT": torchvision's
    default; "ResNet50_Weights.IMAGENET1K_V2" spelled as torchvision does also works)."""
    entry = _arch_entry(arch)
    name = entry["default"] if weights in (None, "DEFAULT") else weights.rpartition(".")[2]
    if name not in entry["weights"]:
        raise ValueError(
            f"{arch} has no weights {weights!r}; torchvision publishes "
            f"{', '.join(entry['weights'])} (DEFAULT: {entry['default']}), or pass a path or an "
            "http(s) URL of a .pth/.safetensors file")
    return name, entry["weights"][name]


def by_file(arch: str, file: str) -> tuple[str | None, dict | None]:
    """(name, registry entry) of `arch`'s published weights whose file is named `file`, or
    (None, None)."""
    for name, entry in registry()["architectures"].get(arch, {}).get("weights", {}).items():
        if entry["url"].rsplit("/", 1)[-1] == file:
            return name, entry
    return None, None


def named(value: Any) -> str | None:
    """The weights name a command-line value gives, or None for a path: "pretrained" (torchvision's
    DEFAULT), "pretrained:NAME", or an upper-case name (IMAGENET1K_V1, DEFAULT) that is not also
    a file or directory here (the path wins)."""
    if not isinstance(value, str):
        return None
    if value == "pretrained" or value.startswith("pretrained:"):
        return value.partition(":")[2] or "DEFAULT"
    return value if _NAME.fullmatch(value) and not os.path.exists(value) else None


def preprocessing(arch: str, entry: dict[str, Any]) -> dict[str, Any]:
    """What `cnnjax.predict.preprocess` takes for these weights: their own resize, crop and
    interpolation, and GoogLeNet's mean = std = 0.5 (its `transform_input`)."""
    t = entry["transform"]
    half = _arch_entry(arch).get("transform_input")
    return {"resize": t["resize"], "crop": t["crop"], "interpolation": t["interpolation"],
            "mean": [0.5] * 3 if half else list(t["mean"]),
            "std": [0.5] * 3 if half else list(t["std"])}


# --- where the file comes from -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
    file: str                       # torchvision's file name: resnet50-11ad3fa6.pth
    expected: str                   # the full SHA-256 or the prefix the name carries
    url: str | None = None          # fetched from here (None: a local file)
    path: str | None = None         # a local file, used in place
    name: str | None = None         # the registry's weights name
    entry: dict | None = None       # its registry entry
    digest: str | None = None       # a local file's SHA-256, once computed

    @property
    def key(self) -> str:
        """The converted cache's name: the file's stem (it carries the hash), and for a file of
        the user's own also its digest (two different files may share a name)."""
        stem = self.file.rsplit(".", 1)[0]
        return stem if self.digest is None else f"{stem}.{self.digest[:16]}"


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "cnnjax")


def _expected(file: str, sha256: str | None) -> str:
    found = HASH_IN_NAME.findall(file)
    if sha256 is not None:
        sha256 = sha256.lower().removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{8,64}", sha256):
            raise ValueError(f"sha256={sha256!r} must be 8 to 64 hex digits")
        if found and not (sha256.startswith(found[-1]) or found[-1].startswith(sha256)):
            raise ValueError(f"sha256={sha256!r} contradicts the hash {found[-1]} in {file}")
        return sha256
    if not found:
        raise ValueError(f"{file} carries no hash in its name (torchvision's name-<hex>.pth); "
                         "pass sha256= to verify it")
    return found[-1]


def resolve(arch: str, weights: str | None = None, sha256: str | None = None) -> Source:
    """Where `arch`'s weights come from and what their hash must be; ValueError for an unknown
    name (naming the choices) or a file that cannot be verified."""
    from cnnjax import convert
    convert.family(arch)  # an architecture torchvision lacks: its message names the shared ones
    if weights is not None and (re.match(r"https?://", weights) or os.sep in weights
                                or pathlib.Path(weights).suffix in convert.FORMATS):
        file = weights.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        if pathlib.Path(file).suffix not in convert.FORMATS:
            raise ValueError(f"weights={weights!r}: expected a .pth, .pt, .safetensors or .npz "
                             "file")
        name, entry = by_file(arch, file)
        if re.match(r"https?://", weights):
            return Source(file, _expected(file, sha256), url=weights, name=name, entry=entry)
        if not os.path.isfile(weights):
            raise ValueError(f"weights={weights!r} is neither a weights name nor a file")
        digest = convert.sha256(weights)
        expected = (_expected(file, sha256) if sha256 or HASH_IN_NAME.search(file)
                    else digest)
        return Source(file, expected, path=os.path.abspath(weights), name=name, entry=entry,
                      digest=digest)
    name, entry = weights_entry(arch, weights)
    file = entry["url"].rsplit("/", 1)[-1]
    full = sha256 or entry.get("sha256")
    return Source(file, _expected(file, full or entry["sha256_prefix"]), url=entry["url"],
                  name=name, entry=entry)


def _mirrored(source: Source) -> Source:
    """The source with torchvision's host replaced by CNNJAX_WEIGHTS_MIRROR, if set."""
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror or source.entry is None or source.url != source.entry["url"]:
        return source  # no mirror, a local file, or a URL the user chose
    if re.match(r"https?://", mirror):
        return dataclasses.replace(source, url=f"{mirror.rstrip('/')}/{source.file}")
    path = pathlib.Path(mirror) / source.file
    if not path.is_file():
        raise DownloadError(f"{MIRROR_ENV}={mirror} holds no {source.file}: fetch "
                            f"{source.url} elsewhere and put it there")
    return dataclasses.replace(source, url=None, path=str(path.absolute()))


# --- download and verify -----------------------------------------------------------------------

def _verify(path: str | os.PathLike, expected: str, what: str) -> str:
    """The file's SHA-256; _Mismatch unless it starts with `expected` (torch.hub's check)."""
    from cnnjax import convert
    digest = convert.sha256(path)
    if not digest.startswith(expected):
        raise _Mismatch(f"{what} has SHA-256 {digest[:max(len(expected), 8)]}..., expected "
                        f"{expected}: the file is damaged or not these weights")
    return digest


def _how_to_place(source: Source) -> str:
    original = source.entry["url"] if source.entry else source.url
    target = cache_dir() / "downloads" / source.file
    return (f"without internet, fetch {original} elsewhere and put it in a directory named by "
            f"{MIRROR_ENV} (or serve torchvision's files from an http(s) URL named there), or "
            f"place it at {target}")


def _reason(error: Exception) -> str:
    """A few words for a requests error (its own text is a page of nested reprs)."""
    import requests
    text = str(error)
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code} {error.response.reason}"
    if isinstance(error, requests.Timeout) or "timed out" in text:
        return f"no answer within {TIMEOUT[0]:g} s to connect or {TIMEOUT[1]:g} s to read"
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "the connection closed before the whole file arrived"
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    return found[1].strip() if found else type(error).__name__


class _CheckedDownloader:
    """pooch's HTTP downloader (a tqdm progress bar, a capped connect and read time) whose
    file must also match the hash prefix before pooch renames it into the cache."""

    def __init__(self, source: Source):
        import pooch
        self.source = source
        self.http = pooch.HTTPDownloader(progressbar=True, timeout=TIMEOUT)

    def __call__(self, url: str, output_file: str, pooch_obj: Any, check_only: bool = False):
        self.http(url, output_file, pooch_obj)
        _verify(output_file, self.source.expected, f"{self.source.file} from {url}")


def fetch(source: Source) -> pathlib.Path:
    """The verified weights file: a local one in place, else downloaded into the cache (or found
    there, verified, from an earlier call). DownloadError, one line, when that fails."""
    if source.path is not None:
        try:
            if source.digest is None or not source.digest.startswith(source.expected):
                _verify(source.path, source.expected, source.path)
        except _Mismatch as e:
            raise DownloadError(str(e)) from None
        return pathlib.Path(source.path)
    import pooch
    import requests
    downloads = cache_dir() / "downloads"
    target = downloads / source.file
    if target.is_file():
        try:
            _verify(target, source.expected, str(target))
            return target
        except _Mismatch as e:  # placed by hand, or an older file of that name: fetch it anew
            print(f"cnnjax.pretrained: {e}; downloading it again", file=sys.stderr)
            target.unlink(missing_ok=True)
    full = f"sha256:{source.expected}" if len(source.expected) == 64 else None
    print(f"cnnjax.pretrained: downloading {source.url} to {target}", file=sys.stderr)
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)  # pooch's own lines would repeat ours
    try:
        pooch.retrieve(source.url, known_hash=full, fname=source.file, path=downloads,
                       downloader=_CheckedDownloader(source))
    except ValueError as e:  # the hash: pooch's (full digest) or ours (prefix)
        raise DownloadError(f"{e}; nothing was cached, the next call downloads it again") \
            from None
    except (requests.RequestException, OSError) as e:
        raise DownloadError(f"could not download {source.file} from {source.url} "
                            f"({_reason(e)}); {_how_to_place(source)}") from None
    finally:
        logger.setLevel(level)
    return target


# --- the converted cache -----------------------------------------------------------------------

def _complete(path: pathlib.Path) -> bool:
    """A converted directory that a later call may trust. Finished ones only ever appear by
    rename, so anything else under the name (a crash while removing one) counts as absent."""
    from cnnjax import convert
    try:
        convert.read_meta(path)
        return True
    except ValueError:
        return False


def converted(arch: str, source: Source) -> pathlib.Path:
    """The cache directory of `source`'s weights converted for `arch` (pretrained.json and the
    orbax variables, what `convert.load_pretrained` reads), converting them on the first call.
    Two processes converting at once each write a temporary directory; the first rename wins."""
    from cnnjax import convert
    final = cache_dir() / "converted" / arch / source.key
    if _complete(final):
        return final
    path = fetch(source)
    state = convert.read_state_dict(path)
    variables, dropped = convert.convert(arch, state, num_classes=None)
    num_classes = int(variables["params"][convert.family(arch).head]["bias"].shape[0])
    info = {"file": source.file, "url": source.url, "path": str(path),
            "sha256": source.digest or convert.sha256(path), "weights": source.name,
            "format": convert.FORMATS[path.suffix], "tensors": len(state), "dropped": dropped}
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{source.key}.", dir=final.parent))
    try:
        convert.save_pretrained(staging, arch, variables, num_classes=num_classes, source=info,
                                preprocess=_preprocess(arch, source))
        if final.exists() and not _complete(final):  # half-written by a crash: set it aside
            trash = final.parent / f".{source.key}.removed-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(staging, final)
        except OSError:
            if not _complete(final):  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _preprocess(arch: str, source: Source) -> dict[str, Any]:
    from cnnjax import convert
    return (preprocessing(arch, source.entry) if source.entry is not None
            else convert.preprocessing(arch))


# --- one line from Python ------------------------------------------------------------------------

def directory(arch: str, weights: str | None = None) -> pathlib.Path:
    """The converted cache directory of `arch`'s weights (what `--weights=DIR` and
    `--init_from=DIR` read), downloading and converting them on the first call."""
    return converted(arch, _mirrored(resolve(arch, weights)))


def pretrained(arch: str, weights: str | None = None, *, sha256: str | None = None,
               num_classes: int | None = None, features_only: bool = False, seed: int = 0,
               **overrides: Any):
    """(model, variables, meta) of torchvision's published weights for `arch`, converted, as
    `cnnjax.convert.load_pretrained` returns them: `model.apply(variables, x, train=False)`.

    weights: None or "DEFAULT" (torchvision's default), a registry name ("IMAGENET1K_V1"), or a
    path or http(s) URL of a .pth/.safetensors file in torchvision's naming (name-<hex>.pth;
    `sha256=` verifies any other). num_classes=N != 1000: a fresh head (from `seed`), every other
    tensor from the weights. features_only=True: the backbone (`create_model(...,
    features_only=True)`) with the head's tensors dropped.

    meta: "preprocess" (what `cnnjax.predict.preprocess` takes), "categories" (the class names;
    None for a fresh head), "metrics" (published ImageNet-1k top-1/top-5, percent), "weights",
    "num_params", "source" (file, URL, SHA-256), "cache" (the converted directory).
    """
    from cnnjax import convert
    flags.optional(flags.POSITIVE_INT).check("num_classes", num_classes)
    if features_only and num_classes is not None:
        raise ValueError("features_only=True builds no classifier; drop num_classes")
    source = _mirrored(resolve(arch, weights, sha256))
    directory = converted(arch, source)
    model, variables, meta = convert.load_pretrained(directory,
                                                     **({} if features_only else overrides))
    entry = source.entry or {}
    meta = {**meta, "weights": source.name, "preprocess": _preprocess(arch, source),
            "categories": list(_categories()) if meta["num_classes"] == 1000 else None,
            "metrics": ({"top1": entry["top1"], "top5": entry["top5"], "dataset": "ImageNet-1k"}
                        if entry else None),
            "num_params": entry.get("num_params"), "cache": str(directory)}
    if features_only:
        model, variables = _backbone(arch, variables, overrides)
        meta.update(categories=None, metrics=None, features_only=True)
    elif num_classes is not None and num_classes != meta["num_classes"]:
        model, variables, fresh = _fresh_head(arch, variables, num_classes, seed, overrides)
        meta.update(num_classes=num_classes, categories=None, metrics=None, fresh=fresh)
    return model, variables, meta


def _backbone(arch: str, variables: dict, overrides: dict[str, Any]):
    import jax
    import jax.numpy as jnp

    from cnnjax.models import create_model, model_spec, strip_head
    model = create_model(arch, features_only=True, **overrides)
    size = model_spec(arch).input_size
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return model, strip_head(variables, shapes)


def _fresh_head(arch: str, variables: dict, num_classes: int, seed: int,
                overrides: dict[str, Any]):
    """The model with `num_classes` outputs: its head freshly initialised, the rest copied."""
    import jax
    import jax.numpy as jnp

    from cnnjax import transfer
    from cnnjax.models import create_model, model_spec
    model = create_model(arch, num_classes=num_classes, **overrides)
    size = model_spec(arch).input_size
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, size, size, 3)), train=False))
    merged, report = transfer.init_from(init(jax.random.key(seed)), variables,
                                        source_arch=arch, target_arch=arch)
    return model, merged, report.fresh_layers
