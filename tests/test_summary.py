"""python -m cnnjax.summary: the lecture's table in four formats, and its errors."""
import csv
import io
import json
import subprocess
import sys

import pytest

from cnnjax import summary


def run(*args):
    return subprocess.run([sys.executable, "-m", "cnnjax.summary", *args], capture_output=True,
                          text=True, timeout=300)


def test_alexnet_table_as_the_lecture_prints_it():
    out = run("--arch=alexnet", "--input_size=227")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "1 FLOP = 1 MAC" in text and "61,100,840 params" in text
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    #            layer kind in_C in_HxW filters kernel stride pad out_C out_HxW KB params_k MFLOP
    assert lines["conv1"] == ["conv1", "conv", "3", "227", "64", "11", "4", "2", "64", "56",
                              "784.0", "23.296", "72.856"]
    assert lines["pool1"][-4:] == ["27", "182.2", "0.0", "0.0"]
    assert lines["fc6"][-3:] == ["16.0", "37752.832", "37.749"]
    assert lines["TOTAL"] == ["TOTAL", "2375.2", "61100.84", "716.767"]


def test_grouped_and_depthwise_convs_are_marked():
    rows = {r["layer"]: r for r in csv.DictReader(io.StringIO(
        summary.render(__import__("cnnjax").profile("alexnet_v1", 227), "csv")))}
    assert rows["conv1"]["kind"] == "conv" and rows["conv2"]["kind"] == "gconv/2"
    assert rows["conv2"]["filters"] == "256"  # two GPUs' worth of filters, 48 inputs each
    rows = list(csv.DictReader(io.StringIO(
        summary.render(__import__("cnnjax").profile("mobilenet_v1", 64), "csv"))))
    assert {r["kind"] for r in rows if r["kernel"] == "3"} == {"conv", "dwconv"}


def test_csv_json_and_markdown_formats_parse():
    prof_csv = list(csv.DictReader(io.StringIO(run("--arch=zfnet", "--format=csv").stdout)))
    assert prof_csv[0]["layer"] == "conv1" and prof_csv[0]["out_HxW"] == "110"
    assert prof_csv[-1]["layer"] == "TOTAL" and prof_csv[-1]["MFLOP"] == "1168.033"
    data = json.loads(run("--arch=alexnet_v1", "--format=json").stdout)
    assert data["input_shape"] == [1, 227, 227, 3]  # alexnet_v1 is quoted at 227
    assert data["params"] == 60_965_224 and data["macs"] == 724_406_816
    assert "multiply-adds" in data["note"]
    md = run("--arch=vgg11", "--format=markdown").stdout.splitlines()
    assert md[2].startswith("| layer | kind |") and md[3].startswith("|---|")


def test_too_small_input_is_one_line_naming_the_smallest_size():
    out = run("--arch=alexnet", "--input_size=32")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: alexnet needs an input of at least 63x63 pixels; got 32x32"]


def test_unknown_arch_is_one_line_with_suggestions():
    out = run("--arch=vgg16bn")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "vgg16_bn" in out.stderr


def test_render_in_process_matches_profile_totals():
    import cnnjax
    prof = cnnjax.profile("resnet18", 64)
    text = summary.render(prof, "table")
    assert f"{prof.params:,} params" in text
    assert text.count("\n") == len(prof.layers) + 5  # title, 3 rules, header, total


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "markdown"])
def test_every_format_renders_every_layer(fmt):
    import cnnjax
    prof = cnnjax.profile("se_resnet18", 64)
    text = summary.render(prof, fmt)
    for layer in prof.layers:
        assert layer.name in text
