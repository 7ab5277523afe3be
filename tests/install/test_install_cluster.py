"""`helm install` on the local control plane, then the operator and the trainer with exactly the
chart's permissions.

There is no image to run here, so the operator runs as a subprocess from this venv, with the
arguments the installed Deployment carries and a token of the chart's ServiceAccount (the
identity its pod would have): a job goes PostTrainJob -> JobSet -> (kwok's fake) pods ->
Succeeded, which proves the chart's ClusterRole is enough. SelfSubjectRulesReviews, made as each
ServiceAccount (`--as`), show it is not more: what each may do equals docs/operator.md's list,
in the watched namespace and outside it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from posttrain.progress import ProgressReporter

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
TRAINER_SA = "posttrain-trainer"
Triple = tuple[str, str, str]  # (apiGroup, resource, verb)


@dataclass(frozen=True)
class Release:
    cluster: Any
    namespace: str  # where the chart is installed (Pod Security "restricted" enforced)
    jobs: str  # the namespace the operator watches and trainers run in
    other: str  # a namespace neither may touch
    name: str  # the Helm release; cluster-scoped objects are named after it
    install_output: str = ""  # what `helm install` printed (NOTES.txt)

    @property
    def fullname(self) -> str:
        return f"{self.name}-posttrain"  # the chart's FULLNAME for a release without "posttrain"

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        return self.cluster.kubectl(*args, **kw)

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def sa_user(self, namespace: str, name: str) -> str:
        return f"system:serviceaccount:{namespace}:{name}"


def wait_for(what: str, check: Callable[[], Any], timeout: float, detail=lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{detail()}")
        time.sleep(0.5)
    return value


def create_namespace(cluster, name: str, **labels: str) -> None:
    cluster.kubectl("create", "namespace", name)
    if labels:
        cluster.kubectl("label", "namespace", name, *[f"{k}={v}" for k, v in labels.items()])
    wait_for(
        f"the default service account in {name}",
        lambda: cluster.kubectl("-n", name, "get", "sa", "default", check=False).returncode == 0,
        30,
    )


@pytest.fixture(scope="module")
def release(cluster, helm: str) -> Iterator[Release]:
    # A fresh release name each run: its ClusterRoles cannot clash with a run that died before
    # uninstalling, nor with tests/operator's own `posttrain-operator` RBAC.
    suffix = secrets.token_hex(3)
    rel = Release(
        cluster, f"pt-install-{suffix}", f"pt-jobs-{suffix}", f"pt-other-{suffix}", f"pt{suffix}"
    )
    cmd = [helm, "--kubeconfig", str(cluster.kubeconfig), "-n", rel.namespace]
    try:
        create_namespace(
            cluster,
            rel.namespace,
            **{
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            },
        )
        create_namespace(cluster, rel.jobs)
        create_namespace(cluster, rel.other)
        proc = subprocess.run(
            [*cmd, "install", rel.name, str(REPO / "charts/posttrain")]
            + ["--set", f"watchNamespaces={{{rel.jobs}}}", "--wait", "--timeout", "120s"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, f"helm install failed:\n{proc.stdout}\n{proc.stderr}"
        yield Release(cluster, rel.namespace, rel.jobs, rel.other, rel.name, proc.stdout)
    finally:
        # Also after a failed install: helm keeps a "failed" release and what it created.
        subprocess.run([*cmd, "uninstall", rel.name, "--wait"], capture_output=True, timeout=120)
        for ns in (rel.namespace, rel.jobs, rel.other):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def token_kubeconfig(rel: Release, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount, with a token of its own."""
    token = rel.kubectl("-n", namespace, "create", "token", sa, "--duration", "1h").stdout.strip()
    config = yaml.safe_load(rel.cluster.kubeconfig.read_text())
    config["users"] = [{"name": sa, "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = sa
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the install -----------------------------------------------------------------------------


def test_operator_pod_is_admitted_under_restricted_pod_security(release: Release) -> None:
    """`--wait` returned, so the Deployment's pod exists in a namespace enforcing "restricted"."""
    deployment = release.get("-n", release.namespace, "deployment", f"{release.fullname}-operator")
    assert deployment["status"].get("availableReplicas") == 1
    pods = release.get(
        "-n", release.namespace, "pods", "-l", "app.kubernetes.io/component=operator"
    )
    (pod,) = pods["items"]
    assert pod["spec"]["serviceAccountName"] == f"{release.fullname}-operator"
    # The same pod spec, submitted afresh, passes the restricted standard with no warning.
    probe = {k: pod[k] for k in ("apiVersion", "kind", "spec")}
    probe["metadata"] = {"name": "psa-probe", "namespace": release.namespace}
    probe["spec"] = {k: v for k, v in probe["spec"].items() if k != "nodeName"}
    proc = release.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(probe))
    assert "violate PodSecurity" not in proc.stderr, proc.stderr


def test_notes_say_how_to_submit_and_watch_a_job(release: Release) -> None:
    notes = release.install_output
    assert f"kubectl -n {release.jobs} apply -f job.yaml" in notes, notes
    assert f"kubectl -n {release.jobs} get posttrainjobs --watch" in notes, notes
    assert f"rollout status deployment/{release.fullname}-operator" in notes, notes


def test_crd_and_trainer_accounts_are_installed(release: Release) -> None:
    crd = release.get("crd", "posttrainjobs.posttrain.dev")
    assert any(
        c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"]
    )
    assert release.get("-n", release.jobs, "serviceaccount", TRAINER_SA)
    assert release.kubectl("-n", release.other, "get", "sa", TRAINER_SA, check=False).returncode


# ---- enough: the operator completes a job with the chart's permissions ----------------------


class Operator:
    """The installed Deployment's command, run here as its ServiceAccount."""

    def __init__(self, release: Release, workdir: Path) -> None:
        deployment = release.get(
            "-n", release.namespace, "deployment", f"{release.fullname}-operator"
        )
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        self.port = free_port()
        # The image's entrypoint (`posttrain operator`) with the chart's arguments; only the
        # liveness port moves (8080 may be taken here) and the pod's identity becomes a token.
        args = [
            f"--liveness=http://127.0.0.1:{self.port}/healthz" if a.startswith("--liveness=") else a
            for a in container["args"]
        ]
        sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        kubeconfig = token_kubeconfig(release, release.namespace, sa, workdir / "kubeconfig")
        self.cmd = [str(Path(sys.executable).with_name("posttrain")), "operator", *args]
        self.cmd += ["--kubeconfig", str(kubeconfig)]
        self.log = workdir / "operator.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Operator:
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.log.parent
            )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def output(self) -> str:
        return self.log.read_text()

    def healthz(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return r.status
        except OSError:
            return None


def job_manifest(name: str) -> dict:
    return {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainJob",
        "metadata": {"name": name, "annotations": {"posttrain.dev/fake-run-seconds": "2"}},
        "spec": {
            "algorithm": "sft",
            "model": {"base": "builtin:tiny"},
            "data": {"train": "/data/train.jsonl"},
            "training": {"steps": 5},
            "resources": {"accelerator": "cpu", "nodes": 2},
            "output": {"dir": "/tmp/posttrain-out"},
        },
    }


def test_operator_runs_a_job_to_success_with_the_charts_permissions(
    release: Release, tmp_path: Path
) -> None:
    name = "install-smoke"
    with Operator(release, tmp_path) as op:
        wait_for("the liveness endpoint", lambda: op.healthz() == 200, 60, op.output)
        release.kubectl(
            "-n", release.jobs, "apply", "-f", "-", input=yaml.safe_dump(job_manifest(name))
        )

        def status() -> dict:
            job = release.get("-n", release.jobs, "posttrainjob", name)
            return job.get("status") or {}

        final = wait_for(
            "the job to succeed",
            lambda: status().get("phase") in ("Succeeded", "Failed") and status(),
            180,
            lambda: (
                f"status: {json.dumps(status(), indent=1)}\noperator log:\n{op.output()[-4000:]}"
            ),
        )
        assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
        log = op.output()
    # It really went through a JobSet and pods that ran as the chart's trainer account.
    jobset = release.get("-n", release.jobs, "jobset", final.get("jobSetName") or name)
    assert any(
        c["type"] == "Completed" and c["status"] == "True" for c in jobset["status"]["conditions"]
    )
    pods = release.get("-n", release.jobs, "pods", "-l", f"posttrain.dev/job={name}")["items"]
    assert len(pods) == 2 and {p["status"]["phase"] for p in pods} == {"Succeeded"}
    assert {p["spec"]["serviceAccountName"] for p in pods} == {TRAINER_SA}
    # The image defaults came from the chart's values (cpu: posttrain/trainer:VERSION-cpu).
    image = pods[0]["spec"]["containers"][0]["image"]
    assert image.startswith("posttrain/trainer:") and image.endswith("-cpu"), image
    # Not one request was refused, kopf's own included (it would log a warning and carry on).
    for sign in ("Forbidden", "forbidden", "Not enough permissions"):
        assert sign not in log, f"{sign!r} in the operator's log:\n{log[-4000:]}"


def test_trainer_reports_progress_with_the_charts_permissions(release: Release) -> None:
    name = "install-progress"
    release.kubectl(
        "-n", release.jobs, "apply", "-f", "-", input=yaml.safe_dump(job_manifest(name))
    )
    config = yaml.safe_load(release.cluster.kubeconfig.read_text())
    server = config["clusters"][0]["cluster"]["server"]
    token = release.kubectl("-n", release.jobs, "create", "token", TRAINER_SA).stdout.strip()
    ca = release.cluster.dir / "pki" / "ca.crt"

    def reporter(namespace: str, job: str) -> ProgressReporter:
        return ProgressReporter(
            job, namespace, api_server=server, token=token, ca_file=ca, min_interval=0, env={}
        )

    assert reporter(release.jobs, name).report(3, 5, {"loss": 1.5}) is True
    progress = release.get("-n", release.jobs, "posttrainjob", name)["status"]["progress"]
    assert (progress["step"], progress["totalSteps"], progress["metrics"]) == (3, 5, {"loss": 1.5})
    # The same token cannot report to a job in another namespace.
    release.kubectl(
        "-n", release.other, "apply", "-f", "-", input=yaml.safe_dump(job_manifest(name))
    )
    assert reporter(release.other, name).report(1, 5) is False
    other = release.get("-n", release.other, "posttrainjob", name)
    assert "progress" not in (other.get("status") or {})


# ---- not more: each account may do exactly its documented list, and nothing elsewhere --------


def rules_review(release: Release, user: str, namespace: str) -> set[Triple]:
    """What `user` may do in `namespace` (a SelfSubjectRulesReview made as that user)."""
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": namespace},
    }
    # --validate=false: kubectl's schema check would itself run as `user` (and need CRDs).
    args = ["create", "--as", user, "--validate=false", "-f", "-", "-o", "json"]
    proc = release.kubectl(*args, input=json.dumps(review))
    status = json.loads(proc.stdout)["status"]
    assert not status.get("incomplete"), status.get("evaluationError")
    return {
        (g, r, v)
        for rule in status["resourceRules"]
        for g in rule.get("apiGroups", [])
        for r in rule.get("resources", [])
        for v in rule["verbs"]
    }


