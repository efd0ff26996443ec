"""torchvision -> cnnjax weight conversion: exact logits for every shared architecture, errors
that name the tensor, files read without torch, and the command.

The parity tests need torch and torchvision, the `torch` extra that `.ci/run` installs
(`pip install -e ".[test,torch]"`); without them they are skipped with that reason.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import convert
from cnnjax.models import create_model, list_models

from helpers import jit_once

try:
    import torch
    import torchvision
except ImportError:  # the parity tests skip, saying why
    torch = torchvision = None

ROOT = pathlib.Path(__file__).resolve().parent.parent
needs_torch = pytest.mark.skipif(
    torch is None, reason="needs torch and torchvision: pip install -e '.[test,torch]'")
SHARED = convert.shared_architectures()
# One architecture per mapping family: the non-square, other-class-count and error checks.
PER_FAMILY = ("alexnet", "vgg11_bn", "resnext50_32x4d", "densenet121", "googlenet",
              "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "mnasnet0_5")
TOLERANCE = 1e-4  # max |cnnjax - torchvision| / max |torchvision| over the logits, fp32


def random_torchvision(name: str, num_classes: int = 1000, seed: int = 0, **kw):
    """torchvision's `name` in eval mode with random weights AND random BatchNorm statistics
    (fresh ones, mean 0 and variance 1, would hide a scale/var or mean/bias mix-up).

    Built on the meta device and filled from NumPy: torchvision's own init of VGG's 100M
    parameters would take longer than the comparison."""
    rng = np.random.default_rng(seed)
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kw)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            leaf, shape = key.rsplit(".", 1)[-1], tuple(tensor.shape)
            if leaf == "num_batches_tracked":
                value = np.zeros(shape)
            elif tensor.ndim > 1:  # variance 1/fan_in keeps 150 layers' activations finite
                bound = np.sqrt(3.0 / np.prod(shape[1:]))
                value = rng.random(shape, dtype=np.float32) * (2 * bound) - bound
            elif leaf in ("running_var", "weight"):
                value = rng.uniform(0.5, 1.5, shape)
            else:  # biases, running means
                value = rng.normal(0.0, 0.1, shape)
            tensor.copy_(torch.from_numpy(np.asarray(value, np.float32)).to(tensor.dtype))
    return model.eval()


def torch_logits(model, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def cnnjax_logits(name: str, variables: dict, x_nhwc: np.ndarray, **kw) -> np.ndarray:
    model = create_model(name, num_classes=variables["params"][convert.family(name).head]
                         ["bias"].shape[0], **kw)
    apply = jit_once(lambda v, x: model.apply(v, x, train=False))
    return np.asarray(apply(variables, jnp.asarray(x_nhwc)))


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape and np.all(np.isfinite(ours))
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def images(h: int, w: int, n: int = 1, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, h, w, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def resnet18_state():
    if torch is None:
        pytest.skip("needs torch and torchvision: pip install -e '.[test,torch]'")
    return {k: v.numpy() for k, v in random_torchvision("resnet18", 10).state_dict().items()}


def test_the_shared_list_is_every_name_both_have():
    expected = sorted(n for n in list_models() if n in {
        "alexnet", "googlenet", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
        "mnasnet0_5", "mnasnet1_0", "wide_resnet50_2", "resnext50_32x4d", "resnext101_32x8d"}
        or n.startswith(("vgg", "resnet", "densenet", "shufflenet_v2")))
    assert SHARED == expected and len(SHARED) == 31
    if torchvision is not None:
        assert set(SHARED) == set(list_models()) & set(torchvision.models.list_models())
    with pytest.raises(ValueError, match="torchvision has no 'se_resnet50'.*resnet18"):
        convert.family("se_resnet50")


@needs_torch
@pytest.mark.parametrize("name", SHARED)
def test_converted_logits_equal_torchvisions_at_224(name):
    theirs = random_torchvision(name)
    variables = convert.from_torchvision(name, theirs.state_dict())
    assert variables["params"][convert.family(name).head]["bias"].shape == (1000,)
    x = images(224, 224)
    assert relative_error(cnnjax_logits(name, variables, x), torch_logits(theirs, x)) < TOLERANCE


@needs_torch
@pytest.mark.parametrize("name", PER_FAMILY)
def test_converted_logits_equal_torchvisions_at_a_non_square_size_and_10_classes(name):
    theirs = random_torchvision(name, num_classes=10, seed=2)
    variables = convert.from_torchvision(name, theirs.state_dict())  # classes from the file
    x = images(160, 208, n=2)
    assert relative_error(cnnjax_logits(name, variables, x), torch_logits(theirs, x)) < TOLERANCE
    with pytest.raises(convert.ConversionError, match=r"wrong shape.*1000"):
        convert.from_torchvision(name, theirs.state_dict(), num_classes=1000)


@needs_torch
def test_googlenet_aux_heads_are_dropped_unless_asked_for_and_then_converted():
    theirs = random_torchvision("googlenet", aux_logits=True, init_weights=False)
    state = theirs.state_dict()
    variables, dropped = convert.convert("googlenet", state)
    assert sorted({k.split(".")[0] for k in dropped}) == ["aux1", "aux2"]
    assert "aux1" not in variables["params"]
    with_aux = convert.from_torchvision("googlenet", state, aux_logits=True)
    # aux fc1 reads a 128x4x4 map: torchvision flattens it (C, H, W), cnnjax (H, W, C).
    kernel = state["aux1.fc1.weight"].numpy()
    np.testing.assert_array_equal(
        with_aux["params"]["aux1"]["fc1"]["kernel"],
        kernel.reshape(1024, 128, 4, 4).transpose(2, 3, 1, 0).reshape(2048, 1024))
    x = images(224, 224)
    assert relative_error(cnnjax_logits("googlenet", with_aux, x, aux_logits=True),
                          torch_logits(theirs, x)) < TOLERANCE


def test_missing_unexpected_and_misshapen_tensors_are_named(resnet18_state):
    missing = dict(resnet18_state)
    del missing["layer2.1.bn2.running_var"]
    with pytest.raises(convert.ConversionError,
                       match=r"1 missing: layer2\.1\.bn2\.running_var \(for batch_stats/"
                             r"stage2_block2/bn2/var\)"):
        convert.from_torchvision("resnet18", missing)
    extra = {**resnet18_state, "layer5.0.conv1.weight": np.zeros((3, 3, 3, 3), np.float32)}
    with pytest.raises(convert.ConversionError, match=r"1 unexpected: layer5\.0\.conv1\.weight"):
        convert.from_torchvision("resnet18", extra)
    wrong = {**resnet18_state, "layer1.0.conv2.weight": np.zeros((64, 64, 1, 1), np.float32)}
    with pytest.raises(convert.ConversionError,
                       match=r"layer1\.0\.conv2\.weight has shape \(64, 64, 1, 1\), resnet18 "
                             r"needs \(64, 64, 3, 3\)"):
        convert.from_torchvision("resnet18", wrong)
    with pytest.raises(convert.ConversionError, match="no classifier 'fc.weight'"):
        convert.from_torchvision("resnet18", {k: v for k, v in resnet18_state.items()
                                              if not k.startswith("fc.")})


@needs_torch
def test_densenet_checkpoints_with_the_old_key_spelling_convert_the_same():
    state = {k: v.numpy() for k, v in random_torchvision("densenet121", 10).state_dict().items()}
    # torchvision's published DenseNet files say "norm.1" where its modules say "norm1".
    old = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
           for k, v in state.items()}
    assert old != state
    chex_equal = jax.tree.map(np.array_equal, convert.from_torchvision("densenet121", old),
                              convert.from_torchvision("densenet121", state))
    assert all(jax.tree.leaves(chex_equal))


def _save(state: dict, path) -> None:
    if str(path).endswith(".npz"):
        np.savez(path, **state)
    else:
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_the_command_converts_files_without_importing_torch(resnet18_state, tmp_path, suffix):
    source = tmp_path / f"resnet18{suffix}"
    _save(resnet18_state, source)
    out = tmp_path / "weights"
    script = textwrap.dedent(f"""
        import sys
        import jax
        import numpy as np
        from cnnjax import convert
        assert convert.main(["--arch=resnet18", "--checkpoint={source}", "--out={out}"]) == 0
        model, variables, meta = convert.load_pretrained("{out}")
        x = np.random.default_rng(1).standard_normal((1, 64, 80, 3), dtype=np.float32)
        from cnnjax import runtime  # compiled as cnnjax_logits compiles (tests/helpers.jit_once)
        apply = runtime.jit_on(jax.devices()[0], lambda v, x: model.apply(v, x, train=False))
        np.save("{tmp_path / 'logits.npy'}", np.asarray(apply(variables, x)))
        assert "torch" not in sys.modules, "reading {suffix} imported torch"
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resnet18: 102 tensors converted; 10 classes" in run.stdout
    meta = json.loads((out / "pretrained.json").read_text())
    assert meta["arch"] == "resnet18" and meta["num_classes"] == 10
    assert meta["source"]["sha256"] == convert.sha256(source)
    assert meta["preprocess"] == {"resize": 256, "crop": 224, "interpolation": "bilinear",
                                  "mean": list(convert.IMAGENET_MEAN),
                                  "std": list(convert.IMAGENET_STD)}
    x = np.random.default_rng(1).standard_normal((1, 64, 80, 3), dtype=np.float32)
    expected = cnnjax_logits("resnet18", convert.from_torchvision("resnet18", resnet18_state), x)
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), expected)


