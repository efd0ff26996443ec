"""The docs stay true: every fenced `python -m` command of README.md and docs/*.md names a module
that exists and flags its parser accepts (the cheap ones are run for real), every relative link
resolves, and the generated tables in docs/ are their generators' output."""
import argparse
import contextlib
import functools
import importlib
import importlib.util
import inspect
import io
import pathlib
import re
import shlex
import subprocess
import sys
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROJECT = {"cnnjax", "experiments", "benchmarks"}  # their commands' flags are checked
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
# Fast enough to run for real (seconds, writing nothing): each must appear in the docs.
CHEAP = ("python -m cnnjax.summary --arch=alexnet --input_size=227",
         "python -m experiments.zoo --render_only --no_readme")


def text(name: str) -> str:
    return (ROOT / name).read_text()


def between(page: str, start: str, end: str) -> str:
    body = text(page)
    assert body.count(start) == 1 and body.count(end) == 1, f"{page}: one {start} ... {end}"
    return body.split(start)[1].split(end)[0].strip()


class Command(NamedTuple):
    where: str    # page:line
    module: str
    argv: list

    @property
    def line(self) -> str:
        return shlex.join(["python", "-m", self.module, *self.argv])


def fenced_commands(markdown: str, page: str) -> list[Command]:
    """The `python -m MODULE ARGS` commands of the page's shell (and unlabelled) code blocks:
    continuation lines joined, comments dropped, `A && B` split, `VAR=value` prefixes skipped."""
    found, fence, logical, start = [], None, "", 0
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence not in SHELL_FENCES:
            continue
        if not logical:
            start = number
        logical += line
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        command, logical = logical, ""
        if not re.search(r"(^|&&)\s*([A-Za-z_]\w*=\S*\s+)*python -m ", command):
            continue  # prose or output in an unlabelled block
        tokens = shlex.split(command, comments=True)
        segments, current = [], []
        for token in tokens:
            if token in ("&&", "||", ";"):
                segments.append(current)
                current = []
            else:
                current.append(token)
        segments.append(current)
        for segment in segments:
            while segment and re.fullmatch(r"[A-Za-z_]\w*=.*", segment[0]):
                segment = segment[1:]  # an environment assignment
            if segment[:2] == ["python", "-m"] and len(segment) > 2:
                found.append(Command(f"{page}:{start}", segment[2], segment[3:]))
    return found


COMMANDS = [c for page in PAGES
            for c in fenced_commands(page.read_text(), page.relative_to(ROOT).as_posix())]


class _Parsed(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


@functools.cache
def parser_of(module_name: str) -> argparse.ArgumentParser:
    """The argument parser `module.main` builds: main is called with no arguments and stopped
    at its first parse, so nothing after the parse runs."""
    module = importlib.import_module(module_name)
    main = getattr(module, "main", None)
    assert callable(main), f"{module_name} has no main(): not a command"
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, args=None, namespace=None):
        raise _Parsed(self)

    argparse.ArgumentParser.parse_known_args = capture  # parse_args calls it too
    try:
        main([]) if inspect.signature(main).parameters else main()
    except _Parsed as parsed:
        return parsed.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise AssertionError(f"{module_name}.main() returned without parsing any arguments")


def parse_error(command: Command) -> str | None:
    """None when the command's module exists and its parser accepts the arguments, else why."""
    if importlib.util.find_spec(command.module) is None:
        return f"no module {command.module}"
    if command.module.split(".")[0] not in PROJECT:
        return None  # pip's, venv's, pytest's: it is enough that the module exists
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parser_of(command.module).parse_args(command.argv)
        except SystemExit as e:
            if e.code:
                return err.getvalue().strip() or f"exit status {e.code}"
    return None


def test_the_docs_have_commands_for_every_entry_point():
    modules = {c.module for c in COMMANDS}
    assert {"experiments.train", "experiments.nas", "experiments.benchmark",
            "experiments.complexity", "experiments.curves", "experiments.ensemble",
            "experiments.zoo", "cnnjax.summary", "cnnjax.convert", "cnnjax.predict",
            "experiments.validate"} <= modules


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where} {c.module}" for c in COMMANDS])
def test_every_fenced_command_parses(command):
    error = parse_error(command)
    assert error is None, f"{command.where}: `{command.line}`: {error}"


