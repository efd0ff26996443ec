"""Images/s, compile time and XLA memory of one model's train (or eval) step; or the input
pipeline's images/s.

    python -m experiments.benchmark --arch=resnet50 --batch_size=8 --image_size=224
    python -m experiments.benchmark --arch=densenet121 --memory_efficient --mode=train
    python -m experiments.benchmark --mode=input --dataset=imagenet2012 --data_dir=DIR \
        [--workers=N] [--arch=resnet18]
    python -m experiments.benchmark --arch=mobilenet_v2 --compare=torch
    python -m experiments.benchmark --arch=resnet18 --trace=/tmp/trace [--framework=torch]
    python -m experiments.benchmark --arch=resnet18 --convs
    python -m experiments.benchmark --all
    python -m experiments.benchmark --arch=resnet50 --dtype=bfloat16 --largest_batch \
        --compare=torch

--compare=torch, --all and --largest_batch run each measurement in a fresh process (cnnjax's
or torchvision's), as described at their flags; a step that does not fit in the device's memory
exits with status 3 and one `error:` line.

train/eval: random inputs of the given shape, the real train step of cnnjax.train (SGD,
BatchNorm updates, donated state) jitted over all local devices; the first step (compilation)
is timed apart, then `--steps` steps are timed after a warm-up. Memory is XLA's own analysis of
the compiled step. --trace=DIR then traces two more steps and prints the operations that took
the most time, each with the layer and pass (forward or backward) it belongs to, and the time
per step by kind (convolutions forward, backward, kernel gradients, the rest); with
--framework=torch, torch.profiler's table of the same steps, by operator and input shape.

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

if __name__ == "__main__":  # first of all: glibc reads its tunables only when a process starts
    from experiments import hostmem
    hostmem.reexec_with_huge_pages()

import argparse
import json
import os
import pathlib
import re
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import flags
from experiments import hostmem

RULES = {name: flags.optional(flags.POSITIVE_INT)
         for name in ("batch_size", "image_size", "num_classes", "steps", "workers",
                      "rounds", "max_batch_size")}
WARMUP_BATCHES = 2  # input mode: batches that fill the pipeline before timing starts
INPUT_START, INPUT_END = "<!-- input-benchmark:start -->", "<!-- input-benchmark:end -->"
LARGEST_START, LARGEST_END = "<!-- largest-batch:start -->", "<!-- largest-batch:end -->"
EVERY_START, EVERY_END = "<!-- every-arch:start -->", "<!-- every-arch:end -->"
# The sections of BENCHMARKS.md that commands other than --all write (and --all keeps): the
# every-architecture table, and one largest-batch sweep per device kind ("largest:KIND"; plain
# "largest" is the section without a kind), so that a run on one card keeps another card's.
SECTION_RE = re.compile(r"<!-- (largest-batch(?: [^>]*?)?|every-arch):start -->.*?<!-- \1:end -->",
                        re.S)
EXIT_OOM = 3  # a step that does not fit in the device's memory (a child's exit status)
# Dense bfloat16 matrix-unit peaks from NVIDIA's datasheets, TFLOP/s, by device-kind substring.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0),
                    ("L4", 121.0), ("V100", 125.0))
MLPERF_H100_IMG_PER_S = 7190  # NVIDIA's MLPerf Training v4.0 ResNet-50 result, per H100
# Set when this process (a parent of --compare, --all, --largest_batch or --every_arch) turned
# XLA's GPU preallocation off for itself; its children get the variable as the user left it.
PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"
_preallocation_off = False


def main(argv: list[str] | None = None) -> int:
    p = flags.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", help="required except with --mode=input")
    p.add_argument("--batch_size", type=int, help="default 8; 64 with --mode=input")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--num_classes", type=int, help="default 1000; the dataset's with --mode=input")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mode", default="train", choices=("train", "eval", "input"))
    p.add_argument("--steps", type=int, help="default 5 on the CPU, 30 on a GPU/TPU; 20 "
                                             "batches with --mode=input")
    p.add_argument("--conv", default="auto", choices=("auto", "xla"),
                   help="auto: cnnjax's per-shape fast convolutions and max pooling "
                        "(cnnjax.models.fastconv); xla: XLA's everywhere, for comparison")
    p.add_argument("--memory_efficient", action="store_true", help="DenseNet's recompute option")
    p.add_argument("--remat", action="store_true",
                   help="the ResNet family's recompute option (each residual block recomputed "
                        "in the backward pass); cnnjax's alone, torchvision has none")
    p.add_argument("--trace", metavar="DIR",
                   help="after timing, trace two more steps into DIR (Perfetto / TensorBoard's "
                        "profile plugin for cnnjax, a Chrome trace for --framework=torch) and "
                        "print where the step's time goes, operation by operation")
    p.add_argument("--convs", action="store_true",
                   help="after timing the step, time each distinct convolution of the model "
                        "alone, jitted as the step is (forward, and forward with both "
                        "gradients in train mode), and print them with their sum against the "
                        "step: what --trace cannot show on the CPU, where XLA's own "
                        "convolutions run asynchronously")
    p.add_argument("--framework", default="cnnjax", choices=("cnnjax", "torch"),
                   help="whose step to time in this process: cnnjax's, or torchvision's same "
                        "architecture (needs the torch extra)")
    p.add_argument("--compare", choices=("torch",),
                   help="time cnnjax and torchvision in fresh processes, alternating, "
                        "--rounds times (PyTorch with and without glibc's huge pages, when "
                        "cnnjax has them); print the medians and the ratio to PyTorch's "
                        "faster")
    p.add_argument("--all", action="store_true",
                   help="--compare=torch for each of the standard architectures (ALL_ARCHS), "
                        "with --conv=xla and --conv=auto, and write the table to --out")
    p.add_argument("--largest_batch", action="store_true",
                   help="double --batch_size (default 64) in fresh processes until the step "
                        "no longer fits in device memory (with --compare=torch, PyTorch's "
                        "too); write the results as the largest-batch section of --out")
    p.add_argument("--every_arch", action="store_true",
                   help="the step of every registered architecture, each in a fresh process: "
                        "compile seconds, step time, temporary memory per image; written as "
                        "the every-architecture section of --out")
    p.add_argument("--max_batch_size", type=int, default=4096,
                   help="--largest_batch: the largest size tried")
    p.add_argument("--out", default="BENCHMARKS.md",
                   help="--all, --largest_batch and --every_arch: the Markdown file written")
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
    elif not args.arch and not args.all and not args.every_arch:
        p.error("the following arguments are required: --arch")
    if args.compare or args.all or args.largest_batch or args.every_arch:
        # this process only starts others: it must not take the GPU's memory from them
        global _preallocation_off
        if PREALLOCATE not in os.environ:
            os.environ[PREALLOCATE], _preallocation_off = "false", True
    try:
        flags.check(vars(args), RULES)
        check_comparison(args)
        check_largest_batch(args)
        check_every_arch(args)
        check_trace(args)
    except ValueError as e:
        return flags.fail(e)
    if args.mode == "input":
        return input_benchmark(args)
    if args.largest_batch:
        return largest_batch(args)
    if args.every_arch:
        return every_arch(args)
    if args.all:
        return all_benchmarks(args)
    if args.compare:
        return compare(args)
    if args.framework == "torch":
        return torch_benchmark(args)
    from cnnjax.models import fastconv
    fastconv.set_impl(args.conv)
    args.batch_size = args.batch_size or 8
    args.steps = args.steps or (5 if jax.default_backend() == "cpu" else 30)
    args.num_classes = args.num_classes or 1000
    try:
        mesh, model, state, train_step, eval_step = build_step(args, args.num_classes, 3)
    except ValueError as e:
        return flags.fail(e)
    try:
        return time_step(args, mesh, state, train_step, eval_step)
    except Exception as e:  # noqa: BLE001 - only running out of device memory is handled
        if not out_of_memory(e):
            raise
        return too_big(args, f"the memory of {jax.devices()[0].device_kind}", e)


def too_big(args, where: str, e: BaseException) -> int:
    """The one-line error (exit status EXIT_OOM) of a step that does not fit in `where`."""
    return flags.fail(f"--batch_size={args.batch_size}: one {args.mode} step of {args.arch} "
                      f"does not fit in {where} ({first_line(e)}); use a smaller --batch_size",
                      EXIT_OOM)


def options(args, framework: str = "cnnjax") -> dict:
    """The model options the flags set: DenseNet's memory_efficient (both frameworks) and the
    ResNet family's remat (cnnjax's alone: torchvision's ResNets have no such option)."""
    chosen = {"memory_efficient": True} if args.memory_efficient else {}
    if getattr(args, "remat", False) and framework == "cnnjax":
        chosen["remat"] = True
    return chosen


