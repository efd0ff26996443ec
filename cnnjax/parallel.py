"""All device layout in one place: multi-host start-up, the mesh, shardings, global batches.

Data parallelism with `jax.jit` and shardings over a one-axis `Mesh` ("data") of every device of
every process: the batch is split over "data", the train state is replicated. BatchNorm
statistics are then computed over the global batch by XLA with no extra code (no pmap, no
axis_name). Each process feeds only its own rows; `global_batch` assembles them.
"""
from __future__ import annotations

import collections
import os
import re
import signal
import threading
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cnnjax import flags

DATA_AXIS = "data"


def simulated_cpu_devices() -> int:
    """The CPU device count asked for before JAX starts: XLA_FLAGS'
    --xla_force_host_platform_device_count, JAX_NUM_CPU_DEVICES or jax_num_cpu_devices."""
    found = re.findall(r"--xla_force_host_platform_device_count=(\d+)",
                       os.environ.get("XLA_FLAGS", ""))
    counts = [int(found[-1])] if found else []
    env = os.environ.get("JAX_NUM_CPU_DEVICES", "")
    counts += [int(env)] if env.isdecimal() else []
    counts += [jax.config.jax_num_cpu_devices]
    return max(counts)


def reserve_cpu_threads() -> None:
    """Gives XLA's CPU client two threads per simulated CPU device (PJRT_NPROC, unless set).

    The client runs every device's share of a multi-device program on one thread pool, and the
    dispatch of the next programs too; it sizes that pool max(cores, devices): one thread per
    device with 8 simulated devices on 2 cores. A dispatch waits on its pool thread while its
    device has 32 programs in flight (as when many small programs queue behind a long one), so
    a few such waits can leave a collective fewer threads than devices: 7 of 8 devices wait in
    the all-reduce for the 8th, which never starts. Two README runs on 8 devices stopped with
    7 of 8 devices in an all-reduce, near an evaluation (where hundreds of small programs used
    to queue); the stall could not be reproduced on demand, so this cause is read from XLA's
    code, not seen in a stack. With two threads per device, one program's devices and the
    next program's dispatch both fit. Works only before JAX's CPU backend starts (cnnjax's
    import calls it); a process with one device is left alone.
    """
    if "PJRT_NPROC" in os.environ or "NPROC" in os.environ:
        return
    devices = simulated_cpu_devices()
    if devices > 1:
        os.environ["PJRT_NPROC"] = str(max(2 * devices, os.cpu_count() or 1))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Starts multi-host JAX. Call before any other JAX call.

    With explicit flags (GPU clusters, or several processes on one CPU machine) they are passed
    to `jax.distributed.initialize`; on a TPU pod (TPU_WORKER_HOSTNAMES set by the runtime with
    more than one host) it needs none. A single process with no flags does nothing.
    """
    if check_processes(coordinator_address, num_processes, process_id):
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    elif len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)


# A process that sends no heartbeat for this long is declared dead by JAX's coordination
# service (JAX's default is 100 s). Heartbeats come from a thread of their own, so a long
# compile, eval or save does not miss them. The others then stop one of two ways: where a
# collective failed first (a peer's connection closed), raise_if_peer_lost's LostPeer, exit 1;
# where they were waiting (at a checkpoint's barrier, in a collective that does not fail), JAX
# aborts them with its own message, "The following tasks are unhealthy (stopped sending
# heartbeats): I" (exit status 134). JAX's hook to replace that abort, the client's
# missed_heartbeat_callback, cannot be called from Python: jaxlib 0.10.2 terminates with
# std::bad_cast when it fires.
HEARTBEAT_TIMEOUT_S = 30


def check_processes(coordinator_address: str | None, num_processes: int | None,
                    process_id: int | None) -> bool:
    """Whether the multi-process flags are given; ValueError unless all or none are, in range."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    if all(v is None for v in given.values()):
        return False
    if any(v is None for v in given.values()):
        have = ", ".join(f"--{k}" for k, v in given.items() if v is not None)
        raise ValueError("multi-process runs need all of --coordinator_address, --num_processes "
                         f"and --process_id (or none, on a TPU pod); got only {have}")
    flags.POSITIVE_INT.check("num_processes", num_processes)
    flags.Rule(f"in [0, {num_processes})", lambda v: flags.is_int(v) and 0 <= v < num_processes
               ).check("process_id", process_id)
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not (port.isdecimal() and 0 < int(port) < 65536):
        raise ValueError(f"--coordinator_address={flags.show(coordinator_address)} must be "
                         "HOST:PORT with a port in 1..65535")
    return True


