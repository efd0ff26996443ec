"""The training system: topology independence, multi-host, resume, learning, bad input."""
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import checkpoint, data, parallel, train
from experiments import train as train_cli

import helpers
from helpers import SAME_THREADS, cli, free_port, read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent


# XLA's CPU collectives abort a process when a device thread waits more than 40 s for the
# others; on 2 loaded cores a slow device thread can fall that far behind in the short sharded
# runs below, so they wait as long as their own timeout instead (a true deadlock still ends
# at that timeout: see test_the_readme_command_learns_the_digits).
SLOW_CPU_COLLECTIVES = ("--xla_cpu_collective_call_terminate_timeout_seconds=1200 "
                        "--xla_cpu_collective_timeout_seconds=1200")


def env(devices: int, threads: int | None = None, optimised: bool = False) -> dict:
    return helpers.env(devices, SLOW_CPU_COLLECTIVES, threads, optimised)


def test_eight_devices_equal_one_device_on_the_same_global_batch(data_dir):
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "multidevice_step.py"), "8",
                          data_dir], capture_output=True, text=True, env=env(1), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["devices"] == 8 and r["shards"] == 8
    # The tolerance is float32 summation order, derived: step 0's learning rate is 0 (warmup),
    # so both runs take both gradients at the same initial parameters and nothing compounds
    # over steps. Each gradient element and BN statistic is one sum of at most n terms (batch
    # 16 x the 16x16 map after the stem); two orders of an n-term float32 sum differ by at most
    # 2 n u times its terms' magnitude (u = 2^-24), here the largest update and statistic.
    bound = 2 * (16 * 16 * 16) * 2.0**-24
    np.testing.assert_allclose(r["loss_n"], r["loss_1"], rtol=bound)
    assert r["params_diff"] <= bound * r["step_max"], r
    assert r["batch_stats_diff"] <= bound * r["stats_max"], r
    assert r["step_max"] > 1e-3  # the step did move the parameters
    assert r["bn_identical_on_devices"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux thread names")
@pytest.mark.parametrize("devices, given, expect", [
    (8, None, str(max(16, os.cpu_count()))), (8, "9", "9"), (1, None, None)])
def test_simulated_cpu_devices_get_two_client_threads_each(devices, given, expect):
    """Importing cnnjax sets PJRT_NPROC to twice the simulated devices (at least the cores)
    before JAX's CPU backend starts, keeps a value the user set, and leaves one device alone;
    XLA's intra-op pool (threads named tf_XLAEigen) then has that many threads."""
    e = helpers.env(devices)
    e.pop("PJRT_NPROC", None)
    e.pop("NPROC", None)
    if given:
        e["PJRT_NPROC"] = given
    code = ("import os, pathlib, jax, cnnjax; jax.devices(); "
            "names = [p.read_text().strip() "
            "for p in pathlib.Path('/proc/self/task').glob('*/comm')]; "
            "print(os.environ.get('PJRT_NPROC'), names.count('tf_XLAEigen'))")
    out = subprocess.run([sys.executable, "-c", code], env=e, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    value, eigen = out.stdout.split()
    assert value == str(expect)
    assert int(eigen) == max(int(expect or os.cpu_count()), devices)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_as_many_devices(data_dir, tmp_path):
    """2 processes x 1 CPU device run 3 steps of the real CLI; 1 process x 2 devices agrees
    bitwise, on any machine, given the same number of XLA CPU threads (helpers.SAME_THREADS).

    Exact by construction: both run the same SPMD program on the same two shards (each
    process feeds its own rows, assembled into the same global batch) with as many threads
    (XLA's own convolution kernels split their sums by the thread count), and every cross-shard
    reduction (gradients, BatchNorm statistics, the loss) is then a sum of two partial values,
    a + b, which float addition gives the same in any order. Comparing against 1 device would
    instead compare different summation orders, whose float32 rounding the chaotic first
    steps amplify past any fixed tolerance on some CPUs (2.85e-5 in a conv kernel on one AMD
    EPYC); tests/multidevice_step.py covers N devices vs 1 with a derived bound.
    """
    common = ["-m", "experiments.train", "--arch=resnet18", f"--data_dir={data_dir}",
              "--batch_size=16", "--num_steps=3", "--log_every=1", "--eval_every=3",
              "--bn_recalibration_batches=2", "--quiet"]
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, *common, f"--workdir={tmp_path / 'multi'}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        env=env(1, threads=SAME_THREADS), cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    single = subprocess.run([sys.executable, *common, f"--workdir={tmp_path / 'single'}"],
                            env=env(2, threads=SAME_THREADS), cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    multi_m, single_m = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    losses = lambda ms: [(m["step"], m["loss"]) for m in ms if "loss" in m]
    assert len(losses(multi_m)) == 3  # only process 0 writes metrics
    assert losses(multi_m) == losses(single_m)
    evals = lambda ms: [m for m in ms if "eval_loss" in m]
    assert evals(multi_m) == evals(single_m)
    a, _ = checkpoint.Checkpointer(tmp_path / "multi").restore_on_host()
    b, _ = checkpoint.Checkpointer(tmp_path / "single").restore_on_host()
    assert int(a["step"]) == int(b["step"]) == 3
    for key in ("params", "batch_stats", "opt_state"):
        for x, y in zip(jax.tree_util.tree_leaves(a[key]), jax.tree_util.tree_leaves(b[key])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=key)


def test_processes_read_disjoint_rows_that_make_the_global_batch(data_dir):
    kw = dict(data_dir=data_dir, image_size=32, global_batch_size=16, train=True, seed=0)
    whole = data.Loader("digits", "train", **kw).batch(5)
    parts = [data.Loader("digits", "train", process_index=i, process_count=2, **kw).batch(5)
             for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
    assert not np.array_equal(parts[0]["image"], parts[1]["image"])


def small(workdir, **kw):
    base = dict(arch="resnet18", dataset="digits", batch_size=32, num_steps=8, log_every=2,
                learning_rate=0.4, workdir=str(workdir))
    return train.TrainConfig(**{**base, **kw})


def test_interrupted_run_resumes_to_the_same_parameters(data_dir, tmp_path):
    full = train.train_and_evaluate(small(tmp_path / "a", data_dir=data_dir), verbose=False)
    part = train.train_and_evaluate(small(tmp_path / "b", data_dir=data_dir), verbose=False,
                                    stop_after=4)
    assert part["steps"] == 4 and checkpoint.Checkpointer(tmp_path / "b").latest_step() == 4
    resumed = train.train_and_evaluate(small(tmp_path / "b", data_dir=data_dir), verbose=False)
    for x, y in zip(jax.tree_util.tree_leaves(full["state"]),
                    jax.tree_util.tree_leaves(resumed["state"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise on the CPU
    la = [m for m in read_metrics(tmp_path / "a") if "loss" in m]
    lb = [m for m in read_metrics(tmp_path / "b") if "loss" in m]
    assert [m["loss"] for m in la] == [m["loss"] for m in lb]
    assert resumed["eval_top1"] == full["eval_top1"]


def test_metrics_jsonl_and_workdir_contents(data_dir, tmp_path):
    train.train_and_evaluate(small(tmp_path, data_dir=data_dir, num_steps=4, eval_every=2,
                                   checkpoint_every=2),
                             verbose=False)
    records = read_metrics(tmp_path)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_top1" in r]
    assert [r["step"] for r in steps] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    assert set(steps[0]) == {"step", "loss", "lr", "img_per_s", "data_wait"}
    assert all(0 <= r["data_wait"] <= 1 for r in steps)
    assert set(evals[0]) == {"step", "eval_loss", "eval_top1", "eval_top5"}
    assert steps[1]["lr"] > steps[0]["lr"] > 0  # warming up
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["arch"] == "resnet18" and config["image_size"] == 32
    assert checkpoint.Checkpointer(tmp_path).latest_step() == 4
    model, variables, record = train.load_checkpoint(tmp_path)
    assert record["data_position"]["step"] == 4
    x = data.Loader("digits", "test", data_dir=data_dir, image_size=32, global_batch_size=8,
                    train=False).batch(0)["image"]
    assert model.apply(variables, x, train=False).shape == (8, 10)
    with pytest.raises(ValueError, match=r"has no checkpoint of step 3; saved steps: 2, 4"):
        train.load_checkpoint(tmp_path, step=3)
    assert train.load_checkpoint(tmp_path, step=2)[2]["data_position"]["step"] == 2


def test_load_checkpoint_of_a_directory_without_a_run_says_so_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*typo' holds no checkpoint \(no .*typo/"
                                                r"checkpoints/STEP\): expected the --workdir"):
        train.load_checkpoint(tmp_path / "typo")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        train.load_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_eval_counts_every_test_example_once(data_dir, tmp_path):
    out = train.train_and_evaluate(small(tmp_path, data_dir=data_dir, num_steps=1,
                                         batch_size=64), verbose=False)
    assert out["eval_count"] == data.dataset_info("digits", data_dir=data_dir).num_test


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_the_readme_command_learns_the_digits(data_dir, tmp_path, seed):
    """`python -m experiments.train --arch=resnet18` as the README gives it (10 epochs), in a
    fresh process, on two seeds. More seeds and architectures are measured by
    `python -m experiments.zoo`, not here. Both run on one device: a step on 8 simulated devices
    is the same function (test_eight_devices_equal_one_device_on_the_same_global_batch), and a
    whole 8-device run took 340 s of CI. A stall ends the test at the timeout with the metrics
    so far, not the suite."""
    try:
        out = subprocess.run([sys.executable, "-m", "experiments.train", "--arch=resnet18",
                              f"--seed={seed}", f"--data_dir={data_dir}",
                              f"--workdir={tmp_path}", "--quiet"], cwd=ROOT,
                             env=env(1, optimised=True),  # 220 steps: compiled as a user's run
                             capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        metrics = tmp_path / "metrics.jsonl"
        pytest.fail(f"no end after {e.timeout} s; last metrics: "
                    f"{metrics.read_text()[-300:] if metrics.exists() else 'none'}")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 220 and summary["eval_count"] == 360
    assert summary["eval_top1"] >= 0.9, summary


@pytest.mark.parametrize("args, message", [
    (["--arch=resnet5"], "unknown model 'resnet5'; did you mean resnet50"),
    (["--dataset=imagenet22k"], "imagenet22k"),
    (["--arch=alexnet", "--image_size=32"],
     "--image_size=32 is too small for alexnet: it needs at least 63x63"),
    (["--optimizer=lamb"], "unknown optimizer 'lamb'"),
    (["--config=nope"], "unknown --config='nope'"),
])
def test_bad_input_is_one_clear_line(data_dir, tmp_path, args, message):
    code, err = cli(*args, f"--data_dir={data_dir}", f"--workdir={tmp_path}", "--num_steps=1",
                    "--quiet")
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_batch_size_must_divide_by_the_device_count():
    parallel.check_batch_size(64, 8)
    with pytest.raises(ValueError, match=r"--batch_size=100 must be divisible by the number of "
                                         r"devices \(8\); nearest valid sizes: 96 or 104"):
        parallel.check_batch_size(100, 8)
    with pytest.raises(ValueError, match="nearest valid sizes: 8"):
        parallel.check_batch_size(3, 8)


def test_batch_size_error_on_eight_devices_from_the_cli(data_dir):
    out = subprocess.run([sys.executable, "-m", "experiments.train", f"--data_dir={data_dir}",
                          "--batch_size=20", "--num_steps=1"], cwd=ROOT, env=env(8),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "--batch_size=20 must be divisible by the number of devices (8)" in out.stderr
    assert "Traceback" not in out.stderr


def _tree_digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


def test_a_workdir_of_another_arch_is_refused_and_left_untouched(data_dir, tmp_path):
    train.train_and_evaluate(small(tmp_path, data_dir=data_dir, num_steps=2), verbose=False)
    before = _tree_digest(tmp_path)
    code, err = cli("--arch=vgg11", f"--data_dir={data_dir}", f"--workdir={tmp_path}",
                    "--num_steps=2", "--quiet")
    assert code == 2 and "belongs to a different run" in err and "arch: 'resnet18' there" in err
    assert _tree_digest(tmp_path) == before
    (tmp_path / "config.json").unlink()  # even without config.json the checkpoint guards itself
    with pytest.raises(checkpoint.CheckpointMismatch, match="nothing was overwritten"):
        train.train_and_evaluate(small(tmp_path, data_dir=data_dir, arch="vgg11"), verbose=False)
    assert checkpoint.Checkpointer(tmp_path).latest_step() == 2


def test_unprepared_dataset_fails_fast_with_instructions(tmp_path):
    code, err = cli("--dataset=cifar10", f"--data_dir={tmp_path}", "--num_steps=1", "--quiet")
    assert code == 2 and "cifar10" in err


def test_presets_open_with_their_command_and_flags_override_them():
    from experiments import configs
    assert {"default", "cifar10_resnet18", "imagenet_resnet50"} <= set(configs.names())
    for name in configs.names():
        import importlib
        doc = importlib.import_module(f"experiments.configs.{name}").__doc__
        assert doc.startswith("python -m experiments.train"), name
    rn50 = configs.load("imagenet_resnet50")
    assert (rn50["batch_size"], rn50["num_epochs"], rn50["warmup_epochs"], rn50["weight_decay"],
            rn50["dtype"], rn50["optimizer"]) == (1024, 100, 5, 1e-4, "bfloat16", "sgd")
    args = train_cli._parser().parse_args(["--config=imagenet_resnet50", "--batch_size=256"])
    config = train_cli.make_config(args)
    assert config.batch_size == 256 and config.arch == "resnet50" and config.dtype == "bfloat16"


def test_the_default_preset_has_per_family_rows_that_flags_still_override():
    from experiments import configs
    make = lambda *a: train_cli.make_config(train_cli._parser().parse_args(list(a)))
    base = dataclasses.asdict(train.TrainConfig())
    plain = make("--arch=densenet121")
    assert (plain.optimizer, plain.learning_rate, plain.model_overrides) == ("sgd", 0.2, {})
    for k, v in configs.load("default").items():  # the Python defaults are the preset's
        assert base[k] == v or k == "log_every", k
    for arch in ("resnet18", "se_resnet50", "resnext50_32x4d", "wide_resnet50_2"):
        assert make(f"--arch={arch}").model_overrides == {"zero_init_residual": True}, arch
    for arch in ("se_resnet50", "resnext50_32x4d"):
        c = make(f"--arch={arch}")
        assert (c.optimizer, c.learning_rate, c.weight_decay) == ("adamw", 1e-3, 0.05), arch
    assert make("--arch=resnet50").optimizer == "sgd"
    for arch in ("alexnet", "alexnet_v1", "zfnet", "vgg11_bn", "vgg16_bn", "googlenet_v1"):
        c = make(f"--arch={arch}")
        assert (c.optimizer, c.learning_rate, c.weight_decay) == ("adamw", 5e-4, 0.05), arch
    for arch in ("vgg11", "vgg13", "vgg16", "vgg19"):  # no BatchNorm at all: a lower rate
        c = make(f"--arch={arch}")
        assert (c.optimizer, c.learning_rate, c.weight_decay) == ("adamw", 2e-4, 0.05), arch
    assert make("--arch=googlenet").optimizer == "sgd"
    assert make("--arch=shufflenet_v2_x1_0").num_epochs == 20
    assert make("--arch=shufflenet_v1_g3").num_epochs == 20
    assert make("--arch=shufflenet_v1_g8").model_overrides == {"zero_init_residual": True}
    assert make("--arch=shufflenet_v2_x1_0").model_overrides == {}  # no added units to zero
    assert make("--arch=shufflenet_v2_x1_0", "--num_epochs=3").num_epochs == 3
    c = make("--arch=resnet18", '--model_overrides={"se_reduction": 16}')  # merged, not replaced
    assert c.model_overrides == {"zero_init_residual": True, "se_reduction": 16}
    c = make("--arch=resnet18", '--model_overrides={"zero_init_residual": false}')
    assert c.model_overrides == {"zero_init_residual": False}
    c = make("--arch=vgg16", "--optimizer=sgd", "--learning_rate=0.04")
    assert (c.optimizer, c.learning_rate, c.weight_decay) == ("sgd", 0.04, 0.05)
    assert train.TrainConfig(**configs.load("default", arch="vgg16")).optimizer == "adamw"
    for module in (configs.default,):
        assert all(why for _, _, why in module.PER_ARCH)  # every row says why


def test_optimizer_skips_weight_decay_on_bn_and_bias_and_scales_lr():
    params = {"conv": {"kernel": np.ones((3, 3, 1, 2))}, "bn": {"scale": np.ones(2)},
              "fc": {"bias": np.ones(2)}}
    mask = train.decay_mask(params)
    assert mask == {"conv": {"kernel": True}, "bn": {"scale": False}, "fc": {"bias": False}}
    config = train.TrainConfig(batch_size=1024, learning_rate=0.1, warmup_epochs=5)
    schedule = train.learning_rate_schedule(config, steps_per_epoch=100, total_steps=10_000)
    assert float(schedule(0)) == 0.0
    assert abs(float(schedule(500)) - 0.4) < 1e-6  # peak 0.1 x 1024/256 after 5 epochs
    assert float(schedule(10_000)) < 1e-6


def test_label_smoothing_and_float32_loss_under_bf16():
    import jax.numpy as jnp
    logits = jnp.array([[10.0, 0.0, 0.0]], jnp.bfloat16)
    plain = train.cross_entropy(logits, jnp.array([0]))
    smooth = train.cross_entropy(logits, jnp.array([0]), smoothing=0.3)
    assert plain.dtype == jnp.float32 and smooth[0] > plain[0]


def _leaves(small: int, large: int) -> dict:
    """A tree like a deep network's state: many small leaves (BN vectors, a bf16 one, a
    scalar), a few large kernels, integer counters."""
    return {"bn": [jnp.full((64,), 0.5) for _ in range(small)],
            "half": jnp.ones((7,), jnp.bfloat16), "loss": jnp.float32(2.3),
            "kernels": [jnp.ones((3, 3, 64, 64)) for _ in range(large)],
            "step": jnp.int32(7), "count": np.arange(5)}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["bn", "half", "loss", "kernels"])
def test_all_finite_finds_a_bad_value_in_any_floating_leaf(where, bad):
    check = jax.jit(train.all_finite)
    tree = _leaves(small=40, large=11)  # the last kernel: in the second group of 8
    assert bool(check(tree)) and bool(train.all_finite({"step": 3})) and bool(check({}))
    if where in ("bn", "kernels"):
        tree[where][-1] = tree[where][-1].at[(0,) * tree[where][-1].ndim].set(bad)
    else:
        tree[where] = jnp.full_like(tree[where], bad)
    assert not bool(check(tree))


def test_all_finite_compiles_to_a_few_kernels_however_many_leaves():
    """A reduction per leaf made XLA:CPU compile kernels per leaf (DenseNet-201's step: half of
    its 87 s compile). The small leaves share a few; large ones of a shape go in groups of 8."""
    compiled = jax.jit(train.all_finite).lower(_leaves(small=400, large=40)).compile()
    fusions = compiled.as_text().count(" fusion(")
    # XLA 0.10: a reduction per leaf gave 1,316 kernels, this 15
    assert fusions <= 25, fusions


def test_adamw_bf16_clipping_smoothing_and_googlenet_aux_heads_train(data_dir, tmp_path):
    """The options together: GoogLeNet's aux heads train, bf16 compute keeps float32
    parameters, AdamW with clipping and label smoothing takes finite steps, and the checkpoint
    gives back the same model (aux heads, bf16) and parameters."""
    config = small(tmp_path, data_dir=data_dir, arch="googlenet", num_steps=2, optimizer="adamw",
                   learning_rate=1e-3, dtype="bfloat16", grad_clip_norm=1.0, label_smoothing=0.1,
                   model_overrides={"aux_logits": True}, log_every=1,
                   bn_recalibration_batches=0)  # one GoogLeNet compile less (tested apart)
    out = train.train_and_evaluate(config, verbose=False)
    params = out["state"].params
    assert "aux1" in params and "aux2" in params
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype("float32")}
    losses = [m["loss"] for m in read_metrics(tmp_path) if "loss" in m]
    assert len(losses) == 2 and all(np.isfinite(losses))
    model, variables, _ = train.load_checkpoint(tmp_path)
    assert model.aux_logits and model.dtype == jnp.bfloat16
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables["params"],
                           jax.device_get(params))


class _TwoHeads(nn.Module):
    """A model with one auxiliary head in train mode, as GoogLeNet's (logits, aux...)."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = x.reshape(x.shape[0], -1)
        logits = nn.Dense(10, name="fc")(x)
        return (logits, nn.Dense(10, name="aux")(x)) if train else logits


def test_aux_heads_add_their_weighted_cross_entropy_to_the_training_loss():
    model = _TwoHeads()
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 1))
    batch = {"image": x, "label": jnp.array([0, 1, 2, 3])}
    variables = model.init(jax.random.key(1), x, train=True)
    state = train.TrainState(step=jnp.array(0), params=variables["params"], batch_stats={},
                             opt_state=optax.sgd(0.1).init(variables["params"]),
                             rng=jax.random.key_data(jax.random.key(2)))
    logits, aux = model.apply(variables, x, train=True)
    ce = lambda z: float(train.cross_entropy(z, batch["label"], 0.1).mean())
    for weight in (0.0, 0.3, 1.0):
        config = train.TrainConfig(aux_loss_weight=weight, label_smoothing=0.1)
        step, _ = train.make_steps(model, optax.sgd(0.1), config, lambda s: 0.1)
        loss = float(jax.jit(step)(state, batch)[1]["loss"])
        np.testing.assert_allclose(loss, ce(logits) + weight * ce(aux), rtol=1e-6)


def test_blowup_monitor_flags_jumps_by_orders_of_magnitude():
    m = train.BlowUpMonitor(num_classes=10)  # chance level ln 10 = 2.30
    assert "BLOW-UP" in m.check("eval", 22, 4344.7)  # a first eval 10x above chance
    assert not m.check("eval", 44, 0.9)
    assert not m.check("train", 5, 2.5) and not m.check("train", 10, 0.05)
    assert not m.check("train", 15, 0.4)   # 8x its best, and below chance: batch noise
    assert not m.check("train", 16, 2.2)   # 44x its best, but still below chance
    assert m.check("train", 20, 3.0)       # >10x its best and above chance
    assert m.check("train", 25, float("nan"))
    assert m.check("eval", 66, 9.5)        # >10x the best eval loss 0.9
    assert [(e["kind"], e["step"]) for e in m.events] == [
        ("eval", 22), ("train", 20), ("train", 25), ("eval", 66)]
    assert m.summary().startswith("warning: the loss blew up 4 time(s)")


def test_a_blowup_shows_on_the_progress_line_in_metrics_and_in_the_summary(data_dir, tmp_path):
    code, err = cli("--arch=resnet18", f"--data_dir={data_dir}", f"--workdir={tmp_path}",
                    "--batch_size=32", "--num_steps=4", "--log_every=1", "--eval_every=2",
                    "--learning_rate=400", "--warmup_epochs=0")
    assert code == 0, err
    assert "BLOW-UP" in err and "warning: the loss blew up" in err, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["blowups"] and summary["max_eval_loss"] > 23, summary
    flagged = [r for r in read_metrics(tmp_path)
               if "blowup_train_loss" in r or "blowup_eval_loss" in r]
    assert {e["step"] for e in summary["blowups"]} == {r["step"] for r in flagged}


def test_a_healthy_run_reports_no_blowups_and_its_throughput(data_dir, tmp_path):
    out = train.train_and_evaluate(small(tmp_path, data_dir=data_dir, num_steps=6,
                                         learning_rate=0.1, eval_every=3), verbose=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["blowups"] == [] and out["blowups"] == []
    evals = [r["eval_loss"] for r in read_metrics(tmp_path) if "eval_loss" in r]
    assert summary["max_eval_loss"] == max(evals)
    assert summary["img_per_s"] > 0


@pytest.mark.parametrize("arch, overrides", [
    ("resnet18", {}),
    ("mnasnet0_5", {"dropout_rate": 0.0}),                 # BN momentum 0.9997 (TensorFlow's)
    # BNs inside rematerialised blocks; two short dense blocks keep the compile cheap
    ("densenet121", {"memory_efficient": True, "block_config": (2, 2)}),
    ("googlenet", {"aux_logits": True, "dropout_rate": 0.0}),
])
def test_recalibrated_batch_norm_holds_exactly_the_batch_statistics(arch, overrides):
    """After recalibrating on one batch, eval mode normalises that batch exactly as train mode
    does, whatever the BN momentum: the running averages are replaced, not nudged."""
    import jax.numpy as jnp

    from cnnjax import create_model
    model = create_model(arch, num_classes=10, **overrides)
    # 64 px and 8 images keep >= 32 values per channel in the last BNs: with fewer, a channel's
    # variance nears epsilon and amplifies float32 rounding between the two programs compared.
    x = jax.random.normal(jax.random.key(1), (8, 64, 64, 3))
    # Jitted: op by op, the two GoogLeNet/MnasNet applies took half a minute.
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                             batch_stats=variables["batch_stats"], opt_state=None,
                             rng=jax.random.key_data(jax.random.key(0)))
    moments = jax.jit(train.make_moments_step(model))
    assert (jax.tree_util.tree_structure(moments(state, {"image": x}))
            == jax.tree_util.tree_structure(state.batch_stats))
    evaluate = jax.jit(lambda v: model.apply(v, x, train=False))
    before = evaluate({"params": state.params, "batch_stats": state.batch_stats})
    new = train.recalibrate_batch_norm(state, moments, [{"image": x}])
    trained = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"],
                                            rngs={"dropout": jax.random.key(2)})[0])(
        {"params": new.params, "batch_stats": new.batch_stats})  # dropout: aux heads' only
    trained = trained[0] if isinstance(trained, tuple) else trained
    evaluated = evaluate({"params": new.params, "batch_stats": new.batch_stats})
    np.testing.assert_allclose(evaluated, trained, rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(before) - np.asarray(trained)).max() > 1e-2  # the EMA was stale
    # K batches: the mean of the per-batch statistics.
    y = x[::-1] * 2.0 + 1.0
    two = train.recalibrate_batch_norm(state, moments, [{"image": x}, {"image": y}])
    expect = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, moments(state, {"image": x}),
                                    moments(state, {"image": y}))
    for a, b in zip(jax.tree_util.tree_leaves(two.batch_stats), jax.tree_util.tree_leaves(expect)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_keep_if_picks_the_new_or_the_old_state_with_one_conditional_on_the_cpu():
    """The train step's guard: the whole new tree or the whole old one, by one conditional (a
    select per leaf made XLA:CPU compile a kernel per leaf)."""
    new = {"w": jnp.ones((2, 3)), "b": (jnp.full(4, 2.0), jnp.arange(3))}
    old = jax.tree.map(lambda x: x * 0 - 1, new)
    for ok, want in ((True, new), (False, old)):
        got = jax.jit(train.keep_if)(jnp.bool_(ok), new, old)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
    eqns = jax.make_jaxpr(train.keep_if)(jnp.bool_(True), new, old).jaxpr.eqns
    assert [e.primitive.name for e in eqns if e.primitive.name in ("cond", "select_n")] == ["cond"]
