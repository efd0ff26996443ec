"""Images/s, compile time and XLA memory of one model's train (or eval) step.

    python -m experiments.benchmark --arch=resnet50 --batch_size=8 --image_size=224
    python -m experiments.benchmark --arch=densenet121 --memory_efficient --mode=train

Random inputs of the given shape, the real train step of cnnjax.train (SGD, BatchNorm updates,
donated state) jitted over all local devices; the first step (compilation) is timed apart, then
`--steps` steps are timed after a warm-up. Memory is XLA's own analysis of the compiled step.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import flags

RULES = {name: flags.POSITIVE_INT for name in ("batch_size", "image_size", "num_classes", "steps")}


def main(argv: list[str] | None = None) -> int:
    p = flags.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mode", default="train", choices=("train", "eval"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--memory_efficient", action="store_true", help="DenseNet's recompute option")
    args = p.parse_args(argv)

    from cnnjax import parallel, train
    from cnnjax.models.registry import create_model
    overrides = {"memory_efficient": True} if args.memory_efficient else {}
    try:
        flags.check(vars(args), RULES)
        model = create_model(args.arch, num_classes=args.num_classes,
                             dtype=jnp.dtype(args.dtype), **overrides)
        train.check_image_size(args.image_size, model)
        mesh = parallel.make_mesh()
        parallel.check_batch_size(args.batch_size, mesh.size)
    except ValueError as e:
        return flags.fail(e)
    config = train.TrainConfig(arch=args.arch, image_size=args.image_size,
                               batch_size=args.batch_size, dtype=args.dtype)
    schedule = train.learning_rate_schedule(config, 100, 1000)
    tx = train.make_optimizer(config, schedule)
    state = train.init_state(model, tx, config, 3, mesh)
    train_step, eval_step = train.make_steps(model, tx, config, schedule)
    rng = np.random.default_rng(0)
    batch = parallel.global_batch({
        "image": rng.standard_normal((args.batch_size, args.image_size, args.image_size, 3),
                                     np.float32),
        "label": rng.integers(0, args.num_classes, args.batch_size).astype(np.int32),
        "mask": np.ones(args.batch_size, np.float32)}, mesh)
    repl, sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    if args.mode == "train":
        step = jax.jit(train_step, in_shardings=(repl, sh), out_shardings=(repl, repl),
                       donate_argnums=0)
    else:
        step = jax.jit(eval_step, in_shardings=(repl, sh), out_shardings=repl)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()

    def run(state):
        out = compiled(state, batch)
        return out if args.mode == "train" else (state, out)

    state, out = run(state)  # warm-up
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, out = run(state)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    result = {
        "arch": args.arch, "mode": args.mode, "batch_size": args.batch_size,
        "image_size": args.image_size, "dtype": args.dtype, "devices": mesh.size,
        "device_kind": jax.devices()[0].device_kind, "memory_efficient": args.memory_efficient,
        "img_per_s": args.steps * args.batch_size / dt, "step_ms": 1e3 * dt / args.steps,
        "compile_s": compile_s,
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
        "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
        "output_bytes": getattr(mem, "output_size_in_bytes", None),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
