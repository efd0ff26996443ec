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
    p.add_argument("--conv", default="auto", choices=("auto", "xla"),
                   help="auto: cnnjax's per-shape fast convolutions (cnnjax.models.fastconv); "
                        "xla: XLA's convolution everywhere, for comparison")
    p.add_argument("--memory_efficient", action="store_true", help="DenseNet's recompute option")
    p.add_argument("--framework", default="cnnjax", choices=("cnnjax", "torch"),
                   help="whose step to time in this process: cnnjax's, or torchvision's same "
                        "architecture (needs the torch extra)")
    p.add_argument("--compare", choices=("torch",),
                   help="time cnnjax and torchvision in fresh processes, alternating, "
                        "--rounds times; print both medians and their ratio")
    p.add_argument("--all", action="store_true",
                   help="--compare=torch for each of the standard architectures (ALL_ARCHS), "
                        "with --conv=xla and --conv=auto, and write the table to --out")
    p.add_argument("--out", default="BENCHMARKS.md", help="--all: the Markdown file written")
    p.add_argument("--dataset", help="--mode=input: a named dataset with encoded images")
    p.add_argument("--data_dir", help="--mode=input: where it is prepared")
    p.add_argument("--workers", type=int, help="--mode=input: decode workers (default 1, 2 "
                                               "and all cores)")
    p.add_argument("--rounds", type=int, default=3,
                   help="--mode=input and --compare: timings of each side, alternating; "
                        "medians reported")
    p.add_argument("--readme", help="--mode=input: write the table into this file, between "
                                    f"{INPUT_START} and {INPUT_END}")
    args = p.parse_args(argv if argv is not None else sys.argv[1:])
    args.command = "python -m experiments.benchmark " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    if args.mode == "input":
        if not args.dataset:
            p.error("the following arguments are required: --dataset")
    elif not args.arch and not args.all:
        p.error("the following arguments are required: --arch")
    try:
        flags.check(vars(args), RULES)
        check_comparison(args)
    except ValueError as e:
        return flags.fail(e)
    if args.mode == "input":
        return input_benchmark(args)
    if args.all:
        return all_benchmarks(args)
    if args.compare:
        return compare(args)
    if args.framework == "torch":
        return torch_benchmark(args)
    from cnnjax import parallel
    from cnnjax.models import fastconv
    fastconv.set_impl(args.conv)
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
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}

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
    temp = getattr(mem, "temp_size_in_bytes", None)
    flops = cost.get("flops")
    result = {
        "framework": "cnnjax", "arch": args.arch, "mode": args.mode,
        "batch_size": args.batch_size,
        "image_size": args.image_size, "dtype": args.dtype, "devices": mesh.size,
        "device_kind": jax.devices()[0].device_kind, "memory_efficient": args.memory_efficient,
        "conv": args.conv,
        "img_per_s": args.steps * args.batch_size / dt, "step_ms": 1e3 * dt / args.steps,
        "compile_s": compile_s, "flops": flops,
        "gflop_per_s": flops * args.steps / dt / 1e9 if flops else None,
        "temp_bytes": temp, "temp_bytes_per_image": temp / args.batch_size if temp else None,
        "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
        "output_bytes": getattr(mem, "output_size_in_bytes", None),
    }
    print(json.dumps(result))
    return 0


# The architectures `--all` compares with PyTorch (issue 11): where users train.
ALL_ARCHS = ("resnet50", "resnet18", "densenet121", "mobilenet_v2", "vgg16",
             "shufflenet_v2_x1_0")
TORCH_MISSING = ("--framework=torch and --compare=torch need torch and torchvision: "
                 "pip install -e \".[torch]\"")


