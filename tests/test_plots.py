"""The lecture's pictures: the complexity rows are cnnjax.profile's numbers, every plotted accuracy
comes from a reference file with its source, the PNGs are real pictures with no overlapping
labels, and the --plot flags write them or fail with one line."""
import json
import pathlib
import re
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from conftest import read_csv
from matplotlib.text import Text

import cnnjax
from cnnjax import plots, summary
from cnnjax.models import model_spec
from experiments import complexity

# Each kind of accuracy source: torchvision (alexnet, vgg11, resnet18, shufflenet_v2_x0_5),
# the paper (alexnet_v1, zfnet, mobilenet_v1, shufflenet_v1_g3, se_resnet50), none (googlenet_v1).
ROOT = pathlib.Path(__file__).resolve().parent.parent
FEW = ["alexnet", "alexnet_v1", "zfnet", "vgg11", "resnet18", "se_resnet50", "mobilenet_v1",
       "shufflenet_v1_g3", "shufflenet_v2_x0_5", "googlenet_v1"]


@pytest.fixture(scope="module")
def rows():
    return complexity.complexity_rows(FEW)


@pytest.fixture(scope="module")
def alexnet_227():
    return cnnjax.profile("alexnet", 227)


def run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=600)


def assert_picture(path, min_height=300):
    """A written, non-blank picture: sizeable, many colours, no single colour covering it all."""
    image = matplotlib.image.imread(path)
    h, w = image.shape[:2]
    assert h >= min_height and w >= 600, image.shape
    pixels = image[..., :3].reshape(-1, 3)
    colours, counts = np.unique((pixels * 255).round().astype(np.uint8), axis=0,
                                return_counts=True)
    assert len(colours) > 50 and counts.max() < 0.95 * len(pixels)
    return image


def label_boxes(ax):
    """(text, pixel box of the text alone, without an annotation's leader line) per label, as
    last drawn (savefig draws)."""
    renderer = ax.figure.canvas.get_renderer()
    return [(t.get_text(), Text.get_window_extent(t, renderer)) for t in ax.texts]


# ----- the numbers behind the complexity figure


def test_complexity_rows_are_the_profile_numbers(rows):
    assert [r["name"] for r in rows] == FEW
    for row in rows:
        prof = cnnjax.profile(row["name"], model_spec(row["name"]).input_size)
        assert (row["params"], row["macs"], row["activation_bytes"]) == (
            prof.params, prof.macs, prof.activation_bytes)
        assert row["input_size"] == model_spec(row["name"]).input_size
    by_name = {r["name"]: r for r in rows}
    assert by_name["alexnet_v1"]["input_size"] == 227
    assert by_name["alexnet_v1"]["params"] == 60_965_224  # derived_counts.csv
    assert by_name["resnet18"]["macs"] == 1_814_073_344
    # The printed table shows the same params and GMACs.
    table = complexity.model_table(rows).splitlines()[2:]
    for row, line in zip(rows, table):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [row["name"], f"{row['params'] / 1e6:.2f}M",
                             f"{row['macs'] / 1e9:.3f}"]


def test_families_group_the_lecture_s_architectures():
    expected = {"zfnet": "alexnet", "vgg19_bn": "vgg", "googlenet_v1": "googlenet",
                "se_resnet50": "resnet", "resnext50_32x4d": "resnet", "wide_resnet50_2": "resnet",
                "densenet121": "densenet", "mnasnet1_0": "mobilenet", "mobilenet_v1": "mobilenet",
                "shufflenet_v1_g3": "shufflenet"}
    assert {n: plots.family(n) for n in expected} == expected
    assert all(plots.family(n) != "other" for n in cnnjax.list_models())


def test_every_accuracy_comes_from_a_reference_file_with_its_source():
    published = {}
    for r in read_csv("torchvision_published.csv"):
        if r["acc1"] != "nan":
            published.setdefault(r["model"], r)
    papers = {r["model"]: r for r in read_csv("paper_top1.csv")}
    rated = 0
    for name in cnnjax.list_models():
        acc, kind, source = complexity.top1(name)
        reference = model_spec(name).reference
        if reference in published:  # torchvision's figure wins where it has the architecture
            row = published[reference]
            assert (acc, kind) == (float(row["acc1"]), "torchvision"), name
            assert row["weights_enum"] in source and "torchvision_published.csv" in source
        elif name in papers:
            assert (acc, kind) == (float(papers[name]["top1"]), "paper"), name
            assert papers[name]["source"] in source and "paper_top1.csv" in source
        else:  # no published figure: none invented
            assert (acc, kind, source) == (None, None, None), name
        rated += acc is not None
    assert rated == len(cnnjax.list_models()) - 5  # googlenet_v1 and se_resnet18/34/101/152
    assert complexity.top1("googlenet_v1") == (None, None, None)  # the paper gives no top-1