@needs_torch
def test_the_command_reads_a_pth_and_records_googlenets_input_normalisation(tmp_path):
    theirs = random_torchvision("googlenet", 10, aux_logits=True, init_weights=False)
    torch.save(theirs.state_dict(), tmp_path / "g.pth")
    assert convert.main(["--arch=googlenet", f"--checkpoint={tmp_path / 'g.pth'}",
                         f"--out={tmp_path / 'w'}"]) == 0
    model, variables, meta = convert.load_pretrained(tmp_path / "w")
    assert meta["source"]["format"] == "torch"
    assert meta["source"]["dropped"] == [k for k in theirs.state_dict() if k.startswith("aux")]
    # torchvision's published GoogLeNet normalises inside (transform_input): (x - 0.5) / 0.5.
    assert meta["preprocess"]["mean"] == [0.5] * 3 and meta["preprocess"]["std"] == [0.5] * 3
    x = images(96, 96)
    ours = jit_once(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
    assert relative_error(np.asarray(ours), torch_logits(theirs, x)) < TOLERANCE


def _command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnjax.convert", *args], capture_output=True,
                          text=True, timeout=120)


def test_bad_commands_say_what_was_expected_and_keep_what_was_there(resnet18_state, tmp_path):
    source = tmp_path / "r.npz"
    _save(resnet18_state, source)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    cases = {
        ("--arch=se_resnet50", f"--checkpoint={source}", "--out=o"): "torchvision has no",
        ("--arch=resnet18", "--checkpoint=nope.pth", "--out=o"): "does not exist",
        ("--arch=resnet18", f"--checkpoint={tmp_path}/r.txt", "--out=o"): "must be a .pth",
        ("--arch=resnet18", f"--checkpoint={source}", f"--out={tmp_path}/full"): "not empty",
        ("--arch=resnet18", f"--checkpoint={source}", "--out=o",
         "--num_classes=0"): "positive integer",
        ("--arch=resnet50", f"--checkpoint={source}", f"--out={tmp_path}/o"): "does not fit",
        ("--arch=resnet18", f"--checkpoint={source}", "--out=o", "--resize=200"): "at most",
    }
    for args, message in cases.items():
        run = _command(*args)
        assert run.returncode == 2, (args, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], args
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="not a directory written by python -m cnnjax.convert"):
        convert.load_pretrained(tmp_path / "full")


