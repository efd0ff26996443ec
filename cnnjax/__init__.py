"""cnnjax: the classic convolutional networks, AlexNet to NAS, as functional Flax modules.

Imports run one way. Each layer imports only itself and the layers above it in this list
(tests/test_imports.py checks every import, top-level and inside functions, and that no
modules or packages import each other in a circle):

1. flags: command-line checks;
2. models (the networks, their CPU fast paths in models/fastconv.py, the spec-built networks
   of a search in models/nasspec.py and nasnet.py), profile, summary, plots;
3. runtime (jit with compiler options), parallel (mesh, shardings, processes), checkpoint;
4. what a run reads or starts from: data, convert, pretrained (torchvision's published weights:
   registry, download, cache), transfer; the `cnnjax` package itself, which re-exports
   `pretrained`;
5. training (cnnjax.training; cnnjax.train is its stable import path);
6. what builds on training: nas, ensemble, predict, evaluate;
7. benchmarks and experiments.
"""
from cnnjax import parallel as _parallel

_parallel.reserve_cpu_threads()  # before JAX's CPU backend starts: see its docstring
from cnnjax.models import create_model, list_models
from cnnjax.pretrained import pretrained
from cnnjax.profile import Layer, Profile, profile

__version__ = "0.1.0"
__all__ = ["Layer", "Profile", "create_model", "list_models", "pretrained", "profile"]
