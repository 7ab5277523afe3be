"""Fixtures for the install tests: the pinned helm binary and `helm template` as Python data.

(Helpers are fixtures, not imports: pytest runs with --import-mode=importlib, so test modules
cannot import one another.)
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Chart:
    """charts/posttrain and the helm that renders it."""

    helm: str
    path: Path = REPO / "charts/posttrain"
    release: str = "posttrain"
    namespace: str = "posttrain-system"
    # The API the chart's install-time check looks for (Chart.yaml annotations).
    jobset_api: str = "jobset.x-k8s.io/v1alpha2/JobSet"

    def template(self, *args: str, jobset: bool = True) -> subprocess.CompletedProcess:
        """`helm template` with the CRDs; `jobset`: pretend the cluster serves JobSet."""
        cmd = [self.helm, "template", self.release, str(self.path), "-n", self.namespace]
        cmd += ["--include-crds"]  # no --kube-version: helm is built knowing the pinned one
        if jobset:
            cmd += ["--api-versions", self.jobset_api]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)

    def render(self, *args: str, jobset: bool = True) -> list[dict]:
        proc = self.template(*args, jobset=jobset)
        if proc.returncode != 0:
            raise AssertionError(f"helm template {' '.join(args)} failed:\n{proc.stderr}")
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]

    @staticmethod
    def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
        """The manifests of one kind (and name), in rendering order."""
        return [
            d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
        ]

    @staticmethod
    def pinned_version(group: str, module: str) -> str:
        """The version hack/tools/GROUP/go.mod pins for MODULE."""
        for line in (REPO / f"hack/tools/{group}/go.mod").read_text().splitlines():
            words = line.split()
            if words[:1] == [module]:
                return words[1]
            if words[:2] == ["require", module]:
                return words[2]
        raise AssertionError(f"hack/tools/{group}/go.mod does not pin {module}")

    @property
    def kube_version(self) -> str:
        """The Kubernetes the local cluster runs (hack/tools/kube)."""
        return self.pinned_version("kube", "k8s.io/kubernetes")

    @property
    def meta(self) -> dict:
        return yaml.safe_load((self.path / "Chart.yaml").read_text())


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm the control-plane scripts pin (hack/tools/helm), built on first use."""
    proc = subprocess.run(
        [str(REPO / "hack/tools.sh"), "path", "helm"], capture_output=True, text=True, timeout=3600
    )
    if proc.returncode != 0:
        pytest.fail(f"could not build helm (hack/tools.sh path helm):\n{proc.stderr[-3000:]}")
    return proc.stdout.strip()


@pytest.fixture(scope="session")
def chart(helm: str) -> Chart:
    return Chart(helm)
