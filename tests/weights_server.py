"""A loopback weights server for the pretrained tests: a resnet18 in torchvision's format
(random weights and BatchNorm statistics) served by an http.server thread on 127.0.0.1 that
counts its requests, and the registry with one entry of the tests' own, "TEST_V1", whose file
name carries that file's hash, reached through CNNJAX_WEIGHTS_MIRROR. Nothing reaches the
internet."""
from __future__ import annotations

import copy
import hashlib
import http.server
import importlib
import socket
import threading
import time

import pytest

P = importlib.import_module("cnnjax.pretrained")  # `cnnjax.pretrained` is also the function

try:
    import torch
    import torchvision
except ImportError:
    torch = torchvision = None
needs_torch = pytest.mark.skipif(
    torch is None, reason="needs torch and torchvision: pip install -e '.[test,torch]'")


class Server(http.server.ThreadingHTTPServer):
    """Serves `files` ({"/models/name.pth": bytes}); counts requests by path. mode "cut" sends
    half a file and closes; "slow" sends it in 16 pieces (two downloads overlap)."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.requests, self.mode = {}, {}, "ok"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, path: str = "") -> int:
        return sum(n for p, n in self.requests.items() if p.endswith(path))


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.requests[self.path] = server.requests.get(self.path, 0) + 1
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.mode == "cut":
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        pieces = 16 if server.mode == "slow" else 1
        step = -(-len(body) // pieces)
        for i in range(0, len(body), step):
            self.wfile.write(body[i:i + step])
            if server.mode == "slow":
                time.sleep(0.1)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(torch model, file name in torchvision's naming, bytes, full SHA-256) of a resnet18."""
    if torch is None:
        pytest.skip("needs torch and torchvision: pip install -e '.[test,torch]'")
    from test_convert import random_torchvision
    model = random_torchvision("resnet18", seed=5)
    path = tmp_path_factory.mktemp("file") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    body = path.read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    return model, f"resnet18-{digest[:8]}.pth", body, digest


@pytest.fixture
def server(weights):
    s = Server()
    s.files[f"/models/{weights[1]}"] = weights[2]
    thread = threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield s
    s.shutdown()
    s.server_close()


def registry_entry(weights, url: str = "https://download.pytorch.org/models") -> dict:
    entry = copy.deepcopy(P.registry()["architectures"]["resnet18"]["weights"]["IMAGENET1K_V1"])
    entry.update(url=f"{url}/{weights[1]}", sha256_prefix=weights[3][:8])
    return entry



@pytest.fixture
def env(monkeypatch, tmp_path, weights, server):
    """A fresh cache, the mirror at the local server, and the registry with TEST_V1 added."""
    registry = copy.deepcopy(P.registry())
    registry["architectures"]["resnet18"]["weights"]["TEST_V1"] = registry_entry(weights)
    monkeypatch.setattr(P, "registry", lambda: registry)
    monkeypatch.setenv(P.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(P.MIRROR_ENV, f"{server.url}/models")
    return registry
