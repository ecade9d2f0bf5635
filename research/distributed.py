"""Multi-process start-up: the one call a multi-host run makes before anything touches devices.

    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)   # explicit
    distributed.initialize()   # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
                               # else auto-detected (TPU VM, Slurm, Open MPI), else one process

Every process runs the same program (SPMD): the same config, the same
``jax.jit`` calls in the same order, each process feeding the devices it
owns.  ``jax.distributed`` also watches the processes: one that stops
sending heartbeats for ``heartbeat_timeout_s`` makes every other process
abort with "The following tasks are unhealthy (stopped sending heartbeats):
<process ids>" instead of waiting forever inside a collective.

On the CPU, cross-process collectives go through gloo (JAX's default); ``JAX_NUM_CPU_DEVICES``
sets each process's device count (how the tests fake a pod on one machine).
"""

from __future__ import annotations

import glob
import os

import jax

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _cluster_detected() -> bool:
    """An environment where ``jax.distributed.initialize()`` finds the processes by itself."""
    tpu_vm = bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ
    return tpu_vm or slurm or "OMPI_MCA_orte_hnp_uri" in os.environ


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_timeout_s: int = 100) -> bool:
    """Join the run's processes; ``False`` (and nothing done) for a single-process run.

    Arguments left ``None`` come from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.  Giving some of the three and
    not the others is a ``ValueError`` naming the missing ones.
    """
    given = dict(zip(ENV, (coordinator, num_processes, process_id)))
    given = {k: v if v is not None else os.environ.get(k) for k, v in given.items()}
    missing = [k for k, v in given.items() if v in (None, "")]
    if len(missing) == len(ENV):
        if not _cluster_detected():
            return False
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
        return True
    if missing:
        flags = {"JAX_COORDINATOR_ADDRESS": "--coordinator", "JAX_NUM_PROCESSES": "--num-processes",
                 "JAX_PROCESS_ID": "--process-id"}
        raise ValueError("a multi-process run needs all of coordinator, process count and process id; missing: "
                         + ", ".join(f"{flags[k]} (or {k})" for k in missing))
    n, i = int(given["JAX_NUM_PROCESSES"]), int(given["JAX_PROCESS_ID"])
    if not 0 <= i < n:
        raise ValueError(f"process id {i} is outside 0..{n - 1} (num_processes={n})")
    jax.distributed.initialize(given["JAX_COORDINATOR_ADDRESS"], n, i, heartbeat_timeout_seconds=heartbeat_timeout_s)
    return True


def is_lead() -> bool:
    """Process 0: the one that writes logs, metrics and run files, and shows progress."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(x):
    """A global array as numpy, gathered across processes when it spans several."""
    if getattr(x, "is_fully_addressable", True):
        return jax.device_get(x)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)
