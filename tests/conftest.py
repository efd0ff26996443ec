"""Shared test set-up: reference tables (copied from the papers and torchvision) and helpers."""
import csv
import os
import pathlib
import tempfile

import pytest

os.environ.setdefault("KERAS_HOME", "/tmp/cnnjax-test-keras")  # importing TF writes keras.json
# JAX's persistent compilation cache (programs that took over a second to compile), for these
# tests and the CLIs they start in subprocesses: many compile the same train steps. Set before
# JAX is imported; .ci/run points it into CI's scratch directory.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "cnnjax-test-jax-cache"))

from helpers import FAST_COMPILE_FLAGS  # noqa: E402 - after the cache's place is set

# Compile for compile speed (helpers.FAST_COMPILE_FLAGS): read when JAX's CPU backend starts.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

REFERENCE = pathlib.Path(__file__).parent / "reference"


def pytest_collection_modifyitems(items):
    """The slow tests first: on xdist's workers they then overlap the many short ones instead of
    running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def read_csv(name: str) -> list[dict[str, str]]:
    with open(REFERENCE / name, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The embedded digits, prepared once for the whole session."""
    from cnnjax import data
    d = tmp_path_factory.mktemp("tfds")
    data.dataset_info("digits", data_dir=str(d))
    return str(d)
