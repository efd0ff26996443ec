"""cnnjax.data: the embedded digits, named-dataset reading and failure, exact batch semantics.

Every test uses its own tmp data dir (never ~/tensorflow_datasets) and nothing is downloaded: the
one real network probe (cifar10) is bounded by the library, and the test refuses the download
even where that probe succeeds.
"""
import dataclasses
import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnnjax import data
from cnnjax.data import digits, sources, transforms


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    data.dataset_info("digits", data_dir=d)
    return d


def loader(d, split="train", **kw):
    kw.setdefault("image_size", 32)
    kw.setdefault("global_batch_size", 128)
    return data.Loader("digits", split, data_dir=d, **kw)


# --- names and info ---------------------------------------------------------------------------

def test_unknown_name_lists_supported():
    with pytest.raises(ValueError, match="digits.*mnist.*synthetic"):
        data.dataset_info("no_such_set", data_dir="/nonexistent")
    assert issubclass(data.DatasetUnavailable, ValueError)


def test_digits_info(digits_dir):
    info = data.dataset_info("digits", data_dir=digits_dir)
    assert info == data.DatasetInfo("digits", 10, 1437, 360, 1, 8)
    assert data.default_image_size(info, 1) == 32
    assert data.default_image_size(info, 63) == 63
    assert data.default_image_size(data.dataset_info("synthetic"), 1) == 224


def test_digits_split_is_fixed_and_stratified():
    images, labels = digits.load_arrays()
    train, test = digits.split_indices(labels)
    assert len(train) == 1437 and len(test) == 360
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    assert np.bincount(labels[test]).tolist() == [36] * 10
    assert images.dtype == np.uint8 and images.max() == 255 and images.shape == (1797, 8, 8, 1)
    # Normalisation constants in DATASETS are the train split's own statistics.
    x = images[train] / 255.0
    assert abs(x.mean() - data.DATASETS["digits"].mean[0]) < 1e-3
    assert abs(x.std() - data.DATASETS["digits"].std[0]) < 1e-3


def test_eval_at_native_size_returns_the_real_digits(digits_dir):
    from sklearn.datasets import load_digits

    raw = load_digits()
    _, test = digits.split_indices(raw.target)
    ev = loader(digits_dir, "test", image_size=8, global_batch_size=360)
    b = ev.batch(0)
    spec = data.DATASETS["digits"]
    pixels = (b["image"][..., 0] * spec.std[0] + spec.mean[0]) * 255.0
    np.testing.assert_allclose(pixels, raw.images[test] * 255.0 / 16.0, atol=0.51)
    assert np.array_equal(b["label"], raw.target[test])


def test_first_use_prepares_silently_and_once(tmp_path, capfd, monkeypatch):
    d = str(tmp_path)
    assert data.dataset_info("digits", data_dir=d).num_train == 1437
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    info_file = tmp_path / "cnnjax_digits" / "1.0.0" / "dataset_info.json"
    stamp = info_file.stat().st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("prepared twice")

    monkeypatch.setattr(digits.CnnjaxDigits, "download_and_prepare", fail)
    sources.dataset_info_cached.cache_clear()
    assert data.dataset_info("digits", data_dir=d).num_test == 360
    assert data.Loader("digits", "test", data_dir=d, image_size=8,
                       global_batch_size=8).batch(0)["mask"].sum() == 8
    assert info_file.stat().st_mtime_ns == stamp


