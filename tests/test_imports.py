"""Imports run one way: every import of every module (top-level and inside functions) goes to
its own layer or one below, and no modules import each other in a circle.

The layers, bottom first (cnnjax/__init__.py's docstring says the same):

0. flags: command-line checks every layer uses;
1. models: the networks and their ops (fastconv), the NAS spec language and network
   (models/nasspec.py, nasnet.py), and what reads a model alone: profile, summary, plots;
2. runtime: how programs compile and where they run (runtime, parallel) and the orbax wrapper
   (checkpoint);
3. inputs, what a run reads or starts from: data, convert (torchvision weights), pretrained
   (the weight registry, download, verify, cache), transfer (--init_from's layer matching).
   DESIGN.md places convert, pretrained and transfer here, below training, because a run starts
   from them (`--init_from` reads converted weights and copies layers). The `cnnjax` package
   itself sits here too: it re-exports `pretrained` (DESIGN.md's `cnnjax.pretrained(...)`),
   besides models and parallel's host settings, so it may import this layer; no module below
   imports the package;
4. training: cnnjax.training and its stable path cnnjax.train;
5. what builds on training: nas (the search trains children with the trainer's steps),
   ensemble, predict, evaluate (measures weights and runs' checkpoints with the trainer's eval
   step and predict's transform);
6. tools: benchmarks and experiments (thin entry points, presets, notebooks' helpers).
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("cnnjax", "experiments", "benchmarks")

LAYERS = [  # (name, module prefixes); a module takes the layer of its longest matching prefix
    ("flags", ["cnnjax.flags"]),
    ("models", ["cnnjax.models", "cnnjax.profile", "cnnjax.summary", "cnnjax.plots"]),
    ("runtime", ["cnnjax.runtime", "cnnjax.parallel", "cnnjax.checkpoint"]),
    ("inputs", ["cnnjax", "cnnjax.data", "cnnjax.convert", "cnnjax.pretrained",
                "cnnjax.transfer"]),
    ("training", ["cnnjax.training", "cnnjax.train"]),
    ("built on training", ["cnnjax.nas", "cnnjax.ensemble", "cnnjax.predict",
                           "cnnjax.evaluate"]),
    ("tools", ["benchmarks", "experiments"]),
]


def module_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every module of the packages: dotted name -> file."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(name: str, path: pathlib.Path, modules: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file. `from P import X` counts as an
    import of P.X where P.X is a module, else of P (a name P's __init__ defines)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name in a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def layer(module: str) -> int:
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    assert found is not None, f"{module} is in no layer: add it to LAYERS"
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer(m)][0]}) imports {t} ({LAYERS[layer(t)][0]})"
                  for m, targets in graph.items() for t in targets if layer(t) > layer(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between cnnjax's subpackages and top-level modules (cnnjax.nas, cnnjax.train,
    ...): a circle between two packages is a circle even when no two modules close it."""
    def unit(m: str) -> str:
        return ".".join(m.split(".")[:2])
    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        if m.startswith("cnnjax."):
            out.setdefault(unit(m), set()).update(
                unit(t) for t in targets if t.startswith("cnnjax.") and unit(t) != unit(m))
    return out


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_is_in_a_layer(graph):
    for m in graph:
        layer(m)
    assert {"cnnjax.training.loop", "cnnjax.runtime", "cnnjax.nas.search",
            "experiments.train"} <= set(graph)


def test_no_import_runs_up_the_layers(graph):
    assert upward_imports(graph) == []


def test_no_modules_import_each_other_in_a_circle(graph):
    assert cycles(graph) == []


def test_no_packages_import_each_other_in_a_circle(graph):
    assert cycles(package_graph(graph)) == []


def test_a_searched_network_reaches_the_trainer_through_the_model_layer(graph):
    training = [m for m in graph if m.startswith("cnnjax.training") or m == "cnnjax.train"]
    assert not [(m, t) for m in training for t in graph[m] if t.startswith("cnnjax.nas")]
    assert "cnnjax.models.nasnet" in graph["cnnjax.training.config"]


def test_the_checks_find_what_they_look_for():
    """An upward import, a circle of modules and one of packages, in a made-up graph."""
    made_up = {"cnnjax.models.vgg": {"cnnjax.train"}, "cnnjax.train": set(),
               "cnnjax.nas.a": {"cnnjax.nas.b"}, "cnnjax.nas.b": {"cnnjax.nas.a"},
               "cnnjax.ensemble": {"cnnjax.predict"}, "cnnjax.predict": {"cnnjax.ensemble"}}
    assert upward_imports(made_up) == [
        "cnnjax.models.vgg (models) imports cnnjax.train (training)"]
    assert cycles(made_up) == [["cnnjax.ensemble", "cnnjax.predict"],
                               ["cnnjax.nas.a", "cnnjax.nas.b"]]
    assert cycles(package_graph({"cnnjax.nas.a": {"cnnjax.train"},
                                 "cnnjax.train": {"cnnjax.nas.b"}})) == [
        ["cnnjax.nas", "cnnjax.train"]]


def test_imports_inside_functions_count(tmp_path):
    (tmp_path / "cnnjax" / "models").mkdir(parents=True)
    for d in ("experiments", "benchmarks"):
        (tmp_path / d).mkdir()
    (tmp_path / "cnnjax" / "__init__.py").write_text("")
    (tmp_path / "cnnjax" / "train.py").write_text("")
    (tmp_path / "cnnjax" / "models" / "__init__.py").write_text("")
    (tmp_path / "cnnjax" / "models" / "vgg.py").write_text(
        "def f():\n    from cnnjax import train\n    return train\n")
    assert import_graph(tmp_path)["cnnjax.models.vgg"] == {"cnnjax.train"}
