"""The search space as data: what a controller chooses, and a child network as a JSON spec.

It lives with the models because a searched network is a model like any other: the trainer,
`cnnjax.summary` and `cnnjax.profile` build one from its spec here (`nasnet.build`) without
importing the search (`cnnjax.nas`), which sits above the trainer.

Zoph & Le 2017 (Sec. 3.1 and 3.3): a child is a stack of conv layers, each with its number of
filters, kernel height and width and stride, and skip connections from earlier layers chosen at
"anchor points"; inputs of different sizes are zero-padded to the largest and concatenated. Here
layer i always takes layer i-1's output (the image for layer 0) and may add skips from any layer
j <= i-2; every layer is conv (no bias) - BatchNorm - ReLU; global average pooling and one dense
layer classify. The spec of a child, as JSON:

    {"space": {"num_layers": 6, "filters": [8, 16, 32], ...},   # optional: the default space
     "layers": [{"filters": 16, "kernel": [3, 5], "stride": 1, "skips": []},
                {"filters": 32, "kernel": [3, 3], "stride": 2, "skips": []},
                {"filters": 16, "kernel": [1, 3], "stride": 1, "skips": [0]}]}

Kernels are odd and padded by k // 2 on both sides, so a layer of stride s maps n pixels to
ceil(n / s); a stride-s layer needs at least s pixels of input (else the net would shrink below
1x1 at `input_size`, the size the space is searched at).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Sequence

import numpy as np

KINDS = ("filters", "kernel_h", "kernel_w", "stride")  # a layer's categorical decisions, in order


class SpecError(ValueError):
    """A search space or child spec that cannot be built; the message names the defect."""


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, tuple) else json.dumps(list(v))


def _int_list(where: str, v: Any, *, odd: bool = False) -> tuple[int, ...]:
    ok = (isinstance(v, (list, tuple)) and v
          and all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in v))
    if not ok:
        raise SpecError(f"{where} must be a non-empty list of positive integers; got {_show(v)}")
    if len(set(v)) != len(v):
        raise SpecError(f"{where} lists a choice twice: {_show(v)}")
    if odd and any(i % 2 == 0 for i in v):
        raise SpecError(f"{where} must be odd (padded by k // 2, a kernel keeps the map size at "
                        f"stride 1); got {_show(v)}")
    return tuple(v)


def _positive(where: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise SpecError(f"{where} must be a positive integer; got {_show(v)}")
    return v


def _fields(where: str, obj: Any, allowed: Sequence[str], required: Sequence[str] = ()) -> dict:
    if not isinstance(obj, dict):
        raise SpecError(f"{where} must be a JSON object; got {_show(obj)}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise SpecError(f"{where} has unknown field {', '.join(map(repr, unknown))}; its fields "
                        f"are {', '.join(allowed)}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise SpecError(f"{where} lacks field {', '.join(map(repr, missing))}")
    return obj


@dataclasses.dataclass(frozen=True)
class Space:
    """The choices of every layer (Zoph & Le 2017, Sec. 4.1, in small: they chose filter sizes
    in [1, 3, 5, 7] and 24..64 filters for CIFAR-10; these defaults fit 8x8 digits on a CPU)."""
    num_layers: int = 6
    filters: tuple[int, ...] = (8, 16, 32)
    kernel_heights: tuple[int, ...] = (1, 3, 5)
    kernel_widths: tuple[int, ...] = (1, 3, 5)
    strides: tuple[int, ...] = (1, 2)
    skips: bool = True       # anchor points: skip inputs from layers j <= i - 2
    input_size: int = 8      # H = W of the images searched on (8x8 digits)

    @classmethod
    def from_json(cls, obj: Any, where: str = "space") -> "Space":
        names = [f.name for f in dataclasses.fields(cls)]
        obj = _fields(where, obj, names)
        kw: dict[str, Any] = {}
        for name in ("num_layers", "input_size"):
            if name in obj:
                kw[name] = _positive(f"{where}.{name}", obj[name])
        for name in ("filters", "kernel_heights", "kernel_widths", "strides"):
            if name in obj:
                kw[name] = _int_list(f"{where}.{name}", obj[name], odd=name.startswith("kernel"))
        if "skips" in obj:
            if not isinstance(obj["skips"], bool):
                raise SpecError(f"{where}.skips must be true or false; got {_show(obj['skips'])}")
            kw["skips"] = obj["skips"]
        space = cls(**kw)
        space.check()
        return space

    def check(self) -> None:
        """Rules the fields obey together (also for a Space built in Python)."""
        _positive("space.num_layers", self.num_layers)
        _positive("space.input_size", self.input_size)
        _int_list("space.filters", self.filters)
        _int_list("space.kernel_heights", self.kernel_heights, odd=True)
        _int_list("space.kernel_widths", self.kernel_widths, odd=True)
        _int_list("space.strides", self.strides)
        if 1 not in self.strides:
            raise SpecError(f"space.strides must include 1 (the only stride a 1x1 map takes); "
                            f"got {_show(self.strides)}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    def choices(self, kind: str) -> tuple[int, ...]:
        return {"filters": self.filters, "kernel_h": self.kernel_heights,
                "kernel_w": self.kernel_widths, "stride": self.strides}[kind]

    def layout(self) -> list[tuple[int, str, int | None]]:
        """The decisions of one child in controller order: (layer, kind, skip source or None);
        per layer i, its skip bits (sources 0..i-2) then filters, kernel_h, kernel_w, stride."""
        out = []
        for i in range(self.num_layers):
            if self.skips:
                out += [(i, "skip", j) for j in range(i - 1)]
            out += [(i, kind, None) for kind in KINDS]
        return out

    def num_children(self) -> int:
        """How many distinct children the space holds (invalid stride patterns included)."""
        per_layer = math.prod(len(self.choices(k)) for k in KINDS)
        skip_bits = sum(max(i - 1, 0) for i in range(self.num_layers)) if self.skips else 0
        return per_layer ** self.num_layers * 2 ** skip_bits


@dataclasses.dataclass(frozen=True)
class Layer:
    """One conv layer of a child: conv(filters, kernel, stride) - BN - ReLU over the channel
    concatenation of layer i-1's output and the outputs of `skips` (ascending)."""
    filters: int
    kernel: tuple[int, int]
    stride: int = 1
    skips: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {"filters": self.filters, "kernel": list(self.kernel), "stride": self.stride,
                "skips": list(self.skips)}


