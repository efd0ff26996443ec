"""cnnjax.pretrained: the registry against torchvision, download once / convert once, and every
way a download fails (wrong hash, 404, a connection cut mid-file, a server that never answers,
no network), each one line that leaves nothing in the cache a later call would trust.

Nothing here reaches the internet: the weights (a resnet18 in torchvision's format, random
weights and BatchNorm statistics) are served by an http.server thread on 127.0.0.1 that counts
its requests. The registry's real entries hash real files we cannot fetch, so most tests add
one entry of their own, "TEST_V1", whose file name carries this file's own hash, and reach it
through CNNJAX_WEIGHTS_MIRROR, which replaces torchvision's host by the local server.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import convert

from weights_server import P, env, needs_torch, registry_entry, server, torch, torchvision, weights

ROOT = pathlib.Path(__file__).resolve().parent.parent
__all__ = ["env", "server", "weights"]  # fixtures the tests below take by name


def apply(model, variables, x):
    """The model's output, jitted (op by op, a ResNet compiles a hundred small programs)."""
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))


def cached_files(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) \
        if root.exists() else []


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and error.value.__suppress_context__, text
    return text


@needs_torch
def test_downloads_once_converts_once_and_computes_torchvisions_logits(env, weights, server,
                                                                       monkeypatch, tmp_path):
    model_t, file, _, digest = weights
    model, variables, meta = P.pretrained("resnet18", weights="TEST_V1")
    assert server.count() == 1
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3), dtype=np.float32)
    ours = np.asarray(apply(model, variables, x))
    with torch.no_grad():
        theirs = model_t(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4
    assert meta["source"]["sha256"] == digest and meta["weights"] == "TEST_V1"
    assert meta["preprocess"] == {"resize": 256, "crop": 224, "interpolation": "bilinear",
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert meta["metrics"] == {"top1": 69.758, "top5": 89.078, "dataset": "ImageNet-1k"}
    assert len(meta["categories"]) == 1000 and meta["categories"][1] == "goldfish"
    cache = tmp_path / "cache"
    assert f"downloads/{file}" in cached_files(cache)
    # The second call: no request, no conversion.
    with monkeypatch.context() as m:
        m.setattr(convert, "convert", lambda *a, **k: pytest.fail("converted again"))
        _, again, _ = P.pretrained("resnet18", weights="TEST_V1")
    assert server.count() == 1
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, again, variables)))
    # A converted directory left half-written (a crash while removing it) counts as absent:
    # converted again from the downloaded file, still no request.
    os.remove(pathlib.Path(meta["cache"]) / convert.META_FILE)
    P.pretrained("resnet18", weights="TEST_V1")
    assert server.count() == 1 and (pathlib.Path(meta["cache"]) / convert.META_FILE).is_file()
    assert not [p for p in pathlib.Path(meta["cache"]).parent.iterdir() if p.name[0] == "."]


@needs_torch
def test_a_fresh_head_and_a_backbone_from_the_same_weights(env, server):
    _, full, _ = P.pretrained("resnet18", weights="TEST_V1")
    model, variables, meta = P.pretrained("resnet18", weights="TEST_V1", num_classes=7)
    assert variables["params"]["fc"]["kernel"].shape == (512, 7) and meta["num_classes"] == 7
    assert meta["fresh"] == ["fc"] and meta["categories"] is None
    assert np.array_equal(variables["params"]["conv_init"]["kernel"],
                          full["params"]["conv_init"]["kernel"])
    assert apply(model, variables, np.zeros((1, 64, 64, 3), np.float32)).shape == (1, 7)
    model, variables, meta = P.pretrained("resnet18", weights="TEST_V1", features_only=True)
    maps = apply(model, variables, np.zeros((1, 64, 64, 3), np.float32))
    assert "fc" not in variables["params"] and maps["stride32"].shape == (1, 2, 2, 512)
    assert meta["features_only"] and server.count() == 1
    with pytest.raises(ValueError, match="features_only=True builds no classifier"):
        P.pretrained("resnet18", weights="TEST_V1", features_only=True, num_classes=7)


