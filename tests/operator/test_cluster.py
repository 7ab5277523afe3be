"""The operator on the real control plane (kube-apiserver, controller-manager, scheduler, JobSet,
kwok fake nodes with GKE-like node pools provisioned for pending pods; docs/development.md).

The operator runs as a subprocess, `posttrain operator --namespace NS`, with a service account
bound to the ClusterRole in docs/operator.md and nothing else, so these tests also check that
the documented RBAC is enough. Fake pods run for `posttrain.dev/fake-run-seconds` and fail with
`posttrain.dev/fake-exit-code` (annotations on the PostTrainJob are copied to its pods).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from posttrain import runtime
from posttrain.api import parse_job
from posttrain.operator import render as r
from posttrain.operator.reconcile import Operator, job_manifest
from posttrain.progress import ProgressReporter

from .podenv import resolve_env

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
OPERATOR_NS = "posttrain-system"
# the operator's log line once it has reconciled a job found at start (its initial listing)
HANDLED_AT_START = Operator.FOUND_AT_START


def docs_yaml(kind: str) -> list[dict[str, Any]]:
    """The YAML block of docs/operator.md holding a `kind`: the docs are what the test applies."""
    text = (REPO / "docs/operator.md").read_text()
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        docs = [d for d in yaml.safe_load_all(block) if d]
        if any(d.get("kind") == kind for d in docs):
            return docs
    raise AssertionError(f"docs/operator.md has no YAML block with a {kind}")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, every: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster, tmp_path_factory) -> Path:
    """CRD installed; a kubeconfig for service account posttrain-system/posttrain-operator
    bound to docs/operator.md's ClusterRole."""
    kubectl = cluster.kubectl
    kubectl("apply", "--server-side", "-f", str(REPO / "crds/posttrain.dev_posttrainjobs.yaml"))
    kubectl("wait", "--for=condition=Established", "crd/posttrainjobs.posttrain.dev")
    kubectl("create", "namespace", OPERATOR_NS, check=False)
    role = docs_yaml("ClusterRole")
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "posttrain-operator"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "posttrain-operator",
        },
        "subjects": [
            {"kind": "ServiceAccount", "name": "posttrain-operator", "namespace": OPERATOR_NS}
        ],
    }
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "posttrain-operator"}}
    kubectl("-n", OPERATOR_NS, "apply", "-f", "-", input=yaml.safe_dump_all([sa]))
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all([*role, binding]))
    token = kubectl(
        "-n", OPERATOR_NS, "create", "token", "posttrain-operator", "--duration", "3h"
    ).stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    admin["users"] = [{"name": "posttrain-operator", "user": {"token": token}}]
    for ctx in admin["contexts"]:
        ctx["context"]["user"] = "posttrain-operator"
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    path.write_text(yaml.safe_dump(admin))
    return path


class OperatorProcess:
    """`posttrain operator --namespace NS` as a subprocess; kill() is a SIGKILL, mid-flight."""

    def __init__(
        self, namespace: str, kubeconfig: Path, log: Path, *, peering: str | None = None
    ) -> None:
        self.namespace, self.kubeconfig, self.log = namespace, kubeconfig, log
        self.peering = peering
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "posttrain.cli", "operator", "--namespace", self.namespace]
        cmd += ["--kubeconfig", str(self.kubeconfig), "--trainer-image-cpu", "trainer:test"]
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        if self.peering:
            cmd += ["--peering", self.peering]
            env["POD_ID"] = self.log.stem  # kopf's name for this replica in the peering object
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text().splitlines()[-n:]) if self.log.exists() else ""


@pytest.fixture
def trainer_rbac(kubectl) -> None:
    """The trainer's ServiceAccount, Role and RoleBinding from docs/operator.md."""
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs_yaml("Role")))


