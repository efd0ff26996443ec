"""The README stays a landing page: the set-up commands CI runs, links to the docs, the model
table, and no measurement diary (that is docs/performance.md's)."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TEST_COMMAND = 'pip install -e ".[test,torch]" && ruff check . && python -m pytest'


def test_ci_runs_the_readme_test_command():
    block = README.split("## Set up and test")[1].split("```bash")[1].split("```")[0]
    command = block.strip().splitlines()[-1]
    assert command == TEST_COMMAND
    assert command in (ROOT / ".ci" / "run").read_text(), (
        ".ci/run must run the README's test command verbatim")


def test_readme_is_a_landing_page():
    lines = README.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"
    from experiments import zoo
    assert zoo.START not in README and zoo.END not in README, "the zoo table lives in docs/"
    assert "<!-- input-benchmark:" not in README, "the input-speed table lives in docs/data.md"
    table = README.split("<!-- model-table:start -->")[1].split("<!-- model-table:end -->")[0]
    prose = README.replace(table, "")
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", prose), "dates go to docs/performance.md"
    commit = r"(?<![\w.-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}(?![\w.-])"
    assert not re.search(commit, prose), "commit hashes go to docs/performance.md"


def test_readme_links_every_docs_page():
    pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    linked = set(re.findall(r"\]\((docs/[^)#\s]+\.md)", README))
    assert set(pages) <= linked, f"README does not link {sorted(set(pages) - linked)}"
