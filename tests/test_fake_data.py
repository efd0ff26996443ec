"""cnnjax.data.fake: fakes that the real TFDS builders and cnnjax.data take for the real thing.

Tiny sizes (a few dozen images in all) in tmp dirs; nothing touches the network.
"""
import glob
import io
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cnnjax import data
from cnnjax.data import fake

RAW = {"image": tfds.decode.SkipDecoding()}  # records' stored bytes, not decoded pixels


def shards(path: str) -> dict[str, bytes]:
    return {os.path.basename(f): open(f, "rb").read()
            for f in sorted(glob.glob(os.path.join(path, "*.array_record-*")))}


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """(data_dir, dataset dir) of a fake imagenet2012 with 12 train and 4 validation images."""
    d = str(tmp_path_factory.mktemp("fake"))
    return d, fake.write_fake("imagenet2012", d, num_train=12, num_test=4)


def test_real_builder_reads_fake_imagenet(imagenet):
    d, path = imagenet
    builder = tfds.builder("imagenet2012", data_dir=d)
    assert path == os.fspath(builder.data_path) == os.path.join(d, "imagenet2012", "5.1.0")
    assert os.path.exists(os.path.join(path, "dataset_info.json"))
    assert builder.info.file_format.value == "array_record"
    names = builder.info.features["label"].names
    train = builder.as_data_source(split="train")
    assert len(train) == 12
    records = [train[i] for i in range(12)]
    assert sorted(r["label"] for r in records) == list(range(12))  # class = index % 1000
    for r in records:
        h, w, c = r["image"].shape
        assert 300 <= h <= 500 and 300 <= w <= 500 and c == 3 and r["image"].dtype == np.uint8
        assert r["file_name"].decode().startswith(names[r["label"]] + "_")
    raw = builder.as_data_source(split="validation", decoders=RAW)
    assert len(raw) == 4
    for r in raw:
        assert r["file_name"].decode().startswith("ILSVRC2012_val_000000")
        with Image.open(io.BytesIO(r["image"])) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert 300 <= min(im.size) and max(im.size) <= 500
    info = data.dataset_info("imagenet2012", data_dir=d)
    assert (info.num_classes, info.num_train, info.num_test, info.channels) == (1000, 12, 4, 3)


def test_same_seed_same_bytes_and_no_silent_overwrite(imagenet, tmp_path):
    _, path = imagenet
    (tmp_path / "keep.txt").write_text("not ours")
    again = fake.write_fake("imagenet2012", str(tmp_path), num_train=12, num_test=4)
    assert shards(again) == shards(path) and len(shards(path)) == 2
    with pytest.raises(ValueError, match=r"already holds a prepared fake imagenet2012 5\.1\.0 "
                                         r"\(12 train, 4 validation examples\).*overwrite"):
        fake.write_fake("imagenet2012", str(tmp_path), num_train=12, num_test=4)
    assert shards(again) == shards(path)
    fake.write_fake("imagenet2012", str(tmp_path), num_train=6, num_test=4, seed=1,
                    overwrite=True)
    assert tfds.builder("imagenet2012", data_dir=str(tmp_path)).info.splits["train"].num_examples \
        == 6
    assert shards(again) != shards(path)
    assert (tmp_path / "keep.txt").read_text() == "not ours"


def test_cifar10_through_the_command_and_the_loader(tmp_path, capsys):
    d = str(tmp_path)
    assert fake.main(["cifar10", f"--data_dir={d}", "--num_train=20", "--num_test=10"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "fake cifar10 (20 train + 10 test examples" in out[0]
    builder = tfds.builder("cifar10", data_dir=d)
    assert builder.info.features["label"].names[:2] == ["airplane", "automobile"]
    r = builder.as_data_source(split="test", decoders=RAW)[0]
    assert r["id"].decode().startswith("test_")
    with Image.open(io.BytesIO(r["image"])) as im:
        assert im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB"
    assert data.dataset_info("cifar10", data_dir=d) == data.DatasetInfo(
        "cifar10", 10, 20, 10, 3, 32)
    batch = data.Loader("cifar10", "train", data_dir=d, global_batch_size=8).batch(0)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].shape == (8,)


def test_imagenette_default_config(tmp_path):
    d = str(tmp_path)
    path = fake.write_fake("imagenette", d, num_train=3, num_test=2)
    builder = tfds.builder("imagenette", data_dir=d)
    assert path == os.fspath(builder.data_path) and builder.builder_config.name == "full-size-v2"
    assert data.dataset_info("imagenette", data_dir=d) == data.DatasetInfo(
        "imagenette", 10, 3, 2, 3, None)


@pytest.mark.parametrize("argv, message", [
    (["mnist"], "no fake of dataset 'mnist'; fakes exist of cifar10, imagenet2012, imagenette"),
    (["cifar10", "--num_train=0"], "num_train=0 must be a positive integer"),
    (["cifar10", "--seed=-1"], "seed=-1 must be an integer >= 0"),
    (["cifar10", "--num_tst=3"], "unrecognized arguments: --num_tst=3; did you mean --num_test?"),
])
def test_command_errors_are_one_line(argv, message, tmp_path, capsys):
    d = tmp_path / "data"
    try:
        status = fake.main(argv + [f"--data_dir={d}"])
    except SystemExit as e:  # argparse's own complaints exit
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert not d.exists()  # refused before anything was written