def replaced(args, **changes) -> argparse.Namespace:
    """A copy of the parsed flags with `changes` (a child's arch or batch size)."""
    return argparse.Namespace(**{**vars(args), **changes})


def check_model(args, arch: str, batch_size: int) -> None:
    """What the cnnjax side would refuse for `arch`, refused in one line before any process
    starts: an image too small for it, a batch the devices do not divide."""
    from cnnjax import parallel, train
    from cnnjax.models.registry import create_model
    train.check_image_size(args.image_size, create_model(arch, **options(args)))
    parallel.check_batch_size(batch_size, jax.device_count())


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is a device running out of memory (XLA's RESOURCE_EXHAUSTED, PyTorch's
    OutOfMemoryError, or the check of `time_step` against the device's limit)."""
    text = f"{type(e).__name__}: {e}"
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or \
        "OutOfMemoryError" in text or "out of memory" in text.lower()


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def time_step(args, mesh, state, train_step, eval_step) -> int:
    """Compiles and times the step on random inputs; prints one JSON line."""
    from cnnjax import parallel, profile
    from cnnjax.models import fastconv
    rng = np.random.default_rng(0)
    batch = parallel.global_batch({
        "image": rng.standard_normal((args.batch_size, args.image_size, args.image_size, 3),
                                     np.float32),
        "label": rng.integers(0, args.num_classes, args.batch_size).astype(np.int32),
        "mask": np.ones(args.batch_size, np.float32)}, mesh)
    repl, sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    if args.mode == "train":
        step = fastconv.jit(train_step, in_shardings=(repl, sh), out_shardings=(repl, repl),
                            donate_argnums=0)
    else:
        step = fastconv.jit(eval_step, in_shardings=(repl, sh), out_shardings=repl)

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
    # the paper convention for a train step: forward, input gradient and weight gradient
    passes = 3 if args.mode == "train" else 1
    prof = profile(args.arch, args.image_size, num_classes=args.num_classes, **options(args))
    model_flops = 2 * passes * args.batch_size * prof.macs

    def run(state):
        out = compiled(state, batch)
        return out if args.mode == "train" else (state, out)

    state, out = run(state)  # warm-up
    jax.block_until_ready(out)
    faults = minor_faults()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, out = run(state)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    faults = (minor_faults() - faults) / args.steps
    if args.trace:
        jax.profiler.start_trace(args.trace, create_perfetto_trace=True)
        for _ in range(TRACE_STEPS):
            state, out = run(state)
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        print_xla_trace(args.trace, compiled.as_text(), TRACE_STEPS, 1e3 * dt / args.steps,
                        args.mode)
    if args.convs:
        print_conv_times(args, prof, 1e3 * dt / args.steps)
    temp = getattr(mem, "temp_size_in_bytes", None)
    flops = cost.get("flops")
    result = {
        "framework": "cnnjax", "arch": args.arch, "mode": args.mode,
        "batch_size": args.batch_size,
        "image_size": args.image_size, "dtype": args.dtype, "devices": mesh.size,
        "device_kind": jax.devices()[0].device_kind, "memory_efficient": args.memory_efficient,
        "remat": args.remat,
        "conv": args.conv,
        "img_per_s": args.steps * args.batch_size / dt, "step_ms": 1e3 * dt / args.steps,
        "compile_s": compile_s, "flops": flops,
        "gflop_per_s": flops * args.steps / dt / 1e9 if flops else None,
        "params": prof.params, "macs": prof.macs, "steps": args.steps,
        "model_flops": model_flops, "model_tflop_per_s": model_flops * args.steps / dt / 1e12,
        "device_memory_limit": limit,
        "temp_bytes": temp, "temp_bytes_per_image": temp / args.batch_size if temp else None,
        "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
        "output_bytes": getattr(mem, "output_size_in_bytes", None),
        "huge_pages": hostmem.active(), "minor_faults_per_step": faults,
    }
    print(json.dumps(result))
    return 0


# The architectures `--all` compares with PyTorch (issue 11): where users train.
ALL_ARCHS = ("resnet50", "resnet18", "densenet121", "mobilenet_v2", "vgg16",
             "shufflenet_v2_x1_0")
TORCH_MISSING = ("--framework=torch and --compare=torch need torch and torchvision: "
                 "pip install -e \".[torch]\"")


def check_trace(args) -> None:
    """--trace traces the step that this process times: one framework, one run (--convs too,
    cnnjax's alone)."""
    if args.trace and (args.compare or args.all or args.largest_batch or args.every_arch
                       or args.mode == "input"):
        raise ValueError("--trace traces one step in this process; drop --compare, --all, "
                         "--largest_batch, --every_arch and --mode=input (trace each side with "
                         "--framework=cnnjax or --framework=torch)")
    if args.convs and (args.compare or args.all or args.largest_batch or args.every_arch
                       or args.mode == "input" or args.framework == "torch"):
        raise ValueError("--convs times the convolutions of cnnjax's step in this process; "
                         "drop --compare, --all, --largest_batch, --every_arch, --mode=input "
                         "and --framework=torch")
    if args.trace and pathlib.Path(args.trace).exists() and not pathlib.Path(args.trace).is_dir():
        raise ValueError(f"--trace={args.trace} is a file; give a directory (it is created if "
                         "missing)")


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
    import importlib.util
    if importlib.util.find_spec("torch") is None or \
            importlib.util.find_spec("torchvision") is None:
        raise ValueError(TORCH_MISSING)
    from cnnjax import convert
    shared = convert.shared_architectures()
    for arch in ([args.arch] if args.arch else ALL_ARCHS):
        if arch not in shared:
            raise ValueError(f"--arch={arch} has no torchvision counterpart to compare with; "
                             f"torchvision has {', '.join(shared)}")
        check_model(args, arch, args.batch_size or (64 if args.largest_batch else 8))
    if args.all:
        check_out(args)


def check_out(args) -> None:
    out = pathlib.Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise ValueError(f"--out={args.out} must be a file in an existing directory")


def check_largest_batch(args) -> None:
    """ValueError for a --largest_batch run that cannot work, before any process starts."""
    if not args.largest_batch:
        return
    if args.mode == "input" or args.all or args.framework == "torch":
        raise ValueError("--largest_batch sweeps one model's step (--arch, with --compare=torch "
                         "for PyTorch's too); drop --mode=input, --all and --framework")
    start = args.batch_size or 64
    if start > args.max_batch_size:
        raise ValueError(f"--batch_size={start} is above --max_batch_size="
                         f"{args.max_batch_size}: nothing to sweep")
    if not args.compare:  # check_comparison has checked the architecture then
        check_model(args, args.arch, start)
    check_out(args)


def torch_benchmark(args) -> int:
    """torchvision's same architecture, timed as `main` times cnnjax's step: batch, image size
    and classes alike, random inputs, channels_last, SGD with Nesterov momentum 0.9 and weight
    decay 5e-4 (cnnjax's default optimizer), BatchNorm in train mode; two warm-up steps. On the
    GPU when torch sees one (cuDNN autotuning on, as XLA autotunes); --dtype=bfloat16 is
    autocast, float32 parameters and bfloat16 compute, as cnnjax's dtype option."""
    import torch
    try:
        return _torch_benchmark(args, torch)
    except torch.OutOfMemoryError as e:
        return too_big(args, "the GPU's memory in PyTorch", e)


def _torch_benchmark(args, torch) -> int:
    import contextlib

    import torchvision
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    args.batch_size = args.batch_size or 8
    args.steps = args.steps or (30 if device.type == "cuda" else 5)
    classes = args.num_classes or 1000
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=classes,
                                         **options(args, "torch"))
    model = model.to(device, memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size).to(
        device, memory_format=torch.channels_last)
    y = torch.randint(0, classes, (args.batch_size,)).to(device)

    def autocast():
        if args.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if args.mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                              weight_decay=5e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                out = model(x)
                out = getattr(out, "logits", out)  # GoogLeNet/Inception in train mode
                loss = torch.nn.functional.cross_entropy(out, y)
            loss.backward()
            opt.step()
            return loss
    else:
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                return model(x)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(2):
        step()
    sync()
    faults = minor_faults()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = time.perf_counter() - t0
    faults = (minor_faults() - faults) / args.steps
    if args.trace:
        from torch import profiler
        with profiler.profile(activities=[profiler.ProfilerActivity.CPU]
                              + ([profiler.ProfilerActivity.CUDA] if device.type == "cuda"
                                 else []), record_shapes=True) as prof:
            for _ in range(TRACE_STEPS):
                step()
            sync()
        pathlib.Path(args.trace).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(pathlib.Path(args.trace) / "torch_trace.json"))
        print(f"torch.profiler, {TRACE_STEPS} steps (step {1e3 * dt / args.steps:.0f} ms "
              f"untraced); trace in {args.trace}/torch_trace.json", file=sys.stderr)
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=TRACE_ROWS), file=sys.stderr)
    print(json.dumps({
        "framework": "torch", "arch": args.arch, "mode": args.mode,
        "batch_size": args.batch_size, "image_size": args.image_size, "dtype": args.dtype,
        "img_per_s": args.steps * args.batch_size / dt, "step_ms": 1e3 * dt / args.steps,
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads(),
        "huge_pages": hostmem.active(), "minor_faults_per_step": faults,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}))
    return 0


