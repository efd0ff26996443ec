"""experiments.benchmark against PyTorch: --compare=torch and --all run both frameworks in fresh
processes and write BENCHMARKS.md; the committed BENCHMARKS.md came from that command."""
import json
import pathlib

import numpy as np
import pytest

from experiments import benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("torchvision")


def test_all_compares_each_architecture_before_and_after_and_writes_the_table(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "ALL_ARCHS", ("resnet18",))
    out = tmp_path / "B.md"
    argv = ["--all", "--rounds=1", "--steps=1", "--batch_size=2", "--image_size=32",
            "--num_classes=10", f"--out={out}"]
    assert benchmark.main(argv) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for side, conv in (("before", "xla"), ("after", "auto")):
        r = row[side]
        assert r["arch"] == "resnet18" and r["conv"] == conv and r["batch_size"] == 2
        assert r["cnnjax_img_per_s"] > 0 and r["torch_img_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["cnnjax_img_per_s"] / r["torch_img_per_s"])
        assert r["compile_s"] > 0 and r["flops"] > 0 and r["temp_bytes_per_image"] > 0
        assert len(r["rounds"]["cnnjax"]) == len(r["rounds"]["torch"]) == 1
    text = out.read_text()
    assert f"Written by `python -m experiments.benchmark {' '.join(argv)}`" in text
    assert "PyTorch 2." in text and "| resnet18 | " in text
    table_row = next(line for line in text.splitlines() if line.startswith("| resnet18 |"))
    torch = np.median(row["before"]["rounds"]["torch"] + row["after"]["rounds"]["torch"])
    assert f"| {torch:.2f} | {row['before']['cnnjax_img_per_s'] / torch:.2f} | " \
           f"{row['after']['cnnjax_img_per_s'] / torch:.2f} |" in table_row


def test_the_committed_benchmarks_were_written_by_the_harness():
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert "Written by `python -m experiments.benchmark --all" in text, (
        "python -m experiments.benchmark --all writes BENCHMARKS.md")
    rows = [line.split("|")[1].strip() for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| arch")]
    assert rows == list(benchmark.ALL_ARCHS)
