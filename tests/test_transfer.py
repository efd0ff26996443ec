"""Starting from another run: VGG's deepening (Simonyan & Zisserman 2015, Sec. 3.1) copies exactly
net A's first four convs and three FC layers; fine-tuning matches by name and shape; a bad
--init_from is one clear line before any work; the train command prints what it copied."""
import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnnjax
from cnnjax import checkpoint, parallel, train, transfer
from experiments import train as train_cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A CPU-sized VGG with the real layer names (a full one takes ~20 s to initialise on 2 cores).
TINY = {"widths": [4, 8, 8, 8, 8], "fc_features": 16}
PAPER_LAYERS = {"conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8"}


def shapes(arch, num_classes=10, **kw):
    """The variables' shapes of `arch` on 32x32x1 input, without computing them."""
    model = cnnjax.create_model(arch, num_classes=num_classes, in_channels=1, **kw)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)),
                                             train=False))


def fill(tree, sign):
    """A constant per tensor, different for every tensor and of sign `sign` (views: no memory)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef.unflatten([np.broadcast_to(np.float32(sign * (i + 1)), x.shape)
                              for i, x in enumerate(leaves)])


def flat(tree):
    return dict(transfer._flatten(tree))


def layer(path):
    return path.split("/")[1]


def random(tree, seed):
    """Random values of `tree`'s shapes (a stand-in for an init: cheaper on a busy CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape, np.float32), tree)


# --- VGG deepening ------------------------------------------------------------------------------

@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn"])
@pytest.mark.parametrize("depth", [13, 16, 19])
def test_vgg_deepening_copies_exactly_the_papers_layers(depth, bn):
    """Full-size shapes: net A's conv1_1, conv2_1, conv3_1, conv3_2 (3->64, 64->128, 128->256,
    256->256) and fc6-fc8 land on the deeper net's layers of those names (and, with BN, the
    BatchNorm after each, running statistics included); every other tensor is the target's own."""
    suffix = "_bn" if bn else ""
    source, target = fill(shapes("vgg11" + suffix), 1), fill(shapes(f"vgg{depth}" + suffix), -1)
    expected = PAPER_LAYERS | ({"bn1_1", "bn2_1", "bn3_1", "bn3_2"} if bn else set())
    variables, report = transfer.init_from(target, source, source_arch="vgg11" + suffix,
                                           target_arch=f"vgg{depth}" + suffix)
    assert report.mapping == "vgg_deepening"
    src, tgt, out = flat(source), flat(target), flat(variables)
    assert out.keys() == tgt.keys()
    for path, leaf in out.items():
        if layer(path) in expected:
            assert np.array_equal(leaf, src[path]), path
        else:
            assert leaf is tgt[path], path  # untouched: the fresh initialisation itself
    copied = {p for p in tgt if layer(p) in expected}
    assert sorted(report.copied) == sorted((p, p) for p in copied)
    assert len(copied) == 2 * len(expected) + (8 if bn else 0)  # kernel+bias; BN mean+var
    assert set(report.copied_layers) == expected
    assert not report.skipped and set(report.missing) == tgt.keys() - copied
    # conv4_1, conv5_1, ... have the same names and shapes in both nets: only the mapping
    # keeps them fresh, as the paper did ("the intermediate layers were initialised randomly")
    _, by_name = transfer.init_from(target, source, mapping="name_and_shape")
    assert {"conv4_1", "conv4_2", "conv5_1", "conv5_2"} <= set(by_name.copied_layers)
    # the paper's function on one collection at a time gives the same pairs
    for collection in ("params", "batch_stats"):
        tree, pairs = transfer.vgg_deepening(source.get(collection, {}),
                                             target.get(collection, {}))
        assert all(t == s for t, s in pairs)
        assert sorted(f"{collection}/{t}" for t, _ in pairs) == sorted(
            p for p in copied if p.startswith(collection + "/"))