def test_paper_top1_rows_are_registered_models_torchvision_lacks_and_match_their_source():
    rows = read_csv("paper_top1.csv")
    assert len(rows) == len({r["model"] for r in rows}) >= 5
    for row in rows:
        assert row["model"] in cnnjax.list_models(), row
        assert model_spec(row["model"]).reference is None, row  # torchvision has no figure
        assert re.search(r"\b(19|20)\d\d\b", row["source"]) and "Table" in row["source"], row
        # The figure is the one the source quotes: top-1 itself, or 100 - the top-1 error.
        quoted = re.search(r"(top-1 error|classification error|top-1) (\d+(?:\.\d+)?)%",
                           row["source"])
        assert quoted, row
        value = float(quoted.group(2))
        expected = value if quoted.group(1) == "top-1" else 100 - value
        assert float(row["top1"]) == pytest.approx(expected, abs=1e-9), row
    assert {r["model"]: float(r["top1"]) for r in rows if r["model"] in (
        "alexnet_v1", "zfnet", "mobilenet_v1", "shufflenet_v1_g3")} == {
        "alexnet_v1": 59.3, "zfnet": 61.6, "mobilenet_v1": 70.6, "shufflenet_v1_g3": 67.4}


# ----- the pictures


def test_complexity_figure_is_written_labelled_and_readable(rows, tmp_path):
    path = tmp_path / "complexity.png"
    fig = plots.complexity(rows, path)
    assert_picture(path, min_height=1500)
    ax_acc, ax_ops, ax_mem = fig.axes[:3]
    acc_labels = label_boxes(ax_acc)
    rated = [r for r in rows if r["top1"] is not None]
    names = sorted(r["name"] + ("*" if r["top1_kind"] == "paper" else "") for r in rated)
    assert sorted(t for t, _ in acc_labels) == names  # every rated model, paper ones starred
    assert "zfnet*" in names and "alexnet" in names
    assert "googlenet_v1" in ax_acc.get_title()  # left out of the accuracy panel, and said so
    ops_labels = label_boxes(ax_ops)
    assert sorted(t for t, _ in ops_labels) == sorted(FEW)  # every model in ops-vs-params
    for labels in (acc_labels, ops_labels):
        for i, (a, box_a) in enumerate(labels):
            for b, box_b in labels[i + 1:]:
                assert not box_a.overlaps(box_b), (a, b)
    by_memory = sorted(rows, key=lambda r: r["activation_bytes"])  # the most memory on top
    assert [t.get_text() for t in ax_mem.get_yticklabels()] == [r["name"] for r in by_memory]
    assert by_memory[-1]["name"] == "se_resnet50" and by_memory[0]["name"] == "alexnet"


def test_alexnet_bars_show_the_lecture_s_three_observations(alexnet_227, tmp_path):
    path = tmp_path / "alexnet.png"
    fig = plots.layer_bars(alexnet_227, path)
    assert_picture(path)
    memory, params, macs = (ax.get_title(loc="left") for ax in fig.axes[:3])
    assert "largest conv1: 784.0 KB" in memory  # memory sits in the early convs
    assert "largest fc6: 37.75 M (62%)" in params  # parameters in the first FC layer
    assert "convolutions: 91.8% of all MACs" in macs  # FLOPs in the convs
    assert "1 FLOP = 1 multiply-add" in fig.get_suptitle()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][:3] == ["conv1", "pool1", "conv2"]


def test_bars_grow_with_the_layer_count_and_sum_blocks(tmp_path):
    small = cnnjax.profile("resnet18", 64)
    full, blocks = tmp_path / "full.png", tmp_path / "blocks.png"
    plots.layer_bars(small, full)
    fig = plots.layer_bars(small, blocks, depth=1)
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    h_full = assert_picture(full).shape[0]
    h_blocks = assert_picture(blocks).shape[0]
    assert len(ticks) == 13 and len(small.layers) == 43
    assert h_full - h_blocks == pytest.approx(16 * (43 - 13), abs=2)  # 0.16 inch a row at 100 dpi
    assert ticks[:4] == ["conv_init", "bn_init", "pool_init", "stage1_block1"] and ticks[-1] == "fc"
    bars = [p.get_width() for p in fig.axes[2].patches]  # MACs, summed per block
    assert sum(bars) * 1e6 == pytest.approx(small.macs)


# ----- the command lines


def test_summary_plot_writes_the_bars_and_still_prints_the_table(tmp_path):
    path = tmp_path / "r18.png"
    out = run("cnnjax.summary", "--arch=resnet18", "--input_size=64", f"--plot={path}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("resnet18 at 64x64")
    assert "TOTAL" in out.stdout
    assert_picture(path)


@pytest.mark.parametrize("bad, says", [
    ("{tmp}/missing/dir/x.png", "does not exist"),
    ("{tmp}", "is a directory"),
    ("{tmp}/x.nosuchformat", "must end in one of"),
    ("{tmp}/file.png/x.png", "is a file"),
])
def test_bad_plot_paths_are_one_line_errors(tmp_path, bad, says):
    (tmp_path / "file.png").write_text("")
    bad = bad.format(tmp=tmp_path)
    assert summary.main(["--arch=resnet18", "--input_size=64", f"--plot={bad}"]) == 2
    assert complexity.main([f"--plot={bad}"]) == 2  # refused before any model is profiled
    with pytest.raises(ValueError, match=says):
        plots.check_path("plot", bad)


def test_bad_plot_path_from_the_shell_is_one_error_line_and_exit_2(tmp_path):
    out = run("experiments.complexity", f"--plot={tmp_path}/missing/c.png")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"error: --plot='{tmp_path}/missing/c.png': directory {tmp_path}/missing does not exist"]
    out = run("experiments.complexity", "--plott=c.png")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("error:") and "did you mean --plot?" in out.stderr