@pytest.fixture
def operator(namespace, operator_kubeconfig, trainer_rbac, tmp_path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(namespace, operator_kubeconfig, tmp_path / "operator.log")
    op.start()
    yield op
    op.stop()


# ---- helpers -----------------------------------------------------------------------------------


def manifest(name: str, resources: dict, *, annotations: dict | None = None, **spec: Any) -> dict:
    doc = {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainJob",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "algorithm": "sft",
            "model": {"base": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "data": {"train": "gs://b/train.jsonl"},
            "training": {"steps": 10},
            "resources": resources,
            "output": {"dir": "/tmp/posttrain-out"},
            **spec,
        },
    }
    parse_job(doc)  # the test's own input must be valid where it means to be
    return doc


class Api:
    def __init__(self, kubectl) -> None:
        self.kubectl = kubectl

    def apply(self, doc: dict) -> subprocess.CompletedProcess:
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))

    def get(self, *what: str) -> dict | None:
        proc = self.kubectl("get", *what, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def items(self, *what: str) -> list[dict]:
        return (self.get(*what) or {}).get("items") or []

    def status(self, name: str) -> dict:
        return (self.get("posttrainjob", name) or {}).get("status") or {}

    def wait_phase(self, name: str, phase: str, op: OperatorProcess, timeout: float = 60) -> dict:
        try:
            return wait_for(
                f"{name} to be {phase}",
                lambda: (s := self.status(name)).get("phase") == phase and s,
                timeout,
            )
        except AssertionError as err:
            raise AssertionError(
                f"{err}; status: {json.dumps(self.status(name), indent=1)}\n"
                f"operator log:\n{op.tail()}"
            ) from None

    def events(self, name: str) -> list[tuple[str, str]]:
        found = self.items("events", "--field-selector", f"involvedObject.name={name}")
        return [
            (e["reason"], e.get("message", ""))
            for e in found
            if e["involvedObject"].get("kind") == "PostTrainJob"
        ]

    def columns(self, name: str, *flags: str) -> dict[str, str]:
        """`kubectl get posttrainjobs NAME` as {COLUMN: value}."""
        out = self.kubectl("get", "posttrainjobs", name, *flags).stdout.splitlines()
        header, row = out[0], out[1]
        starts = [m.start() for m in re.finditer(r"\S+", header)]
        ends = starts[1:] + [None]
        return {header[s:e].strip(): row[s:e].strip() for s, e in zip(starts, ends, strict=True)}


def trainer_reporter(kubectl, cluster, namespace: str, name: str) -> ProgressReporter:
    """A reporter as the trainer's rank 0 makes it, with the trainer service account's token."""
    token = kubectl("create", "token", "posttrain-trainer").stdout.strip()
    kc = yaml.safe_load(cluster.kubeconfig.read_text())
    server = kc["clusters"][0]["cluster"]["server"]
    ca = cluster.dir / "pki" / "ca.crt"
    return ProgressReporter(
        name, namespace, api_server=server, token=token, ca_file=ca, min_interval=0, env={}
    )


# ---- tests -------------------------------------------------------------------------------------


def test_multislice_tpu_job_runs_to_success(cluster, namespace, kubectl, operator) -> None:
    """tpu-v4 2x2x2 x 2 slices: JobSet -> 4 pods on 2 auto-provisioned TPU pools -> Succeeded,
    with PHASE and PROGRESS in `kubectl get posttrainjobs`."""
    api = Api(kubectl)
    resources = {"accelerator": "tpu-v4", "topology": "2x2x2", "slices": 2}
    api.apply(
        manifest(
            "ms", resources, annotations={"posttrain.dev/fake-run-seconds": "6"}, maxRestarts=0
        )
    )
    jobset = wait_for("the JobSet", lambda: api.get("jobset", "ms"), 30)
    ptj = api.get("posttrainjob", "ms")
    assert jobset["metadata"]["ownerReferences"][0]["uid"] == ptj["metadata"]["uid"]
    assert jobset["metadata"]["annotations"][r.EXCLUSIVE_TOPOLOGY] == r.NODEPOOL_LABEL
    recipe = api.get("configmap", "ms-recipe")
    assert parse_job(yaml.safe_load(recipe["data"]["recipe.yaml"])).spec.resources.slices == 2

    api.wait_phase("ms", "Running", operator, timeout=90)
    reporter = trainer_reporter(kubectl, cluster, namespace, "ms")
    assert reporter.report(5, 10, {"loss": 1.5})
    columns = api.columns("ms")
    assert columns["PHASE"] == "Running" and columns["PROGRESS"] == "50%", columns
    assert columns["ACCELERATOR"] == "2xtpu-v4-8" and columns["MODEL"] == "Qwen2.5-0.5B-Instruct"

    # the pods: on TPU nodes of the right shape, one node pool per slice, one distributed job
    pods = api.items("pods", "-l", f"{r.JOB_LABEL}=ms")
    assert len(pods) == 4
    pools: dict[str, set[str]] = {}
    for pod in pods:
        node = api.get("node", pod["spec"]["nodeName"])
        labels = node["metadata"]["labels"]
        assert labels[r.GKE_TPU_ACCELERATOR] == "tpu-v4-podslice"
        assert labels[r.GKE_TPU_TOPOLOGY] == "2x2x2"
        slice_id = pod["metadata"]["annotations"]["jobset.sigs.k8s.io/job-index"]
        pools.setdefault(slice_id, set()).add(labels[r.NODEPOOL_LABEL])
    assert all(len(p) == 1 for p in pools.values()) and len(set.union(*pools.values())) == 2
    topologies = []
    for pod in pods:
        env = resolve_env(pod["spec"]["containers"][0]["env"], pod["metadata"])
        topologies.append((pod, runtime.ProcessTopology.from_env(env)))
    assert sorted(t.process_id for _, t in topologies) == [0, 1, 2, 3]
    (rank0,) = [p for p, t in topologies if t.process_id == 0]
    host0 = f"{rank0['spec']['hostname']}.{rank0['spec']['subdomain']}"
    assert {t.coordinator_address for _, t in topologies} == {f"{host0}:8476"}
    assert rank0["metadata"]["labels"]["jobset.sigs.k8s.io/coordinator"] == host0

    status = api.wait_phase("ms", "Succeeded", operator, timeout=90)
    assert reporter.report(10, 10, {"loss": 1.0})
    assert api.columns("ms")["PROGRESS"] == "100%"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["Succeeded"]["observedGeneration"] == ptj["metadata"]["generation"]
    assert status["startTime"] and status["completionTime"] and status["restarts"] == 0
    reasons = [reason for reason, _ in api.events("ms")]
    assert "Provisioning" in reasons and "Running" in reasons and "Succeeded" in reasons
    progress = api.status("ms")["progress"]
    assert progress["step"] == 10 and progress["metrics"] == {"loss": 1.0}
    # kopf kept its bookkeeping out of the (strict) status
    assert set(api.status("ms")) <= {
        "phase", "conditions", "progress", "summary", "jobSetName", "restarts", "readmissions",
        "startTime", "completionTime", "observedGeneration",
    }  # fmt: skip


def test_failing_pod_restarts_then_fails(namespace, kubectl, operator) -> None:
    api = Api(kubectl)
    annotations = {
        "posttrain.dev/fake-exit-code": "3",
        "posttrain.dev/fake-reason": "OOMKilled",
        "posttrain.dev/fake-message": "out of memory",
    }
    api.apply(
        manifest(
            "crash", {"accelerator": "cpu", "nodes": 2}, annotations=annotations, maxRestarts=1
        )
    )
    status = api.wait_phase("crash", "Failed", operator, timeout=90)
    assert status["restarts"] == 1
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ReachedMaxRestarts"
    assert "exited with code 3 (OOMKilled): out of memory" in failed["message"]
    assert api.columns("crash")["PHASE"] == "Failed"
    events = api.events("crash")
    assert ("Restarted", "JobSet restarted every pod (restart 1)") in events
    assert any(reason == "Failed" and "ReachedMaxRestarts" in msg for reason, msg in events)


def test_suspend_and_resume(namespace, kubectl, operator) -> None:
    api = Api(kubectl)
    annotations = {"posttrain.dev/fake-run-seconds": "600"}
    api.apply(manifest("sus", {"accelerator": "cpu", "nodes": 2}, annotations=annotations))
    api.wait_phase("sus", "Running", operator)
    kubectl("patch", "posttrainjob", "sus", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    status = api.wait_phase("sus", "Suspended", operator)
    assert api.get("jobset", "sus")["spec"]["suspend"] is True
    wait_for(
        "the pods to go",
        lambda: (
            not [
                p
                for p in api.items("pods", "-l", f"{r.JOB_LABEL}=sus")
                if not p["metadata"].get("deletionTimestamp")
            ]
        ),
        30,
    )
    assert {c["type"]: c["status"] for c in status["conditions"]}["Suspended"] == "True"
    kubectl("patch", "posttrainjob", "sus", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    status = api.wait_phase("sus", "Running", operator)
    assert api.get("jobset", "sus")["spec"]["suspend"] is False
    assert {c["type"]: c["status"] for c in status["conditions"]}["Suspended"] == "False"
    reasons = [reason for reason, _ in api.events("sus")]
    assert reasons.count("Running") >= 2 and "Suspended" in reasons


def test_spec_is_immutable_while_active_except_suspend(namespace, kubectl, operator) -> None:
    api = Api(kubectl)
    annotations = {"posttrain.dev/fake-run-seconds": "600"}
    api.apply(manifest("frozen", {"accelerator": "cpu"}, annotations=annotations))
    api.wait_phase("frozen", "Running", operator)
    refused = kubectl(
        "patch", "posttrainjob", "frozen", "--type=merge",
        "-p", '{"spec":{"training":{"steps":20}}}', check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "spec is immutable while the job is active" in refused.stderr
    assert api.get("posttrainjob", "frozen")["spec"]["training"]["steps"] == 10


def test_delete_cascades_even_with_the_operator_down(namespace, kubectl, operator) -> None:
    api = Api(kubectl)
    annotations = {"posttrain.dev/fake-run-seconds": "600"}
    api.apply(manifest("gone", {"accelerator": "cpu", "nodes": 2}, annotations=annotations))
    api.wait_phase("gone", "Running", operator)
    assert not api.get("posttrainjob", "gone")["metadata"].get("finalizers")
    operator.kill()
    kubectl("delete", "posttrainjob", "gone", "--wait=true", "--timeout=20s")
    wait_for("the JobSet to go", lambda: api.get("jobset", "gone") is None, 30)
    wait_for("the ConfigMap to go", lambda: api.get("configmap", "gone-recipe") is None, 30)
    wait_for("the Jobs to go", lambda: not api.items("jobs", "-l", f"{r.JOB_LABEL}=gone"), 30)
    wait_for("the pods to go", lambda: not api.items("pods", "-l", f"{r.JOB_LABEL}=gone"), 30)


def test_operator_killed_mid_flight_makes_no_duplicates(namespace, kubectl, operator) -> None:
    api = Api(kubectl)
    # 1. killed between the ConfigMap and the JobSet: the ConfigMap is there, the JobSet not.
    operator.kill()
    doc = manifest("again", {"accelerator": "cpu", "nodes": 2}, annotations={
        "posttrain.dev/fake-run-seconds": "8"})  # fmt: skip
    api.apply(doc)
    ptj = api.get("posttrainjob", "again")
    configmap = r.render(parse_job(job_manifest(ptj)))[0]
    kubectl("apply", "-f", "-", input=yaml.safe_dump(configmap))
    operator.start()
    jobset = wait_for("the JobSet", lambda: api.get("jobset", "again"), 30)
    api.wait_phase("again", "Running", operator)
    # 2. killed while running, started again
    operator.kill()
    operator.start()
    api.wait_phase("again", "Succeeded", operator, timeout=60)
    assert [j["metadata"]["uid"] for j in api.items("jobsets")] == [jobset["metadata"]["uid"]]
    assert [c["metadata"]["name"] for c in api.items("configmaps", "-l", r.JOB_LABEL)] == [
        "again-recipe"
    ]
    assert len(api.items("jobs", "-l", f"{r.JOB_LABEL}=again")) == 1
    assert api.status("again")["restarts"] == 0
    # 3. a finished job's JobSet deleted (as a TTL would), operator restarted: never made again
    kubectl("delete", "jobset", "again", "--wait=true", "--timeout=30s")
    operator.kill()
    handled = operator.tail(10_000).count(HANDLED_AT_START)
    operator.start()
    wait_for("the resume", lambda: operator.tail(10_000).count(HANDLED_AT_START) > handled)
    assert api.get("jobset", "again") is None and api.status("again")["phase"] == "Succeeded"


def test_children_are_applied_server_side(namespace, kubectl, operator_kubeconfig) -> None:
    """The reconcile in process, against the real API server with the operator's RBAC (docs):
    both children applied (managedFields: the operator's manager, Apply); a reconcile again, by
    a restarted operator or one that renders differently (an upgrade), writes nothing; a field
    of another manager survives the operator's next apply (spec.suspend); an earlier job's
    children of the same name are not adopted (an apply would: it is read first)."""
    from kubernetes import config

    from posttrain.operator.reconcile import FIELD_MANAGER, Retry

    api = Api(kubectl)
    api_client = config.new_client_from_config(config_file=str(operator_kubeconfig))

    def restarted(cpu: str = "trainer:test") -> Operator:  # empty caches
        return Operator(api_client, images=r.ImageDefaults(cpu=cpu))

    annotations = {"posttrain.dev/fake-run-seconds": "600"}
    doc = manifest("ssa", {"accelerator": "cpu"}, annotations=annotations, suspend=True)
    api.apply(doc)
    restarted().reconcile(namespace, "ssa")
    fields = "--show-managed-fields"
    jobset, recipe = api.get("jobset", "ssa", fields), api.get("configmap", "ssa-recipe", fields)
    assert jobset and recipe and api.status("ssa")["jobSetName"] == "ssa"
    for obj in (jobset, recipe):
        mine = [m for m in obj["metadata"]["managedFields"] if m["manager"] == FIELD_MANAGER]
        assert [m["operation"] for m in mine] == ["Apply"], obj["metadata"]["managedFields"]
    assert jobset["spec"]["suspend"] is True

    def versions() -> list[str]:
        found = [api.get(*w) for w in (("jobset", "ssa"), ("cm", "ssa-recipe"), ("ptj", "ssa"))]
        return [(f or {}).get("metadata", {}).get("resourceVersion", "") for f in found]

    before = versions()
    restarted().reconcile(namespace, "ssa")
    restarted("trainer:other").reconcile(namespace, "ssa")  # renders another image
    assert versions() == before

    # kubectl's annotation on the JobSet survives the apply that resumes it, by an operator that
    # renders differently: the JobSet keeps what it was made with
    kubectl("annotate", "jobset", "ssa", "team=ml")
    kubectl("patch", "posttrainjob", "ssa", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    restarted("trainer:other").reconcile(namespace, "ssa")
    resumed = api.get("jobset", "ssa", fields)
    assert resumed is not None and resumed["spec"]["suspend"] is False
    assert resumed["metadata"]["annotations"]["team"] == "ml"
    for part in ("labels", "ownerReferences"):
        assert resumed["metadata"][part] == jobset["metadata"][part]
    assert resumed["spec"]["replicatedJobs"] == jobset["spec"]["replicatedJobs"]
    (mine,) = [m for m in resumed["metadata"]["managedFields"] if m["manager"] == FIELD_MANAGER]
    assert "f:suspend" in mine["fieldsV1"]["f:spec"] and mine["operation"] == "Apply"

    # an earlier job's children, orphaned (deleted with --cascade=orphan): a new job of that
    # name waits for them to go and adopts neither
    kubectl("delete", "posttrainjob", "ssa", "--cascade=orphan", "--wait=true", "--timeout=30s")
    wait_for(
        "the children orphaned",
        lambda: (
            not any(
                (api.get(*w) or {}).get("metadata", {}).get("ownerReferences")
                for w in (("jobset", "ssa"), ("cm", "ssa-recipe"))
            )
        ),
        30,
    )
    api.apply(doc)
    with pytest.raises(Retry):
        restarted().reconcile(namespace, "ssa")
    kubectl("delete", "jobset", "ssa", "--wait=true", "--timeout=30s")
    with pytest.raises(Retry):
        restarted().reconcile(namespace, "ssa")
    assert api.get("jobset", "ssa") is None
    assert not (api.get("cm", "ssa-recipe") or {})["metadata"].get("ownerReferences")


def test_invalid_jobs(namespace, kubectl, operator) -> None:
    api = Api(kubectl)
    # refused by the API server: CEL (a block the algorithm needs) and the schema (pattern)
    grpo = manifest("cel", {"accelerator": "cpu"})
    grpo["spec"]["algorithm"] = "grpo"
    refused = kubectl("apply", "-f", "-", input=yaml.safe_dump(grpo), check=False)
    assert refused.returncode != 0 and "algorithm grpo needs spec.grpo" in refused.stderr
    bad = manifest("pattern", {"accelerator": "tpu-v5e", "topology": "2x4"})
    bad["spec"]["resources"]["topology"] = "two-by-four"
    refused = kubectl("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert refused.returncode != 0 and "spec.resources.topology" in refused.stderr

    # accepted by the API server, refused by the model: Failed, the field named, an Event
    doc = manifest("topo", {"accelerator": "tpu-v5e", "topology": "2x4"})
    doc["spec"]["resources"]["topology"] = "3x3"
    api.apply(doc)
    status = api.wait_phase("topo", "Failed", operator)
    valid = next(c for c in status["conditions"] if c["type"] == "Valid")
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert valid["message"].startswith("spec.resources.topology: '3x3' is not a tpu-v5e topology")
    assert "valid: 1x1, 2x2, 2x4" in valid["message"]
    assert any(
        reason == "Failed" and "spec.resources.topology" in m for reason, m in api.events("topo")
    )
    assert api.get("jobset", "topo") is None

    # a failed job's spec may change; fixed, it starts (2x2: no 8-chip 2x4 pool is left behind
    # for test_a_2x4_as_two_4_chip_hosts, whose 4-chip pods would fit on it)
    kubectl(
        "patch", "posttrainjob", "topo", "--type=merge",
        "-p", '{"spec":{"resources":{"topology":"2x2"}}}',
    )  # fmt: skip
    wait_for("the JobSet of the fixed job", lambda: api.get("jobset", "topo"), 30)
    status = api.status("topo")
    assert status["phase"] in ("Pending", "Provisioning", "Running", "Succeeded")


def test_liveness_endpoint_and_json_logs(namespace, operator_kubeconfig, tmp_path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "operator.log"
    cmd = [sys.executable, "-m", "posttrain.cli", "operator", "-n", namespace]
    cmd += ["--kubeconfig", str(operator_kubeconfig), "--log-format", "json"]
    cmd += ["--liveness", f"http://127.0.0.1:{port}/healthz"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:

        def alive() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as rsp:
                    return rsp.status == 200
            except OSError:
                return False

        wait_for("the liveness probe to answer", alive, 30)
        lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
        assert lines and all("message" in json.loads(line) for line in lines), log.read_text()
    finally:
        proc.terminate()
        proc.wait(15)


# ---- faults --------------------------------------------------------------------------------------


def recipe_spec(api: Api, name: str) -> dict:
    return yaml.safe_load(api.get("configmap", f"{name}-recipe")["data"][r.RECIPE_KEY])["spec"]


def test_killed_repeatedly_while_jobs_are_applied(namespace, kubectl, operator) -> None:
    """SIGKILL at random points of reconciles, restart, repeat: every job ends with exactly one
    owned JobSet, an up-to-date recipe and a status. One job starts with a stale recipe of its
    own (as if an earlier render differed) and must get the right one."""
    import random

    api = Api(kubectl)
    rng = random.Random(17)
    annotations = {"posttrain.dev/fake-run-seconds": "600"}
    names = [f"k{i}" for i in range(8)]
    # a stale recipe, owned by the job, made while no operator runs
    operator.kill()
    api.apply(manifest("stale", {"accelerator": "cpu"}, annotations=annotations))
    uid = api.get("posttrainjob", "stale")["metadata"]["uid"]
    stale = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "stale-recipe",
            "ownerReferences": [
                {"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainJob",
                 "name": "stale", "uid": uid, "controller": True},
            ],
        },
        "data": {r.RECIPE_KEY: "spec: {training: {steps: 1}}\n"},
    }  # fmt: skip
    kubectl("apply", "-f", "-", input=yaml.safe_dump(stale))
    operator.start()
    for i, name in enumerate(names):
        api.apply(manifest(name, {"accelerator": "cpu"}, annotations=annotations))
        if i % 2:
            time.sleep(rng.uniform(0.2, 2.5))  # start-up, mid-reconcile or idle
            operator.kill()
            operator.start()
    for name in [*names, "stale"]:
        api.wait_phase(name, "Running", operator, timeout=120)
    jobs = {j["metadata"]["name"]: j for j in api.items("posttrainjobs")}
    jobsets = api.items("jobsets")
    assert sorted(js["metadata"]["name"] for js in jobsets) == sorted(jobs)
    for js in jobsets:
        job = jobs[js["metadata"]["name"]]
        (ref,) = js["metadata"]["ownerReferences"]
        assert ref["uid"] == job["metadata"]["uid"] and ref["controller"]
        assert job["status"]["jobSetName"] == js["metadata"]["name"]
        assert job["status"]["restarts"] == 0
        want = r.recipe(parse_job(job_manifest(job)))["spec"]
        assert recipe_spec(api, js["metadata"]["name"]) == want
    assert recipe_spec(api, "stale")["training"]["steps"] == 10


def test_faults_fail_or_wait_with_the_reason(namespace, kubectl, operator) -> None:
    """A configuration error fails at once (no restart spent); pods that cannot be created say
    why within seconds; a deleted JobSet is not made again, even by a restarted operator."""
    api = Api(kubectl)
    api.apply(
        manifest(
            "badcfg", {"accelerator": "cpu", "nodes": 2}, maxRestarts=3,
            annotations={"posttrain.dev/fake-exit-code": str(runtime.EXIT_CONFIG),
                         "posttrain.dev/fake-message": "spec.model.base: no such model"},
        )
    )  # fmt: skip
    api.apply(manifest("nosa", {"accelerator": "cpu"}, serviceAccountName="missing-sa"))
    api.apply(
        manifest(
            "gone", {"accelerator": "cpu"}, annotations={"posttrain.dev/fake-run-seconds": "600"}
        )
    )

    started = time.monotonic()
    status = api.wait_phase("nosa", "Pending", operator)
    running = wait_for(
        "the FailedCreatePods reason",
        lambda: next(
            (c for c in api.status("nosa").get("conditions", [])
             if c["type"] == "Running" and c["reason"] == "FailedCreatePods"), None),
        30,
    )  # fmt: skip
    print(f"FailedCreatePods after {time.monotonic() - started:.1f}s")
    assert time.monotonic() - started < 30
    assert 'serviceaccount "missing-sa" not found' in running["message"]
    assert "create the ServiceAccount missing-sa in namespace" in running["message"]
    assert any(
        reason == "Pending" and "FailedCreatePods" in m for reason, m in api.events("nosa")
    ), status

    status = api.wait_phase("badcfg", "Failed", operator, timeout=90)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ConfigurationError", failed
    assert "spec.model.base: no such model" in failed["message"]
    assert status["restarts"] == 0

    api.wait_phase("gone", "Running", operator)
    kubectl("delete", "jobset", "gone", "--wait=true", "--timeout=30s")
    status = api.wait_phase("gone", "Failed", operator)
    assert next(c for c in status["conditions"] if c["type"] == "Failed")["reason"] == (
        "JobSetDeleted"
    )
    operator.kill()
    handled = operator.tail(10_000).count(HANDLED_AT_START)
    operator.start()  # on resume it must not make the JobSet again
    wait_for("the resume", lambda: operator.tail(10_000).count(HANDLED_AT_START) > handled)
    assert api.get("jobset", "gone") is None and api.status("gone")["phase"] == "Failed"


def test_readme_job_is_accepted_and_a_job_without_outputs_refused(operator_kubeconfig, kubectl):
    """The CRD's CEL rule agrees with `posttrain validate` on spec.output.dir."""
    text = (REPO / "README.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    kubectl("apply", "--dry-run=server", "-f", "-", input=block)
    doc = yaml.safe_load(block)
    del doc["spec"]["training"]["checkpoint"]
    refused = kubectl(
        "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(doc), check=False
    )
    assert refused.returncode != 0
    assert "spec.output.dir: Invalid value" in refused.stderr or "spec.output.dir" in refused.stderr
    assert "required in a cluster, or training.checkpoint.dir" in refused.stderr


def test_two_replicas_one_active_and_a_hand_over(
    cluster, namespace, kubectl, operator_kubeconfig, trainer_rbac, tmp_path
) -> None:
    """kopf peering: of two replicas one acts, the other waits; SIGKILL the active one and the
    other takes over within the peering lifetime (docs/operator.md)."""
    from posttrain.operator.handlers import PEERING_LIFETIME_S

    api = Api(kubectl)
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds/kopf.dev_peerings.yaml"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev")
    (role,) = [d for d in docs_yaml("KopfPeering") if d["kind"] == "ClusterRole"]
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": role["metadata"]["name"]},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": role["metadata"]["name"]},
        "subjects": [{"kind": "ServiceAccount", "name": "posttrain-operator",
                      "namespace": OPERATOR_NS}],
    }  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([role, binding]))
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "pt"}}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(peering))
    ops = {
        n: OperatorProcess(namespace, operator_kubeconfig, tmp_path / f"{n}.log", peering="pt")
        for n in ("op-a", "op-b")
    }
    try:
        for op in ops.values():
            op.start()

        def records() -> dict:
            return (api.get("kopfpeering", "pt") or {}).get("status") or {}

        wait_for("both replicas in the peering object", lambda: set(records()) >= set(ops), 60)
        active = max(records().items(), key=lambda kv: kv[1]["priority"])[0]
        standby = next(n for n in ops if n != active)
        # kopf starts a peered operator paused; the highest priority resumes, a lower one
        # pauses (again, if it was alone for a moment at start)
        resumed, paused = "Resuming operations", "Pausing operations"

        def acting(name: str) -> bool:
            log = ops[name].log.read_text()
            return log.rfind(resumed) > log.rfind(paused)

        wait_for("one active, one waiting", lambda: acting(active) and not acting(standby), 30)
        waiting_since = len(ops[standby].log.read_text())
        api.apply(manifest("before", {"accelerator": "cpu"}))
        wait_for("the JobSet of the first job", lambda: api.get("jobset", "before"), 30)
        assert "before" not in ops[standby].log.read_text()[waiting_since:]  # it did nothing

        ops[active].kill()
        killed = time.monotonic()
        api.apply(manifest("after", {"accelerator": "cpu"}))
        wait_for("the standby to take over", lambda: api.get("jobset", "after"), 60)
        hand_over = time.monotonic() - killed
        print(f"hand-over after SIGKILL: {hand_over:.1f}s")
        assert hand_over < PEERING_LIFETIME_S + 10
        assert acting(standby)
    finally:
        for op in ops.values():
            op.stop()


