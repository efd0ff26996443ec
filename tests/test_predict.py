"""cnnjax.predict: torchvision's eval preprocessing, the ImageNet names, the CLI end to end."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cnnjax import convert, predict

from helpers import random_variables

ROOT = pathlib.Path(__file__).resolve().parents[1]


def env() -> dict:
    # CPU: the comparison with torchvision is about conversion and preprocessing, not about a
    # GPU's reduced-precision convolutions.
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                KERAS_HOME=os.environ.get("KERAS_HOME", "/tmp"))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real 427x640 photograph that ships with scikit-learn."""
    from sklearn.datasets import load_sample_image
    return Image.fromarray(load_sample_image("china.jpg"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> pathlib.Path:
    """A converted resnet18 directory made without torch (random variables)."""
    from cnnjax import create_model
    variables = random_variables(create_model("resnet18"), np.zeros((1, 32, 32, 3), np.float32),
                                 train=False)
    out = tmp_path_factory.mktemp("converted") / "resnet18"
    return convert.save_pretrained(out, "resnet18", variables, num_classes=1000)


def torchvision_eval(image: Image.Image, resize=256, crop=224) -> np.ndarray:
    from torchvision import transforms
    t = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop),
                            transforms.ToTensor(),
                            transforms.Normalize(predict.IMAGENET_MEAN, predict.IMAGENET_STD)])
    return t(image).permute(1, 2, 0).numpy()


# --- preprocess ---------------------------------------------------------------------------------

VIEWS = {
    "landscape": lambda im: im,                                 # 640x427
    "portrait": lambda im: im.crop((150, 0, 431, 427)),         # 281x427
    "grayscale": lambda im: im.convert("L"),
    "odd_small": lambda im: im.crop((7, 3, 308, 258)),          # 301x255: odd margins, crop
}


@pytest.mark.parametrize("view", VIEWS)
def test_preprocess_matches_torchvision(photo, view):
    pytest.importorskip("torchvision", reason="needs torchvision: the reference preprocessing")
    image = VIEWS[view](photo)
    ours = predict.preprocess(image)
    # torchvision users read files with .convert("RGB") (ImageFolder's loader does).
    theirs = torchvision_eval(image.convert("RGB"))
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("resize,crop", [(100, 224), (255, 256), (300, 299)])
def test_preprocess_other_sizes_match_torchvision(photo, resize, crop):
    """Crops larger than the resized image are zero-padded the way torchvision pads them."""
    pytest.importorskip("torchvision", reason="needs torchvision: the reference preprocessing")
    image = photo.crop((0, 0, 301, 255))
    ours = predict.preprocess(image, resize=resize, crop=crop)
    np.testing.assert_allclose(ours, torchvision_eval(image, resize, crop), rtol=0, atol=1e-5)


def test_preprocess_inputs_and_modes(photo, tmp_path):
    """A path and a uint8 array give what the PIL image gives; every mode becomes RGB."""
    expected = predict.preprocess(photo)
    path = tmp_path / "photo.png"
    photo.save(path)
    np.testing.assert_array_equal(predict.preprocess(path), expected)
    np.testing.assert_array_equal(predict.preprocess(str(path)), expected)
    np.testing.assert_array_equal(predict.preprocess(np.asarray(photo)), expected)
    grey = photo.convert("L")
    np.testing.assert_array_equal(predict.preprocess(np.asarray(grey)),
                                  predict.preprocess(grey.convert("RGB")))
    for mode in ("L", "LA", "RGBA", "P", "CMYK", "I"):
        out = predict.preprocess(photo.convert(mode))
        assert out.shape == (224, 224, 3) and np.isfinite(out).all(), mode
    rgba = photo.convert("RGBA")
    rgba.putalpha(0)  # alpha is dropped, as .convert("RGB") drops it
    np.testing.assert_array_equal(predict.preprocess(rgba), expected)
    batch = np.stack([np.asarray(photo), np.asarray(photo.transpose(Image.Transpose.ROTATE_180))])
    np.testing.assert_array_equal(predict._as_batch(batch, {}),
                                  np.stack([predict.preprocess(b) for b in batch]))
    with pytest.raises(ValueError, match="uint8"):
        predict.preprocess(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="crop"):
        predict.preprocess(photo, crop=0)


# --- class names --------------------------------------------------------------------------------

def test_imagenet_classes():
    names = predict.imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert all(n and n == n.strip() for n in names)
    assert names[0] == "tench" and names[207] == "golden retriever"
    assert names[999] == "toilet tissue"
    names.append("x")  # a copy: the cached list is not changed
    assert len(predict.imagenet_classes()) == 1000


