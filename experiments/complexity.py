"""The model table: every registered model's parameters and multiply-adds, from `cnnjax.profile`.

    python -m experiments.complexity                 # print the markdown table
    python -m experiments.complexity --update_readme # rewrite the table in README.md
    python -m experiments.complexity --plot=complexity.png   # also draw the lecture's figure

The README's table is this script's output, never typed by hand (a test checks they agree).
Top-1 is torchvision's published ImageNet accuracy for the same architecture (first weights),
read from tests/reference/torchvision_published.csv; "-" where torchvision has no such network.
The figure (`cnnjax.plots.complexity`) also plots, marked as such, the paper's own top-1 for
networks torchvision lacks, from tests/reference/paper_top1.csv (each row names its paper and
table); a model with neither is left out of the accuracy panel, never given a number.
"""
from __future__ import annotations

import argparse
import csv
import pathlib
import sys
from typing import Any, Sequence

import cnnjax
from cnnjax import flags
from cnnjax.models import model_spec

ROOT = pathlib.Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "tests" / "reference" / "torchvision_published.csv"
PAPER_TOP1 = ROOT / "tests" / "reference" / "paper_top1.csv"
START, END = "<!-- model-table:start -->", "<!-- model-table:end -->"


def _torchvision_published() -> dict[str, dict[str, str]]:
    """torchvision's first published weights with an accuracy, per torchvision model name."""
    rows: dict[str, dict[str, str]] = {}
    with open(PUBLISHED, newline="") as f:
        for row in csv.DictReader(f):
            if row["acc1"] != "nan":
                rows.setdefault(row["model"], row)
    return rows


def torchvision_top1() -> dict[str, str]:
    return {name: row["acc1"] for name, row in _torchvision_published().items()}


def paper_top1() -> dict[str, tuple[float, str]]:
    """The papers' own top-1 (%) for networks torchvision lacks: {model: (top1, source)}."""
    with open(PAPER_TOP1, newline="") as f:
        return {row["model"]: (float(row["top1"]), row["source"]) for row in csv.DictReader(f)}


def top1(name: str) -> tuple[float | None, str | None, str | None]:
    """(top-1 %, kind, source) of a registered model: torchvision's published acc@1 for the same
    architecture, else the paper's own figure from paper_top1.csv, else (None, None, None)."""
    published, papers = _torchvision_published(), paper_top1()
    reference = model_spec(name).reference
    if reference in published:
        row = published[reference]
        return (float(row["acc1"]), "torchvision",
                f"torchvision {row['weights_enum']} acc@1 ({PUBLISHED.name})")
    if name in papers:
        return papers[name][0], "paper", f"{papers[name][1]} ({PAPER_TOP1.name})"
    return None, None, None


def complexity_rows(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One dict per model (default: every registered one) for the table and the figure.

    params, macs (multiply-adds) and activation_bytes are `cnnjax.profile`'s at the model's
    quoted input size; top1, top1_kind ("torchvision", "paper" or None) and top1_source (the
    weights or the paper and table) are `top1(name)`'s.
    """
    from cnnjax.plots import family
    rows = []
    for name in cnnjax.list_models() if names is None else names:
        spec = model_spec(name)
        prof = cnnjax.profile(name, spec.input_size)
        acc, kind, source = top1(name)
        rows.append({"name": name, "family": family(name), "params": prof.params,
                     "macs": prof.macs, "activation_bytes": prof.activation_bytes,
                     "input_size": spec.input_size, "top1": acc, "top1_kind": kind,
                     "top1_source": source})
    return rows


def model_table(rows: Sequence[dict[str, Any]] | None = None) -> str:
    published = torchvision_top1()
    lines = ["| model | params | GMACs | input | torchvision top-1 |", "|---|--:|--:|--:|--:|"]
    for row in complexity_rows() if rows is None else rows:
        acc = published.get(model_spec(row["name"]).reference or "", "-")
        lines.append(f"| {row['name']} | {row['params'] / 1e6:.2f}M | {row['macs'] / 1e9:.3f} | "
                     f"{row['input_size']} | {acc} |")
    return "\n".join(lines)


def update_readme(path: pathlib.Path, rows: Sequence[dict[str, Any]] | None = None) -> bool:
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{model_table(rows)}\n{END}{tail}"
    path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = flags.ArgumentParser(prog="python -m experiments.complexity", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update_readme", action="store_true")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="also draw the complexity figure to PATH (.png, .pdf, .svg, ...)")
    args = parser.parse_args(argv)
    if args.plot is not None:
        from cnnjax import plots
        try:
            plots.check_path("plot", args.plot)
        except ValueError as e:
            return flags.fail(e)
    rows = complexity_rows()
    if args.update_readme:
        changed = update_readme(ROOT / "README.md", rows)
        print("README.md table updated" if changed else "README.md table already up to date")
    else:
        print(model_table(rows))
    if args.plot is not None:
        plots.complexity(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