def minor_faults() -> int:
    """This process's minor page faults so far (each a page the kernel mapped in, and zeroed
    if new): per step, how much of the step's memory was fresh. See experiments/hostmem.py."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


TRACE_ROWS = 25  # operations --trace lists
TRACE_STEPS = 2  # steps --trace traces, after the timed ones


def xla_op_events(trace_dir: str) -> list[tuple[str, float, float]]:
    """(name, start, duration) in microseconds of every complete event of the newest trace that
    jax.profiler wrote under `trace_dir` (XLA operations carry their HLO name)."""
    import gzip
    found = sorted(pathlib.Path(trace_dir).glob("plugins/profile/*/*.trace.json.gz"),
                   key=lambda f: f.stat().st_mtime)
    if not found:
        raise RuntimeError(f"no trace was written under {trace_dir}")
    with gzip.open(found[-1]) as f:
        events = json.load(f)["traceEvents"]
    return [(e["name"], float(e["ts"]), float(e["dur"])) for e in events
            if e.get("ph") == "X" and "dur" in e and "ts" in e]


def idle_us(intervals: list[tuple[float, float]]) -> float:
    """Microseconds between the first start and the last end of `intervals` (start, duration)
    during which none of them was running."""
    idle, reach = 0.0, None
    for start, dur in sorted(intervals):
        if reach is not None and start > reach:
            idle += start - reach
        reach = start + dur if reach is None else max(reach, start + dur)
    return idle


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """The compiled module's instructions: name -> (output shape, the JAX source op_name, the
    opcode that computes it: a fusion's root instruction's)."""
    ops, calls, roots, computation = {}, {}, {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            computation = head.group(1)
        m = re.match(r"\s*(ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
        if not m:
            continue
        if m.group(1) and computation:
            roots[computation] = m.group(4)
        src = re.search(r'op_name="([^"]*)"', line)
        called = re.search(r"calls=%([\w.\-]+)", line)
        if called:
            calls[m.group(2)] = called.group(1)
        ops[m.group(2)] = (m.group(3).split("{")[0], src.group(1) if src else "", m.group(4))
    return {name: (shape, src, roots.get(calls.get(name), opcode))
            for name, (shape, src, opcode) in ops.items()}


def classify(op_name: str, opcode: str = "", mode: str = "train") -> tuple[str, str, str]:
    """(kind, pass, layer) of an XLA operation from its JAX op_name ("jit(step)/transpose(jvp(
    ResNet))/stage1_block1/conv1/conv_general_dilated"): convolutions and matrix products apart;
    in a train step, backward when the name is a transpose, forward under jvp, "update" outside
    the model (optimizer, metrics). XLA names no source for what it writes itself for backward
    passes; its opcode tells: a convolution is a kernel gradient, a reverse flips a kernel for an
    input gradient, copies change layouts."""
    if not op_name:
        kind = {"convolution": "convolution", "reverse": "kernel flip",
                "copy": "layout copy", "transpose": "layout copy"}.get(opcode, opcode or "other")
        what = {"convolution": "(a kernel gradient; XLA names no layer)",
                "kernel flip": "(for an input gradient; XLA names no layer)"}.get(kind, "")
        return kind, "backward" if kind in ("convolution", "kernel flip") else "", what
    parts = [p for p in op_name.split("/") if p and "(" not in p]
    prim = parts[-1] if parts else op_name
    layer = "/".join(parts[:-1])
    if prim.startswith("conv_general_dilated"):
        kind = "convolution"
    elif prim.startswith("dot_general"):
        kind = "matrix product"
    else:
        kind = "other"
    if mode != "train":
        phase = "forward"
    else:
        phase = ("backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name
                 else "update")
    return kind, phase, layer


def print_xla_trace(trace_dir: str, hlo_text: str, steps: int, step_ms: float,
                    mode: str = "train") -> None:
    """The table of --trace: the costliest operations, then the time by kind and pass."""
    import collections
    ops = hlo_ops(hlo_text)
    events = [e for e in xla_op_events(trace_dir) if e[0] in ops]
    mine: dict[str, float] = collections.Counter()
    for name, _, dur in events:
        mine[name] += dur / steps / 1e3
    total = sum(mine.values())
    out = sys.stderr
    print(f"XLA operations, ms per step, {steps} traced steps (step {step_ms:.0f} ms untraced; "
          f"the operations sum to {total:.0f} ms: XLA runs independent ones concurrently); "
          f"trace in {trace_dir}", file=out)
    print(f"{'ms':>8}  {'operation':<28} {'output':<22} {'kind':<14} {'pass':<8} layer",
          file=out)
    rows = sorted(((ms, name, ops[name][0], *classify(*ops[name][1:], mode))
                   for name, ms in mine.items()), reverse=True)
    for ms, name, shape, kind, phase, layer in rows[:TRACE_ROWS]:
        print(f"{ms:8.1f}  {name[:28]:<28} {shape[:22]:<22} {kind[:14]:<14} {phase:<8} {layer}",
              file=out)
    by_kind: dict[tuple[str, str], float] = collections.Counter()
    for ms, _, _, kind, phase, _ in rows:
        by_kind[(kind, phase)] += ms
    print("by kind:", file=out)
    for (kind, phase), ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{ms:8.1f}  {kind} {phase}".rstrip(), file=out)
    # XLA:CPU runs its own convolutions on its thread pool after the operation that launches
    # them has returned: the trace holds the launch, and the kernel's time shows as a gap
    idle = idle_us([(start, dur) for _, start, dur in events]) / steps / 1e3
    print(f"{idle:8.1f}  no traced operation running (XLA's own CPU convolutions, traced only "
          "at their launch, and the time between steps)", file=out)


CONV_KINDS = ("conv", "dwconv", "gconv")  # cnnjax.profile's kinds of convolution layer


def conv_shapes(prof) -> list[tuple[tuple, list[str]]]:
    """The distinct convolutions of a profile, in order of first use: ((input shape without the
    batch, kernel (kh, kw), output channels, strides, explicit padding, groups), their layers'
    names)."""
    found: dict[tuple, list[str]] = {}
    for layer in prof.layers:
        if layer.kind not in CONV_KINDS:
            continue
        padding = layer.padding
        if padding is None:  # a string padding: the explicit one the output size implies
            padding = []
            for size, out, k, s in zip(layer.input_shape[1:3], layer.output_shape[1:3],
                                       layer.kernel, layer.stride):
                total = max((out - 1) * s + k - size, 0)
                padding.append((total // 2, total - total // 2))
        key = (layer.input_shape[1:], tuple(layer.kernel), layer.output_shape[-1],
               tuple(layer.stride), tuple(tuple(p) for p in padding), layer.groups)
        found.setdefault(key, []).append(layer.name)
    return list(found.items())


def time_jitted(fun, *operands, repeats: int) -> float:
    """Median milliseconds of a compiled `fun(*operands)` after a warm-up call."""
    compiled = fun.lower(*operands).compile()
    jax.block_until_ready(compiled(*operands))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*operands))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def print_conv_times(args, prof, step_ms: float) -> float:
    """--convs: each distinct convolution of the model timed alone at the step's batch size and
    dtype, through the path the model takes (cnnjax.models.fastconv, with the step's compiler
    options); the table goes to stderr. Returns the convolutions' summed milliseconds per step."""
    import functools

    from jax import lax

    from cnnjax.models import fastconv
    train = args.mode == "train"
    dtype = jnp.dtype(args.dtype)
    repeats = max(args.steps, 3)
    out = sys.stderr
    timed = "forward with both gradients" if train else "forward"
    print(f"Convolutions of {args.arch} alone, batch {args.batch_size}, {args.dtype}, ms "
          f"(median of {repeats}); {timed} is what a step spends on each", file=out)
    print(f"{'count':>5}  {'input':<14} {'kernel':<12} {'stride':<6} {'groups':>6} "
          f"{'path':<8} {'fwd':>7} {'fwd+grads':>9} {'x count':>8} {'GFLOP/s':>8}  first layer",
          file=out)
    total = 0.0
    for (shape, kernel, cout, strides, padding, groups), names in conv_shapes(prof):
        x = jnp.full((args.batch_size, *shape), 0.5, dtype)
        k = jnp.full((*kernel, shape[-1] // groups, cout), 0.01, dtype)
        numbers = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
        conv = functools.partial(fastconv.conv_general_dilated, window_strides=strides,
                                 padding=padding, dimension_numbers=numbers,
                                 feature_group_count=groups)

        def both(x, k):
            y, pullback = jax.vjp(conv, x, k)
            return pullback(y)
        fwd = time_jitted(fastconv.jit(conv), x, k, repeats=repeats)
        grads = time_jitted(fastconv.jit(both), x, k, repeats=repeats) if train else None
        per_step = (grads if train else fwd) * len(names)
        total += per_step
        macs = sum(layer.macs for layer in prof.layers if layer.name in names) // len(names)
        flops = 2 * (3 if train else 1) * macs * args.batch_size
        path = fastconv.choose(x.shape, k.shape, strides, padding, groups, dilated=False)
        print(f"{len(names):>5}  {'x'.join(map(str, shape)):<14} "
              f"{'x'.join(map(str, (*kernel, shape[-1] // groups, cout))):<12} "
              f"{'x'.join(map(str, strides)):<6} {groups:>6} {path:<8} {fwd:7.2f} "
              f"{grads if grads is not None else float('nan'):9.2f} {per_step:8.2f} "
              f"{flops / (grads if train else fwd) / 1e6:8.1f}  {names[0]}", file=out)
    print(f"the convolutions alone: {total:.0f} ms of the {step_ms:.0f} ms step "
          f"({100 * total / step_ms:.0f}%)", file=out)
    return total


def child_argv(args, framework: str, conv: str | None = None) -> list[str]:
    """The command line of one side of a comparison (a fresh process each)."""
    argv = [f"--arch={args.arch}", f"--mode={args.mode}", f"--image_size={args.image_size}",
            f"--framework={framework}", f"--dtype={args.dtype}"]
    for name in ("batch_size", "num_classes", "steps"):
        if getattr(args, name):
            argv.append(f"--{name}={getattr(args, name)}")
    if args.memory_efficient:
        argv.append("--memory_efficient")
    if args.remat and framework == "cnnjax":
        argv.append("--remat")
    if framework == "cnnjax":
        argv.append(f"--conv={conv or args.conv}")
    return argv


def run_child(argv: list[str], *, oom_ok: bool = False, env: dict | None = None
              ) -> dict | None:
    """One benchmark in a fresh process (in `env`, default this one's environment): its JSON
    line; None if it ran out of device memory and `oom_ok`; RuntimeError for any other
    failure."""
    import subprocess
    cmd = [sys.executable, "-m", "experiments.benchmark", *argv]
    env = dict(os.environ if env is None else env)
    if _preallocation_off and env.get(PREALLOCATE) == "false":
        del env[PREALLOCATE]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    if out.returncode == EXIT_OOM and oom_ok:
        return None
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd[1:])} failed (exit {out.returncode}):\n"
                           f"{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def torch_environments() -> dict[str, dict | None]:
    """Where PyTorch's step runs in a comparison: in this process's environment (cnnjax's,
    huge pages on where experiments/hostmem.py could turn them on) and, when that has huge
    pages, also on glibc's default malloc. Huge pages slow some PyTorch steps (ResNet-18 on
    the 2-core EPYC: 27.9 against 31.5 img/s) and speed up others (VGG-16 3.04 against 2.72),
    so PyTorch is measured both ways and compared at its faster."""
    if not hostmem.active():
        return {"torch": None}
    return {"torch": None, "torch_glibc_default": hostmem.without_huge_pages()}


