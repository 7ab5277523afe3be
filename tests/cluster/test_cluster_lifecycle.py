"""`cluster.sh up` is idempotent and `down` leaves no process behind.

Runs a second, small cluster in its own directory and ports, so the session's shared
cluster (the `cluster` fixture) is never touched.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]


def free_port_base(count: int = 11) -> int:
    """A base port with `count` free consecutive loopback ports after it."""
    for base in range(27443, 40000, 97):
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free loopback port range")


def processes_mentioning(text: str) -> dict[int, str]:
    """pid -> command line of every live process whose command line contains `text`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # exited meanwhile
            continue
        if text in cmdline:
            found[int(proc.name)] = cmdline
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited child stays a zombie until init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def recorded_pids(cluster_dir: Path) -> dict[str, int]:
    return {f.stem: int(f.read_text()) for f in (cluster_dir / "pids").glob("*.pid")}


def test_up_is_idempotent_and_down_leaves_nothing_running(cluster, tmp_path):
    # `cluster` only makes sure the binaries are built; this test runs a cluster of its own.
    cluster_dir = tmp_path / "second-cluster"
    env = {
        **os.environ,
        "CLUSTER_DIR": str(cluster_dir),
        "CLUSTER_PORT_BASE": str(free_port_base()),
        "DEFAULT_POOL_NODES": "1",
    }

    def sh(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(REPO / "hack/cluster.sh"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    pids: dict[str, int] = {}
    up = sh("up")
    try:
        assert up.returncode == 0, up.stderr
        pids = recorded_pids(cluster_dir)
        assert set(pids) == {
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "jobset",
            "kueue",
            "kwok",
            "provisioner",
        }
        procs = processes_mentioning(str(cluster_dir))
        assert set(pids.values()) <= set(procs), (pids, procs)

        again = sh("up")  # a healthy cluster is left alone
        assert again.returncode == 0, again.stderr
        assert "already up" in again.stderr
        assert recorded_pids(cluster_dir) == pids
    finally:
        down = sh("down")
    assert down.returncode == 0, down.stderr
    assert processes_mentioning(str(cluster_dir)) == {}
    for name, pid in pids.items():
        assert not running(pid), f"{name} (pid {pid}) is still running"
    assert not (cluster_dir / "kubeconfig").exists()
    assert sh("status").returncode != 0
