"""The contract between the operator's pods and the trainer's distributed initialisation.

The renderer puts these environment variables on every trainer pod; `posttrain run
--processes N` sets the same ones for local processes; the trainer reads them back with
`ProcessTopology.from_env`. Pure: no JAX, no Kubernetes client.

Per pod the renderer sets (names below):
  POSTTRAIN_COORDINATOR_ADDRESS  host:port of process 0 (pod 0 of slice 0, via the JobSet's
                                 headless service), where jax.distributed's coordinator listens
  POSTTRAIN_NUM_SLICES           slices (JobSet replicas); 1 for GPU and CPU jobs
  POSTTRAIN_HOSTS_PER_SLICE      pods per slice (TPU hosts, or GPU/CPU nodes)
  POSTTRAIN_SLICE_ID             this pod's slice: the JobSet job index (downward API)
  POSTTRAIN_HOST_ID              this pod's index in its slice: the Job completion index
  POSTTRAIN_RECIPE               path of the mounted recipe (the PostTrainJob manifest)
  POSTTRAIN_JOB_NAME, POSTTRAIN_NAMESPACE   which PostTrainJob to report progress to
Async RL (spec.rollout.mode async) adds a role to every pod:
  POSTTRAIN_ROLE                 trainer (the default when unset) or rollout
  POSTTRAIN_TRAINER_ADDRESS      host:port of the trainer's rollout service (process 0 of the
                                 trainer role): weights out, trajectories in (trainer/async_rl/)
  POSTTRAIN_ROLLOUT_WORKER       a rollout worker's index, 0..replicas-1 (its JobSet job index)
A rollout worker is one process: it gets no coordinator variables.
On multislice TPU also MEGASCALE_COORDINATOR_ADDRESS, MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID
and MEGASCALE_PORT, which libtpu reads to join slices over DCN.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

COORDINATOR_ADDRESS = "POSTTRAIN_COORDINATOR_ADDRESS"
NUM_SLICES = "POSTTRAIN_NUM_SLICES"
HOSTS_PER_SLICE = "POSTTRAIN_HOSTS_PER_SLICE"
SLICE_ID = "POSTTRAIN_SLICE_ID"
HOST_ID = "POSTTRAIN_HOST_ID"
RECIPE = "POSTTRAIN_RECIPE"
JOB_NAME = "POSTTRAIN_JOB_NAME"
NAMESPACE = "POSTTRAIN_NAMESPACE"

# libtpu's multislice (DCN) variables, set on every pod of a multislice TPU job.
MEGASCALE_COORDINATOR_ADDRESS = "MEGASCALE_COORDINATOR_ADDRESS"  # host of slice 0, host 0
MEGASCALE_NUM_SLICES = "MEGASCALE_NUM_SLICES"
MEGASCALE_SLICE_ID = "MEGASCALE_SLICE_ID"
MEGASCALE_PORT_ENV = "MEGASCALE_PORT"

ROLE = "POSTTRAIN_ROLE"
TRAINER_ADDRESS = "POSTTRAIN_TRAINER_ADDRESS"
ROLLOUT_WORKER = "POSTTRAIN_ROLLOUT_WORKER"
ROLE_TRAINER, ROLE_ROLLOUT = "trainer", "rollout"

COORDINATOR_PORT = 8476  # jax.distributed's coordinator (the port MaxText and GKE docs use)
MEGASCALE_PORT = 8080  # libtpu's DCN coordination port on multislice
ROLLOUT_PORT = 8477  # the trainer's rollout service (async RL): weights and trajectories
RECIPE_PATH = "/etc/posttrain/recipe.yaml"
# The trainer's exit code for a configuration error (a bad recipe, an algorithm it cannot run):
# sysexits' EX_CONFIG. The JobSet fails at once on it instead of restarting (render.py).
EXIT_CONFIG = 78


@dataclass(frozen=True)
class ProcessTopology:
    """Where this process sits in the whole job: `num_slices x hosts_per_slice` processes."""

    coordinator_address: str | None
    num_slices: int = 1
    hosts_per_slice: int = 1
    slice_id: int = 0
    host_id: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.slice_id < self.num_slices):
            raise ValueError(f"{SLICE_ID}={self.slice_id} outside 0..{self.num_slices - 1}")
        if not (0 <= self.host_id < self.hosts_per_slice):
            raise ValueError(f"{HOST_ID}={self.host_id} outside 0..{self.hosts_per_slice - 1}")

    @property
    def num_processes(self) -> int:
        return self.num_slices * self.hosts_per_slice

    @property
    def process_id(self) -> int:
        """Slice-major: slice 0's hosts are processes 0..H-1, slice 1's are H..2H-1, ..."""
        return self.slice_id * self.hosts_per_slice + self.host_id

    @property
    def is_distributed(self) -> bool:
        return self.num_processes > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProcessTopology:
        def number(name: str, default: int) -> int:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None

        return cls(
            coordinator_address=env.get(COORDINATOR_ADDRESS) or None,
            num_slices=number(NUM_SLICES, 1),
            hosts_per_slice=number(HOSTS_PER_SLICE, 1),
            slice_id=number(SLICE_ID, 0),
            host_id=number(HOST_ID, 0),
        )

    def to_env(self) -> dict[str, str]:
        env = {
            NUM_SLICES: str(self.num_slices),
            HOSTS_PER_SLICE: str(self.hosts_per_slice),
            SLICE_ID: str(self.slice_id),
            HOST_ID: str(self.host_id),
        }
        if self.coordinator_address:
            env[COORDINATOR_ADDRESS] = self.coordinator_address
        return env