def comparison(args, conv: str | None = None) -> dict:
    """cnnjax's and torchvision's step in fresh processes, alternating, `args.rounds` times
    (PyTorch's in each of `torch_environments()`): the medians, the ratio of cnnjax's to
    PyTorch's faster one, and cnnjax's compile time, FLOPs and memory."""
    envs = torch_environments()
    ours, theirs = [], {name: [] for name in envs}
    for _ in range(args.rounds):  # alternating, so that drifts of the machine hit both alike
        ours.append(run_child(child_argv(args, "cnnjax", conv)))
        for name, env in envs.items():
            theirs[name].append(run_child(child_argv(args, "torch"), env=env))
    a = float(np.median([r["img_per_s"] for r in ours]))
    medians = {name: float(np.median([r["img_per_s"] for r in runs]))
               for name, runs in theirs.items()}
    b = max(medians.values())
    first, torch_first = ours[0], theirs["torch"][0]
    return {
        "arch": args.arch, "mode": args.mode, "batch_size": first["batch_size"],
        "image_size": args.image_size, "dtype": args.dtype, "conv": conv or args.conv,
        "cnnjax_img_per_s": a, "torch_img_per_s": b, "ratio": a / b,
        "compile_s": float(np.median([r["compile_s"] for r in ours])),
        "flops": first["flops"], "gflop_per_s": (first["flops"] or 0) * a / first["batch_size"]
        / 1e9, "temp_bytes_per_image": first["temp_bytes_per_image"],
        "torch": torch_first["torch"], "torch_threads": torch_first["threads"],
        "huge_pages": first["huge_pages"], "torch_img_per_s_by_malloc": medians,
        "huge_pages_by_side": {"cnnjax": first["huge_pages"],
                               **{name: runs[0]["huge_pages"] for name, runs in theirs.items()}},
        "torch_malloc": max(medians, key=medians.get),
        "minor_faults_per_step": {"cnnjax": first["minor_faults_per_step"],
                                  **{name: runs[0]["minor_faults_per_step"]
                                     for name, runs in theirs.items()}},
        "rounds": {"cnnjax": [r["img_per_s"] for r in ours],
                   **{name: [r["img_per_s"] for r in runs] for name, runs in theirs.items()}}}