def check_comparison(args) -> None:
    """ValueError for a combination of --framework, --compare and --all that cannot run."""
    torch_side = args.framework == "torch" or args.compare or args.all
    if not torch_side:
        return
    if args.mode == "input":
        raise ValueError("--framework=torch, --compare and --all time a model's step; "
                         "--mode=input times the input pipeline alone")
    if args.compare and args.framework == "torch":
        raise ValueError("--compare=torch already times both frameworks; drop --framework")
    if args.all and args.arch:
        raise ValueError(f"--all measures {', '.join(ALL_ARCHS)}; drop --arch (or drop --all "
                         "and use --compare=torch)")
    if args.dtype != "float32":
        raise ValueError(f"--dtype={args.dtype}: the PyTorch side is timed in float32 only")
    import importlib.util
    if importlib.util.find_spec("torch") is None or \
            importlib.util.find_spec("torchvision") is None:
        raise ValueError(TORCH_MISSING)
    from cnnjax import convert, parallel, train
    from cnnjax.models.registry import create_model
    shared = convert.shared_architectures()
    overrides = {"memory_efficient": True} if args.memory_efficient else {}
    for arch in ([args.arch] if args.arch else ALL_ARCHS):
        if arch not in shared:
            raise ValueError(f"--arch={arch} has no torchvision counterpart to compare with; "
                             f"torchvision has {', '.join(shared)}")
        # what the cnnjax side would refuse, refused here in one line before any process starts
        train.check_image_size(args.image_size, create_model(arch, **overrides))
    parallel.check_batch_size(args.batch_size or 8, jax.device_count())
    if args.all:
        out = pathlib.Path(args.out)
        if out.is_dir() or not out.parent.is_dir():
            raise ValueError(f"--out={args.out} must be a file in an existing directory")


def torch_benchmark(args) -> int:
    """torchvision's same architecture, timed as `main` times cnnjax's step: batch, image size
    and classes alike, random inputs, channels_last, SGD with Nesterov momentum 0.9 and weight
    decay 5e-4 (cnnjax's default optimizer), BatchNorm in train mode; two warm-up steps."""
    import torch
    import torchvision
    torch.manual_seed(0)
    args.batch_size, args.steps = args.batch_size or 8, args.steps or 5
    classes = args.num_classes or 1000
    extra = {"memory_efficient": True} if args.memory_efficient else {}
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=classes, **extra)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size).to(
        memory_format=torch.channels_last)
    y = torch.randint(0, classes, (args.batch_size,))
    if args.mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                              weight_decay=5e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            out = model(x)
            out = getattr(out, "logits", out)  # GoogLeNet/Inception in train mode: main head
            loss = torch.nn.functional.cross_entropy(out, y)
            loss.backward()
            opt.step()
            return loss
    else:
        model.eval()

        def step():
            with torch.inference_mode():
                return model(x)
    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = time.perf_counter() - t0
    print(json.dumps({
        "framework": "torch", "arch": args.arch, "mode": args.mode,
        "batch_size": args.batch_size, "image_size": args.image_size, "dtype": args.dtype,
        "img_per_s": args.steps * args.batch_size / dt, "step_ms": 1e3 * dt / args.steps,
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads()}))
    return 0


def child_argv(args, framework: str, conv: str | None = None) -> list[str]:
    """The command line of one side of a comparison (a fresh process each)."""
    argv = [f"--arch={args.arch}", f"--mode={args.mode}", f"--image_size={args.image_size}",
            f"--framework={framework}", f"--dtype={args.dtype}"]
    for name in ("batch_size", "num_classes", "steps"):
        if getattr(args, name):
            argv.append(f"--{name}={getattr(args, name)}")
    if args.memory_efficient:
        argv.append("--memory_efficient")
    if framework == "cnnjax":
        argv.append(f"--conv={conv or args.conv}")
    return argv