def documented(kind: str) -> set[Triple]:
    """The rules of the (Cluster)Role that docs/operator.md shows."""
    text = (REPO / "docs/operator.md").read_text()
    for block in text.split("```yaml")[1:]:
        for doc in yaml.safe_load_all(block.split("```")[0]):
            if doc and doc.get("kind") == kind and "rules" in doc:
                return {
                    (g, r, v)
                    for rule in doc["rules"]
                    for g in rule["apiGroups"]
                    for r in rule["resources"]
                    for v in rule["verbs"]
                }
    raise AssertionError(f"docs/operator.md shows no {kind}")


CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces"}


def test_operator_may_do_exactly_what_it_uses(release: Release) -> None:
    operator = release.sa_user(release.namespace, f"{release.fullname}-operator")
    # What every ServiceAccount may do (discovery, self reviews), from one with no bindings.
    release.kubectl("-n", release.jobs, "create", "serviceaccount", "nobody")
    baseline = rules_review(release, release.sa_user(release.jobs, "nobody"), release.jobs)
    watched = rules_review(release, operator, release.jobs) - baseline
    elsewhere = rules_review(release, operator, release.other) - baseline
    assert watched == documented("ClusterRole"), (
        f"more than documented: {sorted(watched - documented('ClusterRole'))}; "
        f"missing: {sorted(documented('ClusterRole') - watched)}"
    )
    # Outside the watched namespace only the cluster-scoped reads of kopf remain.
    assert elsewhere == {t for t in documented("ClusterRole") if t[1] in CLUSTER_SCOPED}


