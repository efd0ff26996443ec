"""BENCHMARKS.md in Markdown: the --all table, the every-architecture section and one
largest-batch section a device kind, each with the machine, versions and command it came from;
and the markers that keep one command's section when another rewrites the file."""
from __future__ import annotations

import os
import pathlib
import re
import shlex

import jax
import numpy as np

from experiments import zoo

LARGEST_START, LARGEST_END = "<!-- largest-batch:start -->", "<!-- largest-batch:end -->"
EVERY_START, EVERY_END = "<!-- every-arch:start -->", "<!-- every-arch:end -->"
# The sections of BENCHMARKS.md that commands other than --all write (and --all keeps): the
# every-architecture table, and one largest-batch sweep per device kind ("largest:KIND"; plain
# "largest" is the section without a kind), so that a run on one card keeps another card's.
SECTION_RE = re.compile(r"<!-- (largest-batch(?: [^>]*?)?|every-arch):start -->.*?<!-- \1:end -->",
                        re.S)
# Dense bfloat16 matrix-unit peaks from NVIDIA's datasheets, TFLOP/s, by device-kind substring.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0),
                    ("L4", 121.0), ("V100", 125.0))
MLPERF_H100_IMG_PER_S = 7190  # NVIDIA's MLPerf Training v4.0 ResNet-50 result, per H100
# The flags whose values are paths of the machine that ran the command: a results file shows a
# file by its name alone and a directory as DIR, never where they were on that machine.
FILE_FLAGS, DIR_FLAGS = ("--out", "--readme"), ("--trace", "--data_dir")


def public_command(command: str) -> str:
    """`command` with no machine-local path: `--out=/tmp/x/BENCHMARKS.md` becomes
    `--out=BENCHMARKS.md`, `--data_dir=/data/imagenet` becomes `--data_dir=DIR`; relative paths
    (`--readme=docs/data.md`) stay."""
    shown, pending = [], None  # pending: a path flag given as two words ("--out PATH")
    for word in shlex.split(command):
        name, eq, value = word.partition("=")
        if pending:
            shown.append(_public_path(pending, word))
            pending = None
        elif name in FILE_FLAGS + DIR_FLAGS and eq:
            shown.append(f"{name}={_public_path(name, value)}")
        else:
            pending = word if word in FILE_FLAGS + DIR_FLAGS else None
            shown.append(word)
    return shlex.join(shown)


def _public_path(flag: str, value: str) -> str:
    path = pathlib.PurePath(value)
    if not path.is_absolute():  # relative to the checkout (docs/data.md): nothing of a machine
        return value
    return (path.name or "FILE") if flag in FILE_FLAGS else "DIR"


def written_by(args) -> str:
    return "Written by `" + public_command(args.command) + "`; never edited by hand."


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


def kept_sections(text: str) -> str:
    """What --largest_batch (one section a device kind) and --every_arch wrote in `text`: what
    --all keeps after its own table."""
    return "".join(f"\n{m[0]}\n" for m in SECTION_RE.finditer(text))


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


def host_versions(m: dict) -> str:
    """The machine line's start: CPU, cores, device, Python and JAX's versions."""
    return (f"{m['cpu']}, {m['cores']} cores ({m['devices']}); Python {m['python']}, "
            f"jax {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}")


def render_benchmarks(rows: list[dict], args) -> str:
    """BENCHMARKS.md: the --all table with the machine, versions and command it came from."""
    m = zoo.machine()
    a0 = rows[0]["after"]
    envs = [name for name in a0["rounds"] if name != "cnnjax"]  # PyTorch's malloc settings
    heads = {"torch": "PyTorch img/s" + (" (huge pages)" if len(envs) > 1 else ""),
             "torch_glibc_default": "PyTorch img/s (glibc malloc)"}
    lines = [
        "# Benchmarks", "", written_by(args), "",
        f"Machine: {host_versions(m)}; PyTorch {a0['torch']} "
        f"({a0['torch_threads']} threads, eager, channels_last); {m['date']}. "
        + malloc_note(a0.get("huge_pages"), len(envs) > 1), "",
        f"One {a0['mode']} step at batch {a0['batch_size']}, {a0['image_size']}x"
        f"{a0['image_size']}, {a0['dtype']}, SGD with Nesterov momentum and BatchNorm updates; "
        f"cnnjax's numbers the median of {args.rounds} fresh processes each, alternating with "
        f"PyTorch's, whose number (in each malloc setting) is the median of all its "
        f"{2 * args.rounds} (it runs beside both). *Before*: XLA's convolution and max pooling "
        "everywhere (`--conv=xla`); *after*: cnnjax's per-shape fast paths (`--conv=auto`, "
        "`cnnjax/models/fastconv.py`). Ratio: cnnjax / PyTorch images per second. GFLOP and "
        "temporary memory are XLA's own analysis of the compiled step (after).", "",
        "| arch | cnnjax before img/s | cnnjax after img/s | "
        + "".join(f"{heads[e]} | " for e in envs) + "ratio before | "
        "ratio after | compile s (after) | XLA GFLOP/step | GFLOP/s | temp MiB/image |",
        "|---|--:|--:|" + "--:|" * len(envs) + "--:|--:|--:|--:|--:|--:|"]
    lines += [benchmarks_row(row, envs) for row in rows]
    return "\n".join(lines) + "\n"