def make_mesh(devices: Any = None) -> Mesh:
    """A one-axis mesh ("data") over `devices` (default: every device of every process)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, num_devices: int) -> None:
    """The global batch must split evenly over the devices; say which sizes would."""
    n = num_devices
    flags.POSITIVE_INT.check("batch_size", batch_size)
    if batch_size % n:
        below, above = max(n, batch_size // n * n), (batch_size // n + 1) * n
        nearest = " or ".join(str(v) for v in sorted({below, above}))
        raise ValueError(f"--batch_size={batch_size} must be divisible by the number of devices "
                         f"({n}); nearest valid sizes: {nearest}")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles the global batch from each process's own rows (in process order)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def prefetch_to_device(batches: Iterable[tuple[int, dict[str, np.ndarray]]], mesh: Mesh,
                       size: int = 2) -> Iterator[tuple[int, dict[str, jax.Array]]]:
    """(step, global batch) for each (step, local batch), `size` batches ahead: the copies to
    the devices of the next steps overlap the step in flight."""
    queue: collections.deque = collections.deque()
    for step, local in batches:
        queue.append((step, global_batch(local, mesh)))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a host pytree (identical on every process) replicated on every device."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda _: np.asarray(x)),
        tree)


def place_like(value: Any, like: jax.Array) -> jax.Array:
    """A host value (identical on every process) as an array with `like`'s dtype and sharding."""
    host = np.asarray(value, like.dtype)
    if host.shape != like.shape:
        raise ValueError(f"cannot place an array of shape {host.shape} as one of {like.shape}")
    return jax.make_array_from_callback(host.shape, like.sharding, lambda index: host[index])


def to_host(tree: Any) -> Any:
    """Fetches replicated arrays to numpy (works when they span other processes' devices)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0))
                                  if isinstance(x, jax.Array) else x, tree)


def is_main_process() -> bool:
    return jax.process_index() == 0


class Preemption:
    """SIGTERM, what TPU VMs and most schedulers send before they take a machine away, as a
    request to checkpoint and stop: `reached(step)` is True at one step, the same step on every
    process, and False before the signal.

    Several processes agree through JAX's preemption sync point (its coordination service
    catches SIGTERM on any process and picks the step after the furthest one reached); a single
    process catches the signal itself. Call `reached` after every step, on every process."""

    def __init__(self):
        from jax._src import distributed
        self.synced = (jax.process_count() > 1
                       and distributed.global_state.preemption_sync_manager is not None)
        self.requested = False
        self._previous = None
        if not self.synced and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._catch)

    def _catch(self, signum, frame) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        if self.synced:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class LostPeer(RuntimeError):
    """Another process of a multi-process run died (or stopped answering)."""


def live_processes(timeout_s: float) -> list[int] | None:
    """The processes JAX's coordination service counts as alive, or None when it cannot say
    within `timeout_s` (a dead process is known once its heartbeat timeout has passed)."""
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None:
        return list(range(jax.process_count()))
    result: list = []

    def ask():
        try:
            result.append(sorted(client.get_live_nodes(list(range(jax.process_count())))))
        except Exception:  # noqa: BLE001 - the service itself may be gone (process 0 lost)
            result.append(None)
    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result[0] if result else None


def raise_if_peer_lost(error: BaseException, step: int, workdir: Any) -> None:
    """After `error` in a multi-process run: LostPeer naming the lost processes and the last
    checkpoint committed in WORKDIR when some process is gone (asking the coordination service,
    up to the heartbeat timeout); returns when all are alive (the error is then the caller's to
    raise) or in a single process."""
    n = jax.process_count()
    if n == 1:
        return
    live = live_processes(HEARTBEAT_TIMEOUT_S + 15)
    if live is not None and len(live) == n:
        return
    from cnnjax import checkpoint
    steps = checkpoint.saved_steps(workdir)  # committed ones, in the file system now
    kept = (f"The last committed checkpoint is step {steps[-1]}" if steps else
            "No checkpoint was committed yet")
    if live is None:
        who = "the coordination service did not answer (process 0 lost?)"
    else:
        lost = [i for i in range(n) if i not in live]
        who = f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of {n} lost"
    raise LostPeer(f"{who} during step {step}; process {jax.process_index()} stops too "
                   f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). {kept}: "
                   "restart every process with the same command to resume") from error
