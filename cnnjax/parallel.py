"""All device layout in one place: multi-host start-up, the mesh, shardings, global batches.

Data parallelism with `jax.jit` and shardings over a one-axis `Mesh` ("data") of every device of
every process: the batch is split over "data", the train state is replicated. BatchNorm
statistics are then computed over the global batch by XLA with no extra code (no pmap, no
axis_name). Each process feeds only its own rows; `global_batch` assembles them.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cnnjax import flags

DATA_AXIS = "data"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Starts multi-host JAX. Call before any other JAX call.

    With explicit flags (GPU clusters, or several processes on one CPU machine) they are passed
    to `jax.distributed.initialize`; on a TPU pod (TPU_WORKER_HOSTNAMES set by the runtime with
    more than one host) it needs none. A single process with no flags does nothing.
    """
    if check_processes(coordinator_address, num_processes, process_id):
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        jax.distributed.initialize()


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
