"""The flag combinations that cannot run, refused in one line (ValueError) before any model is
built or any child process starts."""
from __future__ import annotations

import pathlib

import jax

from benchmarks import common, sweeps, torch_side
from cnnjax import convert, parallel, train
from cnnjax.models import registry


def check_all(args) -> None:
    """Every check below, in the order the entry point has always made them."""
    check_comparison(args)
    check_largest_batch(args)
    check_every_arch(args)
    check_trace(args)


def check_model(args, arch: str, batch_size: int) -> None:
    """What the cnnjax side would refuse for `arch`, refused in one line before any process
    starts: an image too small for it, a batch the devices do not divide."""
    train.check_image_size(args.image_size,
                           registry.create_model(arch, **common.options(args)))
    parallel.check_batch_size(batch_size, jax.device_count())


def check_out(args) -> None:
    out = pathlib.Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise ValueError(f"--out={args.out} must be a file in an existing directory")


def check_trace(args) -> None:
    """--trace traces the step that this process times: one framework, one run (--convs too,
    cnnjax's alone)."""
    several = args.compare or args.all or args.largest_batch or args.every_arch
    if args.trace and (several or args.mode == "input"):
        raise ValueError("--trace traces one step in this process; drop --compare, --all, "
                         "--largest_batch, --every_arch and --mode=input (trace each side with "
                         "--framework=cnnjax or --framework=torch)")
    if args.convs and (several or args.mode == "input" or args.framework == "torch"):
        raise ValueError("--convs times the convolutions of cnnjax's step in this process; "
                         "drop --compare, --all, --largest_batch, --every_arch, --mode=input "
                         "and --framework=torch")
    if args.trace and pathlib.Path(args.trace).exists() and not pathlib.Path(args.trace).is_dir():
        raise ValueError(f"--trace={args.trace} is a file; give a directory (it is created if "
                         "missing)")


def check_comparison(args) -> None:
    """ValueError for a combination of --framework, --compare and --all that cannot run."""
    torch_side_too = args.framework == "torch" or args.compare or args.all
    if not torch_side_too:
        return
    if args.mode == "input":
        raise ValueError("--framework=torch, --compare and --all time a model's step; "
                         "--mode=input times the input pipeline alone")
    if args.compare and args.framework == "torch":
        raise ValueError("--compare=torch already times both frameworks; drop --framework")
    if args.all and args.arch:
        raise ValueError(f"--all measures {', '.join(sweeps.ALL_ARCHS)}; drop --arch (or drop "
                         "--all and use --compare=torch)")
    if not torch_side.available():
        raise ValueError(torch_side.TORCH_MISSING)
    shared = convert.shared_architectures()
    for arch in ([args.arch] if args.arch else sweeps.ALL_ARCHS):
        if arch not in shared:
            raise ValueError(f"--arch={arch} has no torchvision counterpart to compare with; "
                             f"torchvision has {', '.join(shared)}")
        check_model(args, arch, args.batch_size or (64 if args.largest_batch else 8))
    if args.all:
        check_out(args)


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


def check_every_arch(args) -> None:
    if not args.every_arch:
        return
    if args.arch or args.all or args.largest_batch or args.compare or args.mode == "input" \
            or args.framework == "torch":
        raise ValueError("--every_arch times cnnjax's step of every registered architecture; "
                         "drop --arch, --all, --largest_batch, --compare, --framework and "
                         "--mode=input")
    check_out(args)

