"""The TPU/GPU catalogue: every topology's host count and chips per host."""

from __future__ import annotations

import math

import pytest

from posttrain.api import accelerators as acc

ALL_TOPOLOGIES = [(g.name, t) for g in acc.TPU_GENERATIONS.values() for t in g.topologies]


@pytest.mark.parametrize(("accelerator", "topology"), ALL_TOPOLOGIES)
def test_hosts_times_chips_per_host_is_the_slice(accelerator: str, topology: str) -> None:
    shape = acc.tpu_slice_shape(accelerator, topology)
    assert shape.chips == math.prod(int(d) for d in topology.split("x"))
    assert shape.hosts * shape.chips_per_host == shape.chips
    if topology in acc.TPU_GENERATIONS[accelerator].single_host:
        assert shape.hosts == 1
    else:
        assert shape.chips_per_host == 4 and shape.hosts > 1


@pytest.mark.parametrize(
    ("accelerator", "topology", "hosts", "per_host"),
    [
        ("tpu-v5e", "1x1", 1, 1),
        ("tpu-v5e", "2x4", 1, 8),
        ("tpu-v5e", "4x4", 4, 4),
        ("tpu-v5e", "16x16", 64, 4),
        ("tpu-v6e", "8x16", 32, 4),
        ("tpu-v4", "2x2x1", 1, 4),
        ("tpu-v4", "2x2x4", 4, 4),
        ("tpu-v5p", "4x4x8", 32, 4),
    ],
)
def test_known_shapes(accelerator: str, topology: str, hosts: int, per_host: int) -> None:
    shape = acc.tpu_slice_shape(accelerator, topology)
    assert (shape.hosts, shape.chips_per_host) == (hosts, per_host)


def test_unknown_topology_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"valid: 2x2x1, 2x2x2"):
        acc.tpu_slice_shape("tpu-v5p", "2x2")


def test_gke_labels_round_trip() -> None:
    for gen in acc.TPU_GENERATIONS.values():
        assert acc.tpu_generation_for_gke_label(gen.gke_accelerator) is gen
    for name, (label, _) in acc.GPU_TYPES.items():
        assert acc.gpu_type_for_gke_label(label) == name
    assert acc.tpu_generation_for_gke_label("tpu-v9") is None