def test_overwrite_replaces_only_an_earlier_conversion(resnet18_state, tmp_path):
    variables = convert.from_torchvision("resnet18", resnet18_state)
    out = convert.save_pretrained(tmp_path / "w", "resnet18", variables, num_classes=10)
    with pytest.raises(ValueError, match="not empty"):
        convert.save_pretrained(out, "resnet18", variables, num_classes=10)
    convert.save_pretrained(out, "resnet18", variables, num_classes=10, overwrite=True)
    _, loaded, meta = convert.load_pretrained(out)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, loaded, variables)))
    assert os.listdir(out) and meta["arch"] == "resnet18"


def test_fine_tuning_starts_from_converted_weights_with_a_fresh_head(resnet18_state, data_dir,
                                                                       tmp_path):
    """1000 ImageNet-shaped classes converted; the digits' 10 get a fresh fc, the rest is
    copied, and the run trains."""
    state = {**resnet18_state, "fc.weight": np.ones((1000, 512), np.float32) * 0.01,
             "fc.bias": np.zeros(1000, np.float32)}
    weights = convert.save_pretrained(tmp_path / "weights", "resnet18",
                                      convert.from_torchvision("resnet18", state),
                                      num_classes=1000, source={"file": "resnet18.npz"})
    work = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--arch=resnet18", f"--init_from={weights}",
         f"--data_dir={data_dir}", f"--workdir={work}", "--image_size=32", "--batch_size=16",
         "--num_steps=40", "--eval_every=40"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (f"init_from {weights} (resnet18, converted from resnet18.npz), by name and shape: "
            "copied 100 tensors") in run.stderr
    assert ("shape differs, kept fresh: fc (kernel (512, 10) here, (512, 1000) in the source); "
            "summed over RGB for 1-channel input: conv_init\n") in run.stderr
    summary = json.loads((work / "summary.json").read_text())
    started = summary["init_from"]
    assert started["converted_from"] == "resnet18.npz" and started["step"] is None
    assert started["copied_tensors"] == 100 and started["summed_over_rgb"] == [
        "params/conv_init/kernel"]
    assert summary["eval_top1"] > 0.3  # 10 classes: chance is 0.1; 0.61 here