def test_deepening_keeps_the_deeper_nets_own_values_dtypes_and_shardings():
    source = random(shapes("vgg11", **TINY), 1)
    target = random(shapes("vgg16", **TINY), 2)
    mesh = parallel.make_mesh()
    target = jax.device_put(target, parallel.replicated(mesh))  # as train.init_state places it
    variables, report = transfer.init_from(target, source, source_arch="vgg11",
                                           target_arch="vgg16")
    src, tgt, out = flat(source), flat(target), flat(variables)
    for path, leaf in out.items():
        assert leaf.sharding == tgt[path].sharding and leaf.dtype == tgt[path].dtype
        want = src[path] if layer(path) in PAPER_LAYERS else tgt[path]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want), err_msg=path)
    assert not np.array_equal(src["params/conv3_2/kernel"], tgt["params/conv3_2/kernel"])
    assert report.summary("RUN") == (
        "init_from RUN, by VGG deepening: copied 14 tensors (conv1_1, conv2_1, conv3_1, conv3_2, "
        "fc6, fc7, fc8), kept fresh: conv1_2, conv2_2, conv3_3, conv4_1, conv4_2, conv4_3, "
        "conv5_1, conv5_2, conv5_3")


def test_vgg_deepening_refuses_what_is_not_net_a_to_a_deeper_net():
    a, b, d = (fill(shapes(arch)["params"], 1) for arch in ("vgg11", "vgg13", "vgg16"))
    with pytest.raises(ValueError, match=r"starts from net A .*the source has \(2, 2, 2, 2, 2\)"):
        transfer.vgg_deepening(b, d)
    with pytest.raises(ValueError, match="goes to a deeper VGG"):
        transfer.vgg_deepening(a, a)
    with pytest.raises(ValueError, match=r"fc8/bias has shape \(10,\) here and \(7,\) in net A"):
        transfer.vgg_deepening(fill(shapes("vgg11", num_classes=7)["params"], 1), d)
    assert transfer.vgg_deepening_pair("vgg11", "vgg19")
    assert transfer.vgg_deepening_pair("vgg11_bn", "vgg13_bn")
    for pair in [("vgg11", "vgg16_bn"), ("vgg11_bn", "vgg16"), ("vgg13", "vgg16"),
                 ("vgg11", "vgg11"), ("resnet18", "vgg16"), (None, "vgg16")]:
        assert not transfer.vgg_deepening_pair(*pair), pair


# --- fine-tuning by name and shape --------------------------------------------------------------

def test_another_class_count_copies_everything_but_the_head():
    source, target = fill(shapes("resnet18", 10), 1), fill(shapes("resnet18", 7), -1)
    variables, report = transfer.init_from(target, source, source_arch="resnet18",
                                           target_arch="resnet18")
    assert report.mapping == "name_and_shape" and not report.missing
    assert report.unused == ["params/fc/bias", "params/fc/kernel"]
    assert sorted(report.skipped) == [("params/fc/bias", (7,), (10,)),
                                      ("params/fc/kernel", (512, 7), (512, 10))]
    src, tgt, out = flat(source), flat(target), flat(variables)
    assert len(report.copied) == len(tgt) - 2
    assert any(p.startswith("batch_stats/") for p, _ in report.copied)
    for path, leaf in out.items():
        assert np.array_equal(leaf, tgt[path] if "/fc/" in path else src[path]), path
    assert report.fresh_layers == ["fc"]
    assert report.summary("R").endswith("kept fresh: none; shape differs, kept fresh: fc "
                                        "(kernel (512, 7) here, (512, 10) in the source)")


def test_a_source_with_no_matching_layer_is_a_clear_error():
    with pytest.raises(ValueError, match=r"nothing to copy: no tensor of the source \(vgg11\) "
                                         r"matches this model \(resnet18\) by name and shape"):
        transfer.init_from(fill(shapes("resnet18"), -1), fill(shapes("vgg11"), 1),
                           source_arch="vgg11", target_arch="resnet18")
    with pytest.raises(ValueError, match=r"2 match by name but not by shape, e\.g\. params/fc"):
        transfer.init_from({"params": {"fc": {"bias": np.zeros(3), "kernel": np.zeros((4, 3))}}},
                           {"params": {"fc": {"bias": np.zeros(5), "kernel": np.zeros((4, 5))}}})


# --- --init_from in the train command -----------------------------------------------------------

def cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = train_cli.main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


BAD_INIT_FROM = {
    "missing": "--init_from='{src}' does not exist; it must be the workdir of an earlier run",
    "file": "--init_from='{src}' is a file; it must be the workdir of an earlier run",
    "empty": "--init_from='{src}' holds no checkpoint (no {src}/checkpoints/STEP)",
    "unfinished": "--init_from='{src}' holds no checkpoint",
    "own": "--init_from='{src}' is this run's own --workdir; leave --init_from out",
}