def test_a_2x4_as_two_4_chip_hosts(namespace, kubectl, operator) -> None:
    """resources.chipsPerHost: 4 runs a v5e 2x4 on two 4-chip hosts (GKE's ct5lp-hightpu-4t)."""
    api = Api(kubectl)
    resources = {"accelerator": "tpu-v5e", "topology": "2x4", "chipsPerHost": 4}

    def eight_chip_2x4_nodes() -> list[str]:
        return [
            n["metadata"]["name"]
            for n in api.items("nodes", "-l", f"{r.GKE_TPU_TOPOLOGY}=2x4")
            if n["status"]["capacity"].get(r.TPU_RESOURCE) == "8"
        ]

    # Two 4-chip pods also fit one 8-chip 2x4 host: wait out one left by an earlier test (the
    # provisioner deletes a pool 60 s after its last pod).
    wait_for("earlier tests' 8-chip 2x4 nodes to go", lambda: not eight_chip_2x4_nodes(), 120, 1)
    api.apply(manifest("two", resources, annotations={"posttrain.dev/fake-run-seconds": "600"}))
    api.wait_phase("two", "Running", operator, timeout=90)
    pods = api.items("pods", "-l", f"{r.JOB_LABEL}=two")
    nodes = [api.get("node", p["spec"]["nodeName"]) for p in pods]
    assert len(pods) == 2 and len({n["metadata"]["name"] for n in nodes}) == 2
    for node in nodes:
        assert node["status"]["capacity"][r.TPU_RESOURCE] == "4"
        assert node["metadata"]["labels"]["node.kubernetes.io/instance-type"] == "ct5lp-hightpu-4t"


