"""PyTorch's side: torchvision's same architecture, timed as `benchmarks.step` times cnnjax's.

torch and torchvision are an optional extra (`pip install -e ".[torch]"`): they are imported
inside the functions that time PyTorch's step, never when this module is imported, so that
cnnjax's own benchmarks run without them."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import pathlib
import sys
import time

from benchmarks import common, trace
from experiments import hostmem

TORCH_MISSING = ("--framework=torch and --compare=torch need torch and torchvision: "
                 "pip install -e \".[torch]\"")


def available() -> bool:
    """Whether torch and torchvision can be imported (without importing them)."""
    return importlib.util.find_spec("torch") is not None and \
        importlib.util.find_spec("torchvision") is not None


def torch_benchmark(args) -> int:
    """torchvision's same architecture, timed as cnnjax's step is: batch, image size and
    classes alike, random inputs, channels_last, SGD with Nesterov momentum 0.9 and weight
    decay 5e-4 (cnnjax's default optimizer), BatchNorm in train mode; two warm-up steps. On the
    GPU when torch sees one (cuDNN autotuning on, as XLA autotunes); --dtype=bfloat16 is
    autocast, float32 parameters and bfloat16 compute, as cnnjax's dtype option."""
    import torch  # the optional extra: imported only when PyTorch's step is timed
    try:
        return _torch_benchmark(args, torch)
    except torch.OutOfMemoryError as e:
        return common.too_big(args, "the GPU's memory in PyTorch", e)


def _torch_benchmark(args, torch) -> int:
    import torchvision  # the optional extra, as torch
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    args.batch_size = args.batch_size or 8
    args.steps = args.steps or (30 if device.type == "cuda" else 5)
    classes = args.num_classes or 1000
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=classes,
                                         **common.options(args, "torch"))
    model = model.to(device, memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size).to(
        device, memory_format=torch.channels_last)
    y = torch.randint(0, classes, (args.batch_size,)).to(device)
    step = make_step(args, torch, device, model, x, y)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(2):
        step()
    sync()
    faults = common.minor_faults()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = time.perf_counter() - t0
    faults = (common.minor_faults() - faults) / args.steps
    if args.trace:
        trace_torch(args, torch, device, step, sync, 1e3 * dt / args.steps)
    print(json.dumps({
        "framework": "torch", "arch": args.arch, "mode": args.mode,
        "batch_size": args.batch_size, "image_size": args.image_size, "dtype": args.dtype,
        "img_per_s": args.steps * args.batch_size / dt, "step_ms": 1e3 * dt / args.steps,
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads(),
        "huge_pages": hostmem.active(), "minor_faults_per_step": faults,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}))
    return 0


def make_step(args, torch, device, model, x, y):
    """One train step (SGD, Nesterov momentum, weight decay) or eval step of `model` on the
    batch (x, y), under bfloat16 autocast with --dtype=bfloat16."""
    def autocast():
        if args.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if args.mode != "train":
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                return model(x)
        return step
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
    return step


def trace_torch(args, torch, device, step, sync, step_ms: float) -> None:
    """--trace with --framework=torch: torch.profiler over TRACE_STEPS more steps; a Chrome
    trace in --trace and the table by operator and input shape on stderr."""
    from torch import profiler  # the optional extra, as torch
    activities = [profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(profiler.ProfilerActivity.CUDA)
    with profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(trace.TRACE_STEPS):
            step()
        sync()
    pathlib.Path(args.trace).mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(pathlib.Path(args.trace) / "torch_trace.json"))
    print(f"torch.profiler, {trace.TRACE_STEPS} steps (step {step_ms:.0f} ms "
          f"untraced); trace in {args.trace}/torch_trace.json", file=sys.stderr)
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=trace.TRACE_ROWS), file=sys.stderr)
