"""Writes cnnjax's weight registry from torchvision's weight enums (needs torchvision).

    python -m experiments.weight_registry            # rewrites cnnjax/data/pretrained_weights.json
    python -m experiments.weight_registry --check    # exit 1 if the file differs from torchvision

For each architecture cnnjax shares with torchvision, every set of ImageNet-1k classification
weights torchvision publishes for it (IMAGENET1K_V1, _V2): the file's URL, the SHA-256 prefix its
name carries (what torch.hub's check_hash verifies), the published top-1/top-5, the evaluation
transform, the parameter count, the file size and the training recipe. vgg16's
IMAGENET1K_FEATURES (an SSD backbone with no classifier metrics or categories) is left out.

cnnjax reads the JSON at run time (`cnnjax.pretrained`); this script is only how it was made,
and tests/test_pretrained.py checks the file against the installed torchvision.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from typing import Any

from cnnjax import convert
from cnnjax.pretrained import HASH_IN_NAME

ROOT = pathlib.Path(__file__).resolve().parent.parent
REGISTRY = ROOT / "cnnjax" / "data" / "pretrained_weights.json"
CATEGORIES_FILE = "imagenet_classes.txt"
# torchvision's googlenet builder sets transform_input=True when it loads published weights:
# the network re-normalises ImageNet-normalised input to (x - 0.5) / 0.5 (see convert.FAMILIES).
TRANSFORM_INPUT = ("googlenet",)


def _entry(weights: Any) -> dict[str, Any]:
    meta, transform = weights.meta, weights.transforms()
    file = weights.url.rsplit("/", 1)[-1]
    found = HASH_IN_NAME.findall(file)
    if not found:
        raise ValueError(f"{weights}: {file} carries no hash prefix")
    metrics = meta["_metrics"]["ImageNet-1K"]
    return {"url": weights.url, "sha256_prefix": found[-1],
            "top1": metrics["acc@1"], "top5": metrics["acc@5"],
            "num_params": meta["num_params"], "file_mb": meta["_file_size"],
            "recipe": meta["recipe"],
            "transform": {"resize": transform.resize_size[0], "crop": transform.crop_size[0],
                          "interpolation": transform.interpolation.value,
                          "antialias": transform.antialias,
                          "mean": list(transform.mean), "std": list(transform.std)}}


def build() -> dict[str, Any]:
    """The registry as torchvision describes it; ValueError where its categories are not the
    ones cnnjax ships (then the categories file would need a second copy)."""
    import torchvision
    from torchvision.models import get_model_weights
    shipped = (ROOT / "cnnjax" / "data" / CATEGORIES_FILE).read_text().splitlines()
    archs = {}
    for arch in convert.shared_architectures():
        enum = get_model_weights(arch)
        entries = {}
        for w in enum:
            metrics = w.meta["_metrics"].get("ImageNet-1K", {})
            if not w.meta.get("categories") or any(math.isnan(v) for v in metrics.values()):
                continue  # not classification weights (vgg16's IMAGENET1K_FEATURES)
            if list(w.meta["categories"]) != shipped:
                raise ValueError(f"{arch} {w.name}: categories differ from {CATEGORIES_FILE}")
            entries[w.name] = _entry(w)
        archs[arch] = {"default": enum.DEFAULT.name, "weights": entries}
        if arch in TRANSFORM_INPUT:
            archs[arch]["transform_input"] = True
    return {"source": f"torchvision {torchvision.__version__.split('+')[0]} weight enums "
                      "(torchvision.models.get_model_weights); python -m "
                      "experiments.weight_registry",
            "categories": CATEGORIES_FILE, "architectures": archs}


def render(registry: dict[str, Any]) -> str:
    return json.dumps(registry, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.weight_registry",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare the shipped file with torchvision instead of writing it")
    args = parser.parse_args(argv)
    registry = build()
    text = render(registry)
    if args.check:
        same = REGISTRY.read_text() == text
        print(f"{REGISTRY}: {'matches' if same else 'differs from'} torchvision")
        return 0 if same else 1
    REGISTRY.write_text(text)
    print(f"wrote {REGISTRY} ({len(registry['architectures'])} architectures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