@needs_torch
def test_converted_weights_serve_as_a_backbone_with_torchvisions_feature_maps():
    """features_only=True on converted weights (head stripped): stride 4..32 are torchvision's
    layer1..layer4 outputs."""
    from cnnjax.models import strip_head
    theirs = random_torchvision("resnet18", seed=3)
    variables = convert.from_torchvision("resnet18", theirs.state_dict())
    backbone = create_model("resnet18", features_only=True)
    x = images(96, 128)
    shapes = jax.eval_shape(lambda: backbone.init(jax.random.key(0), x, train=False))
    maps = backbone.apply(strip_head(variables, shapes), jnp.asarray(x), train=False)
    assert "fc" not in shapes["params"]
    with torch.no_grad():
        t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        t = theirs.maxpool(theirs.relu(theirs.bn1(theirs.conv1(t))))
        for stride, layer in zip((4, 8, 16, 32), (theirs.layer1, theirs.layer2, theirs.layer3,
                                                  theirs.layer4)):
            t = layer(t)
            ref = t.numpy().transpose(0, 2, 3, 1)
            assert relative_error(np.asarray(maps[f"stride{stride}"]), ref) < TOLERANCE, stride


def test_a_damaged_conversion_is_one_line_for_init_from_and_load_pretrained(tmp_path, data_dir):
    from helpers import cli
    weights = tmp_path / "weights"
    (weights / "variables").mkdir(parents=True)
    (weights / "pretrained.json").write_text('{"arch": "resnet18", ')
    code, err = cli("--arch=resnet18", f"--init_from={weights}", f"--data_dir={data_dir}",
                    f"--workdir={tmp_path / 'run'}", "--num_steps=1", "--quiet")
    assert code == 2 and err.startswith(
        f"error: --init_from='{weights}': its pretrained.json is not valid JSON"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    (weights / "pretrained.json").write_text('{"arch": "resnet18", "num_classes": 0}')
    with pytest.raises(ValueError, match=r"has no valid 'num_classes' \(got 0\)"):
        convert.load_pretrained(weights)