def compare(args) -> int:
    try:
        result = comparison(args)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    malloc = {"torch": "huge pages" if result["huge_pages"] else "glibc's default malloc",
              "torch_glibc_default": "glibc's default malloc"}[result["torch_malloc"]]
    print(f"{args.arch} {args.mode}: cnnjax {result['cnnjax_img_per_s']:.2f} img/s, PyTorch "
          f"{result['torch_img_per_s']:.2f} img/s ({malloc}), ratio {result['ratio']:.2f} "
          f"(medians of {args.rounds})", file=sys.stderr)
    return 0


def all_benchmarks(args) -> int:
    """--all: every architecture of ALL_ARCHS compared with PyTorch before (--conv=xla) and
    after (--conv=auto) cnnjax's fast convolutions and pooling; --out is rewritten after each
    one, so an interrupted run keeps what it measured."""
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
        out = pathlib.Path(args.out)
        old = out.read_text() if out.is_file() else ""
        # what --largest_batch (one section a device kind) and --every_arch wrote
        kept = "".join(f"\n{m[0]}\n" for m in SECTION_RE.finditer(old))
        out.write_text(render_benchmarks(rows, args) + kept)
    return 0


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of section `name`: "every", "largest" or "largest:KIND"."""
    if name == "every":
        return EVERY_START, EVERY_END
    kind = name.partition(":")[2]
    if not kind:
        return LARGEST_START, LARGEST_END
    return f"<!-- largest-batch {kind}:start -->", f"<!-- largest-batch {kind}:end -->"


def section(text: str, name: str = "largest") -> str | None:
    """Section `name` (see markers) of a BENCHMARKS.md text, markers included (None if
    absent)."""
    start, end = markers(name)
    if start not in text or end not in text:
        return None
    return text[text.index(start):text.index(end) + len(end)]


def write_section(path: pathlib.Path, body: str, name: str = "largest") -> None:
    """Puts `body` between the markers of section `name` of `path`, in place of what was there,
    or at its end; the rest of the file stays as it was."""
    start, end = markers(name)
    block = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    old = section(text, name)
    path.write_text(text.replace(old, block) if old else f"{text.rstrip()}\n\n{block}\n")


def check_every_arch(args) -> None:
    if not args.every_arch:
        return
    if args.arch or args.all or args.largest_batch or args.compare or args.mode == "input" \
            or args.framework == "torch":
        raise ValueError("--every_arch times cnnjax's step of every registered architecture; "
                         "drop --arch, --all, --largest_batch, --compare, --framework and "
                         "--mode=input")
    check_out(args)


def every_arch(args) -> int:
    """--every_arch: each registered architecture's step in a fresh process, one after another;
    --out's every-architecture section rewritten after each. One that fails is reported in its
    row and the command exits 1 at the end."""
    from cnnjax.models.registry import list_models
    rows, failed = [], False
    for arch in list_models():
        sized = replaced(args, arch=arch)
        try:
            row = run_child(child_argv(sized, "cnnjax"), oom_ok=True) or \
                {"arch": arch, "error": "does not fit in memory"}
        except RuntimeError as e:
            row, failed = {"arch": arch, "error": first_line(e)}, True
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_section(pathlib.Path(args.out), render_every(rows, args), "every")
    return 1 if failed else 0


def render_every(rows: list[dict], args) -> str:
    """The every-architecture section: machine, versions, command and one row per model."""
    from experiments import zoo
    m = zoo.machine()
    first = next((r for r in rows if "error" not in r), {})
    lines = [
        "## Every architecture: compile time, step time, memory", "",
        "Written by `" + args.command + "`; never edited by hand.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['devices']}); Python {m['python']}, "
        f"jax {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}; {m['date']}. "
        + malloc_note(first.get("huge_pages")), "",
        f"One {args.mode} step of cnnjax (`--conv={args.conv}`) at batch "
        f"{first.get('batch_size', args.batch_size or 8)}, {args.image_size}x{args.image_size}, "
        f"{args.dtype}, each architecture in a fresh process: XLA compile seconds of the step, "
        f"then {first.get('steps', '')} steps timed after a warm-up (few steps: a survey, not "
        "the --all comparison); temporary memory is XLA's analysis of the compiled step, per "
        "image. Parameters and multiply-adds (GMACs, at this size) from `cnnjax.profile`.", "",
        "| arch | params (M) | GMACs | compile s | step ms | img/s | temp MiB/image |",
        "|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['arch']} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.2f} | "
            f"{r['compile_s']:.1f} | {r['step_ms']:.0f} | {r['img_per_s']:.2f} | "
            f"{(r['temp_bytes_per_image'] or 0) / 2**20:.0f} |")
    return "\n".join(lines)


def largest_batch(args) -> int:
    """--largest_batch: one step per batch size, doubling from --batch_size (default 64) in
    fresh processes until no framework fits (or --max_batch_size); then, on an accelerator,
    cnnjax's fastest size again with --conv=xla (the fast paths must not slow it) and a bf16
    matrix product for the chip's measured peak. One JSON line per size; --out's largest-batch
    section rewritten after each."""
    rows, size = [], args.batch_size or 64
    sides = ("cnnjax", "torch") if args.compare else ("cnnjax",)
    try:
        while size <= args.max_batch_size:
            sized = replaced(args, batch_size=size)
            row = {"batch_size": size}
            for side in sides:
                runs = [run_child(child_argv(sized, side), oom_ok=True)
                        for _ in range(args.rounds)]
                row[side] = None if None in runs else median_run(runs)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_section(pathlib.Path(args.out), render_largest(rows, args, {}, done=False),
                          largest_name(rows))
            if all(row[side] is None for side in sides):
                break
            size *= 2
        extra = {}
        fits = [r for r in rows if r["cnnjax"]]
        if fits and args.conv == "auto" and jax.default_backend() != "cpu":
            best = max(fits, key=lambda r: r["cnnjax"]["img_per_s"])
            sized = replaced(args, batch_size=best["batch_size"])
            extra["xla"] = median_run([run_child(child_argv(sized, "cnnjax", "xla"))
                                       for _ in range(args.rounds)])
        if jax.default_backend() != "cpu":
            extra["matmul_tflop_per_s"] = matmul_tflop_per_s()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"largest_batch": rows[-1]["batch_size"], **extra}), flush=True)
    write_section(pathlib.Path(args.out), render_largest(rows, args, extra, done=True),
                  largest_name(rows))
    return 0


def sweep_kind(rows: list[dict]) -> str:
    """The device kind a sweep ran on: its children's, else this process's."""
    first = next((r["cnnjax"] for r in rows if r.get("cnnjax")), None)
    return first["device_kind"] if first else jax.devices()[0].device_kind


def largest_name(rows: list[dict]) -> str:
    """The BENCHMARKS.md section of a sweep: one per device kind."""
    return f"largest:{sweep_kind(rows)}"


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput (the first of the two middle ones for an even count)."""
    ordered = sorted(runs, key=lambda r: r["img_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds": [r["img_per_s"] for r in runs]}


def matmul_tflop_per_s(n: int = 8192, repeats: int = 10) -> float:
    """Measured bfloat16 matrix-product rate of this process's first device (random operands,
    median of `repeats` after a warm-up): the ceiling a model's TFLOP/s is read against."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (0, 1))
    ms = time_jitted(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2 * n**3 / (ms / 1e3) / 1e12


def bf16_peak(device_kind: str) -> float | None:
    """The datasheet's dense bfloat16 TFLOP/s of a device kind (None if not listed)."""
    return next((peak for name, peak in BF16_PEAK_TFLOPS if name in device_kind), None)


def render_largest(rows: list[dict], args, extra: dict, *, done: bool) -> str:
    """The largest-batch section of BENCHMARKS.md: machine, versions, command and the table;
    `done`: the sweep ended (out of memory or at --max_batch_size), not written mid-way."""
    from experiments import zoo
    m = zoo.machine()
    first = next((r["cnnjax"] for r in rows if r["cnnjax"]), None)
    kind = sweep_kind(rows)
    torch = next((r["torch"] for r in rows if r.get("torch")), None)
    peak = bf16_peak(kind) if args.dtype == "bfloat16" else None
    fraction = "% of bf16 peak" if peak else "% of peak"
    fraction_env = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "unset (0.75)")
    lines = [
        f"## Largest batch: {args.arch} on {kind}", "",
        "Written by `" + args.command + "`; never edited by hand.", "",
        f"Machine: {kind}"
        + (f" ({first['device_memory_limit'] / 2**30:.1f} GiB usable by XLA)"
           if first and first.get("device_memory_limit") else "")
        + f", host {m['cpu']} with {m['cores']} cores; jax {m['jax']}, jaxlib {m['jaxlib']}, "
        f"flax {m['flax']}"
        + (f"; PyTorch {torch['torch']}, torchvision {torch['torchvision']}" if torch else "")
        + f"; XLA_PYTHON_CLIENT_MEM_FRACTION={fraction_env}; {m['date']}.", "",
        f"One {args.mode} step at {args.image_size}x{args.image_size}, {args.dtype} compute "
        "(float32 parameters), SGD with Nesterov momentum and BatchNorm updates, random inputs "
        "already on the device; each size and framework in its own fresh process, "
        f"{args.rounds} time(s) (median), its steps timed after a warm-up. cnnjax with "
        f"`--conv={args.conv}`; PyTorch eager with channels_last"
        + (", bfloat16 autocast" if args.dtype == "bfloat16" else "")
        + " (cuDNN autotuning on a GPU). Model TFLOP/s counts 3 x 2 x the profile's multiply-adds "
        "per image for a train step (forward, input and weight gradients).", "",
        f"| batch | cnnjax img/s | PyTorch img/s | ratio | cnnjax step ms | compile s | "
        f"model TFLOP/s | {fraction} | XLA temp GiB |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        a, t = r["cnnjax"], r.get("torch")
        cells = [str(r["batch_size"])]
        cells.append(f"{a['img_per_s']:.0f}" if a else "does not fit")
        cells.append((f"{t['img_per_s']:.0f}" if t else "does not fit") if "torch" in r
                     else "-")
        cells.append(f"{a['img_per_s'] / t['img_per_s']:.2f}" if a and t else "-")
        if a:
            tf = a["model_tflop_per_s"]
            cells += [f"{a['step_ms']:.1f}", f"{a['compile_s']:.1f}", f"{tf:.0f}",
                      f"{100 * tf / peak:.0f}%" if peak else "-",
                      f"{(a['temp_bytes'] or 0) / 2**30:.1f}"]
        else:
            cells += ["-"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    fits = [r for r in rows if r["cnnjax"]]
    notes = []
    if fits:
        best = max(fits, key=lambda r: r["cnnjax"]["img_per_s"])
        if not done:
            head = (f"Written while the sweep ran (or it was stopped): sizes above "
                    f"{rows[-1]['batch_size']} not measured. Largest batch that fits so far")
        elif fits[-1] is rows[-1]:
            head = "Every size up to --max_batch_size fits; the largest"
        else:
            head = "Largest batch that fits"
        notes.append(f"{head} (cnnjax): {fits[-1]['batch_size']}; fastest: "
                     f"{best['cnnjax']['img_per_s']:.0f} img/s at batch {best['batch_size']}.")
        if "xla" in extra:
            x = extra["xla"]
            notes.append(f"At batch {best['batch_size']} with `--conv=xla`: "
                         f"{x['img_per_s']:.0f} img/s, so cnnjax's CPU fast paths cost the GPU "
                         f"{100 * (1 - best['cnnjax']['img_per_s'] / x['img_per_s']):+.1f}% "
                         "(on an accelerator every convolution is XLA's).")
        tf = best["cnnjax"]["model_tflop_per_s"]
        if peak:
            notes.append(f"Datasheet dense bf16 peak of this chip: {peak:.0f} TFLOP/s; the "
                         f"fastest step reaches {100 * tf / peak:.0f}% of it.")
        if extra.get("matmul_tflop_per_s"):
            mm = extra["matmul_tflop_per_s"]
            notes.append(f"A bf16 8192x8192x8192 matrix product in this run: {mm:.0f} TFLOP/s; "
                         f"the fastest step reaches {100 * tf / mm:.0f}% of that.")
        if args.arch == "resnet50" and "H100" in kind:
            notes.append(f"For scale: NVIDIA's MLPerf Training v4.0 ResNet-50 result is about "
                         f"{MLPERF_H100_IMG_PER_S:,} img/s per H100 (DALI input, fused "
                         f"kernels); cnnjax's fastest here is "
                         f"{best['cnnjax']['img_per_s'] / MLPERF_H100_IMG_PER_S:.2f} of it.")
    return "\n".join(lines + ([""] + notes if notes else []))


def malloc_note(huge_pages: bool | None, torch_both: bool = False) -> str:
    """How the measured processes allocated host memory (experiments/hostmem.py)."""
    if not huge_pages:
        return ("Every process ran with glibc's default malloc (`CNNJAX_HUGE_PAGES=0`, or no "
                "transparent huge pages here): 4 KiB pages, faulted in anew each step.")
    huge = ("`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, transparent huge pages for malloc's "
            "large buffers, as cnnjax's entry points start themselves (`experiments/hostmem.py`)")
    if torch_both:
        return (f"cnnjax's processes ran with {huge}; PyTorch's both with it and on glibc's "
                "default malloc, and each ratio is against PyTorch's faster of the two.")
    return f"Every process ran with {huge}."


def render_benchmarks(rows: list[dict], args) -> str:
    """BENCHMARKS.md: the --all table with the machine, versions and command it came from."""
    from experiments import zoo
    m = zoo.machine()
    a0 = rows[0]["after"]
    envs = [name for name in a0["rounds"] if name != "cnnjax"]  # PyTorch's malloc settings
    heads = {"torch": "PyTorch img/s" + (" (huge pages)" if len(envs) > 1 else ""),
             "torch_glibc_default": "PyTorch img/s (glibc malloc)"}
    lines = [
        "# Benchmarks", "",
        "Written by `" + args.command + "`; never edited by hand.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['devices']}); Python {m['python']}, "
        f"jax {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}; PyTorch {a0['torch']} "
        f"({a0['torch_threads']} threads, eager, channels_last); {m['date']}. "
        + malloc_note(a0.get("huge_pages"), len(envs) > 1), "",
        f"One {a0['mode']} step at batch {a0['batch_size']}, {a0['image_size']}x"
        f"{a0['image_size']}, {a0['dtype']}, SGD with Nesterov momentum and BatchNorm updates; "
        f"cnnjax's numbers the median of {args.rounds} fresh processes each, alternating with "
        f"PyTorch's, whose number (in each malloc setting) is the median of all its "
        f"{2 * args.rounds} (it runs beside both). *Before*: XLA's convolution and max pooling everywhere (`--conv=xla`); "
        "*after*: cnnjax's per-shape fast paths (`--conv=auto`, `cnnjax/models/fastconv.py`). "
        "Ratio: cnnjax / PyTorch images per second. GFLOP and temporary memory are XLA's own "
        "analysis of the compiled step (after).", "",
        "| arch | cnnjax before img/s | cnnjax after img/s | "
        + "".join(f"{heads[e]} | " for e in envs) + "ratio before | "
        "ratio after | compile s (after) | XLA GFLOP/step | GFLOP/s | temp MiB/image |",
        "|---|--:|--:|" + "--:|" * len(envs) + "--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        b, a = row["before"], row["after"]
        # PyTorch was timed beside both sides: one median over all its runs in each malloc
        # setting; the faster one is the denominator
        speeds = {e: float(np.median(b["rounds"][e] + a["rounds"][e])) for e in envs}
        torch = max(speeds.values())
        cells = "".join((f"**{v:.2f}** | " if len(envs) > 1 and v == torch else f"{v:.2f} | ")
                        for v in speeds.values())
        lines.append(
            f"| {a['arch']} | {b['cnnjax_img_per_s']:.2f} | {a['cnnjax_img_per_s']:.2f} | "
            f"{cells}{b['cnnjax_img_per_s'] / torch:.2f} | "
            f"{a['cnnjax_img_per_s'] / torch:.2f} | "
            f"{a['compile_s']:.1f} | {(a['flops'] or 0) / 1e9:.1f} | {a['gflop_per_s']:.1f} | "
            f"{(a['temp_bytes_per_image'] or 0) / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def build_step(args, num_classes: int, channels: int):
    """The mesh, model, initial state and the train and eval steps for `args` (ValueError on a
    bad combination)."""
    from cnnjax import parallel, train
    from cnnjax.models.registry import create_model
    model = create_model(args.arch, num_classes=num_classes, dtype=jnp.dtype(args.dtype),
                         **options(args))
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
        from cnnjax.models import fastconv
        repl, sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        step_fn = fastconv.jit(train_step, in_shardings=(repl, sh),
                               out_shardings=(repl, repl), donate_argnums=0)
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