def test_an_evicted_pod_restarts_the_job_without_spending_max_restarts(
    namespace, kubectl, operator
) -> None:
    """Eviction (the pod's DisruptionTarget condition) restarts every pod, free: with
    maxRestarts 0 a counted restart would fail the job."""
    api = Api(kubectl)
    doc = manifest("evict", {"accelerator": "cpu", "nodes": 2}, maxRestarts=0,
                   annotations={"posttrain.dev/fake-run-seconds": "600"})  # fmt: skip
    api.apply(doc)
    api.wait_phase("evict", "Running", operator)
    victim = api.items("pods", "-l", f"{r.JOB_LABEL}=evict")[0]["metadata"]["name"]
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": victim}}
    kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{victim}/eviction",
            "-f", "-", input=json.dumps(eviction))  # fmt: skip
    wait_for("the restart", lambda: api.status("evict").get("restarts") == 1, 60)
    status = api.wait_phase("evict", "Running", operator, timeout=60)
    jobset = api.get("jobset", "evict")
    assert jobset["status"].get("restartsCountTowardsMax", 0) == 0, jobset["status"]
    assert status["phase"] == "Running"


def test_a_queued_job_waits_for_admission(namespace, kubectl, operator) -> None:
    """With spec.scheduling.queueName the JobSet starts suspended for Kueue to admit; until then
    the phase is Queued (a column in `kubectl get`) with Kueue's reason (here: no such
    LocalQueue), and the spec is frozen."""
    api = Api(kubectl)
    api.apply(manifest("q", {"accelerator": "cpu"}, scheduling={"queueName": "team-a"}))
    api.wait_phase("q", "Queued", operator)
    running = wait_for(
        "Kueue's reason",
        lambda: (c := running_condition(api.status("q")))["reason"] == "Inadmissible" and c,
        30,
    )
    print(running["message"])
    assert "queue team-a" in running["message"], running
    assert "LocalQueue team-a doesn't exist" in running["message"], running
    jobset = api.get("jobset", "q")
    assert jobset["spec"]["suspend"] is True
    assert jobset["metadata"]["labels"][r.QUEUE_LABEL] == "team-a"
    assert api.columns("q")["PHASE"] == "Queued"
    refused = kubectl(
        "patch", "posttrainjob", "q", "--type=merge", "-p", '{"spec":{"maxRestarts":1}}',
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "immutable while the job is active" in refused.stderr


# ---- Kueue -------------------------------------------------------------------------------------


@pytest.fixture
def kueue_queue(cluster, namespace, kubectl) -> Iterator[dict[str, str]]:
    """docs/operator.md's Kueue set-up (quota for one v5e 2x4 slice, two PriorityClasses), its
    cluster-scoped objects renamed for this test; returns {docs name: name here}."""
    docs = docs_yaml("ClusterQueue")
    names = {}
    for doc in docs:
        if doc["kind"] in ("ResourceFlavor", "ClusterQueue", "PriorityClass"):
            names[doc["metadata"]["name"]] = f"{namespace}-{doc['metadata']['name']}"
    for doc in docs:
        if doc["kind"] == "LocalQueue":
            names[doc["metadata"]["name"]] = doc["metadata"]["name"]
            doc["spec"]["clusterQueue"] = names[doc["spec"]["clusterQueue"]]
        else:
            doc["metadata"]["name"] = names[doc["metadata"]["name"]]
        if doc["kind"] == "ClusterQueue":
            for group in doc["spec"]["resourceGroups"]:
                for flavor in group["flavors"]:
                    flavor["name"] = names[flavor["name"]]
    cluster_scoped = [d for d in docs if d["kind"] != "LocalQueue"]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(cluster_scoped))
    kubectl(
        "apply", "-f", "-", input=yaml.safe_dump_all([d for d in docs if d["kind"] == "LocalQueue"])
    )
    yield names
    for doc in cluster_scoped:
        cluster.kubectl("delete", doc["kind"], doc["metadata"]["name"], "--wait=false", check=False)