def test_two_processes_prepare_the_same_dir(tmp_path):
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, time
        from cnnjax import data
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        info = data.dataset_info("digits", data_dir={str(tmp_path / "dd")!r})
        b = data.Loader("digits", "train", data_dir={str(tmp_path / "dd")!r}, image_size=8,
                        global_batch_size=64).batch(3)
        print(info.num_train, info.num_test, int(b["label"].sum()))
    """)
    env = dict(os.environ, KERAS_HOME=str(tmp_path / "keras"))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    assert results[0][0] == results[1][0] and results[0][0].startswith("1437 360 ")
    leftovers = [n for n in os.listdir(tmp_path / "dd" / "cnnjax_digits") if n != "1.0.0"]
    assert leftovers == []


# --- train order ------------------------------------------------------------------------------

def test_train_epoch_is_a_permutation(digits_dir):
    tr = loader(digits_dir)
    assert tr.steps_per_epoch == 1437 // 128 and tr.local_batch_size == 128
    epoch0 = np.concatenate([tr.indices(s) for s in range(tr.steps_per_epoch)])
    epoch1 = np.concatenate([tr.indices(s + tr.steps_per_epoch)
                             for s in range(tr.steps_per_epoch)])
    assert len(set(epoch0.tolist())) == len(epoch0) == 11 * 128
    assert epoch0.min() >= 0 and epoch0.max() < 1437
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(tr.indices(0), loader(digits_dir, seed=1).indices(0))
    b = tr.batch(2)
    assert b["image"].shape == (128, 32, 32, 1) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["mask"].dtype == np.float32
    assert np.all(b["mask"] == 1) and np.all(np.isfinite(b["image"]))
    assert np.array_equal(b["label"], tr._source.labels[tr.indices(2)])


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("count", [2, 4])
def test_processes_split_the_global_batch_exactly(digits_dir, count, train):
    split = "train" if train else "test"
    size = 32 if count == 2 else 5  # upsampled and antialiased-downsampled digits
    whole = loader(digits_dir, split, global_batch_size=64, train=train, image_size=size)
    parts = [loader(digits_dir, split, global_batch_size=64, train=train, image_size=size,
                    process_index=p, process_count=count) for p in range(count)]
    assert parts[0].local_batch_size == 64 // count
    assert all(p.steps_per_epoch == whole.steps_per_epoch for p in parts)
    for step in (0, whole.steps_per_epoch - 1) + ((whole.steps_per_epoch + 1,) if train else ()):
        ref = whole.batch(step)
        got = [p.batch(step) for p in parts]
        for key in ref:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), ref[key])
        rows = [set(p.indices(step).tolist()) - {-1} for p in parts]
        assert sum(len(r) for r in rows) == len(set().union(*rows))


def test_batch_is_a_pure_function_of_seed_and_step(digits_dir):
    a, b = loader(digits_dir, seed=3), loader(digits_dir, seed=3)
    late = 5 * a.steps_per_epoch + 4
    for key in ("image", "label"):
        np.testing.assert_array_equal(a.batch(late)[key], b.batch(late)[key])
    got = list(b.iterate(start_step=late - 1, num_steps=3))
    assert [s for s, _ in got] == [late - 1, late, late + 1]
    for s, batch in got:
        np.testing.assert_array_equal(batch["image"], a.batch(s)["image"])
    # Leaving an endless iterator early must not hang or leak an error.
    for s, _ in a.iterate():
        if s == 2:
            break


def test_iterate_reraises_errors_and_eval_ends(digits_dir):
    tr = loader(digits_dir)
    good = tr.batch

    def batch(step):
        if step == 2:
            raise RuntimeError("boom")
        return good(step)

    tr.batch = batch
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        for step, _ in tr.iterate():
            seen.append(step)
    assert seen == [0, 1]
    ev = loader(digits_dir, "test")
    assert [s for s, _ in ev.iterate(start_step=1, num_steps=10)] == [1, 2]
    with pytest.raises(IndexError):
        ev.batch(ev.steps_per_epoch)


def test_bad_arguments(digits_dir):
    with pytest.raises(ValueError, match="multiple of process_count"):
        loader(digits_dir, global_batch_size=130, process_count=4)
    with pytest.raises(ValueError, match="exceeds"):
        loader(digits_dir, global_batch_size=2048)
    with pytest.raises(ValueError, match="process_index"):
        loader(digits_dir, process_index=2, process_count=2)


# --- eval -------------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [1, 4])
def test_eval_counts_every_example_once(digits_dir, count):
    evs = [loader(digits_dir, "test", global_batch_size=64, process_index=p,
                  process_count=count) for p in range(count)]
    assert evs[0].steps_per_epoch == 6  # ceil(360 / 64)
    masks, labels, index = [], [], []
    for step in range(6):
        for ev in evs:
            b = ev.batch(step)
            pad = b["mask"] == 0
            assert np.all(b["image"][pad] == 0) and np.all(b["label"][pad] == 0)
            masks.append(b["mask"])
            labels.append(b["label"][~pad])
            index.append(ev.indices(step)[~pad])
    assert sum(m.sum() for m in masks) == 360
    assert np.array_equal(np.concatenate(index), np.arange(360))
    assert np.array_equal(np.concatenate(labels), evs[0]._source.labels)
    assert [s for s, _ in evs[0].iterate()] == list(range(6))


# --- augmentation -----------------------------------------------------------------------------

def _identity_crops(monkeypatch, flip):
    spec = dataclasses.replace(data.DATASETS["digits"], train_scale=(1.0, 1.0),
                               train_ratio=(1.0, 1.0), flip=flip)
    monkeypatch.setitem(data.DATASETS, "digits", spec)


def test_full_crop_without_flip_is_the_plain_image(digits_dir, monkeypatch):
    _identity_crops(monkeypatch, flip=False)
    tr = loader(digits_dir, image_size=8)
    plain = loader(digits_dir, image_size=8, global_batch_size=1437, train=False).batch(0)
    np.testing.assert_allclose(tr.batch(4)["image"], plain["image"][tr.indices(4)], atol=1e-5)


def test_flip_mirrors_about_half(digits_dir, monkeypatch):
    _identity_crops(monkeypatch, flip=True)
    tr = loader(digits_dir, image_size=8)
    plain = loader(digits_dir, image_size=8, global_batch_size=1437, train=False).batch(0)
    img, ref = tr.batch(0)["image"], plain["image"][tr.indices(0)]
    same = np.isclose(img, ref, atol=1e-5).all(axis=(1, 2, 3))
    mirrored = np.isclose(img, ref[:, :, ::-1], atol=1e-5).all(axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 32 < (mirrored & ~same).sum() < 96


def test_default_digits_augmentation_varies_by_epoch(digits_dir):
    tr = loader(digits_dir, image_size=16)
    plain = loader(digits_dir, image_size=16, global_batch_size=1437, train=False).batch(0)
    e0, e1 = tr.batch(0), tr.batch(tr.steps_per_epoch)
    i0, i1 = list(tr.indices(0)), list(tr.indices(tr.steps_per_epoch))
    common = sorted(set(i0) & set(i1))[:5]
    for ex in common:
        a, b = e0["image"][i0.index(ex)], e1["image"][i1.index(ex)]
        assert not np.allclose(a, b)  # a new crop each epoch
    assert not np.allclose(e0["image"], plain["image"][i0])


def test_resampler_matches_pil_bilinear():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    cases = [((8, 8), (0, 0, 8, 8), 32), ((37, 53), (3.2, 5.7, 40.1, 30.3), 16),
             ((100, 80), (0, 0, 80, 100), 224), ((50, 60), (10, 0, 60, 50), 7),
             ((375, 500), (20.5, 10.2, 400.3, 350.1), 224), ((90, 70), (1, 2, 60, 50), 3)]
    assert max(375, 500) > transforms.DENSE_MAX >= max(50, 60)  # both resamplers are covered
    for (h, w), box, size in cases:
        img = rng.uniform(0, 255, (h, w)).astype(np.float32)
        ref = np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.BILINEAR,
                                                               box=box))
        ours = transforms.resize_batch(img[None, :, :, None], np.array([box]), size)
        np.testing.assert_allclose(ours[0, ..., 0], ref, atol=2e-3)
        flipped = transforms.resize_batch(img[None, :, :, None], np.array([box]), size,
                                          flip=np.array([True]))
        np.testing.assert_allclose(flipped, ours[:, :, ::-1], rtol=1e-6)


def test_random_resized_crop_boxes():
    n = 2000
    u = transforms.uniforms(transforms.hash_key(5), np.arange(n), transforms.NUM_DRAWS)
    h = np.where(np.arange(n) % 2, 100, 30)
    w = np.where(np.arange(n) % 3, 60, 300)  # some very wide images force the fallback
    boxes, flip = transforms.random_resized_crop_boxes(u, h, w, (0.08, 1.0), (3 / 4, 4 / 3))
    x0, y0, x1, y1 = boxes.T
    assert np.all((x0 >= 0) & (y0 >= 0) & (x1 <= w + 1e-9) & (y1 <= h + 1e-9))
    aspect = (x1 - x0) / (y1 - y0)
    assert np.all((aspect > 3 / 4 - 1e-9) & (aspect < 4 / 3 + 1e-9))
    area = (x1 - x0) * (y1 - y0) / (h * w)
    assert np.all((area > 0.08 - 1e-9) & (area < 1 + 1e-9))
    assert 0.4 < (flip < 0.5).mean() < 0.6


# --- synthetic --------------------------------------------------------------------------------

def test_synthetic_any_size_deterministic():
    info = data.dataset_info("synthetic:num_classes=10,channels=1,num_train=500")
    assert info == data.DatasetInfo("synthetic:num_classes=10,channels=1,num_train=500",
                                    10, 500, 50_000, 1, None)
    a = data.Loader(info.name, "train", image_size=20, global_batch_size=32)
    halves = [data.Loader(info.name, "train", image_size=20, global_batch_size=32,
                          process_index=p, process_count=2) for p in range(2)]
    b = a.batch(20)
    assert b["image"].shape == (32, 20, 20, 1) and b["label"].max() < 10
    np.testing.assert_array_equal(np.concatenate([h.batch(20)["image"] for h in halves]),
                                  b["image"])
    assert len({x.tobytes() for x in b["image"]}) > 1
    big = data.Loader("synthetic", "test", image_size=64, global_batch_size=16).batch(0)
    assert big["image"].shape == (16, 64, 64, 3) and big["label"].max() < 1000
    with pytest.raises(ValueError, match="synthetic option"):
        data.dataset_info("synthetic:channels=x")


# --- named TFDS datasets ----------------------------------------------------------------------

def test_offline_cifar10_fails_with_instructions(tmp_path, monkeypatch):
    probed, real = [], sources.reachable

    def probe(host, port, timeout=sources.PROBE_TIMEOUT_S):
        probed.append((host, real(host, port, timeout)))
        return False  # even where the network is up, a test never downloads cifar10

    monkeypatch.setattr(sources, "reachable", probe)
    with pytest.raises(data.DatasetUnavailable) as e:
        data.dataset_info("cifar10", data_dir=str(tmp_path))
    msg = str(e.value)
    assert f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record" in msg
    assert "www.cs.toronto.edu:443 is unreachable" in msg
    assert [host for host, _ in probed] == ["www.cs.toronto.edu"]  # the real, bounded probe ran
    assert not (tmp_path / "cifar10").exists()


def test_probe_answers_both_ways_without_hanging():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert sources.reachable("127.0.0.1", server.getsockname()[1], timeout=5)
    assert not sources.reachable("192.0.2.1", 443, timeout=0.5)  # TEST-NET-1: never routed


def test_digit_datasets_are_not_flipped():
    assert not data.DATASETS["digits"].flip and not data.DATASETS["mnist"].flip
    assert data.DATASETS["cifar10"].flip and data.DATASETS["imagenet2012"].flip


def test_imagenet_names_the_manual_files(tmp_path):
    with pytest.raises(data.DatasetUnavailable) as e:
        data.dataset_info("imagenet2012", data_dir=str(tmp_path))
    msg = str(e.value)
    assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
    assert str(tmp_path / "downloads" / "manual") in msg
    assert f"tfds build imagenet2012 --data_dir={tmp_path}" in msg


def _png(array):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _colour(i):
    return np.array([10 * i % 256, 255 - 7 * i % 256, 40], np.uint8)


class TinyPhotos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Variable-size RGB images, each one flat colour, stored as PNG (the mnist/cifar feature)."""
    VERSION = tfds.core.Version("1.0.0")
    SHAPE = (None, None, 3)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=(
            tfds.features.FeaturesDict({"image": tfds.features.Image(shape=self.SHAPE),
                                        "label": tfds.features.ClassLabel(num_classes=3)})))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 24), "test": self._generate_examples(24, 7)}

    def _generate_examples(self, start, n):
        for i in range(start, start + n):
            h, w = self.SHAPE[:2] if self.SHAPE[0] else (20 + i % 7 * 5, 30 + i % 5 * 9)
            yield i, {"image": _png(np.broadcast_to(_colour(i), (h, w, 3)).copy()),
                      "label": i % 3}