@pytest.mark.parametrize("case, expected", BAD_INIT_FROM.items(), ids=BAD_INIT_FROM)
def test_a_bad_init_from_is_one_line_before_any_work(tmp_path, case, expected):
    src, work, data = tmp_path / "src", tmp_path / "work", tmp_path / "data"
    data.mkdir()
    if case == "file":
        src.write_text("not a run")
    elif case != "missing":
        (src / "checkpoints").mkdir(parents=True)
    if case == "unfinished":  # a save that never finished: orbax's temporary name
        (src / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir()
    if case == "own":
        (src / "checkpoints" / "3").mkdir()
        work = src
    before = sorted(tmp_path.rglob("*"))
    code, err = cli(["--arch=vgg13", f"--init_from={src}", f"--workdir={work}",
                     f"--data_dir={data}", "--num_steps=1", "--quiet"])
    assert code == 2 and err.splitlines() == [err.strip()] and "Traceback" not in err, err
    assert err.startswith("error: " + expected.format(src=src)), err
    assert sorted(tmp_path.rglob("*")) == before  # nothing prepared, nothing written
    with pytest.raises(ValueError, match="--init_from="):  # the same check from Python
        train.TrainConfig(init_from=str(src), workdir=str(work)).validate()


@pytest.fixture(scope="module")
def vgg11_run(data_dir, tmp_path_factory):
    """A two-step run of a tiny net A on the digits: the source to deepen."""
    workdir = tmp_path_factory.mktemp("runs") / "vgg11-digits"
    train.train_and_evaluate(train.TrainConfig(
        arch="vgg11", data_dir=data_dir, workdir=str(workdir), image_size=32, batch_size=8,
        num_steps=2, model_overrides=TINY), verbose=False)
    return workdir


def test_the_train_command_deepens_vgg11_into_vgg13_and_trains(data_dir, vgg11_run, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--arch=vgg13", f"--init_from={vgg11_run}",
         f"--data_dir={data_dir}", f"--workdir={tmp_path}", "--image_size=32", "--batch_size=8",
         "--num_steps=2", f"--model_overrides={json.dumps(TINY)}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (f"init_from {vgg11_run} (vgg11, step 2), by VGG deepening: copied 14 tensors "
            "(conv1_1, conv2_1, conv3_1, conv3_2, fc6, fc7, fc8), kept fresh: conv1_2, conv2_2, "
            "conv4_1, conv4_2, conv5_1, conv5_2\n") in out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["eval_loss"])
    started = summary["init_from"]
    assert started["run"] == str(vgg11_run.resolve()) and started["arch"] == "vgg11"
    assert started["step"] == 2 and started["copied_tensors"] == 14
    assert started["copied_layers"] == sorted(PAPER_LAYERS)
    assert json.loads((tmp_path / "config.json").read_text())["init_from"] == str(vgg11_run)
    # the deepened run cannot be resumed as if it had started from somewhere else
    other = tmp_path.parent / "other-run"
    (other / "checkpoints" / "1").mkdir(parents=True)
    code, err = cli(["--arch=vgg13", f"--init_from={other}", f"--data_dir={data_dir}",
                     f"--workdir={tmp_path}", "--image_size=32", "--batch_size=8",
                     "--num_steps=2", f"--model_overrides={json.dumps(TINY)}", "--quiet"])
    assert code == 2 and f"holds a run started from {vgg11_run.resolve()}, not from " in err, err
    assert checkpoint.saved_steps(tmp_path) == [2]


def test_a_run_that_fits_nothing_is_refused_before_anything_is_written(data_dir, vgg11_run,
                                                                          tmp_path):
    work = tmp_path / "resnet"
    code, err = cli(["--arch=resnet18", f"--init_from={vgg11_run}", f"--data_dir={data_dir}",
                     f"--workdir={work}", "--image_size=32", "--batch_size=8", "--num_steps=1",
                     "--quiet"])
    assert code == 2 and err.startswith(
        f"error: --init_from='{vgg11_run}': nothing to copy: no tensor of the source (vgg11) "
        "matches this model (resnet18) by name and shape"), err
    assert not work.exists()


def test_default_workdir_names_the_source_so_it_cannot_resume_the_scratch_run(tmp_path):
    config = train.TrainConfig(arch="vgg16", init_from=str(tmp_path / "vgg11-digits"))
    assert train.default_workdir(config) == "runs/vgg16-digits-from-vgg11-digits"
    assert train.default_workdir(train.TrainConfig(arch="vgg16")) == "runs/vgg16-digits"
