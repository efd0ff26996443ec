"""Helpers shared by the tests: the train CLI in-process and in real processes, a run's
metrics, a port, the models whose siblings stand in for them, a train step's outputs and
residuals for recompute options."""
import contextlib
import io
import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import runtime
from experiments import train as train_cli

# Variants that repeat a sibling's modules with other block counts, widths or group counts: the
# sibling's train step in tests/test_models.py covers their code
# (test_variants_use_no_layer_kind_their_sibling_lacks checks that), tests/test_reference.py
# their exact parameters and multiply-adds, and test_models' shape and dtype tests every model.
# Compiling each one's backward pass cost 11-27 s; tracing each one's backbone 1-2 s.
SIBLINGS = {
    "vgg13": "vgg11", "vgg16": "vgg11", "vgg19": "vgg11",
    "vgg13_bn": "vgg11_bn", "vgg16_bn": "vgg11_bn", "vgg19_bn": "vgg11_bn",
    "resnet34": "resnet18", "se_resnet34": "se_resnet18",
    "resnet101": "resnet152", "se_resnet101": "se_resnet152", "densenet169": "densenet201",
    "shufflenet_v1_g2": "shufflenet_v1_g3", "shufflenet_v1_g4": "shufflenet_v1_g3",
    "shufflenet_v1_g8": "shufflenet_v1_g3", "shufflenet_v2_x1_0": "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_5": "shufflenet_v2_x0_5", "shufflenet_v2_x2_0": "shufflenet_v2_x0_5",
    "mnasnet1_0": "mnasnet0_5", "mobilenet_v3_large": "mobilenet_v3_small",
}


def jit_once(fun, **kwargs):
    """`jax.jit` for a program a test runs once or twice at a small size: on the CPU, XLA
    without LLVM's optimisations (`runtime.FAST_CPU_COMPILE`) compiles it in about half the time
    (densenet121's init and train step at 32x32, batch 2: 94 s -> 58 s) and runs it about as
    fast at these sizes. Never for a program a test runs many times or times."""
    return runtime.jit_on(jax.devices()[0], fun, **kwargs)


def random_variables(model, x, seed: int = 0, **kwargs) -> dict:
    """Variables for `model.init(key, x, **kwargs)` (x: an array or a `jax.ShapeDtypeStruct`),
    by `random_values` of the shapes `jax.eval_shape` gives: traced, never compiled. For tests
    that need finite, input-dependent values rather than the model's own initialisers:
    compiling a model's init costs 5-50 s on this CPU (densenet121 19 s, se_resnet152 51 s),
    nearly all of it the random initialisers. The initialisers themselves are tested where
    they matter (zero_init_residual) and by every real training run."""
    return random_values(jax.eval_shape(lambda k, x: model.init(k, x, **kwargs),
                                        jax.random.key(0), x), seed)


def random_values(shapes, seed: int = 0) -> dict:
    """A tree of variables' shapes filled with NumPy draws by each leaf's name: He-scaled
    normal kernels, scales and running variances near 1, small running means, and biases of
    0.5 to 1, so that a ReLU layer fed nearly constant inputs (a squeeze-excitation's pooled
    features) does not start dead for the whole batch, zeroing its gradients (checked with
    seeds 0-2 on test_models' forward/backward tests)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", "")
        shape = leaf.shape
        if name in ("scale", "var"):
            value = 1 + 0.1 * rng.random(shape)
        elif name == "bias":
            value = 0.5 + 0.5 * rng.random(shape)
        elif name == "mean" or len(shape) < 2:
            value = 0.1 * rng.standard_normal(shape)
        else:  # a kernel: (..., fan_in, features)
            value = rng.standard_normal(shape) * math.sqrt(2 / math.prod(shape[:-1]))
        return np.asarray(value, leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def cli(*args) -> tuple[int, str]:
    """(exit status, stderr) of `python -m experiments.train ARGS`, run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train_cli.main(list(args))
    return code, err.getvalue()


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = pathlib.Path(__file__).resolve().parent.parent