def test_complexity_plot_flag_draws_the_rows_it_prints(rows, tmp_path, monkeypatch, capsys):
    few = rows[:4]
    monkeypatch.setattr(complexity, "complexity_rows", lambda: few)
    path = tmp_path / "c.png"
    assert complexity.main([f"--plot={path}"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == complexity.model_table(few)
    assert f"wrote {path}" in out.err
    assert_picture(path, min_height=1500)


def test_complexity_command_prints_the_readme_table_and_draws_every_model(tmp_path):
    """The README's model table is this command's output (profiling every registered model
    once, for the table and the figure)."""
    path = tmp_path / "complexity.png"
    out = run("experiments.complexity", f"--plot={path}")
    assert out.returncode == 0, out.stderr
    readme = (ROOT / "README.md").read_text()
    table = readme.split(complexity.START)[1].split(complexity.END)[0].strip()
    assert out.stdout.strip() == table, (
        "README model table is stale: run python -m experiments.complexity --update_readme")
    assert len(out.stdout.strip().splitlines()) == 2 + len(cnnjax.list_models())
    assert_picture(path, min_height=1500)


def _fake_run(workdir: pathlib.Path, final_top1: float) -> pathlib.Path:
    """A workdir with the metrics.jsonl a training run writes: train records, then evals."""
    workdir.mkdir()
    lines = [{"step": s, "loss": 2.3 / s, "lr": 0.1, "img_per_s": 100.0} for s in (5, 10, 15, 20)]
    lines += [{"step": s, "eval_loss": 1.0 / s, "eval_top1": t, "eval_top5": 1.0}
              for s, t in ((10, 0.5), (20, final_top1))]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return workdir


def test_training_curves_draw_train_and_test_loss_and_top1_per_run(tmp_path):
    a, b = _fake_run(tmp_path / "a", 0.9), _fake_run(tmp_path / "b", 0.975)
    fig = plots.training_curves([a, b], tmp_path / "curves.png", labels=["scratch", "init"])
    ax_loss, ax_top1 = fig.axes
    assert ax_loss.get_yscale() == "log"
    assert [l.get_label() for l in ax_loss.get_lines()] == [
        "scratch: train", "scratch: test", "init: train", "init: test"]
    np.testing.assert_allclose(ax_loss.get_lines()[1].get_ydata(), [0.1, 0.05])
    np.testing.assert_allclose(ax_top1.get_lines()[1].get_ydata(), [50.0, 97.5])
    assert [l.get_label() for l in ax_top1.get_lines()] == ["scratch: last 90.0%",
                                                            "init: last 97.5%"]
    image = matplotlib.image.imread(tmp_path / "curves.png")
    assert image.shape[:2] == (450, 1200) and image[..., :3].std() > 0.05


def test_curves_command_writes_the_figure_and_prints_each_run_s_last_top1(tmp_path, capsys):
    from experiments import curves
    a, b = _fake_run(tmp_path / "a", 0.9), _fake_run(tmp_path / "b", 0.975)
    out = tmp_path / "curves.png"
    assert curves.main([str(a), str(b), f"--out={out}"]) == 0
    assert out.stat().st_size > 0
    assert capsys.readouterr().out.splitlines() == [
        f"{a}: test top-1 90.00% at step 20", f"{b}: test top-1 97.50% at step 20"]


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize("args, says", [
    (["{a}", "{empty}", "--out={tmp}/c.png"], "'{empty}' has no metrics"),
    (["{a}", "{tmp}/typo", "--out={tmp}/c.png"], "'{tmp}/typo' has no metrics"),
    (["{a}", "--labels=x,y", "--out={tmp}/c.png"], "2 labels (x,y) for 1 runs: give one per run"),
    (["{a}", "--out={tmp}/c.txt"], "--out='{tmp}/c.txt' must end in one of"),
    (["{a}", "--out={tmp}/nodir/c.png"], "does not exist"),
    (["{a}"], "the following arguments are required: --out"),
])
def test_bad_curves_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, says):
    from experiments import curves
    a = _fake_run(tmp_path / "a", 0.9)
    (tmp_path / "empty").mkdir()
    fill = lambda s: s.format(a=a, empty=tmp_path / "empty", tmp=tmp_path)
    code = _exit_code(curves.main, [fill(x) for x in args])
    err = capsys.readouterr().err
    assert code == 2 and fill(says) in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty"]
