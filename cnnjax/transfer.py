"""Starting a network from another one's weights: VGG's deepening, and fine-tuning by name.

VGG (Simonyan & Zisserman 2015, arXiv 1409.1556, Sec. 3.1) trained net A (vgg11) first and, for
the deeper nets, "initialised the first four convolutional layers and the last three
fully-connected layers with the layers of net A (the intermediate layers were initialised
randomly)"; `vgg_deepening` does that. `init_from` serves fine-tuning from any earlier run: it
copies every tensor whose path and shape match (params and batch_stats), keeps the rest (a new
head when the class count differs) at their fresh initialisation, and says which is which.

    params, copied = vgg_deepening(vgg11_params, vgg16_params)
    variables, report = init_from(target_variables, source_variables,
                                  source_arch="resnet18", target_arch="resnet18")
    print(report.summary("runs/resnet18-digits"))

`python -m experiments.train --arch=vgg16 --init_from=runs/vgg11-digits` runs `init_from` on a
fresh run's state (cnnjax.train); the optimizer state stays fresh.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable

import jax
import numpy as np

from cnnjax import parallel

# Net A's first four convs are conv3-64, conv3-128, conv3-256, conv3-256 (paper Table 1): one in
# stage 1, one in stage 2, two in stage 3. In the deeper nets B, D, E the layers of those shapes
# in those places are stage 1's first conv (3->64), stage 2's first (64->128) and stage 3's first
# two (128->256, 256->256); in cnnjax's naming both sides call them conv1_1, conv2_1, conv3_1,
# conv3_2. Reading "first four" as the four layers with net A's shapes, not the deeper net's first
# four (conv1_1, conv1_2, conv2_1, conv2_2), is the only reading under which the copied weights fit.
VGG_DEEPENING_CONVS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2")
VGG_DEEPENING_FCS = ("fc6", "fc7", "fc8")
_VGG_LAYER = re.compile(r"(?:conv|bn)(\d+)_(\d+)")
_VGG_ARCH = re.compile(r"vgg(\d+)(_bn)?")
VGG_A_STAGES = (1, 1, 2, 2, 2)  # net A's convs per stage (paper Table 1)
_MAPPING_WORDS = {"vgg_deepening": "VGG deepening", "name_and_shape": "name and shape"}


@dataclasses.dataclass
class Report:
    """What `init_from` did, by tensor path ("params/conv1_1/kernel")."""
    mapping: str                                         # "vgg_deepening" or "name_and_shape"
    copied: list[tuple[str, str]]                        # (target path, source path)
    skipped: list[tuple[str, tuple, tuple]]              # shape differs: (path, target, source)
    missing: list[str]                                   # no counterpart: kept fresh
    unused: list[str]                                    # source tensors copied nowhere
    gray: list[str] = dataclasses.field(default_factory=list)  # RGB kernels summed to 1 channel

    @property
    def copied_layers(self) -> list[str]:
        return _layers(t for t, _ in self.copied)

    @property
    def fresh_layers(self) -> list[str]:
        """Layers with any tensor left at its fresh initialisation (missing or skipped)."""
        return _layers([*self.missing, *(p for p, _, _ in self.skipped)])

    def summary(self, source: str) -> str:
        """One line: `init_from SOURCE: copied N tensors (layers), kept fresh: layers`."""
        differs: dict[str, tuple] = {}  # per layer, its tensor of the most dimensions
        for path, t, s in self.skipped:
            if len(t) > len(differs.get(_layer(path), ("", ()))[1]):
                differs[_layer(path)] = (path.rsplit("/", 1)[-1], t, s)
        skipped = ("; shape differs, kept fresh: " + ", ".join(
            f"{layer} ({name} {t} here, {s} in the source)"
            for layer, (name, t, s) in differs.items())) if differs else ""
        fresh = _layers(self.missing)
        gray = (f"; summed over RGB for 1-channel input: {_names(_layers(self.gray))}"
                if self.gray else "")
        return (f"init_from {source}, by {_MAPPING_WORDS[self.mapping]}: copied "
                f"{len(self.copied)} tensors ({_names(self.copied_layers)}), kept fresh: "
                f"{_names(fresh) if fresh else 'none'}{skipped}{gray}")

    def to_json(self) -> dict[str, Any]:
        return {"mapping": self.mapping, "copied_tensors": len(self.copied),
                "copied_layers": self.copied_layers, "fresh_layers": self.fresh_layers,
                "copied": [list(c) for c in self.copied],
                "skipped": [{"path": p, "shape": list(t), "source_shape": list(s)}
                            for p, t, s in self.skipped],
                "missing": self.missing, "summed_over_rgb": self.gray}


def init_from(target_variables: dict, source_variables: dict, *, source_arch: str | None = None,
              target_arch: str | None = None, mapping: str = "auto") -> tuple[dict, Report]:
    """`target_variables` ({"params": ..., "batch_stats": ...}) with every tensor copied from
    `source_variables` that the mapping pairs with one of the same shape; the others untouched.

    mapping "auto" is VGG deepening from vgg11 to vgg13/16/19 (both with BatchNorm or both
    without: `vgg_deepening_pair`), name and shape otherwise. Copies take the target tensor's
    dtype and, for jax.Arrays, its sharding, so a replicated train state stays replicated.
    ValueError when nothing at all is copied.
    """
    if mapping == "auto":
        mapping = ("vgg_deepening" if vgg_deepening_pair(source_arch, target_arch)
                   else "name_and_shape")
    if mapping == "vgg_deepening":
        for collection in ("params", "batch_stats"):
            _check_vgg_deepening(source_variables.get(collection, {}),
                                 target_variables.get(collection, {}))
        source_path = _vgg_source_path
    elif mapping == "name_and_shape":
        source_path = _same_path
    else:
        raise ValueError(f"unknown mapping {mapping!r}; expected auto, vgg_deepening or "
                         "name_and_shape")

    def in_collection(path: str) -> str | None:  # "params/conv1_1/kernel": map past "params/"
        collection, _, rest = path.partition("/")
        mapped = source_path(rest)
        return None if mapped is None else f"{collection}/{mapped}"

    variables, report = _transfer(target_variables, source_variables, in_collection, mapping)
    if not report.copied:
        source = f"the source ({source_arch})" if source_arch else "the source"
        target = f"this model ({target_arch})" if target_arch else "this model"
        why = (f"; {len(report.skipped)} match by name but not by shape, e.g. "
               f"{report.skipped[0][0]}: {report.skipped[0][1]} here, {report.skipped[0][2]} in "
               f"the source" if report.skipped else "")
        raise ValueError(f"nothing to copy: no tensor of {source} matches {target} by "
                         f"{_MAPPING_WORDS[mapping]}{why}")
    return variables, report


def vgg_deepening(source_params: dict, target_params: dict) -> tuple[dict, list[tuple[str, str]]]:
    """Net A (vgg11) -> a deeper VGG as the paper did: its first four convs (conv1_1, conv2_1,
    conv3_1, conv3_2: see VGG_DEEPENING_CONVS) and fc6-fc8 copied, every other layer as given.

    Works on any collection keyed by layer name: params, or batch_stats. For the `_bn` variants
    the BatchNorm that follows a copied conv (bn1_1, ...) is copied with it, scale and offset
    here and running statistics when called on batch_stats: a copied conv whose normalisation
    stayed fresh would feed the next layer activations of another scale. The paper had no
    BatchNorm; its measurement is of the plain nets. Returns (params, [(target, source) paths]);
    ValueError unless the source is net A, the target deeper, and every mapped shape equal.
    """
    _check_vgg_deepening(source_params, target_params)
    params, report = _transfer(target_params, source_params, _vgg_source_path, "vgg_deepening")
    if report.skipped:
        path, t, s = report.skipped[0]
        raise ValueError(f"vgg_deepening: {path} has shape {t} here and {s} in net A (the class "
                         "count or input channels differ; init_from keeps such layers fresh)")
    return params, report.copied


def vgg_deepening_pair(source_arch: str | None, target_arch: str | None) -> bool:
    """Whether `init_from`'s automatic mapping is VGG deepening: vgg11 -> vgg13/16/19, or
    vgg11_bn -> vgg13_bn/16_bn/19_bn. Mixed BatchNorm pairs are matched by name and shape."""
    s = _VGG_ARCH.fullmatch(source_arch or "")
    t = _VGG_ARCH.fullmatch(target_arch or "")
    return bool(s and t and s[1] == "11" and t[1] in ("13", "16", "19") and s[2] == t[2])


# --- the mechanism ----------------------------------------------------------------------------

def _transfer(target: Any, source: Any, source_path: Callable[[str], str | None],
              mapping: str) -> tuple[Any, Report]:
    """`target` with each leaf replaced by the source leaf at `source_path(its path)` where that
    exists with the same shape; the tree structure of `target` is kept exactly."""
    sources = dict(_flatten(source))
    copied, skipped, missing, used, gray = [], [], [], set(), []

    def pick(path: str, leaf: Any) -> Any:
        s = source_path(path)
        if s is None or s not in sources:
            missing.append(path)
            return leaf
        value = sources[s]
        if _rgb_to_gray(np.shape(value), np.shape(leaf)):
            value = np.sum(np.asarray(value), axis=2, keepdims=True)
            gray.append(path)
        if tuple(np.shape(value)) != tuple(np.shape(leaf)):
            skipped.append((path, tuple(np.shape(leaf)), tuple(np.shape(value))))
            return leaf
        copied.append((path, s))
        used.add(s)
        return _place(value, leaf)

    out = jax.tree_util.tree_map_with_path(lambda p, leaf: pick(_path(p), leaf), target)
    unused = [s for s in sources if s not in used]
    return out, Report(mapping, copied, skipped, missing, unused, gray)


def _rgb_to_gray(source: tuple, target: tuple) -> bool:
    """A first conv of 3 input channels (RGB) copied into one of 1 (grayscale, e.g. digits):
    summed over its inputs, it computes on a gray image what the RGB kernel computes on that
    image repeated in all three channels."""
    return (len(source) == len(target) == 4 and source[2] == 3 and target[2] == 1
            and source[:2] == target[:2] and source[3] == target[3])


def _place(value: Any, like: Any) -> Any:
    if isinstance(like, jax.Array):
        return parallel.place_like(value, like)
    return np.asarray(value, like.dtype)


def _flatten(tree: Any) -> Iterable[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return ((_path(p), leaf) for p, leaf in leaves)


def _path(keys: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def _same_path(path: str) -> str:
    return path


def _vgg_source_path(path: str) -> str | None:
    """The net-A tensor a deeper VGG's tensor starts from (same name), or None: kept fresh."""
    layer = path.split("/", 1)[0]
    conv = layer.replace("bn", "conv", 1) if layer.startswith("bn") else layer
    return path if conv in VGG_DEEPENING_CONVS or layer in VGG_DEEPENING_FCS else None


