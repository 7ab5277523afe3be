"""Shared trainer test fixtures: the reference-fixture folder, a local GCS emulator, and a runner
of test files as scripts on simulated CPU devices."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures: tiny HF reference models (hf-reference/<name>) and a tokenizer (tokenizer/)."""
    return FIXTURES


@pytest.fixture
def run_on_cpu_devices():
    """``run(script, marker, devices=4, timeout=300, env=None)``: runs ``script`` (a test file's
    own ``__main__`` checks) in a fresh interpreter on ``devices`` simulated CPU devices, since
    XLA_FLAGS must be set before JAX initialises, and asserts that it exited 0 and printed
    ``marker``. ``env``: the environment to start from (default: this one)."""

    def run(
        script: str,
        marker: str,
        *,
        devices: int = 4,
        timeout: int = 300,
        env: dict[str, str] | None = None,
    ) -> None:
        env = dict(
            os.environ if env is None else env,
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            JAX_PLATFORMS="cpu",
        )
        proc = subprocess.run(
            [sys.executable, "-P", script], env=env, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert marker in proc.stdout, proc.stdout[-3000:]

    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real GCS JSON-API emulator (gcp-storage-emulator) on a loopback port, with bucket ``test-bucket``.

    Sets STORAGE_EMULATOR_HOST for the session, so ``posttrain.trainer.storage`` (and any
    google-cloud-storage client) talks to it. Yields the bucket name.
    """
    server_mod = pytest.importorskip("gcp_storage_emulator.server")
    from posttrain.trainer import storage

    port = _free_port()
    server = server_mod.create_server(
        "127.0.0.1", port, in_memory=True, default_bucket="test-bucket"
    )
    server.start()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    storage.gcs_client.cache_clear()
    try:
        yield "test-bucket"
    finally:
        server.stop()
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        storage.gcs_client.cache_clear()
