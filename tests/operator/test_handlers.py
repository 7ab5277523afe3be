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
    assert settings.peering.standalone


def test_a_workload_names_its_job_through_its_owner_jobset() -> None:
    """Workload events (Kueue's quota and preemption reasons) reach the job their JobSet is of."""
    recorded = json.loads((Path(__file__).parent / "kueue/workload-preempted.json").read_text())
    assert handlers.job_of_workload(recorded) == "second"
    other = {
        "metadata": {"ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "x"}]}
    }
    assert handlers.job_of_workload(other) is None
    assert handlers.job_of_workload({"metadata": {}}) is None


def test_only_event_handlers_so_kopf_keeps_no_bookkeeping_on_objects() -> None:
    """No create/update/resume/delete handlers: kopf stores no diff-base or progress on a job
    and puts no finalizer on it; change detection is Operator.observe_job's."""
    registry = kopf.get_default_registry()
    assert not registry._changing.get_all_handlers()
    assert not registry._spawning.get_all_handlers()
    assert len(registry._watching.get_all_handlers()) == 5