def running_condition(status: dict) -> dict:
    return next(c for c in status["conditions"] if c["type"] == "Running")


def test_kueue_quota_and_preemption(namespace, kubectl, operator, kueue_queue) -> None:
    """Real Kueue, quota for one v5e 2x4 slice: the first job runs, the second is Queued with
    Kueue's reason; deleting the first admits the second; a higher-priority job preempts it
    (Queued/Preempted, same JobSet, no restart spent) and it runs again once that one is gone."""
    api = Api(kubectl)
    slice_ = {"accelerator": "tpu-v5e", "topology": "2x4"}
    long_run = {"posttrain.dev/fake-run-seconds": "600"}

    def job(name: str, priority: str) -> dict:
        scheduling = {
            "queueName": kueue_queue["team-a"],
            "priorityClassName": kueue_queue[priority],
        }
        return manifest(name, slice_, annotations=long_run, scheduling=scheduling)

    api.apply(job("first", "training-low"))
    api.wait_phase("first", "Running", operator, timeout=90)
    api.apply(job("second", "training-low"))
    status = api.wait_phase("second", "Queued", operator)
    cond = wait_for(
        "Kueue's reason on the second job",
        lambda: (c := running_condition(api.status("second")))["reason"] == "WaitingForQuota" and c,
        30,
    )
    assert "insufficient unused quota" in cond["message"], cond
    assert api.columns("second")["PHASE"] == "Queued"
    assert api.get("jobset", "second")["spec"]["suspend"] is True
    assert not api.items("pods", "-l", f"{r.JOB_LABEL}=second")

    kubectl("delete", "posttrainjob", "first", "--wait=false")
    api.wait_phase("second", "Running", operator, timeout=90)
    uid = api.get("jobset", "second")["metadata"]["uid"]

    api.apply(job("urgent", "training-high"))
    status = api.wait_phase("second", "Queued", operator, timeout=60)
    cond = wait_for(
        "the preemption reason",
        lambda: (c := running_condition(api.status("second")))["reason"] == "Preempted" and c,
        30,
    )
    assert "evicted by Kueue (Preempted)" in cond["message"], cond
    api.wait_phase("urgent", "Running", operator, timeout=90)
    jobset = api.get("jobset", "second")
    assert jobset["metadata"]["uid"] == uid and jobset["spec"]["suspend"] is True
    wait_for(
        "the preempted pods to go", lambda: not api.items("pods", "-l", f"{r.JOB_LABEL}=second"), 30
    )
    assert any(reason == "Queued" and "Preempted" in msg for reason, msg in api.events("second"))

    kubectl("delete", "posttrainjob", "urgent", "--wait=false")
    status = api.wait_phase("second", "Running", operator, timeout=90)
    assert api.get("jobset", "second")["metadata"]["uid"] == uid
    assert status["restarts"] == 0
    # the preemption is counted apart from restarts, shown by `kubectl get -o wide`
    assert status.get("readmissions") == 1, status
    wide = api.columns("second", "-o", "wide")
    assert wide["READMISSIONS"] == "1" and wide["RESTARTS"] == "0", wide


