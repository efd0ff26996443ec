"""The model table: every registered model's parameters and multiply-adds, from `cnnjax.profile`.

    python -m experiments.complexity                 # print the markdown table
    python -m experiments.complexity --update_readme # rewrite the table in README.md

The README's table is this script's output, never typed by hand (a test checks they agree).
Top-1 is torchvision's published ImageNet accuracy for the same architecture (first weights),
read from tests/reference/torchvision_published.csv; "-" where torchvision has no such network.
"""
from __future__ import annotations

import argparse
import csv
import pathlib
import sys

import cnnjax
from cnnjax.models import model_spec

ROOT = pathlib.Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "tests" / "reference" / "torchvision_published.csv"
START, END = "<!-- model-table:start -->", "<!-- model-table:end -->"


def torchvision_top1() -> dict[str, str]:
    top1: dict[str, str] = {}
    with open(PUBLISHED, newline="") as f:
        for row in csv.DictReader(f):
            if row["acc1"] != "nan":
                top1.setdefault(row["model"], row["acc1"])
    return top1


def model_table() -> str:
    top1 = torchvision_top1()
    lines = ["| model | params | GMACs | input | torchvision top-1 |", "|---|--:|--:|--:|--:|"]
    for name in cnnjax.list_models():
        spec = model_spec(name)
        prof = cnnjax.profile(name, spec.input_size)
        acc = top1.get(spec.reference or "", "-")
        lines.append(f"| {name} | {prof.params / 1e6:.2f}M | {prof.macs / 1e9:.3f} | "
                     f"{spec.input_size} | {acc} |")
    return "\n".join(lines)


def update_readme(path: pathlib.Path) -> bool:
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{model_table()}\n{END}{tail}"
    path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update_readme", action="store_true")
    args = parser.parse_args(argv)
    if args.update_readme:
        changed = update_readme(ROOT / "README.md")
        print("README.md table updated" if changed else "README.md table already up to date")
    else:
        print(model_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
