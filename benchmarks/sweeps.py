"""The measurements made of several others, each in a fresh child process
(`python -m experiments.benchmark`): --compare=torch, --all, --every_arch and --largest_batch;
each rewrites its part of --out (BENCHMARKS.md) as it goes."""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys

import jax
import numpy as np

from benchmarks import common, convs, report
from cnnjax.models import registry
from experiments import hostmem

# The architectures `--all` compares with PyTorch (issue 11): where users train.
ALL_ARCHS = ("resnet50", "resnet18", "densenet121", "mobilenet_v2", "vgg16",
             "shufflenet_v2_x1_0")
ROOT = pathlib.Path(__file__).resolve().parents[1]  # where the children start
# Set when this process (a parent of --compare, --all, --largest_batch or --every_arch) turned
# XLA's GPU preallocation off for itself; its children get the variable as the user left it.
PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"
_preallocation_off = False


def leave_device_memory() -> None:
    """For a process that only starts others: it must not take the GPU's memory from them."""
    global _preallocation_off
    if PREALLOCATE not in os.environ:
        os.environ[PREALLOCATE], _preallocation_off = "false", True


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
    cmd = [sys.executable, "-m", "experiments.benchmark", *argv]
    env = dict(os.environ if env is None else env)
    if _preallocation_off and env.get(PREALLOCATE) == "false":
        del env[PREALLOCATE]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode == common.EXIT_OOM and oom_ok:
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
    by_side = lambda key: {"cnnjax": first[key],
                           **{name: runs[0][key] for name, runs in theirs.items()}}
    return {
        "arch": args.arch, "mode": args.mode, "batch_size": first["batch_size"],
        "image_size": args.image_size, "dtype": args.dtype, "conv": conv or args.conv,
        "cnnjax_img_per_s": a, "torch_img_per_s": b, "ratio": a / b,
        "compile_s": float(np.median([r["compile_s"] for r in ours])),
        "flops": first["flops"], "gflop_per_s": (first["flops"] or 0) * a / first["batch_size"]
        / 1e9, "temp_bytes_per_image": first["temp_bytes_per_image"],
        "torch": torch_first["torch"], "torch_threads": torch_first["threads"],
        "huge_pages": first["huge_pages"], "torch_img_per_s_by_malloc": medians,
        "huge_pages_by_side": by_side("huge_pages"),
        "torch_malloc": max(medians, key=medians.get),
        "minor_faults_per_step": by_side("minor_faults_per_step"),
        "rounds": {"cnnjax": [r["img_per_s"] for r in ours],
                   **{name: [r["img_per_s"] for r in runs] for name, runs in theirs.items()}}}


def compare(args) -> int:
    """--compare=torch: one comparison, its JSON line and a sentence on stderr."""
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
        out.write_text(report.render_benchmarks(rows, args) + report.kept_sections(old))
    return 0


def every_arch(args) -> int:
    """--every_arch: each registered architecture's step in a fresh process, one after another;
    --out's every-architecture section rewritten after each. One that fails is reported in its
    row and the command exits 1 at the end."""
    rows, failed = [], False
    for arch in registry.list_models():
        sized = common.replaced(args, arch=arch)
        try:
            row = run_child(child_argv(sized, "cnnjax"), oom_ok=True) or \
                {"arch": arch, "error": "does not fit in memory"}
        except RuntimeError as e:
            row, failed = {"arch": arch, "error": common.first_line(e)}, True
        rows.append(row)
        print(json.dumps(row), flush=True)
        report.write_section(pathlib.Path(args.out), report.render_every(rows, args), "every")
    return 1 if failed else 0


def largest_batch(args) -> int:
    """--largest_batch: one step per batch size, doubling from --batch_size (default 64) in
    fresh processes until no framework fits (or --max_batch_size); then, on an accelerator,
    cnnjax's fastest size again with --conv=xla (the fast paths must not slow it) and a bf16
    matrix product for the chip's measured peak. One JSON line per size; --out's largest-batch
    section rewritten after each."""
    try:
        rows = sweep_sizes(args)
        extra = accelerator_extras(args, rows)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"largest_batch": rows[-1]["batch_size"], **extra}), flush=True)
    report.write_section(pathlib.Path(args.out),
                         report.render_largest(rows, args, extra, done=True),
                         report.largest_name(rows))
    return 0


def sweep_sizes(args) -> list[dict]:
    """The doubling sweep of --largest_batch: a row per batch size, each side's median run
    (None where it did not fit), until no side fits or past --max_batch_size."""
    rows, size = [], args.batch_size or 64
    sides = ("cnnjax", "torch") if args.compare else ("cnnjax",)
    while size <= args.max_batch_size:
        sized = common.replaced(args, batch_size=size)
        row = {"batch_size": size}
        for side in sides:
            runs = [run_child(child_argv(sized, side), oom_ok=True) for _ in range(args.rounds)]
            row[side] = None if None in runs else median_run(runs)
        rows.append(row)
        print(json.dumps(row), flush=True)
        report.write_section(pathlib.Path(args.out),
                             report.render_largest(rows, args, {}, done=False),
                             report.largest_name(rows))
        if all(row[side] is None for side in sides):
            break
        size *= 2
    return rows


def accelerator_extras(args, rows: list[dict]) -> dict:
    """On an accelerator: cnnjax's fastest size rerun with --conv=xla ("xla") and this
    device's measured bf16 matrix-product rate ("matmul_tflop_per_s"); nothing on the CPU."""
    extra = {}
    fits = [r for r in rows if r["cnnjax"]]
    if fits and args.conv == "auto" and jax.default_backend() != "cpu":
        best = max(fits, key=lambda r: r["cnnjax"]["img_per_s"])
        sized = common.replaced(args, batch_size=best["batch_size"])
        extra["xla"] = median_run([run_child(child_argv(sized, "cnnjax", "xla"))
                                   for _ in range(args.rounds)])
    if jax.default_backend() != "cpu":
        extra["matmul_tflop_per_s"] = convs.matmul_tflop_per_s()
    return extra


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput (the first of the two middle ones for an even count)."""
    ordered = sorted(runs, key=lambda r: r["img_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds": [r["img_per_s"] for r in runs]}
