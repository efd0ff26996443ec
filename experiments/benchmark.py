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
for data is reported. One JSON line per worker count; --readme=docs/data.md also renders them
as a table (machine, versions and command included) between that page's input-benchmark
markers.
"""
from __future__ import annotations

if __name__ == "__main__":  # first of all: glibc reads its tunables only when a process starts
    from experiments import hostmem
    hostmem.reexec_with_huge_pages()

# The benchmarks (and jax, which they import) load only now, after the restart above.
import argparse
import shlex
import sys

from benchmarks import checks, input_pipeline, step, sweeps, torch_side
from benchmarks.input_pipeline import INPUT_END, INPUT_START  # docs/data.md's markers
from cnnjax import flags

RULES = {name: flags.optional(flags.POSITIVE_INT)
         for name in ("batch_size", "image_size", "num_classes", "steps", "workers",
                      "rounds", "max_batch_size")}


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    p = parser()
    args = p.parse_args(argv)
    args.command = "python -m experiments.benchmark " + shlex.join(argv)
    if args.mode == "input":
        if not args.dataset:
            p.error("the following arguments are required: --dataset")
    elif not args.arch and not args.all and not args.every_arch:
        p.error("the following arguments are required: --arch")
    if args.compare or args.all or args.largest_batch or args.every_arch:
        sweeps.leave_device_memory()  # this process only starts others
    try:
        flags.check(vars(args), RULES)
        checks.check_all(args)
    except ValueError as e:
        return flags.fail(e)
    return dispatch(args)


def dispatch(args) -> int:
    """The one job the checked flags ask for."""
    if args.mode == "input":
        return input_pipeline.input_benchmark(args)
    if args.largest_batch:
        return sweeps.largest_batch(args)
    if args.every_arch:
        return sweeps.every_arch(args)
    if args.all:
        return sweeps.all_benchmarks(args)
    if args.compare:
        return sweeps.compare(args)
    if args.framework == "torch":
        return torch_side.torch_benchmark(args)
    return step.run(args)


def parser() -> flags.ArgumentParser:
    p = flags.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_flags(p)
    add_analysis_flags(p)
    add_sweep_flags(p)
    add_input_flags(p)
    return p


def add_step_flags(p: argparse.ArgumentParser) -> None:
    """The model and the step timed."""
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


def add_analysis_flags(p: argparse.ArgumentParser) -> None:
    """Where the step's time goes."""
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


def add_sweep_flags(p: argparse.ArgumentParser) -> None:
    """PyTorch's side, and the runs of several fresh processes that write --out."""
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


def add_input_flags(p: argparse.ArgumentParser) -> None:
    """--mode=input's dataset and workers (and --rounds, --compare's too)."""
    p.add_argument("--dataset", help="--mode=input: a named dataset with encoded images")
    p.add_argument("--data_dir", help="--mode=input: where it is prepared")
    p.add_argument("--workers", type=int, help="--mode=input: decode workers (default 1, 2 "
                                               "and all cores)")
    p.add_argument("--rounds", type=int, default=3,
                   help="--mode=input and --compare: timings of each side, alternating; "
                        "medians reported")
    p.add_argument("--readme", help="--mode=input: write the table into this file, between "
                                    f"{INPUT_START} and {INPUT_END}")


if __name__ == "__main__":
    sys.exit(main())
