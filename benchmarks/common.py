"""What every measurement shares: the model options the flags set, the one-line exit of a step
that does not fit in memory, and the page faults a step costs."""
from __future__ import annotations

import argparse
import resource

from cnnjax import flags

EXIT_OOM = 3  # a step that does not fit in the device's memory (a child's exit status)


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


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is a device running out of memory (XLA's RESOURCE_EXHAUSTED, PyTorch's
    OutOfMemoryError, or the check of `step.time_step` against the device's limit)."""
    text = f"{type(e).__name__}: {e}"
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or \
        "OutOfMemoryError" in text or "out of memory" in text.lower()


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def too_big(args, where: str, e: BaseException) -> int:
    """The one-line error (exit status EXIT_OOM) of a step that does not fit in `where`."""
    return flags.fail(f"--batch_size={args.batch_size}: one {args.mode} step of {args.arch} "
                      f"does not fit in {where} ({first_line(e)}); use a smaller --batch_size",
                      EXIT_OOM)


def minor_faults() -> int:
    """This process's minor page faults so far (each a page the kernel mapped in, and zeroed
    if new): per step, how much of the step's memory was fresh. See experiments/hostmem.py."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