@dataclasses.dataclass(frozen=True)
class Spec:
    """A child network: its layers and the space their choices come from."""
    layers: tuple[Layer, ...]
    space: Space = Space()

    def to_json(self) -> dict:
        return {"space": self.space.to_json(), "layers": [l.to_json() for l in self.layers]}

    @property
    def name(self) -> str:
        """nas_ + 8 hex digits of the spec's canonical JSON: equal specs, equal names."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return "nas_" + hashlib.sha1(text.encode()).hexdigest()[:8]

    def sizes(self, input_size: int | None = None) -> list[tuple[int, int]]:
        """(input, output) side of every layer's map at `input_size` (default the space's);
        SpecError when a stride needs more pixels than its input has."""
        n0 = self.space.input_size if input_size is None else input_size
        out: list[int] = []
        rows = []
        for i, layer in enumerate(self.layers):
            n = n0 if i == 0 else max([out[i - 1]] + [out[j] for j in layer.skips])
            if layer.stride > n:
                chain = " -> ".join(map(str, [n0] + out))
                raise SpecError(
                    f"layers[{i}] has stride {layer.stride} on a {n}x{n} map (at input_size "
                    f"{n0}: {chain}): the network would shrink below 1x1; use stride 1 there "
                    "or a larger input_size")
            out.append(-(-n // layer.stride))
            rows.append((n, out[-1]))
        return rows

    def min_input_size(self) -> int:
        """The smallest H = W the child takes: every stride has as many pixels as it needs."""
        for n in range(1, self.space.input_size + 1):
            try:
                self.sizes(n)
                return n
            except SpecError:
                pass
        return self.space.input_size + 1  # unreachable for a validated spec

    def in_channels(self, in_channels: int) -> list[int]:
        """Input channels of every layer: the concatenation of its inputs."""
        return [in_channels if i == 0 else
                self.layers[i - 1].filters + sum(self.layers[j].filters for j in layer.skips)
                for i, layer in enumerate(self.layers)]


def parse_layer(obj: Any, i: int, space: Space) -> Layer:
    where = f"layers[{i}]"
    obj = _fields(where, obj, ("filters", "kernel", "stride", "skips"), ("filters", "kernel"))
    filters = _positive(f"{where}.filters", obj["filters"])
    kernel = obj["kernel"]
    if isinstance(kernel, int) and not isinstance(kernel, bool):
        kernel = [kernel, kernel]
    if (not isinstance(kernel, list) or len(kernel) != 2
            or not all(isinstance(k, int) and not isinstance(k, bool) for k in kernel)):
        raise SpecError(f"{where}.kernel must be [height, width] (integers); got {_show(kernel)}")
    stride = _positive(f"{where}.stride", obj.get("stride", 1))
    skips = obj.get("skips", [])
    if not isinstance(skips, list) or not all(isinstance(j, int) and not isinstance(j, bool)
                                             for j in skips):
        raise SpecError(f"{where}.skips must be a list of layer indices; got {_show(skips)}")
    for value, kind, name in ((filters, "filters", "filters"),
                              (kernel[0], "kernel_h", "kernel height"),
                              (kernel[1], "kernel_w", "kernel width"),
                              (stride, "stride", "stride")):
        if value not in space.choices(kind):
            raise SpecError(f"{where}: {name} {value} is not a choice of the search space "
                            f"({', '.join(map(str, space.choices(kind)))})")
    if skips and not space.skips:
        raise SpecError(f"{where}.skips: the search space has no skips (space.skips is false)")
    for j in skips:
        if j >= i:
            raise SpecError(f"{where}.skips: {j} is a later layer (or itself); a layer takes "
                            "skips from earlier layers only")
        if j == i - 1:
            raise SpecError(f"{where}.skips: {j} is already layer {i}'s input; skips come from "
                            f"layers 0..{i - 2}")
        if j < 0:
            raise SpecError(f"{where}.skips: {j} is not a layer index (0..{i - 2})")
    if len(set(skips)) != len(skips):
        raise SpecError(f"{where}.skips lists a layer twice: {_show(skips)}")
    return Layer(filters, (kernel[0], kernel[1]), stride, tuple(sorted(skips)))


def parse_spec(obj: Any) -> Spec:
    """A validated Spec from its JSON object; SpecError names the first defect."""
    if isinstance(obj, Spec):
        obj = obj.to_json()
    obj = _fields("spec", obj, ("space", "layers"), ("layers",))
    space = Space.from_json(obj.get("space", {}))
    layers = obj["layers"]
    if not isinstance(layers, list) or not layers:
        raise SpecError(f"spec.layers must be a non-empty list of layers; got {_show(layers)}")
    if len(layers) > space.num_layers:
        raise SpecError(f"spec has {len(layers)} layers; the search space has at most "
                        f"{space.num_layers} (space.num_layers)")
    spec = Spec(tuple(parse_layer(l, i, space) for i, l in enumerate(layers)), space)
    spec.sizes()
    return spec


def load_spec(path: str | os.PathLike) -> Spec:
    """The spec in a JSON file (such as a search's best_spec.json); SpecError names the file."""
    where = os.fspath(path)
    try:
        with open(path) as f:
            obj = json.load(f)
    except OSError as e:
        raise SpecError(f"cannot read the spec file {where}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{where} is not JSON ({e})") from None
    try:
        return parse_spec(obj)
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None


def cost(spec: Spec, input_size: int | None = None, in_channels: int = 3,
         num_classes: int = 1000) -> tuple[int, int]:
    """(parameters, multiply-adds) of the built child, counted from the spec alone:
    conv kh*kw*cin*f (no bias) + BatchNorm 2f per layer, the classifier f*classes + classes;
    MACs = output pixels x kh*kw*cin*f per conv, f*classes for the classifier."""
    params = macs = 0
    cins = spec.in_channels(in_channels)
    for layer, cin, (_, n) in zip(spec.layers, cins, spec.sizes(input_size)):
        kh, kw = layer.kernel
        params += kh * kw * cin * layer.filters + 2 * layer.filters
        macs += n * n * kh * kw * cin * layer.filters
    last = spec.layers[-1].filters
    return params + last * num_classes + num_classes, macs + last * num_classes


def decode(space: Space, decisions: Sequence[int]) -> Spec:
    """The spec of one controller sample (`Space.layout` order: choice indices, skip bits)."""
    decisions = [int(d) for d in np.asarray(decisions).reshape(-1)]
    layout = space.layout()
    if len(decisions) != len(layout):
        raise ValueError(f"{len(decisions)} decisions for a space of {len(layout)}")
    per_layer: list[dict] = [{"skips": []} for _ in range(space.num_layers)]
    for (i, kind, j), d in zip(layout, decisions):
        if kind == "skip":
            if d:
                per_layer[i]["skips"].append(j)
        else:
            per_layer[i][kind] = space.choices(kind)[d]
    layers = tuple(Layer(p["filters"], (p["kernel_h"], p["kernel_w"]), p["stride"],
                         tuple(p["skips"])) for p in per_layer)
    spec = Spec(layers, space)
    spec.sizes()
    return spec


def uniform_decisions(space: Space, seed: int, n: int) -> np.ndarray:
    """n children drawn uniformly from `space` (every choice, and each skip bit, equally
    likely), [n, D] int32 in `Space.layout` order; a pure function of (seed, n). Strides that
    would shrink a child below 1x1 are not masked: for spaces of strides [1] (a supergraph)."""
    rng = np.random.default_rng(seed)
    sizes = [2 if kind == "skip" else len(space.choices(kind)) for _, kind, _ in space.layout()]
    return (rng.random((n, len(sizes))) * np.asarray(sizes)).astype(np.int32)


def encode(spec: Spec) -> np.ndarray:
    """The controller decisions that give `spec` (it must have space.num_layers layers)."""
    space = spec.space
    if len(spec.layers) != space.num_layers:
        raise ValueError(f"a spec of {len(spec.layers)} layers is not a sample of a space of "
                         f"{space.num_layers}")
    out = []
    for i, kind, j in space.layout():
        layer = spec.layers[i]
        if kind == "skip":
            out.append(int(j in layer.skips))
        else:
            value = {"filters": layer.filters, "kernel_h": layer.kernel[0],
                     "kernel_w": layer.kernel[1], "stride": layer.stride}[kind]
            out.append(space.choices(kind).index(value))
    return np.asarray(out, np.int32)
