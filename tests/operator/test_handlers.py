"""The kopf wiring that needs no cluster: what startup() asks the API server to filter."""

from __future__ import annotations

import json
from pathlib import Path

import kopf
from kubernetes import client

from posttrain.operator import handlers
from posttrain.operator import render as r


def test_startup_filters_pods_jobsets_and_events_server_side(monkeypatch) -> None:
    monkeypatch.setattr(handlers, "api_client", lambda: client.ApiClient())
    settings = kopf.OperatorSettings()
    handlers.startup(settings=settings)
    selectors = dict(settings.watching.label_selectors.items())
    by_plural = {(s.group, s.any_name): value for s, value in selectors.items()}
    assert by_plural == {("", "pods"): r.JOB_LABEL, ("jobset.x-k8s.io", "jobsets"): r.JOB_LABEL}
    fields = {(s.group, s.any_name): v for s, v in settings.watching.field_selectors.items()}
    assert fields == {("", "events"): "reason=FailedCreate,involvedObject.kind=Job"}
    assert settings.peering.standalone and settings.execution.max_workers == handlers.WORKERS


def test_a_workload_names_its_job_through_its_owner_jobset() -> None:
    """Workload events (Kueue's quota and preemption reasons) reach the job their JobSet is of."""
    recorded = json.loads((Path(__file__).parent / "kueue/workload-preempted.json").read_text())
    assert handlers.job_of_workload(recorded) == "second"
    other = {
        "metadata": {"ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "x"}]}
    }
    assert handlers.job_of_workload(other) is None
    assert handlers.job_of_workload({"metadata": {}}) is None


def test_kopf_bookkeeping_writes_nothing_for_a_handled_job(monkeypatch) -> None:
    """kopf's diff-base lives in memory, and its progress store adds no marker annotation: a
    handler that succeeds at once leaves kopf nothing to patch on the object."""
    monkeypatch.setattr(handlers, "api_client", lambda: client.ApiClient())
    settings = kopf.OperatorSettings()
    handlers.startup(settings=settings)
    diffbase, progress = (
        settings.persistence.diffbase_storage,
        settings.persistence.progress_storage,
    )
    assert isinstance(diffbase, handlers.MemoryDiffBase)
    body = kopf.Body({"metadata": {"uid": "u1", "name": "j", "annotations": {}}, "spec": {"a": 1}})
    patch = kopf.Patch()
    assert diffbase.fetch(body=body) is None  # not seen by this process: kopf's "create"
    essence = diffbase.build(body=body)
    diffbase.store(body=body, patch=patch, essence=essence)
    assert diffbase.fetch(body=body) == essence and not patch
    # a handler's progress stored and purged in one cycle (success at the first try)
    progress.store(key=kopf.HandlerId("reconcile"), record={"started": "t"}, body=body, patch=patch)
    progress.purge(key=kopf.HandlerId("reconcile"), body=body, patch=patch)
    assert not patch
    diffbase.forget("u1")
    assert diffbase.fetch(body=body) is None
