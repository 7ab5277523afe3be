"""The local control plane (hack/cluster.sh) behaves like a real GKE cluster where it matters.

Everything here talks to real etcd, kube-apiserver, controllers, JobSet and kwok processes.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
TPU_TOLERATION = {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}


def wait_until(what: str, fn, timeout: float = 120, interval: float = 0.5):
    """Poll fn() until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")


def condition(obj: dict, type_: str) -> bool:
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == type_ and c["status"] == "True" for c in conds)


def pod_template(annotations=None, node_selector=None, tolerations=None, limits=None) -> dict:
    return {
        "metadata": {"annotations": annotations or {}},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": node_selector or {},
            "tolerations": tolerations or [],
            "containers": [
                {
                    "name": "main",
                    "image": "posttrain/trainer:test",
                    "resources": {"limits": limits or {}},
                }
            ],
        },
    }


def bare_pod(name: str, **template_args) -> dict:
    pod = {"apiVersion": "v1", "kind": "Pod", **pod_template(**template_args)}
    pod["metadata"]["name"] = name
    return pod


def jobset(name: str, replicated_jobs: list[dict], annotations=None, failure_policy=None) -> dict:
    spec: dict = {"replicatedJobs": replicated_jobs}
    if failure_policy:
        spec["failurePolicy"] = failure_policy
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": spec,
    }


def replicated_job(name: str, replicas: int, pods: int, template: dict) -> dict:
    return {
        "name": name,
        "replicas": replicas,
        "template": {
            "spec": {
                "parallelism": pods,
                "completions": pods,
                "backoffLimit": 0,
                "completionMode": "Indexed",
                "template": template,
            }
        },
    }


def apply(kubectl, obj: dict) -> None:
    kubectl("apply", "-f", "-", input=json.dumps(obj))


def get(kubectl, *args: str) -> dict:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def test_apiserver_is_ready_and_reports_pinned_version(cluster):
    assert cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    pinned = re.search(
        r"^\s*k8s\.io/kubernetes (v\S+)",
        (REPO / "hack/tools/kube/go.mod").read_text(),
        re.M,
    ).group(1)
    version = json.loads(cluster.kubectl("get", "--raw", "/version").stdout)
    assert version["gitVersion"] == pinned  # the ldflags reached the binary


def test_jobset_runs_to_completion_on_fake_nodes(kubectl):
    apply(
        kubectl,
        jobset(
            "two-by-two",
            [
                replicated_job("driver", 1, 2, pod_template()),
                replicated_job("workers", 1, 2, pod_template()),
            ],
        ),
    )
    js = wait_until(
        "JobSet two-by-two Completed",
        lambda: (lambda o: o if condition(o, "Completed") else None)(
            get(kubectl, "jobset", "two-by-two")
        ),
    )
    assert not condition(js, "Failed")
    pods = get(kubectl, "pods", "-l", "jobset.sigs.k8s.io/jobset-name=two-by-two")["items"]
    assert len(pods) == 4
    assert {p["status"]["phase"] for p in pods} == {"Succeeded"}
    nodes = {p["spec"]["nodeName"] for p in pods}
    for node in nodes:
        labels = get(kubectl, "node", node)["metadata"]["labels"]
        assert labels["cloud.google.com/gke-nodepool"] == "default-pool"
    # the JobSet webhook defaulted and labelled the children, as on a real cluster
    jobs = get(kubectl, "jobs", "-l", "jobset.sigs.k8s.io/jobset-name=two-by-two")["items"]
    assert sorted(j["metadata"]["name"] for j in jobs) == [
        "two-by-two-driver-0",
        "two-by-two-workers-0",
    ]


def test_tpu_pod_gets_a_new_pool_with_one_node_per_host(kubectl):
    selector = {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "4x4",  # 16 chips, 4 per host -> 4 hosts
    }
    pod = bare_pod(
        "tpu-host",
        annotations={"posttrain.dev/fake-run-seconds": "600"},
        node_selector=selector,
        tolerations=[TPU_TOLERATION],
        limits={"google.com/tpu": "4"},
    )
    apply(kubectl, pod)
    node_name = wait_until(
        "the TPU pod to be scheduled",
        lambda: get(kubectl, "pod", "tpu-host")["spec"].get("nodeName"),
        timeout=60,
    )
    node = get(kubectl, "node", node_name)
    pool = node["metadata"]["labels"]["cloud.google.com/gke-nodepool"]
    assert pool != "default-pool"
    assert node["status"]["allocatable"]["google.com/tpu"] == "4"
    assert {"key": "google.com/tpu", "value": "present", "effect": "NoSchedule"} in node["spec"][
        "taints"
    ]
    pool_nodes = get(kubectl, "nodes", "-l", f"cloud.google.com/gke-nodepool={pool}")["items"]
    assert len(pool_nodes) == 4
    for n in pool_nodes:
        assert n["metadata"]["labels"]["cloud.google.com/gke-tpu-topology"] == "4x4"
        assert condition(n, "Ready")  # kwok runs the new nodes
    assert get(kubectl, "pod", "tpu-host")["status"]["phase"] == "Running"


