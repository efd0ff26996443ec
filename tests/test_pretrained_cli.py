"""The pretrained weights on the command line: `predict --arch`, `train --init_from=pretrained`,
`experiments.validate` (a run's checkpoint, published weights on a fake ImageNet), one-line
errors with exit status 2, and the weights' evaluation transform against torchvision's.

Nothing reaches the internet: as in test_pretrained.py (tests/weights_server.py: the server and
registry fixtures), a random resnet18 in torchvision's format is served from 127.0.0.1 as the
registry entry "TEST_V1", reached through CNNJAX_WEIGHTS_MIRROR.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from cnnjax import convert, predict, train
from experiments import validate as validate_cli

from helpers import cli
from weights_server import P, env, needs_torch, registry_entry, server, weights

__all__ = ["env", "server", "weights"]  # fixtures the tests below take by name

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(main, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a command's main(ARGS), in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, out: str, err: str) -> str:
    """The one `error: ` line; before it, at most cnnjax.pretrained's notice of the download
    it is attempting."""
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    if len(lines) == 2 and lines[0].startswith("cnnjax.pretrained: downloading "):
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def closed_url() -> str:
    with socket.socket() as s:  # bound, never listening, then closed: refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/models"


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> pathlib.Path:
    from sklearn.datasets import load_sample_image
    path = tmp_path_factory.mktemp("photo") / "china.png"
    Image.fromarray(load_sample_image("china.jpg")).crop((7, 3, 308, 258)).save(path)
    return path


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory) -> str:
    from cnnjax.data import fake
    d = str(tmp_path_factory.mktemp("fake_imagenet"))
    fake.write_fake("imagenet2012", d, num_train=4, num_test=5)
    return d


def small(workdir, data_dir, **kw) -> train.TrainConfig:
    return train.TrainConfig(**{**dict(arch="resnet18", dataset="digits", data_dir=data_dir,
                                       image_size=32, batch_size=8, num_steps=2, log_every=1,
                                       workdir=workdir and str(workdir)), **kw})


# --- predict -----------------------------------------------------------------------------------

@needs_torch
def test_predict_with_arch_alone_uses_the_default_weights(env, server, photo):
    env["architectures"]["resnet18"]["default"] = "TEST_V1"
    code, out, err = run(predict.main, "--arch=resnet18", "--top_k=3", photo)
    assert code == 0, err
    model, variables, meta = P.pretrained("resnet18", weights="TEST_V1")  # the cache: no request
    assert server.count() == 1
    want = predict.predict(model, variables, [photo], top_k=3, meta=meta)[0]
    assert out.splitlines() == [str(photo)] + [f"  {p:.4f}  {n}" for n, p in want]
    # The same weights by name, and through the converted cache directory.
    for weights_flag in ("--weights=TEST_V1", f"--weights={meta['cache']}"):
        code, again, err = run(predict.main, "--arch=resnet18", weights_flag, "--top_k=3", photo)
        assert (code, again) == (0, out), err
    assert server.count() == 1


def test_predict_offline_in_a_real_process_is_one_line(photo, tmp_path):
    """`python -m cnnjax.predict --arch=resnet18`: torchvision's real entry, through a mirror
    that refuses connections (no internet here either way)."""
    mirror = closed_url()
    environ = {**os.environ, "PYTHONPATH": str(ROOT), P.CACHE_ENV: str(tmp_path / "cache"),
               P.MIRROR_ENV: mirror, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "cnnjax.predict", "--arch=resnet18", str(photo)],
                         capture_output=True, text=True, env=environ, timeout=300, cwd=ROOT)
    line = one_line_error(out.returncode, out.stdout, out.stderr)
    assert line.startswith(f"error: could not download resnet18-f37072fd.pth from {mirror}/"
                           "resnet18-f37072fd.pth (Connection refused); without internet, fetch "
                           "https://download.pytorch.org/models/resnet18-f37072fd.pth"), line
    assert P.MIRROR_ENV in line


@needs_torch
def test_offline_without_a_mirror_every_command_says_where_the_file_goes(
        env, weights, monkeypatch, photo, data_dir, fake_imagenet, tmp_path):
    entry = registry_entry(weights, closed_url())
    env["architectures"]["resnet18"]["weights"]["TEST_V1"] = entry
    monkeypatch.delenv(P.MIRROR_ENV)
    from experiments import train as train_cli
    work = tmp_path / "run"
    commands = {
        "predict": (predict.main, "--arch=resnet18", "--weights=TEST_V1", photo),
        "train": (train_cli.main, "--arch=resnet18", "--init_from=pretrained:TEST_V1",
                  f"--data_dir={data_dir}", f"--workdir={work}", "--image_size=32",
                  "--batch_size=8", "--num_steps=1", "--quiet"),
        "validate": (validate_cli.main, "--arch=resnet18", "--weights=TEST_V1",
                     "--dataset=imagenet2012", f"--data_dir={fake_imagenet}", "--quiet"),
    }
    for what, (main, *args) in commands.items():
        line = one_line_error(*run(main, *args))
        assert line.startswith(f"error: could not download {weights[1]} from {entry['url']} "
                               "(Connection refused)"), (what, line)
        assert P.MIRROR_ENV in line and str(tmp_path / "cache" / "downloads") in line, line
    assert not work.exists()


# --- train --init_from=pretrained --------------------------------------------------------------

@needs_torch
def test_fine_tuning_starts_from_the_converted_weights(env, weights, server, data_dir,
                                                       tmp_path):
    """Step 1's learning rate is 0 (warmup), so after it the parameters are still step 0's:
    every tensor but the fresh 10-class head is the pretrained one, the first convolution summed
    over RGB for the 1-channel digits. The run then resumes to its end."""
    config = small(tmp_path / "run", data_dir, init_from="pretrained:TEST_V1")
    first = train.train_and_evaluate(config, verbose=False, stop_after=1)
    _, source, meta = P.pretrained("resnet18", weights="TEST_V1")
    params = jax.tree.map(np.asarray, first["state"].params)
    for layer in params:
        for name, value in params[layer].items() if isinstance(params[layer], dict) else ():
            if layer == "fc":
                assert value.shape[-1] == 10
                continue
            if isinstance(value, dict):
                for k, v in value.items():
                    np.testing.assert_array_equal(v, source["params"][layer][name][k])
            elif layer == "conv_init":
                np.testing.assert_array_equal(value, source["params"][layer][name].sum(
                    axis=2, keepdims=True))
            else:
                np.testing.assert_array_equal(value, source["params"][layer][name])
    done = train.train_and_evaluate(small(tmp_path / "run", data_dir,
                                          init_from="pretrained:TEST_V1"), verbose=False)
    started = done["init_from"]
    assert started["run"] == "pretrained:TEST_V1" and started["converted_from"] == weights[1]
    assert started["converted"] == meta["cache"] and started["fresh_layers"] == ["fc"]
    assert started["summed_over_rgb"] == ["params/conv_init/kernel"]
    assert server.count() == 1 and done["steps"] == 2
    assert train.default_workdir(small(None, data_dir, init_from="pretrained")) \
        == "runs/resnet18-digits-from-pretrained-IMAGENET1K_V1"


# --- validate ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_run(data_dir, tmp_path_factory) -> pathlib.Path:
    work = tmp_path_factory.mktemp("runs") / "resnet18-digits"
    train.train_and_evaluate(small(work, data_dir), verbose=False)
    return work


def test_validate_a_runs_checkpoint_equals_its_own_final_evaluation(digits_run):
    summary = json.loads((digits_run / "summary.json").read_text())
    code, out, err = run(validate_cli.main, f"--workdir={digits_run}", "--quiet")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (f"{digits_run} step 2 on digits/test: {summary['eval_count']} images, "
                        "the run's eval transform at 32px")
    measured, recorded = lines[2].split(), lines[3].split()
    assert measured[0] == "measured" and recorded[0] == "recorded"
    assert measured[1:4] == recorded[1:4], out  # top-1, top-5, loss as printed
    assert measured[1] == f"{100 * summary['eval_top1']:.3f}%"
    from cnnjax import evaluate
    result = evaluate.validate(workdir=str(digits_run))["measured"]
    assert result["top1"] == 100 * summary["eval_top1"]
    assert result["loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)


@needs_torch
def test_validate_published_weights_on_a_fake_imagenet(env, weights, fake_imagenet):
    code, out, err = run(validate_cli.main, "--arch=resnet18", "--weights=TEST_V1",
                         "--dataset=imagenet2012", f"--data_dir={fake_imagenet}",
                         "--batch_size=2", "--quiet")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == ("resnet18 TEST_V1 on imagenet2012/validation: 5 images, resize 256 "
                        "(bilinear), centre crop 224")
    assert lines[3].split()[:3] == ["published", "69.758%", "89.078%"]
    assert lines[3].endswith("(torchvision, ImageNet-1k)")
    # By hand: each image decoded with PIL, predict.preprocess, the model, the mean loss.
    model, variables, meta = P.pretrained("resnet18", weights="TEST_V1")
    from cnnjax.data import sources
    source = sources.open_split("imagenet2012", fake_imagenet, "validation")
    encoded, labels = source.read(np.arange(5))
    x = np.stack([predict.preprocess(Image.open(io.BytesIO(b)), **meta["preprocess"])
                  for b in encoded])
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x),
                        np.float64)
    loss = np.mean(np.log(np.exp(logits).sum(-1)) - logits[np.arange(5), labels])
    top1 = np.mean(logits.argmax(-1) == labels) * 100
    assert lines[2].split()[1:] == [f"{top1:.3f}%", lines[2].split()[2], f"{loss:.4f}"], out
    # The converted directory: the same figures, the published ones found by its file name.
    code, again, err = run(validate_cli.main, f"--weights={meta['cache']}",
                           "--dataset=imagenet2012", f"--data_dir={fake_imagenet}",
                           "--batch_size=2", "--quiet")
    assert code == 0 and again.splitlines()[1:] == lines[1:], err


@pytest.mark.parametrize("case", ["unknown_name", "no_run", "not_prepared", "classes_differ",
                                  "nothing_to_measure", "run_and_weights", "best_alone",
                                  "train_unknown_name", "train_no_weights_for_arch",
                                  "predict_name_without_arch"])
def test_bad_input_is_one_line_and_exit_status_2(case, data_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    main, args, expected = {
        "unknown_name": (validate_cli.main, ["--arch=resnet50", "--weights=IMAGENET1K_V9"],
                         "resnet50 has no weights 'IMAGENET1K_V9'; torchvision publishes "
                         "IMAGENET1K_V1, IMAGENET1K_V2"),
        "no_run": (validate_cli.main, [f"--workdir={empty}"], "holds no checkpoint"),
        "not_prepared": (validate_cli.main, ["--arch=resnet18", f"--data_dir={empty}"],
                         "dataset 'imagenet2012' is not prepared in"),
        "classes_differ": (validate_cli.main, ["--arch=resnet18", "--dataset=digits",
                                               f"--data_dir={data_dir}"],
                           "the weights have 1000 classes and --dataset=digits has 10"),
        "nothing_to_measure": (validate_cli.main, [], "give --arch=ARCH"),
        "run_and_weights": (validate_cli.main, [f"--workdir={empty}", "--arch=resnet18"],
                            "brings its own model"),
        "best_alone": (validate_cli.main, ["--best"], "--best needs --workdir=RUN"),
        "train_unknown_name": (cli, ["--arch=resnet18", "--init_from=pretrained:V9",
                                     f"--workdir={empty}"],
                               "--init_from='pretrained:V9': resnet18 has no weights 'V9'"),
        "train_no_weights_for_arch": (cli, ["--arch=se_resnet18", "--init_from=pretrained"],
                                      "no pretrained weights for 'se_resnet18'"),
        "predict_name_without_arch": (predict.main, ["--weights=IMAGENET1K_V1", "x.jpg"],
                                      "names published weights: add --arch=ARCH"),
    }[case]
    if main is cli:
        code, err = cli(*args)
        out = ""
    else:
        code, out, err = run(main, *args)
    line = one_line_error(code, out, err)
    assert expected in line, line
    assert list(empty.iterdir()) == []


# --- the weights' transform against torchvision's ---------------------------------------------

def _settings() -> dict[str, tuple[str, str]]:
    """One (arch, weights) per distinct evaluation transform in the registry."""
    found = {}
    for arch, a in P.registry()["architectures"].items():
        for name, entry in a["weights"].items():
            pre = P.preprocessing(arch, entry)
            key = (f"{pre['interpolation']}-{pre['resize']}-{pre['crop']}"
                   + ("-half" if pre["mean"] == [0.5] * 3 else ""))
            found.setdefault(key, (arch, name))
    return found


SETTINGS = _settings()
SIZES = [(301, 255), (255, 301), (223, 500), (97, 131), (640, 427), (257, 257)]


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_the_weights_transform_is_torchvisions(setting):
    torchvision = pytest.importorskip("torchvision", reason="needs torchvision (the torch extra)")
    from sklearn.datasets import load_sample_image
    arch, name = SETTINGS[setting]
    entry = P.weights_entry(arch, name)[1]
    ours_settings = P.preprocessing(arch, entry)
    theirs_t = getattr(torchvision.models.get_model_weights(arch), name).transforms()
    flower = Image.fromarray(load_sample_image("flower.jpg"))
    worst = 0.0
    for i, (w, h) in enumerate(SIZES):
        image = flower.crop((i * 7, i * 3, i * 7 + w, i * 3 + h)) if w <= 640 - i * 7 else \
            flower.resize((w, h))
        ours = predict.preprocess(image, **ours_settings)
        theirs = theirs_t(image).permute(1, 2, 0).numpy()
        assert ours.shape == theirs.shape
        grey = (ours * np.float32(ours_settings["std"]) + np.float32(ours_settings["mean"])) * 255
        grey_t = (theirs * np.float32(theirs_t.std) + np.float32(theirs_t.mean)) * 255
        worst = max(worst, float(np.abs(grey - grey_t).max()))
    print(f"{setting} ({arch} {name}): worst grey-level difference {worst:.2e}")
    assert worst <= 1.0
    assert convert.preprocessing(arch)["crop"] == ours_settings["crop"] == theirs_t.crop_size[0]