def test_imagenet_classes_need_no_torch():
    code = ("import sys, cnnjax.predict as p; p.imagenet_classes(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code], env=env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_classes_match_torchvision():
    torchvision = pytest.importorskip("torchvision", reason="needs torchvision: it holds the names")
    meta = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta
    assert predict.imagenet_classes() == list(meta["categories"])


# --- predict in-process ------------------------------------------------------------------------

def test_predict_batches_and_names():
    """A 10-class model gets "class N" names; a padded last batch changes no image's answer."""
    from cnnjax import create_model
    model = create_model("resnet18", num_classes=10)
    variables = random_variables(model, np.zeros((1, 32, 32, 3), np.float32), seed=1,
                                 train=False)
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    whole = predict.probabilities(model, variables, x, batch_size=3)
    padded = predict.probabilities(model, variables, x, batch_size=2)  # 2, then 1 padded to 2
    np.testing.assert_allclose(padded, whole, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(whole.sum(axis=1), 1, rtol=1e-5)
    top = predict.predict(model, variables, list(x), top_k=10, batch_size=2)
    assert len(top) == 3
    for row, p in zip(top, whole):
        assert sorted(n for n, _ in row) == sorted(f"class {i}" for i in range(10))
        probs = [q for _, q in row]
        assert probs == sorted(probs, reverse=True)
        assert row[0] == (f"class {int(np.argmax(p))}", pytest.approx(float(p.max()), abs=1e-6))
    with pytest.raises(ValueError, match="top_k"):
        predict.predict(model, variables, x, top_k=11, meta={"num_classes": 10})
    assert predict.predict(model, variables, [], meta={"num_classes": 10}) == []


# --- the command --------------------------------------------------------------------------------

def parse(stdout: str) -> dict[str, list[tuple[str, float]]]:
    """{path: [(name, probability), ...]} from the command's output."""
    out: dict[str, list] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("  "):
            p, _, name = line.strip().partition("  ")
            out[current].append((name, float(p)))
        else:
            current = line
            out[current] = []
    return out


def test_cli_matches_torchvision(photo, tmp_path):
    why = "needs torch and torchvision: the reference model"
    torch = pytest.importorskip("torch", reason=why)
    torchvision = pytest.importorskip("torchvision", reason=why)
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    variables = convert.from_torchvision("resnet18", reference.state_dict())
    weights = convert.save_pretrained(tmp_path / "weights", "resnet18", variables,
                                      num_classes=1000)
    path = tmp_path / "photo.jpg"
    photo.save(path, quality=90)

    out = subprocess.run([sys.executable, "-m", "cnnjax.predict", f"--weights={weights}",
                          "--arch=resnet18", str(path)], env=env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    printed = parse(out.stdout)
    assert list(printed) == [str(path)]
    top = printed[str(path)]

    with Image.open(path) as im:
        x = torch.from_numpy(torchvision_eval(im.convert("RGB"))).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = torch.softmax(reference(x), dim=-1)[0].numpy()
    order = np.argsort(-probs)[:5]
    assert np.all(np.diff(probs[np.argsort(-probs)[:6]]) < -1e-4), "top-6 too close to order"
    names = predict.imagenet_classes()
    assert [n for n, _ in top] == [names[i] for i in order]
    got = np.array([p for _, p in top])
    diff = np.abs(got - probs[order]).max()
    print(f"max |probability - torchvision's| = {diff:.2e} (printed to 4 decimals)")
    assert diff <= 1e-4
    assert np.all(np.diff(got) <= 0) and got.sum() <= 1 + 5 * 5e-5

    # Unrounded, in-process: all 1000 probabilities.
    model, variables, meta = convert.load_pretrained(weights)
    ours = predict.probabilities(model, variables, [path], meta=meta)[0]
    full = np.abs(ours - probs).max()
    print(f"max |probability - torchvision's| over 1000 classes, unrounded = {full:.2e}")
    assert full <= 1e-5


def run_main(capsys, *args) -> tuple[int, str, str]:
    try:
        code = predict.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors exit
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", ["missing_image", "text_file", "directory_image",
                                  "not_converted", "missing_weights", "top_k_zero",
                                  "top_k_too_big", "top_k_not_int", "arch_mismatch",
                                  "second_image_bad"])
def test_cli_errors(converted, photo, tmp_path, capsys, case):
    good = tmp_path / "good.png"
    photo.crop((0, 0, 64, 64)).save(good)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    plain = tmp_path / "plain_dir"
    plain.mkdir()
    (plain / "weights.npz").write_bytes(b"")
    w = f"--weights={converted}"
    args, expected = {
        "missing_image": ([w, tmp_path / "nope.jpg"], "nope.jpg does not exist"),
        "text_file": ([w, notes], "notes.txt is not an image"),
        "directory_image": ([w, plain], "plain_dir is a directory"),
        "not_converted": ([f"--weights={plain}", good], "holds no pretrained.json"),
        "missing_weights": ([f"--weights={tmp_path / 'absent'}", good], "does not exist"),
        "top_k_zero": ([w, "--top_k=0", good], "--top_k=0 must be a positive integer"),
        "top_k_too_big": ([w, "--top_k=1001", good], "at most the model's 1000 classes"),
        "top_k_not_int": ([w, "--top_k=five", good], "invalid int value"),
        "arch_mismatch": ([w, "--arch=resnet50", good], "does not match"),
        "second_image_bad": ([w, good, notes], "notes.txt is not an image"),
    }[case]
    code, out, err = run_main(capsys, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]


def test_cli_arch_check_passes_and_prints(converted, photo, tmp_path, capsys):
    """In-process: --arch equal to the weights' is accepted; two images, top-3 each."""
    paths = []
    for i, box in enumerate([(0, 0, 300, 300), (200, 100, 640, 427)]):
        paths.append(tmp_path / f"p{i}.png")
        photo.crop(box).save(paths[-1])
    code, out, err = run_main(capsys, f"--weights={converted}", "--arch=resnet18", "--top_k=3",
                              *paths)
    assert code == 0, err
    printed = parse(out)
    assert list(printed) == [str(p) for p in paths]
    names = set(predict.imagenet_classes())
    for top in printed.values():
        assert len(top) == 3 and all(n in names for n, _ in top)
        probs = [p for _, p in top]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 3 * 5e-5