@needs_torch
def test_a_file_that_is_not_the_registrys_is_refused_and_nothing_is_cached(
        env, weights, server, tmp_path):
    """The real IMAGENET1K_V1 entry through the mirror: the served file (ours, not torchvision's)
    fails the f37072fd prefix its name carries."""
    server.files["/models/resnet18-f37072fd.pth"] = weights[2]
    for attempt in (1, 2):  # nothing trusted is left: the second call downloads again
        with pytest.raises(P.DownloadError) as e:
            P.pretrained("resnet18")
        assert "expected f37072fd" in one_line(e) and "nothing was cached" in str(e.value)
        assert cached_files(tmp_path / "cache") == [] and server.count() == attempt


@needs_torch
@pytest.mark.parametrize("mode, words", [("404", "HTTP 404"),
                                         ("cut", "closed before the whole file arrived")])
def test_a_missing_file_or_a_cut_connection_is_one_line(env, weights, server, tmp_path, mode,
                                                        words):
    if mode == "404":
        server.files.clear()
    server.mode = mode
    with pytest.raises(P.DownloadError) as e:
        P.pretrained("resnet18", weights="TEST_V1")
    text = one_line(e)
    assert words in text and f"{server.url}/models/{weights[1]}" in text, text
    assert cached_files(tmp_path / "cache") == []


@needs_torch
def test_a_server_that_never_answers_times_out(env, weights, monkeypatch, tmp_path):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the backlog) but never replies
    monkeypatch.setenv(P.MIRROR_ENV, f"http://127.0.0.1:{silent.getsockname()[1]}/models")
    monkeypatch.setattr(P, "TIMEOUT", (1.0, 1.0))
    start = time.perf_counter()
    with pytest.raises(P.DownloadError, match="no answer within 1 s") as e:
        P.pretrained("resnet18", weights="TEST_V1")
    silent.close()
    assert time.perf_counter() - start < 15 and one_line(e)
    assert cached_files(tmp_path / "cache") == []


