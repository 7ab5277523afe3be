"""The small pure parts of reconcile.py (the rest runs against the real API server in
test_cluster.py)."""

from __future__ import annotations

from posttrain.api import parse_job
from posttrain.operator.reconcile import job_manifest, owned_by

from .test_render import BASE


def test_job_manifest_drops_status_and_bookkeeping() -> None:
    body = {
        **BASE,
        "metadata": {
            **BASE["metadata"],
            "resourceVersion": "7",
            "managedFields": [{"manager": "kubectl"}],
            "annotations": {"a": "b"},
        },
        "status": {"phase": "Running", "somethingKopfWrote": {}},
    }
    manifest = job_manifest(body)
    assert "status" not in manifest
    assert set(manifest["metadata"]) == {"name", "namespace", "uid", "annotations"}
    assert parse_job(manifest).metadata.name == "t"


def test_owned_by_needs_the_controller_reference_with_the_uid() -> None:
    owner = {"metadata": {"uid": "u1"}}
    mine = {"metadata": {"ownerReferences": [{"uid": "u1", "controller": True}]}}
    other = {"metadata": {"ownerReferences": [{"uid": "u0", "controller": True}]}}
    assert owned_by(mine, owner) and not owned_by(other, owner) and not owned_by({}, owner)


def test_job_of_child_job_reads_jobset_child_names() -> None:
    from posttrain.operator.reconcile import job_of_child_job

    assert job_of_child_job("qwen-grpo-slice-0") == "qwen-grpo"
    assert job_of_child_job("a-node-12") == "a"
    assert job_of_child_job("web-7f9c") is None


def test_a_jobset_event_already_synced_from_reads_nothing() -> None:
    from kubernetes import client

    from posttrain.operator.reconcile import Operator

    op = Operator(client.ApiClient())

    def no_reads(*_a, **_k):
        raise AssertionError("read the job")

    op.get_job = no_reads  # type: ignore[method-assign]
    op._synced_jobset[("ns", "j")] = "41"
    op.sync_status("ns", "j", jobset_version="41")  # the ADDED of the JobSet it made: no sync
    op.get_job = lambda *_a: None  # type: ignore[method-assign,assignment]
    op.sync_status("ns", "j", jobset_version="42")  # a newer one: synced (the job is gone)


def test_both_runs_the_two_at_once_and_raises_an_error_of_either() -> None:
    import threading

    import pytest
    from kubernetes import client

    from posttrain.operator.reconcile import Operator

    op = Operator(client.ApiClient())
    barrier = threading.Barrier(2, timeout=5)  # each waits for the other: at once, or a timeout
    op._both(barrier.wait, barrier.wait)

    def fail() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError):
        op._both(fail, lambda: None)
    with pytest.raises(ValueError):
        op._both(lambda: None, fail)


def test_job_manifest_keeps_labels_for_kueue() -> None:
    body = {**BASE, "metadata": {**BASE["metadata"], "labels": {"kueue.x-k8s.io/queue-name": "q"}}}
    manifest = job_manifest(body)
    assert manifest["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "q"}
    from posttrain.operator import render as r

    assert r.queue_name(parse_job(manifest)) == "q"
