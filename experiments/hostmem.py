"""Host memory: transparent huge pages for the large buffers of a train step on the CPU.

XLA:CPU allocates a compiled step's temporaries as one buffer per execution (2.3 GB for VGG-16's
train step at batch 8, 224x224). glibc's malloc serves an allocation that large with a fresh
`mmap` and gives it back with `munmap` when the step ends, so the kernel faults in, and zeroes,
every 4 KiB page of it again on every step: 575,000 minor page faults a step for VGG-16 on the
project's 2-core EPYC. glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35 and later) makes
malloc advise transparent huge pages on those mappings: 2 MiB pages, some 3,400 faults a step,
and the step takes 2.27 s instead of 2.84 (ResNet-50's 0.75 s instead of 1.18). PyTorch's
eager step faults far less and gains on some models, loses on others, so the benchmark times it
both ways (benchmarks/sweeps.py, `torch_environments`).

glibc reads its tunables once, when a process starts, so a running process cannot turn this
on for itself: `reexec_with_huge_pages()` starts the same command again, in the same process
(`os.execve`, same PID and open files), with the tunable added to GLIBC_TUNABLES. The entry
points `python -m experiments.train` and `python -m experiments.benchmark` call it first thing,
before anything heavier than this module is imported (a restart costs some 30 ms); a notebook
or script of your own can be started with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in its
environment instead. `CNNJAX_HUGE_PAGES=0` in the environment turns it off (for comparison).
Where it cannot help it does nothing: outside Linux with glibc, or where the kernel's
transparent huge pages are `never`.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
SWITCH = "CNNJAX_HUGE_PAGES"  # "0" in the environment: leave malloc as it is
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def _thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode (the bracketed word: always, madvise or never)."""
    try:
        text = open(path).read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _settings(environ) -> list[str]:
    """The settings of GLIBC_TUNABLES in `environ`, one `name=value` each."""
    return [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]


def tunables(environ=None, *, thp_path: str = THP_ENABLED, glibc: bool | None = None
             ) -> str | None:
    """The GLIBC_TUNABLES value to start a process with, or None to leave it as it is: it is
    already given (any `glibc.malloc.hugetlb` setting, the user's own included), turned off
    with CNNJAX_HUGE_PAGES=0, not Linux with glibc, or the kernel's huge pages are `never`.
    Other tunables in GLIBC_TUNABLES are kept."""
    environ = os.environ if environ is None else environ
    current = _settings(environ)
    if environ.get(SWITCH, "1") == "0" or any(t.startswith(f"{TUNABLE}=") for t in current):
        return None
    if not (sys.platform.startswith("linux") and (_glibc() if glibc is None else glibc)):
        return None
    if _thp_mode(thp_path) not in ("always", "madvise"):
        return None
    return ":".join([*current, SETTING])


def active(environ=None) -> bool:
    """Whether this process was started with glibc's huge-page tunable on."""
    environ = os.environ if environ is None else environ
    return any(t.startswith(f"{TUNABLE}=") and t != f"{TUNABLE}=0" for t in _settings(environ))


def without_huge_pages(environ=None) -> dict[str, str]:
    """The environment of a process to start on glibc's default malloc: `environ` (default
    os.environ) without any `glibc.malloc.hugetlb` setting, and told not to add one."""
    environ = dict(os.environ if environ is None else environ)
    kept = [t for t in _settings(environ) if not t.startswith(f"{TUNABLE}=")]
    environ.pop("GLIBC_TUNABLES", None)
    if kept:
        environ["GLIBC_TUNABLES"] = ":".join(kept)
    environ[SWITCH] = "0"
    return environ


def reexec_with_huge_pages() -> None:
    """Starts this process's command again with huge pages on, when `tunables()` says it
    would help; returns (doing nothing) otherwise. Call it before anything else happens: the
    process is replaced, and what it did so far is gone."""
    value = tunables()
    if value is None or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
                  {**os.environ, "GLIBC_TUNABLES": value})
    except OSError:  # could not start it again: go on as it is, with glibc's default
        return