def test_trainer_may_only_report_status_in_its_namespace(release: Release) -> None:
    trainer = release.sa_user(release.jobs, TRAINER_SA)
    release.kubectl("-n", release.jobs, "create", "serviceaccount", "nobody2")
    baseline = rules_review(release, release.sa_user(release.jobs, "nobody2"), release.jobs)
    assert rules_review(release, trainer, release.jobs) - baseline == documented("Role")
    assert rules_review(release, trainer, release.other) - baseline == set()


@pytest.mark.parametrize(
    ("who", "verb", "what", "where"),
    [
        ("operator", "get", "secrets", "jobs"),
        ("operator", "list", "secrets", "all"),
        ("operator", "delete", "nodes", "cluster"),
        ("operator", "create", "pods", "jobs"),
        ("operator", "create", "pods/exec", "jobs"),
        ("operator", "delete", "jobsets.jobset.x-k8s.io", "jobs"),
        ("operator", "create", "jobsets.jobset.x-k8s.io", "other"),
        ("operator", "list", "posttrainjobs.posttrain.dev", "other"),
        ("operator", "delete", "posttrainjobs.posttrain.dev", "jobs"),
        ("operator", "delete", "configmaps", "jobs"),
        ("operator", "create", "clusterroles.rbac.authorization.k8s.io", "cluster"),
        ("operator", "impersonate", "serviceaccounts", "jobs"),
        ("trainer", "patch", "posttrainjobs.posttrain.dev", "jobs"),  # spec: only status
        ("trainer", "get", "secrets", "jobs"),
        ("trainer", "list", "pods", "jobs"),
        ("trainer", "patch", "posttrainjobs.posttrain.dev/status", "other"),
    ],
)
def test_auth_can_i_denies(release: Release, who: str, verb: str, what: str, where: str) -> None:
    user = {
        "operator": release.sa_user(release.namespace, f"{release.fullname}-operator"),
        "trainer": release.sa_user(release.jobs, TRAINER_SA),
    }[who]
    scope = {
        "jobs": ["-n", release.jobs],
        "other": ["-n", release.other],
        "all": ["--all-namespaces"],
        "cluster": [],
    }[where]
    resource, _, sub = what.partition("/")
    args = ["auth", "can-i", verb, resource, *(["--subresource", sub] if sub else [])]
    proc = release.kubectl(*args, "--as", user, *scope, check=False)
    assert proc.stdout.strip() == "no", f"{who} may {verb} {what} in {where}: {proc.stdout}"
