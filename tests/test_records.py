"""The record path: encoded photos decoded on tf.data, batch for batch a pure function of the step.

Two real photos shipped with scikit-learn (china.jpg, flower.jpg, 427x640 JPEGs) and PNGs of
other sizes make a tiny tfds dataset in array_record; nothing is downloaded.
"""
import io
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import sklearn.datasets
import tensorflow_datasets as tfds
from PIL import Image

from cnnjax import data
from cnnjax.data import records, sources

ROOT = pathlib.Path(__file__).resolve().parent.parent
PHOTOS = pathlib.Path(sklearn.datasets.__file__).parent / "images"
NUM_TRAIN, NUM_TEST = 48, 3


def _photo(i: int) -> bytes:
    """Example i: china.jpg, flower.jpg, or a PNG crop of one of them of another size."""
    raw = (PHOTOS / ("china.jpg", "flower.jpg")[i % 2]).read_bytes()
    if i % 3 != 2:
        return raw
    with Image.open(io.BytesIO(raw)) as im:
        crop = im.crop((i % 7 * 20, i % 5 * 15, 300 + i % 4 * 50, 240 + i % 6 * 30))
        buf = io.BytesIO()
        crop.save(buf, format="PNG")
    return buf.getvalue()


class Photos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=(
            tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=2)})))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, NUM_TRAIN),
                "test": self._generate_examples(NUM_TRAIN, NUM_TEST)}

    def _generate_examples(self, start, n):
        for i in range(start, start + n):
            yield i, {"image": _photo(i - start if start else i), "label": i % 2}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("photos"))
    spec = data.Spec(Photos.name, make_builder=lambda dd: Photos(data_dir=dd), offline=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(data.DATASETS, "photos", spec)
        data.dataset_info("photos", data_dir=d)
        yield d, spec


def loader(photos, split="train", **kw):
    d, spec = photos
    kw.setdefault("image_size", 64)
    kw.setdefault("global_batch_size", 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(data.DATASETS, "photos", spec)
        return data.Loader("photos", split, data_dir=d, **kw)


def test_photos_are_decoded_on_tf_data(photos):
    ld = loader(photos)
    assert ld.decodes_records and isinstance(ld._source, sources.EncodedSource)
    b = ld.batch(0)
    assert b["image"].shape == (8, 64, 64, 3) and b["image"].dtype == np.float32
    assert b["label"].tolist() == (ld.indices(0) % 2).tolist()
    assert np.isfinite(b["image"]).all() and b["mask"].tolist() == [1.0] * 8


def test_batches_do_not_depend_on_workers_processes_or_where_iteration_starts(photos):
    steps = range(4, 9)  # crosses the epoch boundary (6 steps of 8 per epoch)
    ref = dict(loader(photos, workers=1).iterate(0, 9))
    for workers in (2, 3):
        for step, b in loader(photos, workers=workers).iterate(steps.start, len(steps)):
            for key in b:
                np.testing.assert_array_equal(b[key], ref[step][key])
    halves = [loader(photos, process_index=p, process_count=2, workers=2) for p in range(2)]
    for step in (1, 7):
        got = [h.batch(step) for h in halves]
        for key in ref[step]:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), ref[step][key])
    assert not np.array_equal(ref[0]["image"], ref[6]["image"])  # a new epoch, new crops


def test_random_resized_crops_and_flips_follow_their_ranges(photos):
    ld = loader(photos, global_batch_size=48)
    areas, ratios, flips = [], [], []
    for step in range(30):  # 30 epochs of the 48 photos: 1,440 crops
        encoded, window, flip, _, mask = ld.plan(step)
        hw = np.array([records.image_size_of(e) for e in encoded])
        areas.append(window[:, 2] * window[:, 3] / (hw[:, 0] * hw[:, 1]))
        ratios.append(window[:, 3] / window[:, 2])
        flips.append(flip)
        assert (window[:, :2] >= 0).all() and (window[:, 0] + window[:, 2] <= hw[:, 0]).all()
        assert (window[:, 1] + window[:, 3] <= hw[:, 1]).all() and mask.all()
    areas, ratios, flips = map(np.concatenate, (areas, ratios, flips))
    # Whole-pixel rounding moves an area by at most a pixel's row and column around the box.
    # (Draws that do not fit the 3:2 photos are retried, so small areas are over-represented;
    # the range, not the mean, is what torchvision's RandomResizedCrop promises.)
    assert 0.075 < areas.min() < 0.1 and 0.9 < areas.max() <= 1.0
    assert 0.74 < ratios.min() < 0.8 and 1.28 < ratios.max() < 1.34
    assert abs(flips.mean() - 0.5) < 0.05  # 1,440 fair draws: 3.8 standard deviations


def _torchvision_eval(raw: bytes, size: int = 224, resize: int = 256) -> np.ndarray:
    """torchvision's Resize(256) + CenterCrop(224) on a PIL image, as its functional code does
    it: the shorter side to 256 (bilinear, PIL's antialiasing), then the centred crop with
    offsets rounded to the nearest pixel."""
    with Image.open(io.BytesIO(raw)) as im:
        w, h = im.size
        if w <= h:
            new = (resize, int(resize * h / w))
        else:
            new = (int(resize * w / h), resize)
        im = im.convert("RGB").resize(new, Image.BILINEAR)
        top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
        return np.asarray(im.crop((left, top, left + size, top + size)), np.float32)