def test_a_queued_job_suspends_through_its_workload(namespace, kubectl, operator, kueue_queue):
    """spec.suspend on a queued job deactivates its Workload (Kueue would undo a suspended
    JobSet at once): Kueue evicts it and suspends the JobSet; resuming reactivates it."""
    api = Api(kubectl)
    resources = {"accelerator": "tpu-v5e", "topology": "2x4"}
    doc = manifest(
        "hold",
        resources,
        annotations={"posttrain.dev/fake-run-seconds": "600"},
        scheduling={"queueName": kueue_queue["team-a"]},
    )
    api.apply(doc)
    api.wait_phase("hold", "Running", operator, timeout=90)
    uid = api.get("jobset", "hold")["metadata"]["uid"]

    kubectl("patch", "posttrainjob", "hold", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(
        "Suspended with the JobSet suspended and no pods",
        lambda: (
            api.status("hold").get("phase") == "Suspended"
            and running_condition(api.status("hold"))["reason"] == "Suspended"
            and not api.items("pods", "-l", f"{r.JOB_LABEL}=hold")
        ),
        60,
    )
    (workload,) = api.items("workloads")
    assert workload["spec"]["active"] is False
    jobset = api.get("jobset", "hold")
    assert jobset["spec"]["suspend"] is True and jobset["metadata"]["uid"] == uid

    kubectl("patch", "posttrainjob", "hold", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    status = api.wait_phase("hold", "Running", operator, timeout=90)
    assert api.items("workloads")[0]["spec"]["active"] is True
    assert api.get("jobset", "hold")["metadata"]["uid"] == uid and status["restarts"] == 0


def test_kueue_queue_label_on_the_job(namespace, kubectl, operator, kueue_queue) -> None:
    """Kueue's own convention: a PostTrainJob labelled kueue.x-k8s.io/queue-name is queued like
    one with spec.scheduling.queueName. Quota for one v5e 2x4 slice: the second of two labelled
    jobs is Queued (no pods) and starts when the first is deleted. A job whose label and
    spec.scheduling.queueName disagree is refused, naming both, and gets no JobSet."""
    api = Api(kubectl)
    queue = kueue_queue["team-a"]

    def labelled(name: str, labels: dict[str, str], **spec: Any) -> dict:
        doc = manifest(
            name,
            {"accelerator": "tpu-v5e", "topology": "2x4"},
            annotations={"posttrain.dev/fake-run-seconds": "600"},
            **spec,
        )
        doc["metadata"]["labels"] = labels
        return doc

    api.apply(labelled("la", {r.QUEUE_LABEL: queue}))
    api.wait_phase("la", "Running", operator, timeout=90)
    # Kueue made a Workload for it: the job ran through the queue, not around it
    assert wait_for("la's Workload", lambda: api.items("workloads"), 30)
    api.apply(labelled("lb", {r.QUEUE_LABEL: queue}))
    api.wait_phase("lb", "Queued", operator)
    cond = wait_for(
        "Kueue's reason on the second job",
        lambda: (c := running_condition(api.status("lb")))["reason"] == "WaitingForQuota" and c,
        30,
    )
    assert f"queue {queue}" in cond["message"], cond
    jobset = api.get("jobset", "lb")
    assert jobset["metadata"]["labels"][r.QUEUE_LABEL] == queue
    assert jobset["spec"]["suspend"] is True
    assert not api.items("pods", "-l", f"{r.JOB_LABEL}=lb")

    kubectl("delete", "posttrainjob", "la", "--wait=false")
    status = api.wait_phase("lb", "Running", operator, timeout=90)
    assert status["restarts"] == 0
    assert api.items("pods", "-l", f"{r.JOB_LABEL}=lb")

    api.apply(labelled("lc", {r.QUEUE_LABEL: queue}, scheduling={"queueName": "other"}))
    status = api.wait_phase("lc", "Failed", operator)
    valid = next(c for c in status["conditions"] if c["type"] == "Valid")
    assert valid["reason"] == "InvalidSpec", valid
    assert "spec.scheduling.queueName" in valid["message"] and r.QUEUE_LABEL in valid["message"]
    assert f"'{queue}'" in valid["message"] and "'other'" in valid["message"], valid
    assert api.get("jobset", "lc") is None
    # the label fixed (a metadata change, not the spec's): it starts, queued where both agree
    kubectl("label", "posttrainjob", "lc", f"{r.QUEUE_LABEL}=other", "--overwrite")
    jobset = wait_for("the JobSet of the fixed job", lambda: api.get("jobset", "lc"), 30)
    assert jobset["metadata"]["labels"][r.QUEUE_LABEL] == "other"
    api.wait_phase("lc", "Queued", operator)
    # once its JobSet exists, the job's queue is the JobSet's: a label now disagreeing with the
    # spec is not applied (a Warning), and the job is not failed for it
    kubectl("label", "posttrainjob", "lc", f"{r.QUEUE_LABEL}={queue}", "--overwrite")
    wait_for(
        "the ChangeIgnored Event",
        lambda: any(reason == "ChangeIgnored" for reason, _ in api.events("lc")),
        30,
    )
    assert api.status("lc")["phase"] == "Queued"
    assert api.get("jobset", "lc")["metadata"]["labels"][r.QUEUE_LABEL] == "other"


def test_bad_geometry_never_creates_a_pod(namespace, kubectl, operator) -> None:
    """A batch that does not divide over its topology's chips (12 over a v5e 2x4's 8) is refused
    before anything is held: Failed/InvalidSpec naming spec.training.batchSize; no recipe, no
    JobSet, no pod. `posttrain validate` says the same without a cluster."""
    api = Api(kubectl)
    doc = manifest("geo", {"accelerator": "tpu-v5e", "topology": "2x4"})
    doc["spec"]["training"]["batchSize"] = 12
    api.apply(doc)
    status = api.wait_phase("geo", "Failed", operator)
    valid = next(c for c in status["conditions"] if c["type"] == "Valid")
    assert valid["reason"] == "InvalidSpec", valid
    assert valid["message"].startswith("spec.training.batchSize: "), valid
    assert "8 data-parallel devices" in valid["message"], valid
    time.sleep(3)  # anything made would have shown by now
    assert api.get("jobset", "geo") is None and api.get("configmap", "geo-recipe") is None
    assert not api.items("pods", "-l", f"{r.JOB_LABEL}=geo")
    assert not api.items("pods")
    assert any(reason == "Failed" and "batchSize" in m for reason, m in api.events("geo"))
    refused = subprocess.run(
        [sys.executable, "-P", "-m", "posttrain.cli", "validate", "-"],
        input=yaml.safe_dump(doc), capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert refused.returncode == 1 and "spec.training.batchSize" in refused.stderr

    # what the API server can check alone is its CEL rule's (the model refuses it too)
    micro = {**doc, "metadata": {"name": "micro"}}
    micro["spec"] = {**doc["spec"], "training": {"steps": 10, "batchSize": 32, "microBatchSize": 5}}
    refused = kubectl("apply", "-f", "-", input=yaml.safe_dump(micro), check=False)
    assert refused.returncode != 0, refused.stdout
    assert "spec.training.microBatchSize must divide spec.training.batchSize" in refused.stderr

    # fixed (a failed job's spec may change), it starts
    kubectl("patch", "posttrainjob", "geo", "--type=merge",
            "-p", '{"spec":{"training":{"steps":10,"batchSize":16}}}')  # fmt: skip
    wait_for("the JobSet of the fixed job", lambda: api.get("jobset", "geo"), 30)


# ---- async RL: a trainer and rollout workers, one JobSet, one Workload ---------------------------


def async_manifest(name: str, queue: str, run_seconds: int) -> dict:
    """GRPO with async rollouts: the trainer on a v5e 2x4 host, two rollout workers on one
    nvidia-l4 GPU each (their own node pool)."""
    return manifest(
        name,
        {"accelerator": "tpu-v5e", "topology": "2x4"},
        annotations={"posttrain.dev/fake-run-seconds": str(run_seconds)},
        algorithm="grpo",
        grpo={"rewards": [{"builtin": "math-answer", "answerField": "answer"}]},
        training={"steps": 10, "batchSize": 8},
        rollout={
            "mode": "async",
            "replicas": 2,
            "resources": {"accelerator": "nvidia-l4", "gpusPerNode": 1},
        },
        scheduling={"queueName": queue},
    )


def role_of(pod: dict) -> str:
    return pod["metadata"]["labels"]["jobset.sigs.k8s.io/replicatedjob-name"]


def live_pods(api: Api, name: str) -> list[dict]:
    return [
        p
        for p in api.items("pods", "-l", f"{r.JOB_LABEL}={name}")
        if not p["metadata"].get("deletionTimestamp")
    ]


def test_async_job_is_admitted_all_or_nothing_and_survives_its_workers(
    cluster, namespace, kubectl, operator, kueue_queue
) -> None:
    """Real Kueue. The ClusterQueue has quota for the trainer's TPU only: the async job's one
    Workload (a podset per role) waits, and no pod of either role is made. Quota for the
    workers' GPUs added, Kueue admits both roles together: a trainer pod on a TPU node and two
    worker pods on L4 nodes, whose env finds the trainer. The trainer reports status.rollout
    (kubectl's POLICY, STALENESS, SYNC-S, ROLLOUT-TOK/S columns). Evicting one worker and
    deleting the other recreates them in their Jobs: the trainer's pod stays, no JobSet
    restart, still Running. The job succeeds when the trainer does (the JobSet's successPolicy),
    with a worker still running, and the operator's status writes kept status.rollout."""
    api = Api(kubectl)
    name = "arl"
    api.apply(async_manifest(name, kueue_queue["team-a"], run_seconds=40))
    api.wait_phase(name, "Queued", operator)
    workload = wait_for(
        "the Workload to wait for quota",
        lambda: next(
            (
                w
                for w in api.items("workloads")
                if any(
                    c["type"] == "QuotaReserved" and c["status"] == "False"
                    for c in (w.get("status") or {}).get("conditions") or []
                )
            ),
            None,
        ),
        60,
    )
    assert [ps["name"] for ps in workload["spec"]["podSets"]] == ["slice", "rollout"]
    assert [ps["count"] for ps in workload["spec"]["podSets"]] == [1, 2]
    cond = wait_for(
        "Kueue's reason on the job",
        lambda: (c := running_condition(api.status(name)))["reason"] == "WaitingForQuota" and c,
        30,
    )
    assert "nvidia.com/gpu" in cond["message"], cond
    time.sleep(2)  # anything admitted would have made pods by now
    assert api.get("jobset", name)["spec"]["suspend"] is True
    assert not api.items("pods", "-l", f"{r.JOB_LABEL}={name}")

    # quota for the workers' GPUs: a flavor for L4 nodes and a resource group in the queue
    flavor = f"{namespace}-l4"
    cluster.kubectl(
        "apply", "-f", "-",
        input=yaml.safe_dump({
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
            "metadata": {"name": flavor},
            "spec": {"nodeLabels": {r.GKE_ACCELERATOR: "nvidia-l4"}},
        }),
    )  # fmt: skip
    try:
        group = {
            "coveredResources": [r.GPU_RESOURCE],
            "flavors": [
                {"name": flavor, "resources": [{"name": r.GPU_RESOURCE, "nominalQuota": 2}]}
            ],
        }
        patch = [{"op": "add", "path": "/spec/resourceGroups/-", "value": group}]
        cluster.kubectl("patch", "clusterqueue", kueue_queue["tpu"], "--type=json",
                        "-p", json.dumps(patch))  # fmt: skip
        status = api.wait_phase(name, "Running", operator, timeout=120)
        assert status["restarts"] == 0
        pods = wait_for(
            "a trainer and two workers running",
            lambda: (
                len(
                    ps := [p for p in live_pods(api, name) if p["status"].get("phase") == "Running"]
                )
                == 3
                and ps
            ),
            60,
        )
        by_role: dict[str, list[dict]] = {}
        for pod in pods:
            by_role.setdefault(role_of(pod), []).append(pod)
        (trainer,) = by_role["slice"]
        workers = by_role["rollout"]
        assert len(workers) == 2
        node = api.get("node", trainer["spec"]["nodeName"])
        assert node["metadata"]["labels"][r.GKE_TPU_ACCELERATOR] == "tpu-v5-lite-podslice"
        service = f"{trainer['spec']['hostname']}.{trainer['spec']['subdomain']}:8477"
        env = resolve_env(trainer["spec"]["containers"][0]["env"], trainer["metadata"])
        assert env[runtime.ROLE] == "trainer" and env[runtime.TRAINER_ADDRESS] == service
        indexes = set()
        for pod in workers:
            node = api.get("node", pod["spec"]["nodeName"])
            assert node["metadata"]["labels"][r.GKE_ACCELERATOR] == "nvidia-l4"
            env = resolve_env(pod["spec"]["containers"][0]["env"], pod["metadata"])
            assert env[runtime.ROLE] == "rollout" and env[runtime.TRAINER_ADDRESS] == service
            assert runtime.COORDINATOR_ADDRESS not in env and runtime.SLICE_ID not in env
            indexes.add(env[runtime.ROLLOUT_WORKER])
        assert indexes == {"0", "1"}

        # the trainer reports its rollout numbers with its progress: kubectl's columns
        reporter = trainer_reporter(kubectl, cluster, namespace, name)
        rollout = {"policy_version": 3, "staleness_mean": 0.5, "weight_sync_seconds": 1.25,
                   "tokens_per_second": 812.5, "workers": 2}  # fmt: skip
        assert reporter.report(3, 10, {"loss": 1.0}, rollout=rollout)
        columns = api.columns(name)
        assert (columns["POLICY"], columns["STALENESS"]) == ("3", "0.5"), columns
        assert (columns["SYNC-S"], columns["ROLLOUT-TOK/S"]) == ("1.25", "812.5"), columns
        assert columns["PROGRESS"] == "30%", columns

        # a worker evicted, the other deleted: each Job makes its pod again, nothing else moves
        evicted, deleted = sorted(workers, key=lambda p: p["metadata"]["name"])
        victim = evicted["metadata"]["name"]
        eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": victim}}
        kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{victim}/eviction",
                "-f", "-", input=json.dumps(eviction))  # fmt: skip
        kubectl("delete", "pod", deleted["metadata"]["name"], "--wait=false")
        old = {evicted["metadata"]["uid"], deleted["metadata"]["uid"]}
        wait_for(
            "two new workers running",
            lambda: (
                len(
                    [
                        p
                        for p in live_pods(api, name)
                        if role_of(p) == "rollout"
                        and p["status"].get("phase") == "Running"
                        and p["metadata"]["uid"] not in old
                    ]
                )
                == 2
            ),
            60,
        )
        (still,) = [p for p in live_pods(api, name) if role_of(p) == "slice"]
        assert still["metadata"]["uid"] == trainer["metadata"]["uid"]
        assert still["status"]["phase"] == "Running"
        jobset = api.get("jobset", name)
        assert (jobset["status"].get("restarts") or 0) == 0, jobset["status"]
        cond = wait_for(
            "the job Running with both workers back",
            lambda: (
                (s := api.status(name)).get("phase") == "Running"
                and running_condition(s)["message"].endswith("all 2 rollout workers running")
                and s
            ),
            30,
        )
        assert cond["restarts"] == 0
        assert not [e for e in api.events(name) if e[0] == "Restarted"]

        # the trainer finishes first (the new workers started later): the set succeeds
        status = api.wait_phase(name, "Succeeded", operator, timeout=90)
        assert status["restarts"] == 0
        assert status["rollout"] == {
            "policyVersion": 3, "stalenessMean": 0.5, "weightSyncSeconds": 1.25,
            "tokensPerSecond": 812.5, "workers": 2,
        }  # fmt: skip
        assert api.columns(name)["POLICY"] == "3"
        wait_for(
            "the workers' Jobs to go",
            lambda: (
                not [
                    j
                    for j in api.items("jobs", "-l", f"{r.JOB_LABEL}={name}")
                    if not j["metadata"].get("deletionTimestamp")
                    and not any(
                        c["type"] in ("Complete", "Failed") and c["status"] == "True"
                        for c in (j.get("status") or {}).get("conditions") or []
                    )
                ]
            ),
            60,
        )
    finally:
        kubectl("delete", "posttrainjob", name, "--wait=false", check=False)
        cluster.kubectl("delete", "resourceflavor", flavor, "--wait=false", check=False)