@needs_torch
def test_offline_without_a_mirror_says_where_to_put_the_file(env, weights, monkeypatch,
                                                             tmp_path):
    """No network: torchvision's host is a closed port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/models"
    env["architectures"]["resnet18"]["weights"]["TEST_V1"] = registry_entry(weights, closed)
    monkeypatch.delenv(P.MIRROR_ENV)
    with pytest.raises(P.DownloadError) as e:
        P.pretrained("resnet18", weights="TEST_V1")
    text = one_line(e)
    assert text.startswith(f"could not download {weights[1]} from {closed}/{weights[1]} "
                           "(Connection refused)"), text
    assert P.MIRROR_ENV in text and str(tmp_path / "cache" / "downloads" / weights[1]) in text


@needs_torch
def test_a_local_mirror_directory_and_a_local_file_need_no_server(env, weights, server,
                                                                  monkeypatch, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / weights[1]).write_bytes(weights[2])
    monkeypatch.setenv(P.MIRROR_ENV, str(mirror))
    _, _, meta = P.pretrained("resnet18", weights="TEST_V1")
    assert server.count() == 0 and meta["source"]["path"] == str(mirror / weights[1])
    # A path: verified by the hash its name carries, or by sha256=.
    P.pretrained("resnet18", weights=str(mirror / weights[1]), sha256=weights[3])
    (tmp_path / "resnet18-00000000.pth").write_bytes(weights[2])
    with pytest.raises(P.DownloadError, match="expected 00000000"):
        P.pretrained("resnet18", weights=str(tmp_path / "resnet18-00000000.pth"))
    assert server.count() == 0


@needs_torch
def test_two_processes_asking_at_once_leave_one_verified_file(weights, server, tmp_path):
    """Two `python -c` processes, a URL in torchvision's naming (its name carries the hash), a
    slow server so the downloads overlap. The file is a .safetensors (the processes need no
    torch), the same tensors as the .pth."""
    from safetensors.numpy import save_file
    path = tmp_path / "resnet18.safetensors"
    save_file({k: np.ascontiguousarray(v.numpy())
               for k, v in weights[0].state_dict().items()}, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    file = f"resnet18-{digest[:8]}.safetensors"
    server.files[f"/models/{file}"] = path.read_bytes()
    server.mode = "slow"
    code = ("import cnnjax; _, _, meta = cnnjax.pretrained('resnet18', "
            f"weights={server.url + '/models/' + file!r}); print(meta['source']['sha256'])")
    env = {**os.environ, P.CACHE_ENV: str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    env.pop(P.MIRROR_ENV, None)
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [r.communicate(timeout=300) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert [out.strip() for out, _ in outs] == [digest, digest]
    assert 1 <= server.count(file) <= 2
    cache = tmp_path / "cache"
    downloads = list((cache / "downloads").iterdir())
    assert [p.name for p in downloads] == [file]
    assert hashlib.sha256(downloads[0].read_bytes()).hexdigest() == digest
    assert [p.name for p in (cache / "converted" / "resnet18").iterdir()] == [
        file.removesuffix(".safetensors")]


def test_unknown_names_give_the_choices():
    with pytest.raises(ValueError, match="torchvision has no 'se_resnet50'.*resnet18"):
        P.pretrained("se_resnet50")
    with pytest.raises(ValueError, match=r"resnet50 has no weights 'V3'; torchvision publishes "
                                         r"IMAGENET1K_V1, IMAGENET1K_V2 \(DEFAULT: IMAGENET1K_V2"):
        P.pretrained("resnet50", weights="V3")
    with pytest.raises(ValueError, match="carries no hash in its name.*sha256="):
        P.pretrained("resnet18", weights="https://example.invalid/resnet18.pth")
    with pytest.raises(ValueError, match="neither a weights name nor a file"):
        P.pretrained("resnet18", weights="missing/resnet18-0123abcd.pth")
    with pytest.raises(ValueError, match="num_classes"):  # before any download
        P.pretrained("resnet18", num_classes=0)
    assert P.weights_entry("resnet50", "ResNet50_Weights.IMAGENET1K_V1")[0] == "IMAGENET1K_V1"


def test_the_registry_covers_every_shared_architecture_with_its_preprocessing():
    archs = P.registry()["architectures"]
    assert sorted(archs) == convert.shared_architectures()
    assert sum(len(a["weights"]) for a in archs.values()) == 39
    assert P.list_weights("resnet50") == ["IMAGENET1K_V1", "IMAGENET1K_V2"]
    for arch, a in archs.items():
        assert a["default"] in a["weights"]
        for entry in a["weights"].values():
            pre = P.preprocessing(arch, entry)
            expected = convert.preprocessing(arch)  # the family's mean/std (googlenet: 0.5)
            assert (pre["mean"], pre["std"]) == (expected["mean"], expected["std"]), arch
            assert entry["url"].rsplit("/", 1)[-1].count(entry["sha256_prefix"]) == 1
    assert P.preprocessing("resnet50", archs["resnet50"]["weights"]["IMAGENET1K_V2"])[
        "resize"] == 232
    from cnnjax.predict import imagenet_classes
    assert list(P._categories()) == imagenet_classes()


@pytest.mark.skipif(torchvision is None, reason="needs torchvision: pip install -e '.[torch]'")
def test_the_registry_is_what_torchvisions_weight_enums_say():
    from experiments import weight_registry
    made = weight_registry.build()  # also checks every enum's categories are the shipped file's
    shipped = P.registry()
    assert made["architectures"] == shipped["architectures"]
    assert made["categories"] == shipped["categories"]


def test_importing_cnnjax_imports_neither_torch_nor_pooch_nor_a_command():
    # nor a module run as a command (`python -m cnnjax.convert` would warn that it was imported)
    code = ("import sys, cnnjax; print(sorted({'torch', 'pooch', 'requests', 'cnnjax.convert', "
            "'cnnjax.predict', 'cnnjax.summary'} & set(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert run.stdout.strip() == "[]", run.stderr[-2000:]
    import cnnjax
    assert cnnjax.pretrained is P.pretrained
