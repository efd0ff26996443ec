"""Named presets for experiments.train: `--config=NAME`; any flag overrides a preset's value.

Each preset is a module with a docstring that opens with the command that runs it, a `CONFIG`
dict of TrainConfig fields and, optionally, `PER_ARCH`: (fnmatch pattern, settings, why) rows
applied on top of CONFIG for the architectures they match (every matching row, in order;
`model_overrides` dicts are merged). From Python:
`TrainConfig(**configs.load("default", arch="vgg16"))` is what the command line trains.
"""
import fnmatch
import importlib
import pkgutil


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def merge(base: dict, settings: dict) -> dict:
    """`settings` over `base`, with `model_overrides` merged key by key rather than replaced."""
    out = {**base, **settings}
    if "model_overrides" in base and "model_overrides" in settings:
        out["model_overrides"] = {**base["model_overrides"], **settings["model_overrides"]}
    return out


def load(name: str, arch: str | None = None) -> dict:
    """The preset's settings for `arch` (default: the preset's own arch, if it names one)."""
    if name not in names():
        raise ValueError(f"unknown --config={name!r}; presets: {', '.join(names())}")
    module = importlib.import_module(f"{__name__}.{name}")
    values = dict(module.CONFIG)
    arch = arch or values.get("arch")
    for pattern, settings, _why in getattr(module, "PER_ARCH", ()):
        if arch and fnmatch.fnmatchcase(arch, pattern):
            values = merge(values, settings)
    return values