def benchmarks_row(row: dict, envs: list[str]) -> str:
    """One architecture's row of the --all table, before and after."""
    b, a = row["before"], row["after"]
    # PyTorch was timed beside both sides: one median over all its runs in each malloc
    # setting; the faster one is the denominator
    speeds = {e: float(np.median(b["rounds"][e] + a["rounds"][e])) for e in envs}
    torch = max(speeds.values())
    cells = "".join((f"**{v:.2f}** | " if len(envs) > 1 and v == torch else f"{v:.2f} | ")
                    for v in speeds.values())
    return (f"| {a['arch']} | {b['cnnjax_img_per_s']:.2f} | {a['cnnjax_img_per_s']:.2f} | "
            f"{cells}{b['cnnjax_img_per_s'] / torch:.2f} | "
            f"{a['cnnjax_img_per_s'] / torch:.2f} | "
            f"{a['compile_s']:.1f} | {(a['flops'] or 0) / 1e9:.1f} | {a['gflop_per_s']:.1f} | "
            f"{(a['temp_bytes_per_image'] or 0) / 2**20:.0f} |")


def render_every(rows: list[dict], args) -> str:
    """The every-architecture section: machine, versions, command and one row per model."""
    m = zoo.machine()
    first = next((r for r in rows if "error" not in r), {})
    lines = [
        "## Every architecture: compile time, step time, memory", "", written_by(args), "",
        f"Machine: {host_versions(m)}; {m['date']}. " + malloc_note(first.get("huge_pages")), "",
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


def sweep_kind(rows: list[dict]) -> str:
    """The device kind a sweep ran on: its children's, else this process's."""
    first = next((r["cnnjax"] for r in rows if r.get("cnnjax")), None)
    return first["device_kind"] if first else jax.devices()[0].device_kind


def largest_name(rows: list[dict]) -> str:
    """The BENCHMARKS.md section of a sweep: one per device kind."""
    return f"largest:{sweep_kind(rows)}"


def bf16_peak(device_kind: str) -> float | None:
    """The datasheet's dense bfloat16 TFLOP/s of a device kind (None if not listed)."""
    return next((peak for name, peak in BF16_PEAK_TFLOPS if name in device_kind), None)


def render_largest(rows: list[dict], args, extra: dict, *, done: bool) -> str:
    """The largest-batch section of BENCHMARKS.md: machine, versions, command and the table;
    `done`: the sweep ended (out of memory or at --max_batch_size), not written mid-way."""
    kind = sweep_kind(rows)
    peak = bf16_peak(kind) if args.dtype == "bfloat16" else None
    lines = largest_head(rows, args, kind, peak)
    lines += [largest_row(r, peak) for r in rows]
    notes = largest_notes(rows, args, extra, done=done, kind=kind, peak=peak)
    return "\n".join(lines + ([""] + notes if notes else []))


def largest_head(rows: list[dict], args, kind: str, peak: float | None) -> list[str]:
    """The largest-batch section's title, command, machine, method and table head."""
    m = zoo.machine()
    first = next((r["cnnjax"] for r in rows if r["cnnjax"]), None)
    torch = next((r["torch"] for r in rows if r.get("torch")), None)
    fraction = "% of bf16 peak" if peak else "% of peak"
    fraction_env = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "unset (0.75)")
    return [
        f"## Largest batch: {args.arch} on {kind}", "", written_by(args), "",
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
        + " (cuDNN autotuning on a GPU). Model TFLOP/s counts 3 x 2 x the profile's "
        "multiply-adds per image for a train step (forward, input and weight gradients).", "",
        f"| batch | cnnjax img/s | PyTorch img/s | ratio | cnnjax step ms | compile s | "
        f"model TFLOP/s | {fraction} | XLA temp GiB |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]


def largest_row(r: dict, peak: float | None) -> str:
    """One batch size's row: each framework's throughput (or "does not fit") and cnnjax's
    figures."""
    a, t = r["cnnjax"], r.get("torch")
    cells = [str(r["batch_size"])]
    cells.append(f"{a['img_per_s']:.0f}" if a else "does not fit")
    cells.append((f"{t['img_per_s']:.0f}" if t else "does not fit") if "torch" in r else "-")
    cells.append(f"{a['img_per_s'] / t['img_per_s']:.2f}" if a and t else "-")
    if a:
        tf = a["model_tflop_per_s"]
        cells += [f"{a['step_ms']:.1f}", f"{a['compile_s']:.1f}", f"{tf:.0f}",
                  f"{100 * tf / peak:.0f}%" if peak else "-",
                  f"{(a['temp_bytes'] or 0) / 2**30:.1f}"]
    else:
        cells += ["-"] * 5
    return "| " + " | ".join(cells) + " |"


def largest_notes(rows: list[dict], args, extra: dict, *, done: bool, kind: str,
                  peak: float | None) -> list[str]:
    """What the sweep found: the largest size that fits, the fastest, and what it is read
    against (--conv=xla, the chip's peak, a measured matrix product, MLPerf)."""
    fits = [r for r in rows if r["cnnjax"]]
    if not fits:
        return []
    best = max(fits, key=lambda r: r["cnnjax"]["img_per_s"])
    if not done:
        head = (f"Written while the sweep ran (or it was stopped): sizes above "
                f"{rows[-1]['batch_size']} not measured. Largest batch that fits so far")
    elif fits[-1] is rows[-1]:
        head = "Every size up to --max_batch_size fits; the largest"
    else:
        head = "Largest batch that fits"
    notes = [f"{head} (cnnjax): {fits[-1]['batch_size']}; fastest: "
             f"{best['cnnjax']['img_per_s']:.0f} img/s at batch {best['batch_size']}."]
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
    return notes
