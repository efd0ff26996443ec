"""cnnjax's side: the model's train (or eval) step built as `cnnjax.train` builds it, compiled
and timed on random inputs, with XLA's own memory, FLOP and compile-time figures."""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, convs, trace
from cnnjax import flags, parallel, profile, runtime, train
from cnnjax.models import fastconv, registry
from experiments import hostmem


def run(args) -> int:
    """A plain run (no --compare, --all, sweep or input mode): cnnjax's step in this process,
    one JSON line; a step that does not fit in the device's memory exits EXIT_OOM."""
    fastconv.set_impl(args.conv)
    args.batch_size = args.batch_size or 8
    args.steps = args.steps or (5 if jax.default_backend() == "cpu" else 30)
    args.num_classes = args.num_classes or 1000
    try:
        mesh, _, state, train_step, eval_step = build_step(args, args.num_classes, 3)
    except ValueError as e:
        return flags.fail(e)
    try:
        return time_step(args, mesh, state, train_step, eval_step)
    except Exception as e:  # noqa: BLE001 - only running out of device memory is handled
        if not common.out_of_memory(e):
            raise
        return common.too_big(args, f"the memory of {jax.devices()[0].device_kind}", e)


def build_step(args, num_classes: int, channels: int):
    """The mesh, model, initial state and the train and eval steps for `args` (ValueError on a
    bad combination)."""
    model = registry.create_model(args.arch, num_classes=num_classes,
                                  dtype=jnp.dtype(args.dtype), **common.options(args))
    train.check_image_size(args.image_size, model)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(args.batch_size, mesh.size)
    config = train.TrainConfig(arch=args.arch, image_size=args.image_size,
                               batch_size=args.batch_size, dtype=args.dtype)
    schedule = train.learning_rate_schedule(config, 100, 1000)
    tx = train.make_optimizer(config, schedule)
    state = train.init_state(model, tx, config, channels, mesh)
    train_step, eval_step = train.make_steps(model, tx, config, schedule)
    return mesh, model, state, train_step, eval_step


def jit_train(train_step, mesh):
    """The train step jitted as the train loop jits it: state replicated and donated, the batch
    split over the mesh."""
    repl, sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return runtime.jit(train_step, in_shardings=(repl, sh), out_shardings=(repl, repl),
                       donate_argnums=0)


def random_batch(args, mesh) -> dict:
    """A batch of random images and labels of the flags' shape, split over the mesh."""
    rng = np.random.default_rng(0)
    return parallel.global_batch({
        "image": rng.standard_normal((args.batch_size, args.image_size, args.image_size, 3),
                                     np.float32),
        "label": rng.integers(0, args.num_classes, args.batch_size).astype(np.int32),
        "mask": np.ones(args.batch_size, np.float32)}, mesh)


def compile_step(step, state, batch):
    """The compiled step, its compile seconds and XLA's figures for it (FLOPs, temporary,
    argument and output bytes, the device's limit); MemoryError, before anything runs, for a
    step that needs more than the device allows."""
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    size = {k: getattr(mem, f"{k}_size_in_bytes", 0) or 0
            for k in ("temp", "argument", "output", "alias")}
    need = size["temp"] + size["argument"] + size["output"] - size["alias"]
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit and need > limit:  # would fail at its first allocation: say so without running
        raise MemoryError(f"RESOURCE_EXHAUSTED: the compiled step needs {need / 2**30:.1f} GiB, "
                          f"the device allows {limit / 2**30:.1f} GiB")
    figures = {"compile_s": compile_s, "flops": cost.get("flops"), "limit": limit,
               **{k: getattr(mem, f"{k}_size_in_bytes", None)
                  for k in ("temp", "argument", "output")}}
    return compiled, figures


def timed(run_step, state, steps: int):
    """`steps` steps after a warm-up one: (the state after them, seconds, minor page faults a
    step)."""
    state, out = run_step(state)  # warm-up
    jax.block_until_ready(out)
    faults = common.minor_faults()
    t0 = time.perf_counter()
    for _ in range(steps):
        state, out = run_step(state)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    return state, dt, (common.minor_faults() - faults) / steps


def time_step(args, mesh, state, train_step, eval_step) -> int:
    """Compiles and times the step on random inputs; prints one JSON line."""
    batch = random_batch(args, mesh)
    if args.mode == "train":
        step = jit_train(train_step, mesh)
    else:
        step = runtime.jit(eval_step, in_shardings=(parallel.replicated(mesh),
                                                    parallel.batch_sharding(mesh)),
                           out_shardings=parallel.replicated(mesh))
    compiled, figures = compile_step(step, state, batch)
    prof = profile(args.arch, args.image_size, num_classes=args.num_classes,
                   **common.options(args))

    def run_step(state):
        out = compiled(state, batch)
        return out if args.mode == "train" else (state, out)

    state, dt, faults = timed(run_step, state, args.steps)
    step_ms = 1e3 * dt / args.steps
    if args.trace:
        state = trace.trace_steps(args.trace, run_step, state, compiled.as_text(), step_ms,
                                  args.mode)
    if args.convs:
        convs.print_conv_times(args, prof, step_ms)
    print(json.dumps(result(args, mesh.size, prof, figures, dt, faults)))
    return 0


def result(args, devices: int, prof, figures: dict, dt: float, faults: float) -> dict:
    """The JSON line of a timed step: throughput, XLA's figures, the model's size."""
    # the paper convention for a train step: forward, input gradient and weight gradient
    passes = 3 if args.mode == "train" else 1
    model_flops = 2 * passes * args.batch_size * prof.macs
    flops, temp = figures["flops"], figures["temp"]
    return {
        "framework": "cnnjax", "arch": args.arch, "mode": args.mode,
        "batch_size": args.batch_size,
        "image_size": args.image_size, "dtype": args.dtype, "devices": devices,
        "device_kind": jax.devices()[0].device_kind, "memory_efficient": args.memory_efficient,
        "remat": args.remat,
        "conv": args.conv,
        "img_per_s": args.steps * args.batch_size / dt, "step_ms": 1e3 * dt / args.steps,
        "compile_s": figures["compile_s"], "flops": flops,
        "gflop_per_s": flops * args.steps / dt / 1e9 if flops else None,
        "params": prof.params, "macs": prof.macs, "steps": args.steps,
        "model_flops": model_flops, "model_tflop_per_s": model_flops * args.steps / dt / 1e12,
        "device_memory_limit": figures["limit"],
        "temp_bytes": temp, "temp_bytes_per_image": temp / args.batch_size if temp else None,
        "argument_bytes": figures["argument"], "output_bytes": figures["output"],
        "huge_pages": hostmem.active(), "minor_faults_per_step": faults,
    }
