"""The README's commands and model table stay true."""
import pathlib
import re


ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    block = README.split("## Set up and test")[1].split("```bash")[1].split("```")[0]
    command = block.strip().splitlines()[-1]
    assert command == 'pip install -e ".[test,torch]" && python -m pytest'
    assert command in (ROOT / ".ci" / "run").read_text()


def test_readme_summary_excerpt_matches_the_real_output():
    from cnnjax import profile, summary
    text = summary.render(profile("alexnet", 227))
    for line in re.findall(r"^(?:conv1|pool1|fc8|TOTAL) .*$", README, re.M):
        assert line in text.splitlines()


def test_zoo_table_is_rendered_from_the_recorded_runs_and_every_run_clears_the_bar():
    from experiments import zoo
    results = zoo.ordered(zoo.read(zoo.RESULTS), zoo.STANDARD)
    table = README.split(zoo.START)[1].split(zoo.END)[0].strip()
    assert table == zoo.render(results), (
        "README zoo table is stale: python -m experiments.zoo --render_only")
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
    text = zoo.render(rows)
    assert "1 of 1 runs reach the 95% bar; 1 not measured yet" in text
    assert "| alexnet | 0 | not measured yet |" in text and "| vgg16 | 0 | 97.00% |" in text
    low = zoo.render([{**done, "top1": 0.775}])
    assert "0 of 1 runs reach the 95% bar" in low and "| vgg16 | 0 | 77.50% (below the bar) |" in low


def test_readme_input_table_was_written_by_the_benchmark():
    from experiments import benchmark
    table = README.split(benchmark.INPUT_START)[1].split(benchmark.INPUT_END)[0].strip()
    assert table.startswith("`python -m experiments.benchmark --mode=input "), (
        "python -m experiments.benchmark --mode=input ... --readme=README.md writes it")
    assert "| workers | cnnjax img/s (median) | per worker | reference img/s (median) | ratio |" \
        in table