def test_the_command_check_refuses_what_a_parser_refuses():
    good = Command("x", "cnnjax.summary", ["--arch=alexnet", "--input_size=227"])
    assert parse_error(good) is None
    assert "--no_such_flag" in parse_error(good._replace(argv=[*good.argv, "--no_such_flag=1"]))
    assert "invalid choice" in parse_error(good._replace(argv=[*good.argv, "--format=pdf"]))
    assert parse_error(good._replace(module="cnnjax.no_such_module")) == \
        "no module cnnjax.no_such_module"
    page = ("python -m no.such.module --in_prose\n```python\nx = 1  # python -m a.b\n```\n"
            "```bash\npip install -e . && FOO=1 python -m cnnjax.summary --arch=vgg16 \\\n"
            "    --plot='v 1.png'  # bars\n. .venv/bin/activate\n```\n")
    assert [c.line for c in fenced_commands(page, "probe.md")] == [
        "python -m cnnjax.summary --arch=vgg16 '--plot=v 1.png'"]


@pytest.mark.parametrize("line", CHEAP)
def test_cheap_commands_run(line):
    assert line in {c.line for c in COMMANDS}, f"`{line}` is no longer in the docs"
    out = subprocess.run([sys.executable, *shlex.split(line)[1:]], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    if "cnnjax.summary" in line:  # the excerpt docs/models.md shows is this output
        excerpt = re.findall(r"^(?:conv1|pool1|fc8|TOTAL) .*$", text("docs/models.md"), re.M)
        assert len(excerpt) == 4 and set(excerpt) <= set(out.stdout.splitlines())
    else:
        from experiments import zoo
        assert out.stdout.strip() == between("docs/training.md", zoo.START, zoo.END)


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve_and_every_page_links_back():
    broken = []
    for page in PAGES:
        body = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", body):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
        if page.parent.name == "docs":
            title, summary = body.split("\n\n")[:2]
            assert title.startswith("# ") and "](../README.md)" in summary, (
                f"{page.name}: a title, then a one-paragraph summary linking back to the README")
    assert not broken, broken


def test_zoo_table_is_rendered_from_the_recorded_runs_and_every_run_clears_the_bar():
    from experiments import zoo
    assert zoo.PAGE == ROOT / "docs" / "training.md"
    results = zoo.ordered(zoo.read(zoo.RESULTS), zoo.STANDARD)
    table = between("docs/training.md", zoo.START, zoo.END)
    assert table == zoo.render(results), (
        "docs/training.md's zoo table is stale: python -m experiments.zoo --render_only")
    missing = [(r["arch"], r["seed"]) for r in results if r.get("missing")]
    assert not missing, f"zoo runs not measured: {missing} (python -m experiments.zoo resumes)"
    below = {(r["arch"], r["seed"]) for r in results if r.get("top1", 0) < zoo.BAR}
    known = set(zoo.KNOWN_BELOW)
    assert below == known, (f"runs below the {zoo.BAR:.0%} bar: {sorted(below)}; known to be "
                            f"(zoo.KNOWN_BELOW, each with its open issue): {sorted(known)}")


def test_zoo_runs_the_readme_command_first_and_marks_what_is_not_measured():
    from experiments import zoo
    order = zoo.run_order(zoo.STANDARD)
    assert sorted(order) == sorted(zoo.STANDARD)
    assert order[:3] == [("resnet18", 0), ("resnet18", 1), ("resnet18", 2)]
    machine = {k: "x" for k in ("cpu", "cores", "devices", "python", "jax", "jaxlib", "flax",
                                "optax", "date")}
    done = {"arch": "vgg16", "seed": 0, "top1": 0.97, "max_eval_loss": 0.2, "blowups": 0,
            "steps": 220, "wall_s": 900.0, "img_per_s": 16.0, "machine": machine}
    rows = zoo.ordered([done], [("alexnet", 0), ("vgg16", 0)])
    assert rows[0] == {"arch": "alexnet", "seed": 0, "missing": True} and rows[1] is done
    rendered = zoo.render(rows)
    assert "1 of 1 runs reach the 95% bar; 1 not measured yet" in rendered
    assert "| alexnet | 0 | not measured yet |" in rendered
    assert "| vgg16 | 0 | 97.00% |" in rendered
    low = zoo.render([{**done, "top1": 0.775}])
    assert "0 of 1 runs reach the 95% bar" in low
    assert "| vgg16 | 0 | 77.50% (below the bar) |" in low


def test_input_table_was_written_by_the_benchmark():
    from experiments import benchmark
    table = between("docs/data.md", benchmark.INPUT_START, benchmark.INPUT_END)
    assert table.startswith("`python -m experiments.benchmark --mode=input "), (
        "python -m experiments.benchmark --mode=input ... --readme=docs/data.md writes it")
    assert "| workers | cnnjax img/s (median) | per worker | reference img/s (median) | ratio |" \
        in table
    assert "--readme=docs/data.md" in {a for c in COMMANDS if c.module == "experiments.benchmark"
                                       for a in c.argv}, "docs/data.md gives the command"