def run_child(argv: list[str]) -> dict:
    import subprocess
    cmd = [sys.executable, "-m", "experiments.benchmark", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd[1:])} failed (exit {out.returncode}):\n"
                           f"{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def comparison(args, conv: str | None = None) -> dict:
    """cnnjax's and torchvision's step in fresh processes, alternating, `args.rounds` times:
    the medians, their ratio (cnnjax / PyTorch) and cnnjax's compile time, FLOPs and memory."""
    ours, theirs = [], []
    for _ in range(args.rounds):  # alternating, so that drifts of the machine hit both alike
        ours.append(run_child(child_argv(args, "cnnjax", conv)))
        theirs.append(run_child(child_argv(args, "torch")))
    a = float(np.median([r["img_per_s"] for r in ours]))
    b = float(np.median([r["img_per_s"] for r in theirs]))
    first = ours[0]
    return {
        "arch": args.arch, "mode": args.mode, "batch_size": first["batch_size"],
        "image_size": args.image_size, "dtype": args.dtype, "conv": conv or args.conv,
        "cnnjax_img_per_s": a, "torch_img_per_s": b, "ratio": a / b,
        "compile_s": float(np.median([r["compile_s"] for r in ours])),
        "flops": first["flops"], "gflop_per_s": (first["flops"] or 0) * a / first["batch_size"]
        / 1e9, "temp_bytes_per_image": first["temp_bytes_per_image"],
        "torch": theirs[0]["torch"], "torch_threads": theirs[0]["threads"],
        "rounds": {"cnnjax": [r["img_per_s"] for r in ours],
                   "torch": [r["img_per_s"] for r in theirs]}}


def compare(args) -> int:
    try:
        result = comparison(args)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    print(f"{args.arch} {args.mode}: cnnjax {result['cnnjax_img_per_s']:.2f} img/s, PyTorch "
          f"{result['torch_img_per_s']:.2f} img/s, ratio {result['ratio']:.2f} (medians of "
          f"{args.rounds})", file=sys.stderr)
    return 0


def all_benchmarks(args) -> int:
    """--all: every architecture of ALL_ARCHS compared with PyTorch before (--conv=xla) and
    after (--conv=auto) cnnjax's fast convolutions; --out is rewritten after each one, so an
    interrupted run keeps what it measured."""
    rows = []
    for arch in ALL_ARCHS:
        args.arch = arch
        try:
            row = {"before": comparison(args, "xla"), "after": comparison(args, "auto")}
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        rows.append(row)
        print(json.dumps(row), flush=True)
        pathlib.Path(args.out).write_text(render_benchmarks(rows, args))
    return 0


def render_benchmarks(rows: list[dict], args) -> str:
    """BENCHMARKS.md: the --all table with the machine, versions and command it came from."""
    from experiments import zoo
    m = zoo.machine()
    a0 = rows[0]["after"]
    lines = [
        "# Benchmarks", "",
        "Written by `" + args.command + "`; never edited by hand.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['devices']}); Python {m['python']}, "
        f"jax {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}; PyTorch {a0['torch']} "
        f"({a0['torch_threads']} threads, eager, channels_last); {m['date']}.", "",
        f"One {a0['mode']} step at batch {a0['batch_size']}, {a0['image_size']}x"
        f"{a0['image_size']}, {a0['dtype']}, SGD with Nesterov momentum and BatchNorm updates; "
        f"cnnjax's numbers the median of {args.rounds} fresh processes each, alternating with "
        f"PyTorch's, whose number is the median of all its {2 * args.rounds} (it runs beside "
        "both). *Before*: XLA's convolution everywhere (`--conv=xla`); *after*: "
        "cnnjax's per-shape fast paths (`--conv=auto`, `cnnjax/models/fastconv.py`). "
        "Ratio: cnnjax / PyTorch images per second. GFLOP and temporary memory are XLA's own "
        "analysis of the compiled step (after).", "",
        "| arch | cnnjax before img/s | cnnjax after img/s | PyTorch img/s | ratio before | "
        "ratio after | compile s (after) | XLA GFLOP/step | GFLOP/s | temp MiB/image |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        b, a = row["before"], row["after"]
        # PyTorch was timed beside both sides: one median over all its runs, one denominator
        torch = float(np.median(b["rounds"]["torch"] + a["rounds"]["torch"]))
        lines.append(
            f"| {a['arch']} | {b['cnnjax_img_per_s']:.2f} | {a['cnnjax_img_per_s']:.2f} | "
            f"{torch:.2f} | {b['cnnjax_img_per_s'] / torch:.2f} | "
            f"{a['cnnjax_img_per_s'] / torch:.2f} | "
            f"{a['compile_s']:.1f} | {(a['flops'] or 0) / 1e9:.1f} | {a['gflop_per_s']:.1f} | "
            f"{(a['temp_bytes_per_image'] or 0) / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


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
