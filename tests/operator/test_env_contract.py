"""The env contract on both sides: what render puts on each pod, resolved as the kubelet would
against the metadata JobSet and the Job controller give each pod, read back by the trainer's
`ProcessTopology.from_env`: distinct process ids 0..N-1, one coordinator, the right slice."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from posttrain import runtime
from posttrain.api import parse_job
from posttrain.operator import render as r

from .podenv import resolve_env
from .test_render import BASE


def simulated_pods(jobset: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    """Pods as JobSet v0.10's constructJob + the Job controller make them (metadata, hostname)."""
    pods = []
    js_name = jobset["metadata"]["name"]
    subdomain = jobset["spec"]["network"]["subdomain"]
    for rjob in jobset["spec"]["replicatedJobs"]:
        for job_idx in range(rjob["replicas"]):
            job_name = f"{js_name}-{rjob['name']}-{job_idx}"
            template = rjob["template"]["spec"]["template"]
            for pod_idx in range(rjob["template"]["spec"]["completions"]):
                keys = {
                    "jobset.sigs.k8s.io/jobset-name": js_name,
                    "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"],
                    "jobset.sigs.k8s.io/replicatedjob-replicas": str(rjob["replicas"]),
                    "jobset.sigs.k8s.io/job-index": str(job_idx),
                    "jobset.sigs.k8s.io/restart-attempt": "0",
                }
                meta = copy.deepcopy(template["metadata"])
                meta["name"] = f"{job_name}-{pod_idx}-abcde"
                meta["namespace"] = namespace
                meta["labels"] = {**meta.get("labels", {}), **keys}
                meta["annotations"] = {
                    **meta.get("annotations", {}),
                    **keys,
                    "batch.kubernetes.io/job-completion-index": str(pod_idx),
                }
                pods.append(
                    {
                        "metadata": meta,
                        "spec": {
                            **template["spec"],
                            "hostname": f"{job_name}-{pod_idx}",
                            "subdomain": subdomain,
                        },
                    }
                )
    return pods


def check_contract(jobset: dict[str, Any], pods: list[dict[str, Any]]) -> None:
    """Every pod's env, resolved, gives a distinct process id; all agree on the coordinator,
    which is the DNS name of pod 0 of slice 0; MEGASCALE_* agree with the slice id."""
    topologies = []
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        env = resolve_env(container["env"], pod["metadata"])
        topo = runtime.ProcessTopology.from_env(env)
        topologies.append((pod, env, topo))
        assert env[runtime.JOB_NAME] == jobset["metadata"]["name"]
        assert env[runtime.NAMESPACE] == pod["metadata"]["namespace"]
        assert env[runtime.RECIPE] == runtime.RECIPE_PATH
        if topo.num_slices > 1:
            assert env[runtime.MEGASCALE_SLICE_ID] == str(topo.slice_id)
            assert env[runtime.MEGASCALE_NUM_SLICES] == str(topo.num_slices)
            assert env[runtime.MEGASCALE_PORT_ENV] == str(runtime.MEGASCALE_PORT)
    n = len(pods)
    assert sorted(t.process_id for _, _, t in topologies) == list(range(n))
    assert {t.num_processes for _, _, t in topologies} == {n}
    (rank0,) = [p for p, _, t in topologies if t.process_id == 0]
    host0 = f"{rank0['spec']['hostname']}.{rank0['spec']['subdomain']}"
    assert {t.coordinator_address for _, _, t in topologies} == {
        f"{host0}:{runtime.COORDINATOR_PORT}"
    }
    megascale = {e.get(runtime.MEGASCALE_COORDINATOR_ADDRESS) for _, e, _ in topologies}
    assert megascale == ({host0} if topologies[0][2].num_slices > 1 else {None})
    # The slice id is the JobSet job index: all hosts of a slice are in the same child Job.
    for pod, _, topo in topologies:
        assert pod["metadata"]["labels"]["jobset.sigs.k8s.io/job-index"] == str(topo.slice_id)


@pytest.mark.parametrize(
    "resources",
    [
        {"accelerator": "tpu-v5p", "topology": "4x4x4", "slices": 4},  # 4 x 16 hosts
        {"accelerator": "tpu-v5e", "topology": "4x8", "slices": 2},  # 2 x 8 hosts
        {"accelerator": "tpu-v6e", "topology": "2x4", "slices": 3},  # 3 x 1 host
        {"accelerator": "tpu-v4", "topology": "2x2x2"},  # 1 x 2 hosts
        {"accelerator": "tpu-v5e", "topology": "1x1"},
        {"accelerator": "nvidia-h100", "nodes": 4},
        {"accelerator": "cpu", "nodes": 3},
    ],
    ids=lambda res: "-".join(str(v) for v in res.values()),
)
def test_rendered_env_forms_one_job(resources: dict[str, Any]) -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"]["resources"] = resources
    doc["spec"]["training"]["batchSize"] = 768  # divides over every device count above
    jobset = r.render(parse_job(doc))[1]
    check_contract(jobset, simulated_pods(jobset, "ml"))