# The suite's programs run once or a few times at small sizes: XLA:CPU without LLVM's
# optimisations (runtime.FAST_CPU_COMPILE, as XLA flags) compiles them in about 60% of the time
# and runs them about as fast for a few steps (not for hundreds: the README's 220-step run took
# 148 s instead of 100). tests/conftest.py sets them for the test processes; `env` gives them to
# the processes the tests start, unless a test asks for optimised code (a whole run).
FAST_COMPILE_FLAGS = " ".join(f"--{k}={str(v).lower()}" for k, v in
                              runtime.FAST_CPU_COMPILE.items())


def env(devices: int, xla_flags: str = "", threads: int | None = None,
        optimised: bool = False) -> dict:
    """The environment of a process of this checkout with `devices` CPU devices (and `threads`
    XLA CPU client threads, PJRT_NPROC, if given), compiling fast unless `optimised`."""
    flags = [f"--xla_force_host_platform_device_count={devices}",
             "" if optimised else FAST_COMPILE_FLAGS, xla_flags]
    e = dict(os.environ, PYTHONPATH=str(ROOT), KERAS_HOME=os.environ.get("KERAS_HOME", "/tmp"),
             XLA_FLAGS=" ".join(f for f in flags if f))
    e.pop("JAX_NUM_CPU_DEVICES", None)
    if threads:
        e["PJRT_NPROC"] = str(threads)
    return e


# Runs compared bitwise across topologies (2 processes x 1 device against 1 process x 2
# devices) give every process this many XLA CPU threads: XLA's own convolution kernels split
# their sums by the thread count, and cnnjax gives a process of 2 simulated devices more threads
# than one of 1 device (cnnjax.parallel), so without it the same SPMD program rounds differently
# (2.3206279 against 2.3206282 at step 6 of test_sigterm_to_one_of_two_processes_saves_one_
# step_on_both on an AMD EPYC; equal with equal thread counts).
SAME_THREADS = 4


def start(args, processes=1, devices=1, module="experiments.train", xla_flags="",
          threads=None):
    """The real CLI `python -m MODULE ARGS`: `processes` processes on 127.0.0.1 (each with
    `devices` CPU devices and, if given, `threads` XLA CPU threads)."""
    base = [sys.executable, "-m", module, *args]
    multi = [[]] if processes == 1 else [
        [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
         f"--process_id={i}"] for port in [free_port()] for i in range(processes)]
    return [subprocess.Popen(base + extra, env=env(devices, xla_flags, threads), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for extra in multi]


def finish(procs, timeout=600) -> list[str]:
    """Waits for every process; their stderr. Fails on a non-zero exit status."""
    errs = [p.communicate(timeout=timeout)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    return errs


def train_step_outputs(model, w):
    """Logits, BatchNorm updates and parameter gradients of a fixed linear loss, train mode."""
    def step(variables, x):
        def loss(params):
            logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                          mutable=["batch_stats"],
                                          rngs={"dropout": jax.random.key(7)})
            return jnp.sum(logits * w), (logits, updates)
        grads, (logits, updates) = jax.grad(loss, has_aux=True)(variables["params"])
        return logits, updates, grads
    return step


def residual_bytes(model, variables, x) -> int:
    """Bytes the forward pass keeps for the backward pass (the VJP's residuals), by tracing."""
    def pullback(variables):  # real arrays or only their shapes (jax.eval_shape of init)
        def f(p):
            return model.apply({**variables, "params": p}, x, train=True,
                               mutable=["batch_stats"], rngs={"dropout": jax.random.key(7)})[0]
        return jax.vjp(f, variables["params"])[1]
    shapes = jax.eval_shape(pullback, variables)
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(shapes))


def assert_tree_close(a, b, rel=1e-4):
    """Leaf by leaf, to `rel` of the leaf's norm, or of the whole tree's for a near-zero leaf
    (BN scales right before another BN get gradients ~1e-5 of the rest, pure rounding noise)."""
    total = np.sqrt(sum(np.sum(np.square(np.asarray(u, np.float64)))
                        for u in jax.tree_util.tree_leaves(a)))
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        err = np.linalg.norm(u - v)
        assert err <= rel * max(np.linalg.norm(u), 1e-3 * total), (
            f"{jax.tree_util.keystr(path)}: |a - b| = {err:.3g}, |a| = {np.linalg.norm(u):.3g}")
