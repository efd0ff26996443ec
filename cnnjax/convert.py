"""torchvision's checkpoints in cnnjax, exact, for every architecture the two share.

    variables = from_torchvision("resnet50", state_dict)   # torchvision names -> numpy or torch
    model = cnnjax.create_model("resnet50")
    logits = model.apply(variables, images_nhwc, train=False)

    python -m cnnjax.convert --arch=resnet50 --checkpoint=resnet50-0676ba61.pth --out=weights/r50
    model, variables, meta = load_pretrained("weights/r50")

The command reads a torchvision `.pth` (which needs PyTorch, installed by the user: it is never a
dependency of cnnjax), a `.safetensors` or an `.npz` (neither needs PyTorch) and writes the
variables as an orbax checkpoint beside `pretrained.json`: the architecture, the class count, the
source file and its SHA-256, and the preprocessing the weights expect.

How names map is data per family (`FAMILIES`): rules pairing a cnnjax layer (a regex over its
path) with the torchvision module it comes from (a template whose `{...}` fields are arithmetic
over the regex's groups). Sequential-indexed models (VGG, the mobile networks) number modules by
position, so templates may also use `n`, the 1-based rank of the layer's repeated unit (a VGG
conv, an inverted-residual block) in natural order, `units`, their count, `has(name)`, 1 when the
unit holds a layer `name`, `batch_norm`, 1 when the model has BatchNorm, and `cb[m]`, 0 for a
`conv` and 1 for its `bn` in a (conv, bn) pair.

Tensors: conv weights OIHW -> HWIO (grouped and depthwise alike: (kh, kw, in/groups, out)),
linear weights transposed, a 1x1 conv feeding a Dense (MobileNetV3's squeeze-excite) squeezed,
the first Dense after a flatten (AlexNet's and VGG's fc6, GoogLeNet's auxiliary fc1) permuted from
PyTorch's (C, H, W) flatten order to NHWC's (H, W, C), BatchNorm weight/bias/running statistics to
scale/bias/mean/var. Every tensor is checked: a missing, unexpected or mis-shaped one raises a
`ConversionError` naming it.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import re
import shutil
import sys
from typing import Any, Mapping

import numpy as np

from cnnjax import flags

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
META_FILE = "pretrained.json"
VARIABLES_DIR = "variables"


class ConversionError(ValueError):
    """A state dict that does not fit the cnnjax model: the message names every tensor at fault."""


@dataclasses.dataclass(frozen=True)
class Family:
    rules: tuple[tuple[str, str], ...]             # (cnnjax layer regex, torchvision template)
    head: str = "fc"                               # the cnnjax classifier layer
    unit: str | None = None                        # regex whose group 1 names the repeated unit
    flatten: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    optional: str | None = None                    # torchvision keys dropped where the model
                                                   # lacks them
    aliases: tuple[tuple[str, str], ...] = ()      # older torchvision spellings -> current ones
    mean: tuple[float, ...] = IMAGENET_MEAN        # what torchvision's published weights expect
    std: tuple[float, ...] = IMAGENET_STD


_CONV_BN = "(?P<m>conv|bn)"
_BLOCK = r"stage(?P<s>\d+)_block(?P<b>\d+)"

FAMILIES: dict[str, Family] = {
    "alexnet": Family(
        rules=((r"conv(?P<i>\d)", "features.{(0, 3, 6, 8, 10)[i - 1]}"),
               (r"fc(?P<i>\d)", "classifier.{(1, 4, 6)[i - 6]}")),
        head="fc8", flatten={"fc6": (6, 6)}),
    # features: per conv "conv, [bn,] relu", a max-pool after each stage.
    "vgg": Family(
        rules=((r"conv(?P<s>\d)_\d", "features.{(n - 1) * (2 + batch_norm) + s - 1}"),
               (r"bn(?P<s>\d)_\d", "features.{(n - 1) * 3 + s}"),
               (r"fc(?P<i>\d)", "classifier.{(0, 3, 6)[i - 6]}")),
        head="fc8", unit=r"(?:conv|bn)(\d_\d)", flatten={"fc6": (7, 7)}),
    "resnet": Family(
        rules=(("conv_init", "conv1"), ("bn_init", "bn1"),
               (_BLOCK + r"/(?P<m>conv|bn)(?P<i>\d)", "layer{s}.{b - 1}.{m}{i}"),
               (_BLOCK + r"/conv_proj", "layer{s}.{b - 1}.downsample.0"),
               (_BLOCK + r"/bn_proj", "layer{s}.{b - 1}.downsample.1"),
               ("fc", "fc"))),
    "densenet": Family(
        rules=((r"(?P<m>conv0|norm0|norm5)", "features.{m}"),
               (r"denseblock(?P<d>\d)_layer(?P<l>\d+)/(?:bottleneck/)?(?P<m>\w+)",
                "features.denseblock{d}.denselayer{l}.{m}"),
               (r"transition(?P<t>\d)/(?P<m>\w+)", "features.transition{t}.{m}"),
               ("fc", "classifier")),
        # Checkpoints published before torchvision 0.3 spell "norm.1" for "norm1" (and conv).
        aliases=((r"(denselayer\d+\.(?:norm|relu|conv))\.(\d)\.", r"\1\2."),)),
    "googlenet": Family(
        rules=((r"conv(?P<i>\d)/" + _CONV_BN, "conv{i}.{m}"),
               *((rf"inception(?P<k>\w+)/{ours}/" + _CONV_BN, f"inception{{k}}.{theirs}.{{m}}")
                 for ours, theirs in (("branch1x1", "branch1"), ("branch3x3_reduce", "branch2.0"),
                                      ("branch3x3", "branch2.1"),
                                      ("branch5x5_reduce", "branch3.0"),
                                      ("branch5x5", "branch3.1"),
                                      ("branch_pool_proj", "branch4.1"))),
               (r"aux(?P<a>\d)/conv/" + _CONV_BN, "aux{a}.conv.{m}"),
               (r"aux(?P<a>\d)/(?P<f>fc\d)", "aux{a}.{f}"),
               ("fc", "fc")),
        flatten={"aux1/fc1": (4, 4), "aux2/fc1": (4, 4)}, optional=r"aux\d\..*",
        # torchvision's published GoogLeNet runs with transform_input=True, which turns
        # ImageNet-normalised input into (x - 0.5) / 0.5: the same as normalising with these.
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    # features: 0 stem, 1..units inverted residuals ("conv": [expand,] dw, project conv, bn), last.
    "mobilenet_v2": Family(
        rules=((r"stem/" + _CONV_BN, "features.0.{cb[m]}"),
               (_BLOCK + r"/expand/" + _CONV_BN, "features.{n}.conv.0.{cb[m]}"),
               (_BLOCK + r"/dw/" + _CONV_BN, "features.{n}.conv.{has('expand')}.{cb[m]}"),
               (_BLOCK + r"/project/" + _CONV_BN,
                "features.{n}.conv.{1 + has('expand') + cb[m]}"),
               (r"conv_last/" + _CONV_BN, "features.{units + 1}.{cb[m]}"),
               ("fc", "classifier.1")),
        unit=r"(stage\d+_block\d+)/"),
    # features: 0 stem, 1..units blocks ("block": [expand,] dw, [se,] project), last.
    "mobilenet_v3": Family(
        rules=((r"stem/" + _CONV_BN, "features.0.{cb[m]}"),
               (r"block\d+/expand/" + _CONV_BN, "features.{n}.block.0.{cb[m]}"),
               (r"block\d+/dw/" + _CONV_BN, "features.{n}.block.{has('expand')}.{cb[m]}"),
               (r"block\d+/se/fc_squeeze", "features.{n}.block.{1 + has('expand')}.fc1"),
               (r"block\d+/se/fc_expand", "features.{n}.block.{1 + has('expand')}.fc2"),
               (r"block\d+/project/" + _CONV_BN,
                "features.{n}.block.{1 + has('expand') + has('se')}.{cb[m]}"),
               (r"conv_last/" + _CONV_BN, "features.{units + 1}.{cb[m]}"),
               ("fc_hidden", "classifier.0"), ("fc", "classifier.3")),
        unit=r"(block\d+)/"),
    # branch1 (downsampling blocks only): dw, bn, pw, bn; branch2: pw, bn, dw, bn, pw, bn.
    "shufflenet_v2": Family(
        rules=((r"stem/" + _CONV_BN, "conv1.{cb[m]}"),
               (_BLOCK + r"/left_dw/" + _CONV_BN, "stage{s}.{b - 1}.branch1.{cb[m]}"),
               (_BLOCK + r"/left_pw/" + _CONV_BN, "stage{s}.{b - 1}.branch1.{2 + cb[m]}"),
               (_BLOCK + r"/right_pw1/" + _CONV_BN, "stage{s}.{b - 1}.branch2.{cb[m]}"),
               (_BLOCK + r"/right_dw/" + _CONV_BN, "stage{s}.{b - 1}.branch2.{3 + cb[m]}"),
               (_BLOCK + r"/right_pw2/" + _CONV_BN, "stage{s}.{b - 1}.branch2.{5 + cb[m]}"),
               (r"conv_last/" + _CONV_BN, "conv5.{cb[m]}"),
               ("fc", "fc"))),
    # layers: 0-2 stem, 3-7 separable conv, 8-13 stages of inverted residuals, 14-16 last.
    "mnasnet": Family(
        rules=((r"stem/" + _CONV_BN, "layers.{cb[m]}"),
               (r"sepconv/dw/" + _CONV_BN, "layers.{3 + cb[m]}"),
               (r"sepconv/pw/" + _CONV_BN, "layers.{6 + cb[m]}"),
               *((_BLOCK + rf"/{part}/" + _CONV_BN,
                  f"layers.{{s + 7}}.{{b - 1}}.layers.{{{offset} + cb[m]}}")
                 for part, offset in (("expand", 0), ("dw", 3), ("project", 6))),
               (r"conv_last/" + _CONV_BN, "layers.{14 + cb[m]}"),
               ("fc", "classifier.1"))),
}

_FAMILY_OF = (("alexnet", "alexnet"), ("vgg", "vgg"), ("resnet", "resnet"), ("resnext", "resnet"),
              ("wide_resnet", "resnet"), ("densenet", "densenet"), ("googlenet", "googlenet"),
              ("mobilenet_v2", "mobilenet_v2"), ("mobilenet_v3", "mobilenet_v3"),
              ("shufflenet_v2", "shufflenet_v2"), ("mnasnet", "mnasnet"))


def shared_architectures() -> list[str]:
    """The cnnjax architectures torchvision also has (same name, same computation)."""
    from cnnjax.models import list_models, model_spec
    return [n for n in list_models() if model_spec(n).reference == n]


def family(arch: str) -> Family:
    """The name-mapping family of `arch`; ValueError for an architecture torchvision lacks."""
    if arch in shared_architectures():
        for prefix, name in _FAMILY_OF:
            if arch.startswith(prefix):
                return FAMILIES[name]
    raise ValueError(f"torchvision has no {arch!r}; the architectures both share are: "
                     f"{', '.join(shared_architectures())}")


def _abstract_variables(arch: str, num_classes: int, overrides: Mapping[str, Any]) -> dict:
    import jax
    import jax.numpy as jnp

    from cnnjax.models import create_model, model_spec
    model = create_model(arch, num_classes=num_classes, **overrides)
    size = model_spec(arch).input_size
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _layers(abstract: dict) -> dict[str, dict[tuple[str, str], tuple[int, ...]]]:
    """{layer path: {(collection, leaf): shape}} in the model's order."""
    from flax import traverse_util
    out: dict[str, dict] = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in traverse_util.flatten_dict(abstract.get(collection, {})).items():
            out.setdefault("/".join(path[:-1]), {})[(collection, path[-1])] = tuple(leaf.shape)
    return out


