"""Batch geometry against the devices of spec.resources: what the trainer would refuse at its
first step (trainer/loop.py `_check_rows`, `make_mesh`) is refused from the spec alone."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from posttrain.api import load_documents, parse_job
from posttrain.api.geometry import check_geometry, device_count, geometry
from posttrain.api.v1alpha1 import FieldValueError

ROOT = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "apiVersion": "posttrain.dev/v1alpha1",
    "kind": "PostTrainJob",
    "metadata": {"name": "t"},
    "spec": {
        "algorithm": "sft",
        "model": {"base": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
        "data": {"train": "gs://b/train.jsonl"},
        "training": {"steps": 10},
        "resources": {"accelerator": "tpu-v5e", "topology": "2x4"},
        "output": {"dir": "gs://b/runs/t"},
    },
}


def spec(training: dict[str, Any] | None = None, resources: dict[str, Any] | None = None, **more):
    doc = copy.deepcopy(BASE)
    doc["spec"]["training"].update(training or {})
    if resources is not None:
        doc["spec"]["resources"] = resources
    doc["spec"].update(more)
    return parse_job(doc).spec


def refused(s: Any) -> FieldValueError:
    with pytest.raises(FieldValueError) as info:
        check_geometry(s)
    return info.value


def test_every_example_passes() -> None:
    paths = sorted(ROOT.glob("examples/*.yaml")) + sorted(ROOT.glob("examples/local/*.yaml"))
    assert len(paths) > 10
    for path in paths:
        for doc in load_documents(path):
            check_geometry(parse_job(doc).spec)


@pytest.mark.parametrize(
    "resources, devices",
    [
        ({"accelerator": "tpu-v5e", "topology": "2x4"}, 8),
        ({"accelerator": "tpu-v5e", "topology": "2x4", "chipsPerHost": 4}, 8),
        ({"accelerator": "tpu-v5p", "topology": "2x2x2", "slices": 3}, 24),
        ({"accelerator": "nvidia-h100", "nodes": 2}, 16),
        ({"accelerator": "nvidia-l4", "nodes": 3, "gpusPerNode": 2}, 6),
        ({"accelerator": "cpu", "nodes": 3}, 3),
    ],
)
def test_device_count(resources: dict[str, Any], devices: int) -> None:
    assert device_count(spec(resources=resources))[0] == devices


def test_cpu_counts_forced_host_devices() -> None:
    env = [{"name": "XLA_FLAGS", "value": "--xla_force_host_platform_device_count=4 --foo"}]
    s = spec(resources={"accelerator": "cpu", "nodes": 2}, env=env)
    assert device_count(s)[0] == 8


def test_batch_not_dividing_the_topology_names_batch_size() -> None:
    err = refused(spec({"batchSize": 12}))  # 8 chips
    assert err.field == "spec.training.batchSize"
    assert "8 data-parallel devices" in str(err) and "tpu-v5e 2x4" in str(err)
    assert "multiple of 8" in str(err)
    check_geometry(spec({"batchSize": 16}))


def test_micro_batch_not_dividing_the_devices_names_micro_batch_size() -> None:
    err = refused(spec({"batchSize": 32, "microBatchSize": 4}))  # 4 rows over 8 chips
    assert err.field == "spec.training.microBatchSize"
    assert "multiple of 8" in str(err)
    check_geometry(spec({"batchSize": 32, "microBatchSize": 8}))


def test_micro_batch_must_divide_the_batch() -> None:
    # the model refuses it too (TrainingSpec); check_geometry says the same on its own
    s = spec({"batchSize": 32, "microBatchSize": 8})
    s = s.model_copy(update={"training": s.training.model_copy(update={"micro_batch_size": 12})})
    assert refused(s).field == "spec.training.microBatchSize"


def test_tensor_parallelism_leaves_fewer_data_parallel_devices() -> None:
    s = spec({"batchSize": 4, "mesh": {"data": 1, "fsdp": -1, "tensor": 2}})  # 8 / 2 = 4
    assert geometry(s).data_parallel == 4
    check_geometry(s)
    err = refused(spec({"batchSize": 6, "mesh": {"data": 1, "fsdp": -1, "tensor": 2}}))
    assert err.field == "spec.training.batchSize" and "mesh tensor 2" in str(err)


def test_mesh_must_fit_the_devices() -> None:
    err = refused(spec({"mesh": {"data": 2, "fsdp": 2, "tensor": 1}}))  # 4 != 8
    assert err.field == "spec.training.mesh" and "needs 4 devices" in str(err)
    err = refused(spec({"mesh": {"data": 3, "fsdp": -1, "tensor": 1}}))
    assert err.field == "spec.training.mesh" and "does not divide" in str(err)


def test_grpo_rows_are_batch_times_generations() -> None:
    rewards = [{"builtin": "math-answer"}]
    # 2 prompts x 4 generations = 8 rows over 8 chips: runs
    s = spec({"batchSize": 2}, algorithm="grpo", grpo={"numGenerations": 4, "rewards": rewards})
    assert geometry(s).rows_per_step == 8
    check_geometry(s)
    # 3 x 4 = 12 rows: does not divide over 8; batchSize must be a multiple of 2
    s = spec({"batchSize": 3}, algorithm="grpo", grpo={"numGenerations": 4, "rewards": rewards})
    err = refused(s)
    assert err.field == "spec.training.batchSize"
    assert "grpo.numGenerations 4 = 12 rows" in str(err) and "multiple of 2" in str(err)
    # Each algorithm's block by its YAML name; DAPO's numGenerations default (8) counts too.
    s = spec(
        {"batchSize": 3}, algorithm="dr-grpo", drGrpo={"numGenerations": 4, "rewards": rewards}
    )
    assert "drGrpo.numGenerations 4 = 12 rows" in str(refused(s))
    s = spec({"batchSize": 3}, algorithm="dapo", dapo={"rewards": rewards})
    assert geometry(s).rows_per_step == 24
    # micro-batches of 1 prompt x 4 = 4 rows do not divide over 8
    s = spec(
        {"batchSize": 4, "microBatchSize": 1},
        algorithm="grpo",
        grpo={"numGenerations": 4, "rewards": rewards},
    )
    assert refused(s).field == "spec.training.microBatchSize"
