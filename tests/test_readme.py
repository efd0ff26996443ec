"""The README's commands and model table stay true."""
import pathlib
import re

from experiments import complexity

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_model_table_is_the_generated_one():
    table = README.split(complexity.START)[1].split(complexity.END)[0].strip()
    assert table == complexity.model_table(), (
        "README model table is stale: run python -m experiments.complexity --update_readme")


def test_ci_runs_the_readme_test_command():
    block = README.split("## Set up and test")[1].split("```bash")[1].split("```")[0]
    command = block.strip().splitlines()[-1]
    assert command == 'pip install -e ".[test]" && python -m pytest'
    assert command in (ROOT / ".ci" / "run").read_text()


def test_readme_summary_excerpt_matches_the_real_output():
    from cnnjax import profile, summary
    text = summary.render(profile("alexnet", 227))
    for line in re.findall(r"^(?:conv1|pool1|fc8|TOTAL) .*$", README, re.M):
        assert line in text.splitlines()


def test_zoo_table_is_rendered_from_the_recorded_runs_and_every_run_clears_the_bar():
    from experiments import zoo
    results = zoo.ordered(zoo.read(zoo.RESULTS), zoo.STANDARD)
    assert [(r["arch"], r["seed"]) for r in results] == zoo.STANDARD, (
        "the zoo results miss runs: python -m experiments.zoo")
    table = README.split(zoo.START)[1].split(zoo.END)[0].strip()
    assert table == zoo.render(results), "README zoo table is stale: python -m experiments.zoo"
    below = [(r["arch"], r["seed"], r.get("top1")) for r in results if r.get("top1", 0) < zoo.BAR]
    assert not below, f"runs below the {zoo.BAR:.0%} bar: {below}"