def test_eval_is_resize_256_center_crop_224_as_torchvision(photos):
    ld = loader(photos, "test", image_size=224, global_batch_size=4)
    assert ld.steps_per_epoch == 1
    b = ld.batch(0)
    assert b["mask"].tolist() == [1, 1, 1, 0] and not b["image"][3].any()
    mean, std = np.array(ld._spec.mean), np.array(ld._spec.std)
    for i in range(2):  # the two JPEGs
        ours = (b["image"][i] * std + mean) * 255.0
        want = _torchvision_eval(_photo(i))
        # The same decode (ISLOW), sizes, offsets and filter (triangle, widened by the scale):
        # what is left is PIL rounding to 8 bits after each of its two passes, at most half a
        # grey level each (its fixed-point weights add far less).
        diff = np.abs(ours - want)
        assert diff.max() <= 1.01 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_a_corrupt_image_names_the_step(tmp_path, monkeypatch):
    class Broken(Photos, skip_registration=True):
        def _generate_examples(self, start, n):
            for i in range(start, start + n):
                raw = _photo(0)
                yield i, {"image": raw[:2000] if i == 3 else raw, "label": i % 2}

    monkeypatch.setitem(data.DATASETS, "broken", data.Spec(
        Broken.name, make_builder=lambda d: Broken(data_dir=d), offline=True))
    ld = data.Loader("broken", "test", data_dir=str(tmp_path), image_size=32,
                     global_batch_size=4, train=False)
    ld.batch(0)  # examples 48..50 are whole
    bad = data.Loader("broken", "train", data_dir=str(tmp_path), image_size=32,
                      global_batch_size=48, train=False)
    with pytest.raises(ValueError, match=r"reading broken/train step 0 failed: "):
        bad.batch(0)


def test_workers_must_be_positive(photos):
    with pytest.raises(ValueError, match="workers must be >= 1, not 0"):
        loader(photos, workers=0)


# --- end to end on a fake ImageNet (cnnjax.data.fake) ------------------------------------------

@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    from cnnjax.data import fake
    d = str(tmp_path_factory.mktemp("fake_imagenet"))
    fake.write_fake("imagenet2012", d, num_train=48, num_test=6)
    return d


def test_input_benchmark_reports_ours_the_reference_and_the_data_wait(fake_imagenet, capsys,
                                                                     tmp_path):
    from experiments import benchmark
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{benchmark.INPUT_START}\nold\n{benchmark.INPUT_END}\nrest\n")
    argv = ["--mode=input", "--dataset=imagenet2012", f"--data_dir={fake_imagenet}",
            "--batch_size=8", "--steps=3", "--image_size=32", "--arch=resnet18", "--rounds=1",
            f"--readme={readme}"]
    assert benchmark.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    table = readme.read_text().split(benchmark.INPUT_START + "\n")[1]
    shown = " ".join(a if not a.startswith(("--data_dir=", "--readme=")) else
                     a.split("=")[0] + ("=DIR" if a.startswith("--data_dir") else "=README.md")
                     for a in argv)  # machine-local paths left out
    assert table.startswith(f"`python -m experiments.benchmark {shown}` on ")
    assert "old" not in table and table.endswith(f"{benchmark.INPUT_END}\nrest\n")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "img/s" not in line]
    assert [int(r.split("|")[1]) for r in rows] == [r["workers"] for r in lines]
    cores = records.default_workers()
    assert [r["workers"] for r in lines] == sorted({1, min(2, cores), cores})
    for r in lines:
        assert r["img_per_s"] > 0 and r["reference_img_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["img_per_s"] / r["reference_img_per_s"])
        assert r["img_per_s_per_worker"] == pytest.approx(r["img_per_s"] / r["workers"])
        assert 0 <= r["data_wait"] <= 1 and r["train_img_per_s"] > 0


@pytest.mark.slow
def test_resnet18_trains_on_fake_imagenet_with_the_real_cli(fake_imagenet, tmp_path):
    work = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--arch=resnet18", "--num_steps=12",
         "--dataset=imagenet2012", f"--data_dir={fake_imagenet}", "--batch_size=8",
         "--image_size=64", "--log_every=4", f"--workdir={work}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resnet18 on imagenet2012 (48 train / 6 test, 64x64x3)" in out.stderr
    # the progress line in a log: one line per update (tqdm's count, rate and ETA, then ours)
    assert re.search(r"\| 12/12 \[.*, loss \d+\.\d+, [\d,]+ img/s, data \d+%\]$", out.stderr,
                     re.M), out.stderr[-2000:]
    logged = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait"] for r in logged if "data_wait" in r]
    assert len(waits) == 3 and all(0 <= w <= 1 for w in waits)
    summary = json.loads((work / "summary.json").read_text())
    assert np.isfinite(summary["eval_loss"]) and summary["steps"] == 12
    assert summary["eval_count"] == 6 and 0 <= summary["data_wait"] <= 1
