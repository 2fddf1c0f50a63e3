"""Multi-process start-up: `jax.distributed.initialize()` behind a flag."""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "UNCLIP_COORDINATOR"  # host:port of process 0
ENV_NUM_PROCESSES = "UNCLIP_NUM_PROCESSES"
ENV_PROCESS_ID = "UNCLIP_PROCESS_ID"


def initialize_distributed(
    *,
    enabled: bool,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins the processes of a multi-host run into one JAX runtime; must run before any JAX op.

    On TPU (and on clusters JAX detects, e.g. SLURM) the arguments may all be None. On CPU/GPU
    they come from the arguments or from UNCLIP_COORDINATOR, UNCLIP_NUM_PROCESSES and
    UNCLIP_PROCESS_ID. Does nothing unless `enabled`.
    """
    if not enabled:
        return
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and ENV_NUM_PROCESSES in os.environ:
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and ENV_PROCESS_ID in os.environ:
        process_id = int(os.environ[ENV_PROCESS_ID])
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ValueError(
            "a multi-process run outside TPU needs all of --coordinator, --num-processes and "
            f"--process-id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got "
            f"coordinator={coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}"
        )
    if coordinator_address is None:
        jax.distributed.initialize()  # TPU pods and auto-detected clusters
    else:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
