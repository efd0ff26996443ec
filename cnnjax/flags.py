"""What every cnnjax command line shares: one-line errors and the rules flag values obey.

Bad input of any kind ends in ONE line on stderr, `error: ...` saying what was expected and what
was got, and exit status 2, before any JAX work: argparse's own complaints (`ArgumentParser`)
and the checks of `Rule`, `check` and `check_directory` alike.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import numbers
import os
import sys
from typing import Any, Callable, Mapping


def fail(message: Any, status: int = 2) -> int:
    """Prints `error: message` on stderr; returns `status` (default that of bad input, 2)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return status


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one `error: ...` line (no usage dump) and exit status 2.

    Abbreviated flags are refused (`--step=3` is not silently `--steps=3`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        unknown = message.partition("unrecognized arguments: ")[2].split()
        close = difflib.get_close_matches(unknown[0].split("=")[0], self._option_string_actions,
                                          1) if unknown else []
        self.exit(fail(message + (f"; did you mean {close[0]}?" if close else "")))


def show(value: Any) -> str:
    """A value as a shell would take it after `--name=` (strings quoted, dicts as JSON)."""
    if isinstance(value, dict):
        return json.dumps(value, default=repr)
    return repr(value) if isinstance(value, str) else str(value)


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_finite(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a flag's value must be: `expected` in words, `ok` as a test, and the message."""
    expected: str
    ok: Callable[[Any], bool]
    message: str = "--{name}={value} must be {expected}"

    def check(self, name: str, value: Any) -> None:
        if not self.ok(value):
            raise ValueError(self.message.format(name=name, value=show(value),
                                                 expected=self.expected))


TEXT = Rule("a string", lambda v: isinstance(v, str))
POSITIVE_INT = Rule("a positive integer", lambda v: is_int(v) and v > 0)
POSITIVE = Rule("a finite number > 0", lambda v: is_finite(v) and v > 0)
NON_NEGATIVE_INT = Rule("an integer >= 0", lambda v: is_int(v) and v >= 0)
NON_NEGATIVE = Rule("a finite number >= 0", lambda v: is_finite(v) and v >= 0)
FRACTION = Rule("a number in [0, 1)", lambda v: is_finite(v) and 0 <= v < 1)
UINT32 = Rule("an integer in [0, 2**32)", lambda v: is_int(v) and 0 <= v < 2**32)
PATH = Rule("a non-empty path", lambda v: isinstance(v, (str, os.PathLike)) and bool(os.fspath(v)))
JSON_OBJECT = Rule("a JSON object such as '{\"zero_init_residual\": true}'",
                   lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v))


def one_of(*choices: str) -> Rule:
    return Rule(" or ".join(choices), lambda v: isinstance(v, str) and v in choices,
                "unknown {name} {value}; --{name} must be {expected}")


def optional(rule: Rule) -> Rule:
    """`rule`, or None (unset: the default applies)."""
    return dataclasses.replace(rule, ok=lambda v: v is None or rule.ok(v))


def check(values: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """Raises ValueError for the first of `values` that breaks its rule in `rules`."""
    for name, rule in rules.items():
        rule.check(name, values[name])


def json_object(text: str) -> dict:
    """argparse type of a JSON-object flag: bad JSON is a one-line error, not a traceback."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"expected {JSON_OBJECT.expected}; got {text!r}, which is not JSON ({e})") from None
    if not JSON_OBJECT.ok(value):
        raise argparse.ArgumentTypeError(f"expected {JSON_OBJECT.expected}; got {text!r}")
    return value


def check_directory(name: str, value: Any, path: str | os.PathLike | None = None) -> None:
    """`--name=value` (opened as `path`, default `value`) must be a directory that exists or can
    be made: a non-empty path with no file in its place or above it."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"--{name}={show(value)} must be a directory path")
    target = os.path.abspath(os.fspath(value if path is None else path))
    p = target
    while not os.path.lexists(p):  # the nearest part that exists (the root always does)
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        what = "it is" if p == target else f"{p} is"
        raise ValueError(f"--{name}={show(value)} must be a directory, but {what} a file")


def check_existing_directory(name: str, value: Any, what: str) -> None:
    """`--name=value` must be a directory that exists; `what` says what it should hold."""
    PATH.check(name, value)
    if not os.path.exists(value):
        raise ValueError(f"--{name}={show(value)} does not exist; it must be {what}")
    if not os.path.isdir(value):
        raise ValueError(f"--{name}={show(value)} is a file; it must be {what}")
