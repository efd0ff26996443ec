"""experiments.hostmem: the entry points restart themselves with glibc's huge-page tunable, which
spares a CPU train step the page faults of its fresh temporaries; it never overrides a setting
the user gave, and CNNJAX_HUGE_PAGES=0 turns it off."""
import json
import os
import subprocess
import sys

import pytest

from experiments import hostmem
from tests.helpers import ROOT

POSSIBLE = hostmem.tunables({}) is not None  # Linux, glibc, transparent huge pages not `never`


@pytest.mark.parametrize("environ, expected", [
    ({}, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, None),  # the user's own choice stands
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, None),  # already on: no second restart
    ({"CNNJAX_HUGE_PAGES": "0"}, None),
    ({"CNNJAX_HUGE_PAGES": "1"}, "glibc.malloc.hugetlb=1"),
])
def test_tunables_add_huge_pages_unless_given_or_turned_off(environ, expected, tmp_path):
    assert hostmem.tunables(environ, thp_path=thp(tmp_path, "madvise"), glibc=True) == expected


def thp(tmp_path, mode: str) -> str:
    """A stand-in for /sys/kernel/mm/transparent_hugepage/enabled in `mode`."""
    f = tmp_path / "enabled"
    f.write_text(" ".join(f"[{m}]" if m == mode else m for m in ("always", "madvise", "never"))
                 + "\n")
    return str(f)


def test_tunables_do_nothing_where_huge_pages_cannot_help(tmp_path):
    assert hostmem.tunables({}, thp_path=thp(tmp_path, "never"), glibc=True) is None
    assert hostmem.tunables({}, thp_path=thp(tmp_path, "always"), glibc=True) == hostmem.SETTING
    assert hostmem.tunables({}, thp_path=str(tmp_path / "none"), glibc=True) is None  # no THP
    assert hostmem.tunables({}, thp_path=thp(tmp_path, "madvise"), glibc=False) is None  # musl


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hostmem._thp_mode(str(f)) == "madvise"
    assert hostmem._thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("value, on", [
    ("", False), ("glibc.malloc.hugetlb=1", True), ("glibc.malloc.hugetlb=2", True),
    ("glibc.malloc.hugetlb=0", False), ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", True),
])
def test_active_reads_the_process_environment(value, on):
    assert hostmem.active({"GLIBC_TUNABLES": value}) is on


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", hostmem.SWITCH)}
    return dict(env, PYTHONPATH=str(ROOT), **extra)


@pytest.mark.skipif(not POSSIBLE, reason="needs Linux, glibc and transparent huge pages")
def test_reexec_restarts_the_same_command_in_the_same_process():
    code = ("import os, sys; from experiments import hostmem; pid = os.getpid(); "
            "hostmem.reexec_with_huge_pages(); "
            "print(os.getpid(), os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", code, "a", "--b=1"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=clean_env(GLIBC_TUNABLES="glibc.malloc.arena_max=4"))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == (f"{proc.pid} glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 "
                   "['a', '--b=1']\n"), (
        "one process (same PID); the arguments and the user's other tunables carry over")


@pytest.mark.skipif(not POSSIBLE, reason="needs Linux, glibc and transparent huge pages")
def test_the_benchmark_runs_with_huge_pages_and_faults_far_less():
    """The entry point restarts itself (its JSON says so), and a step whose temporaries are
    larger than glibc's mmap threshold then takes a small fraction of the page faults it takes
    with glibc's default (VGG-11 at 32x32 has 530 MB of gradients: some 130,000 pages)."""
    argv = [sys.executable, "-m", "experiments.benchmark", "--arch=vgg11", "--image_size=32",
            "--batch_size=2", "--steps=2", "--num_classes=10"]
    runs = {}
    for switch in ("1", "0"):
        out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300,
                             env=clean_env(**{hostmem.SWITCH: switch}))
        assert out.returncode == 0, out.stderr[-2000:]
        runs[switch] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["1"]["huge_pages"] is True and runs["0"]["huge_pages"] is False
    assert runs["1"]["arch"] == "vgg11" and runs["1"]["batch_size"] == 2
    assert runs["0"]["minor_faults_per_step"] > 50_000
    assert runs["1"]["minor_faults_per_step"] < runs["0"]["minor_faults_per_step"] / 10


def test_without_huge_pages_keeps_other_tunables_and_stops_the_restart():
    env = hostmem.without_huge_pages(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "PATH": "/bin"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin",
                   hostmem.SWITCH: "0"}
    assert not hostmem.active(env) and hostmem.tunables(env) is None
    assert "GLIBC_TUNABLES" not in hostmem.without_huge_pages(
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
