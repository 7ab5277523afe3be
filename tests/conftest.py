"""Shared fixtures. Keep this light to import: no JAX, no kubernetes client at module level.

Cluster fixtures (see docs/development.md):
  cluster    session: the local control plane from hack/cluster.sh -- reused when already up
             (`make cluster-up`), otherwise started here and stopped at the end of the session
  kubeconfig path of its admin kubeconfig
  namespace  a fresh namespace per test, deleted afterwards
  kubectl    kubectl(*args, input=None, check=True) bound to the cluster and that namespace

Tests that use them are marked `cluster` automatically (`-m "not cluster"` skips them).
POSTTRAIN_KEEP_CLUSTER=1 leaves a cluster this session started running for later sessions.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FIXTURES = {"cluster", "kubeconfig", "namespace", "kubectl"}


def pytest_collection_modifyitems(items):
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


@dataclass(frozen=True)
class Cluster:
    dir: Path
    kubeconfig: Path

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ):
        """Run kubectl against this cluster; returns the CompletedProcess (text)."""
        cmd = ["kubectl", "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def get_json(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)


def _run(cmd: list[str], what: str, env: dict[str, str], timeout: float) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-4000:]
        pytest.fail(
            f"{what} failed (`{' '.join(cmd)}`, exit {proc.returncode}):\n{out}", pytrace=False
        )


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    env = dict(os.environ)
    cluster_dir = Path(env.get("CLUSTER_DIR", REPO / ".cluster"))
    status = subprocess.run(
        [str(REPO / "hack/cluster.sh"), "status"], cwd=REPO, env=env, capture_output=True
    )
    started_here = status.returncode != 0
    if started_here:
        # Build first, separately, so a build failure reads as one (a cold build takes long).
        _run(
            [str(REPO / "hack/tools.sh"), "build"],
            "building the control-plane binaries (see docs/development.md)",
            env,
            timeout=3600,
        )
        _run([str(REPO / "hack/cluster.sh"), "up"], "starting the local cluster", env, timeout=600)
    yield Cluster(cluster_dir, cluster_dir / "kubeconfig")
    if started_here and not env.get("POSTTRAIN_KEEP_CLUSTER"):
        _run(
            [str(REPO / "hack/cluster.sh"), "down"], "stopping the local cluster", env, timeout=120
        )


@pytest.fixture
def kubeconfig(cluster: Cluster) -> Path:
    return cluster.kubeconfig


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", name)
    # Pods are refused until the service-account controller has made `default`.
    deadline = time.monotonic() + 30
    while cluster.kubectl("-n", name, "get", "serviceaccount", "default", check=False).returncode:
        if time.monotonic() > deadline:
            raise AssertionError(f"no default service account in namespace {name} after 30s")
        time.sleep(0.2)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def kubectl(cluster: Cluster, namespace: str):
    def run(*args: str, input: str | None = None, check: bool = True, timeout: float = 60):
        return cluster.kubectl("-n", namespace, *args, input=input, check=check, timeout=timeout)

    return run
