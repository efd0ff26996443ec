"""Shared test set-up: reference tables (copied from the papers and torchvision) and helpers."""
import csv
import os
import pathlib

os.environ.setdefault("KERAS_HOME", "/tmp/cnnjax-test-keras")  # importing TF writes keras.json

REFERENCE = pathlib.Path(__file__).parent / "reference"


def read_csv(name: str) -> list[dict[str, str]]:
    with open(REFERENCE / name, newline="") as f:
        return list(csv.DictReader(f))
