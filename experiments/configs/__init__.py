"""Named presets for experiments.train: `--config=NAME`; any flag overrides a preset's value.

Each preset is a module with a docstring that opens with the command that runs it and a
`CONFIG` dict of TrainConfig fields.
"""
import importlib
import pkgutil


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def load(name: str) -> dict:
    if name not in names():
        raise ValueError(f"unknown --config={name!r}; presets: {', '.join(names())}")
    return dict(importlib.import_module(f"{__name__}.{name}").CONFIG)