class TinyFixed(TinyPhotos, skip_registration=True):
    SHAPE = (12, 12, 3)


def _register(monkeypatch, name, cls):
    # A name's facts and small splits are cached by (name, data dir): a passing test's tmp_path
    # is removed at once and its number used again, so the next test here may see the same
    # data dir under the same name with another builder.
    sources.dataset_info_cached.cache_clear()
    sources._array_split.cache_clear()
    monkeypatch.setitem(data.DATASETS, name, data.Spec(
        cls.name, test_split="test", make_builder=lambda d: cls(data_dir=d), offline=True))


@pytest.mark.parametrize("cls", [TinyPhotos, TinyFixed])
def test_named_dataset_array_record(tmp_path, monkeypatch, cls):
    pytest.importorskip("PIL")
    _register(monkeypatch, "tiny", cls)
    d = str(tmp_path)
    info = data.dataset_info("tiny", data_dir=d)
    assert (info.num_train, info.num_test, info.channels, info.num_classes) == (24, 7, 3, 3)
    assert info.image_size == (12 if cls is TinyFixed else None)
    assert (sources.ArraySource if cls is TinyFixed else sources.EncodedSource) is type(
        data.Loader("tiny", "test", data_dir=d, image_size=4, global_batch_size=8)._source)
    spec = data.DATASETS["tiny"]
    mean, std = np.array(spec.mean, np.float32), np.array(spec.std, np.float32)
    ev = data.Loader("tiny", "test", data_dir=d, image_size=16, global_batch_size=4)
    seen = []
    for step, b in ev.iterate():
        for img, lab, m, i in zip(b["image"], b["label"], b["mask"], ev.indices(step)):
            if m:
                want = (_colour(24 + i) / 255.0 - mean) / std
                np.testing.assert_allclose(img, np.broadcast_to(want, img.shape), atol=1e-4)
                seen.append(int(lab))
    assert seen == [i % 3 for i in range(24, 31)]
    whole = data.Loader("tiny", "train", data_dir=d, image_size=16, global_batch_size=8)
    halves = [data.Loader("tiny", "train", data_dir=d, image_size=16, global_batch_size=8,
                          process_index=p, process_count=2) for p in range(2)]
    for step in (0, 4):
        ref = whole.batch(step)
        for key in ref:
            np.testing.assert_array_equal(
                np.concatenate([h.batch(step)[key] for h in halves]), ref[key])
        cols = ref["image"].reshape(8, -1, 3) * std + mean
        np.testing.assert_allclose(cols, cols[:, :1].repeat(cols.shape[1], 1), atol=1e-4)


def test_tfrecord_small_is_read_large_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    d = str(tmp_path)
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    for cls in (TinyFixed, TinyPhotos):
        cls(data_dir=d).download_and_prepare(file_format="tfrecord", download_config=config)
    _register(monkeypatch, "tiny_fixed_tfrecord", TinyFixed)
    ev = data.Loader("tiny_fixed_tfrecord", "test", data_dir=d, image_size=12,
                     global_batch_size=7, train=False)
    assert ev.batch(0)["label"].tolist() == [i % 3 for i in range(24, 31)]
    _register(monkeypatch, "tiny_photos_tfrecord", TinyPhotos)
    with pytest.raises(data.DatasetUnavailable, match="--file_format=array_record"):
        data.dataset_info("tiny_photos_tfrecord", data_dir=d)