def _fill(template: str, env: dict) -> str:
    return re.sub(r"\{([^{}]+)\}",
                  lambda m: str(eval(m[1], {"__builtins__": {}}, env)), template)  # noqa: S307


def _module_names(fam: Family, layers: Mapping[str, Any]) -> dict[str, str]:
    """{cnnjax layer: torchvision module} by the family's rules."""
    units: list[str] = []
    if fam.unit:
        found = {m[1] for p in layers if (m := re.match(fam.unit, p))}
        units = sorted(found, key=lambda u: [int(t) if t.isdigit() else t
                                             for t in re.split(r"(\d+)", u)])
    batch_norm = int(any(("params", "scale") in leaves for leaves in layers.values()))
    names = {}
    for layer in layers:
        found = next(((template, m) for pattern, template in fam.rules
                      if (m := re.fullmatch(pattern, layer))), None)
        if found is None:
            raise ConversionError(f"no torchvision name is known for the cnnjax layer {layer!r}")
        template, match = found
        env = {k: int(v) if v.isdigit() else v for k, v in match.groupdict().items()}
        unit = re.match(fam.unit, layer) if fam.unit else None
        if unit:
            prefix = unit[1]
            env["n"] = units.index(prefix) + 1
            env["has"] = lambda name, p=prefix: int(any(
                q.startswith(f"{p}/{name}/") or q == f"{p}/{name}" for q in layers))
        env.update(units=len(units), batch_norm=batch_norm, cb={"conv": 0, "bn": 1})
        names[layer] = _fill(template, env)
    return names


