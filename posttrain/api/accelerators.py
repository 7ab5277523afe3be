"""The accelerator catalogue: which TPU topologies and GPU shapes exist, and how they map to hosts.

Pure data and pure functions, shared by API validation (a topology must exist), the renderer
(node selectors, host counts, chips per pod) and the test cluster's node-pool provisioner.
Values are GKE's (cloud.google.com/gke-tpu-accelerator, cloud.google.com/gke-accelerator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Accelerator = Literal[
    "tpu-v4",
    "tpu-v5e",
    "tpu-v5p",
    "tpu-v6e",
    "nvidia-h100",
    "nvidia-h200",
    "nvidia-a100",
    "nvidia-l4",
    "cpu",
]
ACCELERATORS: tuple[str, ...] = Accelerator.__args__  # type: ignore[attr-defined]

# Multi-host TPU slices always have 4 chips per host (VM); a single-host slice puts all its
# chips (1, 4 or 8) on one host.
MULTI_HOST_CHIPS_PER_HOST = 4


@dataclass(frozen=True)
class TpuGeneration:
    name: str  # our name, e.g. "tpu-v5e"
    gke_accelerator: str  # cloud.google.com/gke-tpu-accelerator
    topologies: tuple[str, ...]  # every topology GKE offers for this generation
    single_host: tuple[str, ...]  # topologies served by one host


TPU_GENERATIONS: dict[str, TpuGeneration] = {
    g.name: g
    for g in (
        TpuGeneration(
            "tpu-v4",
            "tpu-v4-podslice",
            (
                "2x2x1",
                "2x2x2",
                "2x2x4",
                "2x4x4",
                "4x4x4",
                "4x4x8",
                "4x8x8",
                "8x8x8",
                "8x8x12",
                "8x8x16",
                "8x16x16",
                "12x16x16",
                "16x16x16",
            ),
            ("2x2x1",),
        ),
        TpuGeneration(
            "tpu-v5e",
            "tpu-v5-lite-podslice",
            ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
            ("1x1", "2x2", "2x4"),
        ),
        TpuGeneration(
            "tpu-v5p",
            "tpu-v5p-slice",
            (
                "2x2x1",
                "2x2x2",
                "2x2x4",
                "2x4x4",
                "4x4x4",
                "4x4x8",
                "4x8x8",
                "8x8x8",
                "8x8x16",
                "8x16x16",
                "16x16x16",
                "16x16x24",
            ),
            ("2x2x1",),
        ),
        TpuGeneration(
            "tpu-v6e",
            "tpu-v6e-slice",
            ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
            ("1x1", "2x2", "2x4"),
        ),
    )
}

# cloud.google.com/gke-accelerator values and the most GPUs GKE puts on one node of that type.
GPU_TYPES: dict[str, tuple[str, int]] = {
    "nvidia-h100": ("nvidia-h100-80gb", 8),
    "nvidia-h200": ("nvidia-h200-141gb", 8),
    "nvidia-a100": ("nvidia-tesla-a100", 16),
    "nvidia-l4": ("nvidia-l4", 8),
}


@dataclass(frozen=True)
class SliceShape:
    """What one TPU slice needs: `hosts` pods, each asking for `chips_per_host` chips."""

    chips: int
    hosts: int
    chips_per_host: int


def is_tpu(accelerator: str) -> bool:
    return accelerator in TPU_GENERATIONS


def is_gpu(accelerator: str) -> bool:
    return accelerator in GPU_TYPES


def topology_chips(topology: str) -> int:
    return math.prod(int(d) for d in topology.split("x"))


# GKE's 4-chip machine type of the generations whose 8-chip single-host topology (2x4) also
# comes as two 4-chip hosts. Both shapes carry the same accelerator and topology labels, so a
# job that wants two hosts must also select the machine type, or its pods could land together on
# an idle 8-chip host.
FOUR_CHIP_MACHINE = {"tpu-v5e": "ct5lp-hightpu-4t", "tpu-v6e": "ct6e-standard-4t"}
GKE_INSTANCE_TYPE = "node.kubernetes.io/instance-type"


def host_machine_selector(accelerator: str, topology: str, chips_per_host: int) -> dict[str, str]:
    """The extra node selector for a single-host topology run on several smaller hosts."""
    if topology in TPU_GENERATIONS[accelerator].single_host and chips_per_host < topology_chips(
        topology
    ):
        return {GKE_INSTANCE_TYPE: FOUR_CHIP_MACHINE[accelerator]}
    return {}


def chips_per_host_choices(accelerator: str, topology: str) -> tuple[int, ...]:
    """What `resources.chipsPerHost` may be, the default first: GKE serves a single-host
    topology of 8 chips (v5e/v6e 2x4) also as two 4-chip hosts (the shape xpk trains on)."""
    gen = TPU_GENERATIONS[accelerator]
    chips = topology_chips(topology)
    if topology not in gen.single_host:
        return (MULTI_HOST_CHIPS_PER_HOST,)
    if chips > MULTI_HOST_CHIPS_PER_HOST:
        return (chips, MULTI_HOST_CHIPS_PER_HOST)
    return (chips,)


def tpu_slice_shape(
    accelerator: str, topology: str, chips_per_host: int | None = None
) -> SliceShape:
    """Hosts and chips for one slice; raises ValueError listing the valid topologies (or, for
    `chips_per_host`, the valid host sizes)."""
    gen = TPU_GENERATIONS.get(accelerator)
    if gen is None:
        raise ValueError(f"{accelerator!r} is not a TPU; TPUs: {', '.join(TPU_GENERATIONS)}")
    if topology not in gen.topologies:
        raise ValueError(
            f"{topology!r} is not a {accelerator} topology; valid: {', '.join(gen.topologies)}"
        )
    chips = topology_chips(topology)
    choices = chips_per_host_choices(accelerator, topology)
    per_host = choices[0] if chips_per_host is None else chips_per_host
    if per_host not in choices:
        raise ValueError(
            f"{accelerator} {topology} comes with {' or '.join(map(str, choices))} chips per host, "
            f"not {per_host}"
        )
    return SliceShape(chips=chips, hosts=chips // per_host, chips_per_host=per_host)


def tpu_generation_for_gke_label(gke_accelerator: str) -> TpuGeneration | None:
    """The generation behind a cloud.google.com/gke-tpu-accelerator value (for node pools)."""
    return next((g for g in TPU_GENERATIONS.values() if g.gke_accelerator == gke_accelerator), None)


def gpu_type_for_gke_label(gke_accelerator: str) -> str | None:
    return next((name for name, (label, _) in GPU_TYPES.items() if label == gke_accelerator), None)
