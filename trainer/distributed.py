"""Joining the other hosts: jax.distributed from the environment the operator (or
``posttrain run --processes N``) sets, per the contract in ``posttrain.runtime``.

- POSTTRAIN_* variables with more than one process: ``jax.distributed.initialize(coordinator,
  num_processes, process_id)``; process 0 hosts the coordinator.
- A multi-host TPU slice on GKE without them: ``jax.distributed.initialize()`` with no arguments,
  which reads what GKE and libtpu inject (TPU_WORKER_HOSTNAMES, TPU_WORKER_ID, ...).
- Otherwise a single process: nothing to do.
CPU processes talk over gloo (cross-process CPU collectives), which is how multi-host runs are
tested on one machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from posttrain.runtime import COORDINATOR_ADDRESS, ProcessTopology


def _gke_multihost_tpu(env: Mapping[str, str]) -> bool:
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def initialize(env: Mapping[str, str] = os.environ) -> ProcessTopology:
    """Initialise jax.distributed when this is one process of several; returns the topology."""
    topology = ProcessTopology.from_env(env)
    import jax

    if topology.is_distributed:
        if not topology.coordinator_address:
            raise ValueError(
                f"{topology.num_processes} processes but {COORDINATOR_ADDRESS} is not set"
            )
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=topology.coordinator_address,
            num_processes=topology.num_processes,
            process_id=topology.process_id,
        )
    elif _gke_multihost_tpu(env):
        jax.distributed.initialize()
    return topology