def test_the_fields_read_are_the_ones_jobset_and_job_set() -> None:
    """Spelled out: a rename on either side breaks this, not a cluster run."""
    jobset = r.render(parse_job(BASE))[1]
    env = {
        e["name"]: e
        for e in jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    assert env[runtime.SLICE_ID]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['jobset.sigs.k8s.io/job-index']"
    )
    assert env[runtime.HOST_ID]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )


ROLLOUT_JOB_DOC = {
    "algorithm": "grpo",
    "grpo": {"rewards": [{"builtin": "math-answer", "answerField": "answer"}]},
    "training": {"steps": 10, "batchSize": 8},
}


@pytest.mark.parametrize(
    "trainer, rollout",
    [
        ({"accelerator": "tpu-v5e", "topology": "2x4"}, {"accelerator": "nvidia-l4"}),
        ({"accelerator": "nvidia-h100", "gpusPerNode": 8}, None),
        ({"accelerator": "cpu"}, {"accelerator": "tpu-v6e", "topology": "1x1"}),
    ],
    ids=["tpu-trainer-gpu-workers", "gpu-both", "cpu-trainer-tpu-workers"],
)
def test_async_rollout_workers_find_the_trainer(trainer: dict, rollout: dict | None) -> None:
    """An async job's pods resolved as the kubelet would: the trainer's form one distributed job
    (the contract above) and are told they are the trainer; each rollout worker gets its JobSet
    job index as its worker index, the trainer's rollout service at pod 0's DNS name, and none
    of the distributed-init variables (it is its own single process)."""
    doc = copy.deepcopy(BASE)
    doc["spec"].update(ROLLOUT_JOB_DOC, resources=trainer)
    doc["spec"]["rollout"] = {"mode": "async", "replicas": 3}
    if rollout:
        doc["spec"]["rollout"]["resources"] = rollout
    jobset = r.render(parse_job(doc))[1]
    pods = simulated_pods(jobset, "ml")
    role = "jobset.sigs.k8s.io/replicatedjob-name"
    trainers = [p for p in pods if p["metadata"]["labels"][role] != r.ROLLOUT_JOB]
    workers = [p for p in pods if p["metadata"]["labels"][role] == r.ROLLOUT_JOB]
    assert len(workers) == 3 and trainers
    check_contract(jobset, trainers)
    (rank0,) = [p for p in trainers if p["spec"]["hostname"].endswith("-0-0")]
    service = f"{rank0['spec']['hostname']}.{rank0['spec']['subdomain']}:{runtime.ROLLOUT_PORT}"
    for pod in trainers:
        env = resolve_env(pod["spec"]["containers"][0]["env"], pod["metadata"])
        assert env[runtime.ROLE] == runtime.ROLE_TRAINER
        assert env[runtime.TRAINER_ADDRESS] == service
    indexes = []
    for pod in workers:
        env = resolve_env(pod["spec"]["containers"][0]["env"], pod["metadata"])
        assert env[runtime.ROLE] == runtime.ROLE_ROLLOUT
        assert env[runtime.TRAINER_ADDRESS] == service
        assert env[runtime.JOB_NAME] == "t" and env[runtime.NAMESPACE] == "ml"
        assert env[runtime.RECIPE] == runtime.RECIPE_PATH
        indexes.append(int(env[runtime.ROLLOUT_WORKER]))
        distributed = {
            runtime.COORDINATOR_ADDRESS, runtime.NUM_SLICES, runtime.HOSTS_PER_SLICE,
            runtime.SLICE_ID, runtime.HOST_ID,
        }  # fmt: skip
        assert not distributed & set(env)
        assert not any(name.startswith("MEGASCALE_") for name in env)
        topo = runtime.ProcessTopology.from_env(env)
        assert not topo.is_distributed and topo.coordinator_address is None
    assert sorted(indexes) == [0, 1, 2]


def test_rollout_workers_do_not_report_progress() -> None:
    """A worker's env reads as process 0 (no slice or host): the ProgressReporter must still
    leave status.progress to the trainer's rank 0."""
    from posttrain.progress import ProgressReporter

    env = {
        runtime.JOB_NAME: "t", runtime.NAMESPACE: "ml", runtime.ROLE: runtime.ROLE_ROLLOUT,
        runtime.ROLLOUT_WORKER: "0", "KUBERNETES_SERVICE_HOST": "10.0.0.1",
    }  # fmt: skip
    assert not ProgressReporter(token="x", env=env).enabled
    env[runtime.ROLE] = runtime.ROLE_TRAINER
    assert ProgressReporter(token="x", env=env).enabled