def test_gpu_job_gets_a_pool_with_a_node_per_pod(kubectl):
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "gpus"},
        "spec": {
            "parallelism": 2,
            "completions": 2,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": pod_template(
                node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
                limits={"nvidia.com/gpu": "8"},
            ),
        },
    }
    apply(kubectl, job)
    wait_until(
        "Job gpus Complete",
        lambda: condition(get(kubectl, "job", "gpus"), "Complete"),
        timeout=120,
    )
    pods = get(kubectl, "pods", "-l", "job-name=gpus")["items"]
    nodes = [get(kubectl, "node", p["spec"]["nodeName"]) for p in pods]
    assert len({n["metadata"]["name"] for n in nodes}) == 2  # 8 GPUs each: one pod per node
    for node in nodes:
        assert node["metadata"]["labels"]["cloud.google.com/gke-accelerator"] == "nvidia-h100-80gb"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert node["spec"]["taints"] == [
            {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
        ]
    # no toleration in the template: the ExtendedResourceToleration admission plugin added it
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pods[0][
        "spec"
    ]["tolerations"]


def test_multislice_jobset_gets_one_pool_per_slice(kubectl):
    selector = {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
        "cloud.google.com/gke-tpu-topology": "4x4",
    }
    # Exclusive placement keeps *running* slices apart, so the pods must outlive the check.
    template = pod_template(
        annotations={"posttrain.dev/fake-run-seconds": "600"},
        node_selector=selector,
        tolerations=[TPU_TOLERATION],
        limits={"google.com/tpu": "4"},
    )
    apply(
        kubectl,
        jobset(
            "multislice",
            [replicated_job("slice", 2, 4, template)],
            annotations={
                "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
            },
        ),
    )

    def running_pods() -> list[dict]:
        items = get(kubectl, "pods", "-l", "jobset.sigs.k8s.io/jobset-name=multislice")["items"]
        return [p for p in items if p["status"].get("phase") == "Running"]

    pods = wait_until(
        "8 running pods", lambda: (lambda ps: ps if len(ps) == 8 else None)(running_pods())
    )
    pools_of_job: dict[str, set[str]] = {}
    for p in pods:
        node = get(kubectl, "node", p["spec"]["nodeName"])
        pool = node["metadata"]["labels"]["cloud.google.com/gke-nodepool"]
        pools_of_job.setdefault(p["metadata"]["labels"]["job-name"], set()).add(pool)
    assert sorted(pools_of_job) == ["multislice-slice-0", "multislice-slice-1"]
    assert all(len(p) == 1 for p in pools_of_job.values()), pools_of_job  # a slice is one pool
    pool_0, pool_1 = (next(iter(p)) for p in pools_of_job.values())
    assert pool_0 != pool_1, pools_of_job  # and each slice has its own
    assert len(get(kubectl, "nodes", "-l", f"cloud.google.com/gke-nodepool={pool_0}")["items"]) == 4


def test_failing_pods_drive_jobset_through_restarts_to_failed(kubectl):
    template = pod_template(
        annotations={"posttrain.dev/fake-exit-code": "3", "posttrain.dev/fake-reason": "Error"}
    )
    apply(
        kubectl,
        jobset(
            "crashes",
            [replicated_job("workers", 1, 2, template)],
            failure_policy={"maxRestarts": 2},
        ),
    )
    js = wait_until(
        "JobSet crashes Failed",
        lambda: (lambda o: o if condition(o, "Failed") else None)(
            get(kubectl, "jobset", "crashes")
        ),
        timeout=180,
    )
    assert js["status"]["restarts"] == 2
    assert not condition(js, "Completed")
    # the fake container really reported the exit code a trainer crash would
    pods = get(kubectl, "pods", "-l", "jobset.sigs.k8s.io/jobset-name=crashes")["items"]
    terminated = [
        cs["state"]["terminated"] for p in pods for cs in p["status"].get("containerStatuses", [])
    ]
    assert terminated and all(t["exitCode"] == 3 and t["reason"] == "Error" for t in terminated)


def test_fake_run_seconds_keeps_pod_running(kubectl):
    apply(kubectl, bare_pod("sleeper", annotations={"posttrain.dev/fake-run-seconds": "6"}))
    wait_until(
        "the pod to run",
        lambda: get(kubectl, "pod", "sleeper")["status"].get("phase") == "Running",
        timeout=30,
    )
    started = time.monotonic()
    time.sleep(2)
    assert get(kubectl, "pod", "sleeper")["status"]["phase"] == "Running"
    wait_until(
        "the pod to succeed",
        lambda: get(kubectl, "pod", "sleeper")["status"].get("phase") == "Succeeded",
        timeout=30,
    )
    assert time.monotonic() - started >= 3


def test_jobset_suspends_mid_run_and_resumes(kubectl):
    template = pod_template(annotations={"posttrain.dev/fake-run-seconds": "600"})
    apply(kubectl, jobset("long", [replicated_job("workers", 1, 2, template)]))

    def pods(phase: str) -> list[dict]:
        items = get(kubectl, "pods", "-l", "jobset.sigs.k8s.io/jobset-name=long")["items"]
        return [p for p in items if p["status"].get("phase") == phase]

    wait_until("2 running pods", lambda: len(pods("Running")) == 2, timeout=60)
    kubectl("patch", "jobset", "long", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_until(
        "JobSet long Suspended with its pods deleted",
        lambda: (
            condition(get(kubectl, "jobset", "long"), "Suspended")
            and not get(kubectl, "pods", "-l", "jobset.sigs.k8s.io/jobset-name=long")["items"]
        ),
        timeout=60,
    )
    kubectl("patch", "jobset", "long", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_until("2 running pods again", lambda: len(pods("Running")) == 2, timeout=60)


def test_garbage_collector_cascades_owner_deletion(kubectl):
    kubectl("create", "configmap", "owner")
    uid = get(kubectl, "configmap", "owner")["metadata"]["uid"]
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
            ],
        },
    }
    apply(kubectl, dependent)
    kubectl("delete", "configmap", "owner")
    wait_until(
        "the garbage collector to delete the dependent",
        lambda: kubectl("get", "configmap", "dependent", check=False).returncode != 0,
        timeout=60,
    )
