"""Images/s, compile time and XLA memory of one model's train (or eval) step; or the input
pipeline's images/s.

    python -m experiments.benchmark --arch=resnet50 --batch_size=8 --image_size=224
    python -m experiments.benchmark --arch=densenet121 --memory_efficient --mode=train
    python -m experiments.benchmark --mode=input --dataset=imagenet2012 --data_dir=DIR \
        [--workers=N] [--arch=resnet18]

train/eval: random inputs of the given shape, the real train step of cnnjax.train (SGD,
BatchNorm updates, donated state) jitted over all local devices; the first step (compilation)
is timed apart, then `--steps` steps are timed after a warm-up. Memory is XLA's own analysis of
the compiled step.

input: the train split's batches (`--batch_size`, default 64) from cnnjax.data.Loader, with 1,
2 and all cores (or `--workers`), `--steps` batches (default 20) after two to fill the
pipeline, `--rounds` times (default 3, medians reported); in the same process and on the same
files, a reference tf.data pipeline written the way the Flax ImageNet example preprocesses
(sample_distorted_bounding_box, decode_and_crop_jpeg, bicubic resize, flip), and the ratio.
With --arch, the train step also runs fed by the loader and the fraction of time spent waiting
for data is reported. One JSON line per worker count; --readme=README.md also renders them as a
table (machine, versions and command included) between the README's input-benchmark markers.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import flags

RULES = {name: flags.optional(flags.POSITIVE_INT)
         for name in ("batch_size", "image_size", "num_classes", "steps", "workers",
                      "rounds")}
WARMUP_BATCHES = 2  # input mode: batches that fill the pipeline before timing starts
INPUT_START, INPUT_END = "<!-- input-benchmark:start -->", "<!-- input-benchmark:end -->"


def main(argv: list[str] | None = None) -> int:
    p = flags.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", help="required except with --mode=input")
    p.add_argument("--batch_size", type=int, help="default 8; 64 with --mode=input")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--num_classes", type=int, help="default 1000; the dataset's with --mode=input")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mode", default="train", choices=("train", "eval", "input"))
    p.add_argument("--steps", type=int, help="default 5; 20 batches with --mode=input")
    p.add_argument("--memory_efficient", action="store_true", help="DenseNet's recompute option")
    p.add_argument("--dataset", help="--mode=input: a named dataset with encoded images")
    p.add_argument("--data_dir", help="--mode=input: where it is prepared")
    p.add_argument("--workers", type=int, help="--mode=input: decode workers (default 1, 2 "
                                               "and all cores)")
    p.add_argument("--rounds", type=int, default=3,
                   help="--mode=input: timings of each pipeline, alternating; medians reported")
    p.add_argument("--readme", help="--mode=input: write the table into this file, between "
                                    f"{INPUT_START} and {INPUT_END}")
    args = p.parse_args(argv if argv is not None else sys.argv[1:])
    args.command = "python -m experiments.benchmark " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    if args.mode == "input":
        if not args.dataset:
            p.error("the following arguments are required: --dataset")
    elif not args.arch:
        p.error("the following arguments are required: --arch")
    try:
        flags.check(vars(args), RULES)
    except ValueError as e:
        return flags.fail(e)
    if args.mode == "input":
        return input_benchmark(args)
    from cnnjax import parallel
    args.batch_size, args.steps = args.batch_size or 8, args.steps or 5
    args.num_classes = args.num_classes or 1000
    try:
        mesh, model, state, train_step, eval_step = build_step(args, args.num_classes, 3)
    except ValueError as e:
        return flags.fail(e)
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


def build_step(args, num_classes: int, channels: int):
    """The mesh, model, initial state and the train and eval steps for `args` (ValueError on a
    bad combination)."""
    from cnnjax import parallel, train
    from cnnjax.models.registry import create_model
    overrides = {"memory_efficient": True} if args.memory_efficient else {}
    model = create_model(args.arch, num_classes=num_classes, dtype=jnp.dtype(args.dtype),
                         **overrides)
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


def images_per_second(batches, steps: int) -> float:
    """Throughput over `steps` batches after WARMUP_BATCHES of `batches`, an iterator of
    (step, batch)."""
    for _ in range(WARMUP_BATCHES):
        next(batches)
    t0 = time.perf_counter()
    images = 0
    for _ in range(steps):
        images += len(next(batches)[1]["label"])
    return images / (time.perf_counter() - t0)


def reference_batches(loader, workers: int, num_batches: int):
    """The same rows as `loader`, preprocessed as the Flax ImageNet example does on tf.data:
    a distorted bounding box (area 8-100%, ratio 3/4-4/3, 10 attempts), decode_and_crop_jpeg,
    bicubic resize, random flip, normalisation. Yields (step, batch) like Loader.iterate."""
    from cnnjax.data import records
    tf = records.tensorflow()
    size, b = loader.image_size, loader.local_batch_size
    mean = tf.constant(loader._spec.mean, tf.float32) * 255.0
    std = tf.constant(loader._spec.std, tf.float32) * 255.0

    def read(step):
        images, labels = loader._source.read(loader.indices(int(step)))
        return np.array(images, object), labels

    def example(encoded, label):
        begin, crop, _ = tf.image.sample_distorted_bounding_box(
            tf.image.extract_jpeg_shape(encoded), tf.zeros((1, 0, 4)), min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
        image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
        image = tf.image.resize(image, (size, size), method="bicubic")
        image = tf.image.random_flip_left_right(image)
        return (image - mean) / std, label

    ds = (tf.data.Dataset.range(num_batches)
          .map(lambda s: tuple(tf.numpy_function(read, [s], [tf.string, tf.int32])))
          .unbatch()
          .map(example, num_parallel_calls=workers, deterministic=True)
          .batch(b, drop_remainder=True)
          .prefetch(2))
    options = tf.data.Options()
    options.threading.private_threadpool_size = workers
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    for step, (image, label) in enumerate(ds.with_options(options)):
        yield step, {"image": image.numpy(), "label": label.numpy()}


def input_benchmark(args) -> int:
    from cnnjax import data, parallel, train
    from cnnjax.data import records, sources
    batch_size, steps = args.batch_size or 64, args.steps or 20
    cores = records.default_workers()
    counts = [args.workers] if args.workers else sorted({1, min(2, cores), cores})

    def loader(workers):
        return data.Loader(args.dataset, "train", data_dir=args.data_dir,
                           image_size=args.image_size, global_batch_size=batch_size,
                           workers=workers)
    in_memory = (f"--dataset={args.dataset} is held decoded in memory; --mode=input measures "
                 "the decoding of encoded photos (imagenet2012, imagenette, or a fake of them: "
                 "python -m cnnjax.data.fake)")
    try:
        if (sources.parse_synthetic(args.dataset) is not None
                or sources.get_spec(args.dataset).offline):  # before preparing anything
            raise ValueError(in_memory)
        probe = loader(1)
        if not probe.decodes_records:
            raise ValueError(in_memory)
        if probe.steps_per_epoch < WARMUP_BATCHES + steps:
            raise ValueError(f"{args.dataset}'s train split has {probe.steps_per_epoch} "
                             f"batches of {batch_size}; --steps={steps} needs "
                             f"{WARMUP_BATCHES + steps}: lower --steps or --batch_size")
        if args.readme:
            readme = pathlib.Path(args.readme)
            if not readme.is_file():
                raise ValueError(f"--readme={args.readme} is not a file")
            if INPUT_START not in readme.read_text() or INPUT_END not in readme.read_text():
                raise ValueError(f"--readme={args.readme} has no {INPUT_START} ... "
                                 f"{INPUT_END} markers")
        if args.arch:
            mesh, _, state, train_step, _ = build_step(
                args, args.num_classes or probe.info.num_classes, probe.info.channels)
    except ValueError as e:
        return flags.fail(e)
    n, results = WARMUP_BATCHES + steps, []
    if args.arch:
        repl, sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        step_fn = jax.jit(train_step, in_shardings=(repl, sh), out_shardings=(repl, repl),
                          donate_argnums=0)
    for workers in counts:
        ours, ref = [], []
        for _ in range(args.rounds):  # alternating, so that drifts hit both alike
            ours.append(images_per_second(loader(workers).iterate(0, n), steps))
            ref.append(images_per_second(reference_batches(probe, workers, n), steps))
        result = {"mode": "input", "dataset": args.dataset, "batch_size": batch_size,
                  "image_size": args.image_size, "workers": workers, "cores": cores,
                  "img_per_s": float(np.median(ours)),
                  "img_per_s_per_worker": float(np.median(ours)) / workers,
                  "reference_img_per_s": float(np.median(ref)),
                  "ratio": float(np.median(ours) / np.median(ref)),
                  "rounds": {"cnnjax": ours, "reference": ref}}
        if args.arch:
            clock = {"wait": 0.0}
            batches = train.waiting(parallel.prefetch_to_device(
                loader(workers).iterate(0, n), mesh), clock)
            previous = None
            for i, (_, batch) in enumerate(batches):
                state, metrics = step_fn(state, batch)
                jax.block_until_ready(previous)  # as the train loop: one step in flight
                previous = metrics["loss"]
                if i == WARMUP_BATCHES - 1:  # compiled, pipeline full: the clock starts
                    jax.block_until_ready(previous)
                    clock["wait"], t0 = 0.0, time.perf_counter()
            jax.block_until_ready(previous)
            elapsed = time.perf_counter() - t0
            result.update(arch=args.arch, train_img_per_s=steps * batch_size / elapsed,
                          data_wait=clock["wait"] / elapsed)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.readme:
        text = readme.read_text()
        head, rest = text.split(INPUT_START, 1)
        table = render_input(results, args.command)
        readme.write_text(f"{head}{INPUT_START}\n{table}\n{INPUT_END}{rest.split(INPUT_END, 1)[1]}")
    return 0


def render_input(results: list[dict], command: str) -> str:
    """The input benchmark's results as a Markdown table, with what they were measured on."""
    import platform

    from cnnjax.data import records
    from experiments import zoo
    m = zoo.machine()
    r0 = results[0]
    lines = [f"`{command}` on {m['cpu']} ({r0['cores']} cores), Python {m['python']}, "
             f"TensorFlow {records.tensorflow().__version__}, jax {m['jax']}, {m['date']}; "
             f"{r0['dataset']} train batches of {r0['batch_size']} at {r0['image_size']}x"
             f"{r0['image_size']} ({platform.machine()}).", "",
             "| workers | cnnjax img/s (median) | per worker | reference img/s (median) | ratio |"
             + (" train img/s | data wait |" if "arch" in r0 else ""),
             "|--:|--:|--:|--:|--:|" + ("--:|--:|" if "arch" in r0 else "")]
    for r in results:
        row = (f"| {r['workers']} | {r['img_per_s']:,.0f} | {r['img_per_s_per_worker']:,.0f} | "
               f"{r['reference_img_per_s']:,.0f} | {r['ratio']:.2f} |")
        if "arch" in r:
            row += f" {r['train_img_per_s']:,.1f} ({r['arch']}) | {r['data_wait']:.1%} |"
        lines.append(row)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
