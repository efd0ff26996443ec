"""experiments.benchmark (the `benchmarks` package behind it) against PyTorch: --compare=torch
and --all run both frameworks in fresh processes and write BENCHMARKS.md; --largest_batch
doubles the batch until the step no longer fits in device memory and writes its own section;
the committed BENCHMARKS.md came from those commands and names no path of the machine that
ran them."""
import argparse
import json
import pathlib
import re
import shlex

import numpy as np
import pytest

import cnnjax
from benchmarks import common, convs, report, step, sweeps, trace
from experiments import benchmark, hostmem

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("torchvision")
# A path of the machine that ran a command: after a space, quote, `=` or bracket, one that
# starts at the root, the home directory or a drive.
ABSOLUTE_PATH = re.compile(r"(?:^|[\s`'\"=(\[])(?:/|~/|[A-Za-z]:[\\/])[\w.-]", re.M)


def written_by(argv: list[str]) -> str:
    """The line naming the command that wrote a section: --out by its file's name alone."""
    shown = [f"--out={pathlib.Path(a[len('--out='):]).name}" if a.startswith("--out=") else a
             for a in argv]
    return f"Written by `python -m experiments.benchmark {' '.join(shown)}`"


def test_all_compares_each_architecture_before_and_after_and_writes_the_table(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweeps, "ALL_ARCHS", ("resnet18",))
    # as when started from the command line with huge pages on: PyTorch is timed both ways
    monkeypatch.setattr(hostmem, "active", lambda environ=None: True)
    out = tmp_path / "B.md"
    chip_start, chip_end = report.markers("largest:Some Chip 80GB")
    kept = f"{report.LARGEST_START}\n## Largest batch: an earlier GPU run\n" \
           f"{report.LARGEST_END}\n\n{chip_start}\n## Largest batch: on Some Chip\n" \
           f"{chip_end}\n\n{report.EVERY_START}\n## Every architecture\n" \
           f"{report.EVERY_END}"
    out.write_text(f"# old table\n\n{kept}\n")
    argv = ["--all", "--rounds=1", "--steps=1", "--batch_size=2", "--image_size=32",
            "--num_classes=10", f"--out={out}"]
    assert benchmark.main(argv) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for side, conv in (("before", "xla"), ("after", "auto")):
        r = row[side]
        assert r["arch"] == "resnet18" and r["conv"] == conv and r["batch_size"] == 2
        assert r["cnnjax_img_per_s"] > 0 and r["torch_img_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["cnnjax_img_per_s"] / r["torch_img_per_s"])
        assert r["compile_s"] > 0 and r["flops"] > 0 and r["temp_bytes_per_image"] > 0
        sides = {"cnnjax", "torch", "torch_glibc_default"}
        assert set(r["rounds"]) == set(r["minor_faults_per_step"]) == sides
        assert all(len(runs) == 1 for runs in r["rounds"].values())
        # PyTorch in cnnjax's malloc environment and on glibc's default; the faster counts
        assert r["torch_img_per_s"] == max(r["torch_img_per_s_by_malloc"].values())
        possible = hostmem.tunables() is not None
        assert r["huge_pages_by_side"] == {"cnnjax": possible, "torch": possible,
                                           "torch_glibc_default": False}
    text = out.read_text()
    assert report.malloc_note(row["after"]["huge_pages"], True) in text
    assert "# old table" not in text and text.endswith(f"\n{kept}\n"), (
        "--all rewrites its table and keeps the sections the other commands wrote")
    assert written_by(argv) in text and not ABSOLUTE_PATH.search(text)
    assert "PyTorch 2." in text and "| resnet18 | " in text
    assert "| PyTorch img/s (huge pages) | PyTorch img/s (glibc malloc) | ratio before |" in text
    table_row = next(line for line in text.splitlines() if line.startswith("| resnet18 |"))
    speeds = [np.median(row["before"]["rounds"][e] + row["after"]["rounds"][e])
              for e in ("torch", "torch_glibc_default")]
    torch = max(speeds)
    cells = " | ".join(f"**{v:.2f}**" if v == torch else f"{v:.2f}" for v in speeds)
    assert f"| {cells} | {row['before']['cnnjax_img_per_s'] / torch:.2f} | " \
           f"{row['after']['cnnjax_img_per_s'] / torch:.2f} |" in table_row, (
        "the ratios are against PyTorch's faster malloc setting, marked in bold")


def test_trace_shows_where_the_step_goes_layer_by_layer(tmp_path, monkeypatch, capsys):
    """--trace: the costliest XLA operations named by layer and pass, the time by kind, and a
    trace file TensorBoard and Perfetto open; for torch, torch.profiler's table and trace."""
    # every operation listed: which ones are costliest differs from one CPU to the next
    monkeypatch.setattr(trace, "TRACE_ROWS", 100_000)
    small = ["--arch=resnet18", "--image_size=32", "--batch_size=2", "--steps=1",
             "--num_classes=10"]
    assert benchmark.main([*small, f"--trace={tmp_path / 'jax'}"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["arch"] == "resnet18"
    err = captured.err
    assert re.search(r"^XLA operations, ms per step, 2 traced steps \(step \d+ ms untraced",
                     err, re.M)
    rows = err[err.index("  operation"):err.index("by kind:")].splitlines()[1:]
    ms = [float(row.split()[0]) for row in rows]
    assert len(rows) > 100 and ms == sorted(ms, reverse=True)  # costliest first
    assert re.search(r"convolution +forward +stage\d_block\d/conv\d$", err, re.M), err
    kinds = err[err.index("by kind:"):].splitlines()[1:]
    named = {line.split(None, 1)[1] for line in kinds}
    assert {"convolution forward", "convolution backward"} <= named, kinds
    assert any(kind.endswith("update") for kind in named)  # the optimizer, outside the model
    assert re.search(r"^ +\d+\.\d  no traced operation running \(XLA's own CPU convolutions",
                     err, re.M), kinds
    assert list((tmp_path / "jax").glob("plugins/profile/*/*.trace.json.gz"))

    assert benchmark.main([*small, "--framework=torch", f"--trace={tmp_path / 'torch'}"]) == 0
    err = capsys.readouterr().err
    assert "torch.profiler, 2 steps" in err and "aten::convolution" in err
    assert json.loads((tmp_path / "torch" / "torch_trace.json").read_text())["traceEvents"]


def test_idle_time_is_the_gaps_between_overlapping_operations():
    # (start, duration): 0-10 and 5-15 overlap, then gaps 15-20 and 25-30
    assert trace.idle_us([(20, 5), (0, 10), (5, 10), (30, 1), (21, 2)]) == 10
    assert trace.idle_us([]) == 0 and trace.idle_us([(3, 4)]) == 0


@pytest.mark.parametrize("op_name, opcode, expected", [
    ("jit(step)/jvp(ResNet)/stage1_block1/conv1/conv_general_dilated", "fusion",
     ("convolution", "forward", "stage1_block1/conv1")),
    ("jit(step)/transpose(jvp(ResNet))/stage4_block2/conv2/conv_general_dilated", "fusion",
     ("convolution", "backward", "stage4_block2/conv2")),
    ("jit(step)/jvp(ResNet)/fc/dot_general", "dot", ("matrix product", "forward", "fc")),
    ("jit(step)/transpose(jvp(ResNet))/bn_init/mul", "fusion", ("other", "backward", "bn_init")),
    ("jit(step)/add", "fusion", ("other", "update", "")),
    ("", "convolution", ("convolution", "backward", "(a kernel gradient; XLA names no layer)")),
    ("", "reverse", ("kernel flip", "backward", "(for an input gradient; XLA names no layer)")),
    ("", "copy", ("layout copy", "", "")),
])
def test_trace_classifies_xla_operations(op_name, opcode, expected):
    assert trace.classify(op_name, opcode) == expected
    if op_name:
        assert trace.classify(op_name, opcode, "eval")[1] == "forward"


def test_the_committed_benchmarks_were_written_by_the_harness():
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert "Written by `python -m experiments.benchmark --all" in text, (
        "python -m experiments.benchmark --all writes BENCHMARKS.md")
    assert not ABSOLUTE_PATH.search(text), "BENCHMARKS.md names a path of the machine that ran"
    table = text[:report.SECTION_RE.search(text).start()]  # the --all table
    rows = [line.split("|")[1].strip() for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| arch")]
    assert rows == list(sweeps.ALL_ARCHS)
    gpu = report.section(text, "largest:NVIDIA H100 80GB HBM3")
    assert gpu and "Written by `python -m experiments.benchmark --arch=resnet50 " \
                   "--dtype=bfloat16 --largest_batch --compare=torch" in gpu
    assert "on NVIDIA H100" in gpu and "| 1024 | " in gpu



def test_rendered_sections_name_no_machine_local_path(tmp_path):
    """A section's "Written by" command keeps --out's file name and drops the directories it
    was in (a temporary checkout's, a home's): results say nothing of the machine's paths."""
    out = tmp_path / "a checkout" / "B.md"
    side = {"arch": "resnet18", "mode": "train", "batch_size": 2, "image_size": 32,
            "dtype": "float32", "cnnjax_img_per_s": 10.0, "torch": "2.x", "torch_threads": 2,
            "huge_pages": False, "compile_s": 1.0, "flops": 1e9, "gflop_per_s": 5.0,
            "temp_bytes_per_image": 2**20, "rounds": {"cnnjax": [10.0], "torch": [12.0]}}
    renders = {
        "--all": lambda args: report.render_benchmarks([{"before": side, "after": side}], args),
        "--every_arch": lambda args: report.render_every([{"arch": "vgg11", "error": "x"}], args),
        "--largest_batch": lambda args: report.render_largest(
            [{"batch_size": 2, "cnnjax": None}], args, {}, done=True)}
    for flag, render in renders.items():
        for argv, shown in (([flag, f"--out={out}"], "--out=B.md"),
                            ([flag, "--out", str(out)], "--out B.md")):
            args = argparse.Namespace(
                command="python -m experiments.benchmark " + shlex.join(argv), arch="resnet18",
                mode="train", image_size=32, dtype="float32", batch_size=2, rounds=1,
                conv="auto")
            text = render(args)
            assert f"Written by `python -m experiments.benchmark {flag} {shown}`" in text
            assert str(tmp_path) not in text and not ABSOLUTE_PATH.search(text), text
    assert report.public_command("python -m experiments.benchmark --trace=/tmp/t "
                                 "--data_dir=/data/in --readme=docs/data.md --out=/x/B.md") == \
        "python -m experiments.benchmark --trace=DIR --data_dir=DIR --readme=docs/data.md " \
        "--out=B.md"


def fake_child(fits_up_to: dict):
    """run_child's stand-in: a result per framework while the batch is at most
    `fits_up_to[framework]`, None (out of memory) above; the argv of every call recorded."""
    calls = []

    def run_child(argv, *, oom_ok=False):
        calls.append(argv)
        opts = dict(a[2:].split("=", 1) for a in argv if "=" in a)
        side, n = opts["framework"], int(opts["batch_size"])
        if n > fits_up_to[side]:
            assert oom_ok
            return None
        result = {"framework": side, "batch_size": n, "img_per_s": 10.0 * n, "step_ms": 100.0}
        if side == "cnnjax":
            result.update(device_kind="FakeChip", device_memory_limit=2**30, compile_s=1.0,
                          model_tflop_per_s=0.5, temp_bytes=n * 2**20, conv=opts["conv"])
        else:
            result.update(torch="9.9", torchvision="0.9")
        return result
    return run_child, calls


def test_largest_batch_doubles_until_neither_framework_fits(tmp_path, monkeypatch, capsys):
    run_child, calls = fake_child({"cnnjax": 8, "torch": 4})
    monkeypatch.setattr(sweeps, "run_child", run_child)
    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\nthe --all table\n")
    argv = ["--arch=resnet18", "--largest_batch", "--compare=torch", "--batch_size=2",
            "--rounds=1", "--image_size=32", f"--out={out}"]
    assert benchmark.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["batch_size"] for r in lines[:-1]] == [2, 4, 8, 16]
    assert [r["torch"] is None for r in lines[:-1]] == [False, False, True, True]
    assert [r["cnnjax"] is None for r in lines[:-1]] == [False, False, False, True]
    assert lines[-1] == {"largest_batch": 16}  # the CPU: no --conv=xla rerun, no matmul
    assert [(a[-1] if "cnnjax" in " ".join(a) else "torch") for a in calls][:2] == \
        ["--conv=auto", "torch"]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nthe --all table\n"), "the rest of --out stays"
    gpu = report.section(text, "largest:FakeChip")
    assert written_by(argv) in gpu and not ABSOLUTE_PATH.search(gpu)
    assert "## Largest batch: resnet18 on FakeChip" in gpu
    assert "| 4 | 40 | 40 | 1.00 | 100.0 | 1.0 | 0 | - | 0.0 |" in gpu
    assert "| 8 | 80 | does not fit | - |" in gpu
    assert "| 16 | does not fit | does not fit | - | - |" in gpu
    assert "Largest batch that fits (cnnjax): 8; fastest: 80 img/s at batch 8." in gpu
    # a second sweep on the same kind of device replaces its section, never appends another
    assert benchmark.main(argv) == 0
    start, end = report.markers("largest:FakeChip")
    assert out.read_text().count(start) == 1 and out.read_text().count(end) == 1
    # a sweep on another kind of device gets its own section and keeps this one
    other, _ = fake_child({"cnnjax": 4, "torch": 4})

    def other_chip(argv, *, oom_ok=False):
        result = other(argv, oom_ok=oom_ok)
        if result and result["framework"] == "cnnjax":
            result["device_kind"] = "OtherChip"
        return result
    monkeypatch.setattr(sweeps, "run_child", other_chip)
    assert benchmark.main(argv) == 0
    text = out.read_text()
    assert "## Largest batch: resnet18 on FakeChip" in report.section(text, "largest:FakeChip")
    assert "## Largest batch: resnet18 on OtherChip" in report.section(text,
                                                                           "largest:OtherChip")


def test_largest_batch_stops_at_max_batch_size_and_says_so(tmp_path, monkeypatch, capsys):
    run_child, _ = fake_child({"cnnjax": 10**6})
    monkeypatch.setattr(sweeps, "run_child", run_child)
    out = tmp_path / "B.md"
    assert benchmark.main(["--arch=resnet18", "--largest_batch", "--batch_size=4",
                           "--max_batch_size=16", "--rounds=3", f"--out={out}"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()][:-1]
    assert [r["batch_size"] for r in rows] == [4, 8, 16]
    assert rows[0]["cnnjax"]["rounds"] == [40.0] * 3 and "torch" not in rows[0]
    assert "Every size up to --max_batch_size fits; the largest (cnnjax): 16" in out.read_text()


def test_a_step_that_does_not_fit_exits_3_with_one_line(monkeypatch, capsys):
    def too_big(*args):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.0GiB"
                           "\n<thousands of lines of HLO>")
    monkeypatch.setattr(step, "build_step", lambda *a: (None,) * 5)  # no model needed
    monkeypatch.setattr(step, "time_step", too_big)
    code = benchmark.main(["--arch=resnet18", "--image_size=32", "--batch_size=4096"])
    err = capsys.readouterr().err
    assert code == common.EXIT_OOM == 3
    assert err.count("\n") == 1 and err.startswith(
        "error: --batch_size=4096: one train step of resnet18 does not fit in the memory of ")
    assert "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.0GiB); use a " \
           "smaller --batch_size" in err
    monkeypatch.setattr(step, "time_step", lambda *a: 1 / 0)  # anything else propagates
    with pytest.raises(ZeroDivisionError):
        benchmark.main(["--arch=resnet18", "--image_size=32", "--batch_size=2"])


@pytest.mark.parametrize("error, oom", [
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 3 bytes"), True),
    (MemoryError("the compiled step needs 90 GiB"), True),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory."), True),
    (RuntimeError("INVALID_ARGUMENT: shapes do not match"), False),
    (ValueError("bad flag"), False)])
def test_out_of_memory_is_told_apart_from_other_failures(error, oom):
    assert common.out_of_memory(error) is oom


def test_run_child_maps_exit_3_to_none_only_when_asked(monkeypatch):
    import subprocess
    seen = {}

    def fake_run(cmd, **kw):
        seen.update(kw["env"])
        return subprocess.CompletedProcess(cmd, 3, "", "error: does not fit\n")
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(sweeps, "_preallocation_off", True)
    monkeypatch.setenv(sweeps.PREALLOCATE, "false")
    assert sweeps.run_child(["--arch=resnet18"], oom_ok=True) is None
    assert sweeps.PREALLOCATE not in seen, "the children preallocate as the user left it"
    with pytest.raises(RuntimeError, match="failed \\(exit 3\\):\nerror: does not fit"):
        sweeps.run_child(["--arch=resnet18"])


def test_matmul_rate_is_measured():
    assert convs.matmul_tflop_per_s(n=128, repeats=2) > 0
    assert report.bf16_peak("NVIDIA H100 80GB HBM3") == 989.4
    assert report.bf16_peak("NVIDIA H100 PCIe") == 756.0
    assert report.bf16_peak("cpu") is None


def test_every_arch_times_each_registered_model_in_its_own_process(tmp_path, monkeypatch,
                                                                   capsys):
    from cnnjax.models import registry
    monkeypatch.setattr(registry, "list_models", lambda: ["resnet18", "vgg11", "alexnet"])
    seen = []

    def run_child(argv, *, oom_ok=False):
        seen.append(argv)
        arch = argv[0].split("=")[1]
        if arch == "vgg11":
            raise RuntimeError("python -m experiments.benchmark --arch=vgg11 failed (exit 1):\n"
                               "Traceback ...")
        if arch == "alexnet":
            return None  # out of memory
        return {"arch": arch, "batch_size": 8, "steps": 2, "params": 11_689_512,
                "macs": 1_818_554_368, "compile_s": 4.25, "step_ms": 2500.0, "img_per_s": 3.2,
                "temp_bytes_per_image": 47 * 2**20}
    monkeypatch.setattr(sweeps, "run_child", run_child)
    out = tmp_path / "B.md"
    argv = ["--every_arch", "--steps=2", f"--out={out}"]
    assert benchmark.main(argv) == 1  # vgg11 failed: reported, the others still measured
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["arch"] for r in rows] == ["resnet18", "vgg11", "alexnet"]
    assert all("--framework=cnnjax" in a and "--steps=2" in a for a in seen)
    text = report.section(out.read_text(), "every")
    assert written_by(argv) in text and not ABSOLUTE_PATH.search(text)
    assert "| resnet18 | 11.69 | 1.82 | 4.2 | 2500 | 3.20 | 47 |" in text
    assert "| vgg11 | python -m experiments.benchmark --arch=vgg11 failed (exit 1): | " in text
    assert "| alexnet | does not fit in memory |" in text


def test_the_committed_every_arch_section_covers_the_registry():
    from cnnjax.models.registry import list_models
    text = report.section((ROOT / "BENCHMARKS.md").read_text(), "every")
    assert text and "Written by `python -m experiments.benchmark --every_arch" in text
    rows = [line.split("|")[1].strip() for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| arch")]
    assert rows == list(list_models())


def test_remat_reaches_cnnjax_side_only():
    """--remat is the ResNet family's recompute option: it goes to cnnjax's child and model, and
    never to torchvision's, whose ResNets have no such argument."""
    args = argparse.Namespace(arch="resnet50", mode="train", image_size=224, dtype="bfloat16",
                              batch_size=256, num_classes=None, steps=None, conv="auto",
                              memory_efficient=False, remat=True)
    assert "--remat" in sweeps.child_argv(args, "cnnjax")
    assert "--remat" not in sweeps.child_argv(args, "torch")
    assert common.options(args) == {"remat": True}
    assert common.options(args, "torch") == {}
    model = cnnjax.create_model("resnet18", **common.options(args))
    assert model.remat


def test_convs_times_each_distinct_convolution_through_its_path(capsys):
    """--convs: one row a distinct convolution (count, shape, fastconv's path, times), every
    convolution layer of the model counted once, and their sum against the step."""
    argv = ["--arch=resnet18", "--convs", "--batch_size=2", "--image_size=32", "--steps=1",
            "--num_classes=10"]
    assert benchmark.main(argv) == 0
    err = capsys.readouterr().err
    rows = [line.split() for line in err.splitlines() if re.match(r"^ +\d+  \d+x\d+x\d+ ", line)]
    layers = [layer for layer in cnnjax.profile("resnet18", 32, num_classes=10).layers
              if layer.kind in convs.CONV_KINDS]
    assert sum(int(r[0]) for r in rows) == len(layers) == 20
    assert len(rows) == len({(r[1], r[2], r[3]) for r in rows}) == 11  # distinct shapes
    paths = {r[1] + " " + r[2]: r[5] for r in rows}
    assert paths["32x32x3 7x7x3x64"] == "xla" and paths["8x8x64 1x1x64x128"] == "dot"
    assert paths["2x2x256 3x3x256x256"] == paths["1x1x512 3x3x512x512"] == "small"
    # forward and forward-with-gradients milliseconds, numbers (a tiny one may print as 0.00)
    assert all(np.isfinite([float(r[6]), float(r[7]), float(r[8])]).all() for r in rows)
    assert re.search(r"^the convolutions alone: \d+ ms of the \d+ ms step \(\d+%\)$", err, re.M)


@pytest.mark.parametrize("huge, faster, said", [
    (True, "torch", "(huge pages)"), (True, "torch_glibc_default", "(glibc's default malloc)"),
    (False, "torch", "(glibc's default malloc)")])
def test_compare_says_which_malloc_setting_pytorch_was_faster_in(monkeypatch, capsys, huge,
                                                                 faster, said):
    result = {"cnnjax_img_per_s": 10.0, "torch_img_per_s": 12.5, "ratio": 0.8,
              "huge_pages": huge, "torch_malloc": faster}
    monkeypatch.setattr(sweeps, "comparison", lambda args: result)
    assert benchmark.main(["--arch=resnet18", "--compare=torch", "--rounds=2"]) == 0
    err = capsys.readouterr().err
    assert f"cnnjax 10.00 img/s, PyTorch 12.50 img/s {said}, ratio 0.80 (medians of 2)" in err
