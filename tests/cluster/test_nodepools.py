"""The node-pool shapes the local provisioner makes (pure functions, no cluster needed)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[2] / "hack" / "nodepool_provisioner.py"
_spec = importlib.util.spec_from_file_location("nodepool_provisioner", _path)
np_ = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = np_  # dataclasses look their module up there
_spec.loader.exec_module(np_)


@pytest.mark.parametrize(
    "accelerator, topology, hosts, chips_per_host, machine",
    [
        # v5e / v6e single-host slices: all chips on one VM
        ("tpu-v5-lite-podslice", "1x1", 1, 1, "ct5lp-hightpu-1t"),
        ("tpu-v5-lite-podslice", "2x2", 1, 4, "ct5lp-hightpu-4t"),
        ("tpu-v5-lite-podslice", "2x4", 1, 8, "ct5lp-hightpu-8t"),
        ("tpu-v6e-slice", "2x4", 1, 8, "ct6e-standard-8t"),
        # multi-host: 4 chips per host
        ("tpu-v5-lite-podslice", "4x4", 4, 4, "ct5lp-hightpu-4t"),
        ("tpu-v5-lite-podslice", "4x8", 8, 4, "ct5lp-hightpu-4t"),
        ("tpu-v6e-slice", "16x16", 64, 4, "ct6e-standard-4t"),
        ("tpu-v4-podslice", "2x2x1", 1, 4, "ct4p-hightpu-4t"),
        ("tpu-v4-podslice", "2x2x2", 2, 4, "ct4p-hightpu-4t"),
        ("tpu-v5p-slice", "2x2x4", 4, 4, "ct5p-hightpu-4t"),
        ("tpu-v5p-slice", "4x4x4", 16, 4, "ct5p-hightpu-4t"),
    ],
)
def test_tpu_slice_shape(accelerator, topology, hosts, chips_per_host, machine):
    shape = np_.tpu_slice_shape(accelerator, topology)
    assert (shape.hosts, shape.chips_per_host, shape.machine_type) == (
        hosts,
        chips_per_host,
        machine,
    )
    dims = [int(d) for d in topology.split("x")]
    assert shape.chips == math.prod(dims)


def test_a_2x4_whose_pods_ask_for_4_chips_is_two_hosts():
    # resources.chipsPerHost: 4 renders pods asking for 4 chips each (GKE's -4t machines)
    shape = np_.tpu_slice_shape("tpu-v5-lite-podslice", "2x4", chips_per_pod=4)
    assert (shape.hosts, shape.chips_per_host, shape.machine_type) == (2, 4, "ct5lp-hightpu-4t")
    assert np_.tpu_slice_shape("tpu-v6e-slice", "2x4", chips_per_pod=8).hosts == 1
    assert np_.tpu_slice_shape("tpu-v5-lite-podslice", "2x2", chips_per_pod=4).hosts == 1


@pytest.mark.parametrize(
    "accelerator, topology, match",
    [
        ("tpu-v9-imaginary", "2x2", "unknown TPU accelerator"),
        ("tpu-v5-lite-podslice", "2x2x1", "2-dimensional"),  # v5e is a 2D torus
        ("tpu-v4-podslice", "2x2", "3-dimensional"),
        ("tpu-v5-lite-podslice", "1x2", "not a multiple of 4"),  # not a GKE shape
        ("tpu-v5-lite-podslice", "axb", "not of the form"),
    ],
)
def test_tpu_slice_shape_rejects(accelerator, topology, match):
    with pytest.raises(ValueError, match=match):
        np_.tpu_slice_shape(accelerator, topology)


def test_tpu_pool_nodes_look_like_gke():
    nodes = np_.tpu_pool_nodes("nap-v5-lite-4x4-abc", "tpu-v5-lite-podslice", "4x4")
    assert len(nodes) == 4
    for node in nodes:
        labels = node["metadata"]["labels"]
        assert labels["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5-lite-podslice"
        assert labels["cloud.google.com/gke-tpu-topology"] == "4x4"
        assert labels["cloud.google.com/gke-nodepool"] == "nap-v5-lite-4x4-abc"
        assert node["status"]["capacity"]["google.com/tpu"] == "4"
        assert {"key": "google.com/tpu", "value": "present", "effect": "NoSchedule"} in node[
            "spec"
        ]["taints"]
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert len({n["metadata"]["name"] for n in nodes}) == 4


def test_gpu_pool_nodes():
    nodes = np_.gpu_pool_nodes("nap-h100-x", "nvidia-h100-80gb", nodes=2, requested_per_pod=8)
    assert len(nodes) == 2
    assert nodes[0]["metadata"]["labels"]["cloud.google.com/gke-accelerator"] == "nvidia-h100-80gb"
    assert nodes[0]["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert nodes[0]["spec"]["taints"] == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    ]
    # a pod asking for more than the usual machine still gets a node that fits it
    assert np_.gpu_machine("nvidia-tesla-t4", 8) == ("n1-standard-16", 8)
    with pytest.raises(ValueError, match="unknown GPU accelerator"):
        np_.gpu_machine("nvidia-rtx-9999", 1)


def _pod(selector, owner=None):
    meta = {"name": "p", "namespace": "ns", "uid": "pod-uid"}
    if owner:
        meta["ownerReferences"] = [
            {"kind": owner, "name": "j", "uid": "owner-uid", "controller": True}
        ]
    return {"metadata": meta, "spec": {"nodeSelector": selector}}


def test_pool_request_and_group():
    tpu = {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
        "cloud.google.com/gke-tpu-topology": "4x4",
    }
    assert np_.pool_request(_pod(tpu)) == ("tpu", "tpu-v6e-slice", "4x4")
    assert np_.pool_request(_pod({"cloud.google.com/gke-accelerator": "nvidia-l4"})) == (
        "gpu",
        "nvidia-l4",
        "",
    )
    # a JobSet follower pinned to its leader's pool must not get a pool of its own
    assert np_.pool_request(_pod({**tpu, "cloud.google.com/gke-nodepool": "nap-x"})) is None
    assert np_.pool_request(_pod({"kubernetes.io/os": "linux"})) is None
    # the pods of one Job are one slice; a bare pod is its own group
    assert np_.group_key(_pod(tpu, owner="Job")) == "job/owner-uid"
    assert np_.group_key(_pod(tpu, owner="ReplicaSet")) == "pod/pod-uid"
    assert np_.group_key(_pod(tpu)) == "pod/pod-uid"
