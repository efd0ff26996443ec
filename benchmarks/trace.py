"""--trace: two more steps traced with jax.profiler, the trace read back and each XLA operation
classified by kind (convolution, matrix product, the rest), pass (forward, backward, update)
and layer; and the time during which no traced operation ran."""
from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
import sys

import jax

TRACE_ROWS = 25  # operations --trace lists
TRACE_STEPS = 2  # steps --trace traces, after the timed ones


def trace_steps(trace_dir: str, run_step, state, hlo_text: str, step_ms: float,
                mode: str = "train"):
    """Traces TRACE_STEPS steps of `run_step` (state -> (state, output)) into `trace_dir` and
    prints where their time went; returns the state after them."""
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(TRACE_STEPS):
        state, out = run_step(state)
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    print_xla_trace(trace_dir, hlo_text, TRACE_STEPS, step_ms, mode)
    return state


def xla_op_events(trace_dir: str) -> list[tuple[str, float, float]]:
    """(name, start, duration) in microseconds of every complete event of the newest trace that
    jax.profiler wrote under `trace_dir` (XLA operations carry their HLO name)."""
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