def _stages(tree: Any) -> tuple[int, ...]:
    """Convs per stage from the layer names of a VGG collection (conv{s}_{i} / bn{s}_{i})."""
    count: dict[int, int] = {}
    for name in (tree or {}):
        m = _VGG_LAYER.fullmatch(str(name))
        if m:
            count[int(m[1])] = max(count.get(int(m[1]), 0), int(m[2]))
    return tuple(count.get(s, 0) for s in range(1, max(count, default=0) + 1))


def _check_vgg_deepening(source: Any, target: Any) -> None:
    s, t = _stages(source), _stages(target)
    if not s and not t:  # e.g. the empty batch_stats of nets without BatchNorm
        return
    if s != VGG_A_STAGES:
        raise ValueError(f"VGG deepening starts from net A (vgg11: convs per stage "
                         f"{VGG_A_STAGES}); the source has {s or 'no VGG convs'}")
    if len(t) != len(s) or any(a < b for a, b in zip(t, s)) or t == s:
        raise ValueError(f"VGG deepening goes to a deeper VGG (vgg13/16/19); the target has "
                         f"convs per stage {t or 'none'}")


def _layer(path: str) -> str:
    """A tensor's layer: its path without the collection and the tensor's own name."""
    parts = path.split("/")
    return "/".join(parts[1:-1]) if len(parts) > 2 else parts[0]


def _layers(paths: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(_layer(p) for p in paths))


def _names(names: list[str], limit: int = 16) -> str:
    more = f", ... {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