_TORCH_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
               "var": "running_var"}


def torchvision_names(arch: str, *, num_classes: int = 1000, **overrides: Any) -> dict[str, str]:
    """{"params/fc/kernel": "fc.weight", ...}: the torchvision tensor behind each cnnjax one."""
    fam = family(arch)
    layers = _layers(_abstract_variables(arch, num_classes, overrides))
    modules = _module_names(fam, layers)
    return {f"{c}/{layer}/{leaf}": f"{modules[layer]}.{_TORCH_LEAF[leaf]}"
            for layer, leaves in layers.items() for c, leaf in leaves}


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: no torch import needed to read it
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def _torch_shape(shape: tuple[int, ...], source_ndim: int) -> tuple[int, ...]:
    """The torchvision shape of a cnnjax kernel (for messages and checks)."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2 and source_ndim == 4:
        return (shape[1], shape[0], 1, 1)
    return tuple(reversed(shape))


def _to_cnnjax(value: np.ndarray, shape: tuple[int, ...], flatten: tuple[int, int] | None):
    if len(shape) == 4:                       # OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if len(shape) == 2 and value.ndim == 4:   # a 1x1 conv standing in for a Dense
        return value[:, :, 0, 0].T
    if len(shape) == 2 and flatten:           # (out, C*H*W) -> (H*W*C, out)
        h, w = flatten
        out, features = value.shape
        return value.reshape(out, features // (h * w), h, w).transpose(2, 3, 1, 0).reshape(
            -1, out)
    return value.T if len(shape) == 2 else value


def _canonical(fam: Family, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in fam.aliases:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def from_torchvision(name: str, state_dict: Mapping[str, Any], *, num_classes: int | None = None,
                     **overrides: Any) -> dict:
    """`{"params", "batch_stats"}` for `cnnjax.create_model(name, num_classes=..., **overrides)`
    from a torchvision state dict (tensor name -> numpy array or torch tensor).

    `num_classes=None` takes the class count from the classifier in `state_dict`. Tensors the
    model does not build (GoogLeNet's auxiliary heads without `aux_logits=True`) are dropped;
    any other extra, missing or mis-shaped tensor raises ConversionError naming it."""
    variables, _ = convert(name, state_dict, num_classes=num_classes, **overrides)
    return variables


def convert(name: str, state_dict: Mapping[str, Any], *, num_classes: int | None = None,
            **overrides: Any) -> tuple[dict, list[str]]:
    """`from_torchvision`, also returning the names of the tensors it dropped."""
    from flax import traverse_util
    fam = family(name)
    state_dict = _canonical(fam, state_dict)
    default = 1000
    layers = _layers(_abstract_variables(name, num_classes or default, overrides))
    modules = _module_names(fam, layers)  # the same for any class count
    if num_classes is None:
        head = f"{modules[fam.head]}.weight"
        if head not in state_dict:
            raise ConversionError(f"{name}: the state dict has no classifier {head!r}, so the "
                                  "class count is unknown; pass num_classes")
        num_classes = int(np.shape(state_dict[head])[0])
        if num_classes != default:
            layers = _layers(_abstract_variables(name, num_classes, overrides))
    flat, missing, wrong, used = {}, [], [], set()
    for layer, leaves in layers.items():
        for (collection, leaf), shape in leaves.items():
            key = f"{modules[layer]}.{_TORCH_LEAF[leaf]}"
            if key not in state_dict:
                missing.append(f"{key} (for {collection}/{layer}/{leaf})")
                continue
            used.add(key)
            value = _numpy(state_dict[key])
            expected = _torch_shape(shape, value.ndim)
            if value.shape != expected:
                wrong.append(f"{key} has shape {tuple(value.shape)}, {name} needs {expected} "
                             f"(for {collection}/{layer}/{leaf} {shape})")
                continue
            flat[(collection, *layer.split("/"), leaf)] = np.asarray(
                _to_cnnjax(value, shape, fam.flatten.get(layer)), np.float32)
    bn_modules = {modules[layer] for layer, leaves in layers.items()
                  if ("params", "scale") in leaves}
    dropped, extra = [], []
    for key in state_dict:
        if key in used:
            continue
        module, _, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked" and module in bn_modules:
            continue
        if fam.optional and re.fullmatch(fam.optional, key):
            dropped.append(key)
        else:
            extra.append(key)
    problems = [(f"{len(missing)} missing", missing), (f"{len(extra)} unexpected", extra),
                (f"{len(wrong)} of the wrong shape", wrong)]
    problems = [(title, items) for title, items in problems if items]
    if problems:
        lines = [f"the state dict does not fit cnnjax's {name} ({num_classes} classes):"]
        for title, items in problems:
            lines.append(f"  {title}: " + "; ".join(items[:8])
                         + (f"; ... {len(items) - 8} more" if len(items) > 8 else ""))
        raise ConversionError("\n".join(lines))
    return traverse_util.unflatten_dict(flat), dropped


# --- files -------------------------------------------------------------------------------------

FORMATS = {".pth": "torch", ".pt": "torch", ".bin": "torch", ".safetensors": "safetensors",
           ".npz": "npz"}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensor name -> numpy array from a `.pth`/`.pt` (needs torch), `.safetensors` or `.npz`.

    A checkpoint that wraps its state dict ({"state_dict": ...} or {"model": ...}) is unwrapped,
    and a "module." prefix on every key (DataParallel) removed."""
    path = pathlib.Path(path)
    kind = FORMATS.get(path.suffix)
    if kind is None:
        raise ValueError(f"{path}: expected a .pth, .pt, .safetensors or .npz file")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    if kind == "torch":
        try:
            import torch
        except ImportError:
            raise ValueError(f"{path}: reading a PyTorch file needs torch (pip install torch); "
                             "without it, convert .safetensors or .npz files") from None
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    elif kind == "safetensors":
        from safetensors.numpy import load_file
        loaded = load_file(path)
    else:
        with np.load(path, allow_pickle=False) as npz:
            loaded = dict(npz)
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not loaded:
        raise ValueError(f"{path} holds no state dict (a mapping of tensor names to tensors)")
    if all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module."):]: v for k, v in loaded.items()}
    return {k: _numpy(v) for k, v in loaded.items()}


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def preprocessing(arch: str) -> dict[str, Any]:
    """torchvision's ImageNet evaluation transform for `arch`'s published V1 weights (its V2
    weights resize to 232, not 256: the command's --resize)."""
    fam = family(arch)
    return {"resize": 256, "crop": 224, "interpolation": "bilinear", "mean": list(fam.mean),
            "std": list(fam.std)}


def check_out(out: str | os.PathLike, overwrite: bool = False) -> None:
    """The output directory must be new or empty; with `overwrite`, it may hold an earlier
    conversion (pretrained.json), which is replaced. Nothing else a user saved is touched."""
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; the output must be a directory")
    if out.is_dir() and any(out.iterdir()) and not (overwrite and is_converted(out)):
        raise ValueError(f"{out} is not empty; choose a new directory"
                         + ("" if overwrite else " (or pass --overwrite to replace an earlier "
                            "conversion there)"))


def save_pretrained(out: str | os.PathLike, arch: str, variables: dict, *,
                    num_classes: int, source: dict | None = None,
                    preprocess: dict | None = None, overwrite: bool = False) -> pathlib.Path:
    """Writes OUT/variables (orbax) and OUT/pretrained.json. OUT must be new or empty; with
    `overwrite`, an earlier conversion's OUT (one holding pretrained.json) is replaced."""
    import orbax.checkpoint as ocp
    out = pathlib.Path(out).absolute()
    check_out(out, overwrite)
    if is_converted(out):  # check_out let it through: overwrite an earlier conversion
        shutil.rmtree(out / VARIABLES_DIR, ignore_errors=True)
        (out / META_FILE).unlink()
    out.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / VARIABLES_DIR, variables)
    checkpointer.wait_until_finished()
    meta = {"arch": arch, "num_classes": num_classes,
            "preprocess": preprocess or preprocessing(arch), "source": source or {},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_meta(path: str | os.PathLike, flag: str | None = None) -> dict:
    """pretrained.json of a directory written by `save_pretrained` / the command, checked to name
    a registered architecture, a class count and the preprocessing, beside its variables;
    ValueError, naming PATH (as `--flag=PATH` when given), saying what is wrong otherwise."""
    from cnnjax.models import model_spec
    what = "a directory written by python -m cnnjax.convert"
    meta_file = pathlib.Path(path) / META_FILE
    path = f"--{flag}={flags.show(path)}" if flag else path
    if not meta_file.is_file():
        raise ValueError(f"{path} holds no {META_FILE}: it is not {what}")
    try:
        meta = json.loads(meta_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: its {META_FILE} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its {META_FILE} is not a JSON object")
    for key, ok in (("arch", lambda v: isinstance(v, str)), ("num_classes", flags.POSITIVE_INT.ok),
                    ("preprocess", lambda v: isinstance(v, dict))):
        if not ok(meta.get(key)):
            raise ValueError(f"{path}: its {META_FILE} has no valid {key!r} "
                             f"(got {flags.show(meta.get(key))})")
    try:
        model_spec(meta["arch"])
    except ValueError as e:
        raise ValueError(f"{path} holds weights of an architecture this cnnjax lacks: {e}") \
            from None
    if not (meta_file.parent / VARIABLES_DIR).is_dir():
        raise ValueError(f"{path} holds no {VARIABLES_DIR}/ directory; it must be {what}")
    return meta


def is_converted(path: str | os.PathLike) -> bool:
    """Whether PATH looks like converted weights (holds pretrained.json), not a run's workdir."""
    return (pathlib.Path(path) / META_FILE).is_file()


def load_pretrained(path: str | os.PathLike, **overrides: Any):
    """(model, variables, meta) of a directory written by `save_pretrained` / the command:
    `model.apply(variables, x, train=False)`, with `meta["preprocess"]` saying how to make x."""
    import jax
    import orbax.checkpoint as ocp

    from cnnjax.models import create_model
    meta = read_meta(path)
    arch, num_classes = meta["arch"], meta["num_classes"]
    abstract = _abstract_variables(arch, num_classes, overrides)
    target = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    variables = ocp.StandardCheckpointer().restore(
        pathlib.Path(path).absolute() / VARIABLES_DIR, target)
    variables = jax.tree.map(np.asarray, variables)
    return create_model(arch, num_classes=num_classes, **overrides), variables, meta


# --- the command -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = flags.ArgumentParser(
        prog="python -m cnnjax.convert",
        description="Converts a torchvision checkpoint into a cnnjax pretrained directory.")
    parser.add_argument("--arch", required=True, help="a cnnjax architecture torchvision shares")
    parser.add_argument("--checkpoint", required=True,
                        help="torchvision weights: .pth (needs torch), .safetensors or .npz")
    parser.add_argument("--out", required=True, help="new directory for the converted weights")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="default: the classifier's size in the checkpoint")
    parser.add_argument("--resize", type=int, default=256,
                        help="shorter side before the centre crop (torchvision's V2 weights: 232)")
    parser.add_argument("--crop", type=int, default=224, help="centre crop the weights expect")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier conversion in --out")
    args = parser.parse_args(argv)
    try:
        family(args.arch)
        flags.optional(flags.POSITIVE_INT).check("num_classes", args.num_classes)
        flags.POSITIVE_INT.check("resize", args.resize)
        flags.POSITIVE_INT.check("crop", args.crop)
        if args.crop > args.resize:
            raise ValueError(f"--crop={args.crop} must be at most --resize={args.resize}")
        if FORMATS.get(pathlib.Path(args.checkpoint).suffix) is None:
            raise ValueError(f"--checkpoint={flags.show(args.checkpoint)} must be a .pth, .pt, "
                             ".safetensors or .npz file")
        if not os.path.isfile(args.checkpoint):
            raise ValueError(f"--checkpoint={flags.show(args.checkpoint)} does not exist")
        flags.check_directory("out", args.out)
        try:
            check_out(args.out, args.overwrite)
        except ValueError as e:
            raise ValueError(f"--out={e}") from None
        state_dict = read_state_dict(args.checkpoint)
        variables, dropped = convert(args.arch, state_dict, num_classes=args.num_classes)
    except ValueError as e:
        return flags.fail(str(e).replace("\n", " "))
    num_classes = int(variables["params"][family(args.arch).head]["bias"].shape[0])
    source = {"file": os.path.abspath(args.checkpoint), "sha256": sha256(args.checkpoint),
              "format": FORMATS[pathlib.Path(args.checkpoint).suffix], "tensors": len(state_dict),
              "dropped": dropped}
    preprocess = {**preprocessing(args.arch), "resize": args.resize, "crop": args.crop}
    save_pretrained(args.out, args.arch, variables, num_classes=num_classes, source=source,
                    preprocess=preprocess, overwrite=args.overwrite)
    import jax
    print(f"{args.arch}: {len(jax.tree.leaves(variables))} tensors converted"
          + (f", {len(dropped)} dropped ({', '.join(sorted({k.split('.')[0] for k in dropped}))}:"
             " not built by this model)" if dropped else "")
          + f"; {num_classes} classes; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
