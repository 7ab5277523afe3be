"""Shared trainer test fixtures: the reference-fixture folder and a local GCS emulator."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures: tiny HF reference models (hf-reference/<name>) and a tokenizer (tokenizer/)."""
    return FIXTURES


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
