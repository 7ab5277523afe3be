"""The kopf handlers: thin. Each caches what the watch delivered and queues the job's key; worker
threads run Operator.reconcile for each key (reconcile.py: one level-triggered reconcile per job).

    PostTrainJob listed (operator start), created, spec/labels/annotations changed -> queued
    JobSet event (label posttrain.dev/job), but the one the operator's apply returned  -> queued
    pod event (label posttrain.dev/job), while the job starts or (async RL) runs     -> queued
    Event FailedCreate on one of its Jobs (pods refused)                              -> queued
    Kueue Workload event (owned by one of our JobSets)                                -> queued

JobSets and pods are watched with a server-side label selector (posttrain.dev/job), Events with
a field selector (reason FailedCreate, on Jobs): the operator never receives the cluster's
other pods.

Only event handlers (kopf.on.event), async and quick (no thread hop): no create, update or
resume handlers, so kopf keeps no bookkeeping on the objects at all (no diff-base, no progress
annotations, no finalizers: deletion never waits for the operator). The change detection kopf's
update handlers did is Operator.observe_job's, against the cached job; a reconcile that fails is
queued again with a back-off (the work queue), not retried by kopf. Children go with their owner
through ownerReferences and the garbage collector.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes import client, config

from posttrain.api import GROUP, PLURAL, VERSION
from posttrain.operator import render as r
from posttrain.operator import status as st
from posttrain.operator.reconcile import (
    JOBSET_GROUP,
    JOBSET_PLURAL,
    JOBSET_VERSION,
    KUEUE_GROUP,
    KUEUE_VERSION,
    WORKERS,
    WORKLOAD_PLURAL,
    Operator,
    job_of_child_job,
)

FAILED_CREATE_SELECTOR = "reason=FailedCreate,involvedObject.kind=Job"
# Set by `posttrain operator` before kopf starts (image defaults and --peering from its flags).
IMAGE_DEFAULTS: r.ImageDefaults = r.ImageDefaults.from_env(os.environ)
PEERING: str | None = None
# How long a replica's peering record outlives its last keep-alive (kopf sends one every
# lifetime - 5..10 s): a SIGKILLed active replica is replaced this long after its last one. One
# that exits normally removes its record, and a waiting replica takes over at once.
PEERING_LIFETIME_S = 15

_operator: Operator | None = None


def api_client() -> client.ApiClient:
    """In a pod: its service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config()
    else:
        # explicit: the client's default path was read from the environment at import time
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    configuration = client.Configuration.get_default_copy()
    # a connection per handler thread and per side thread (reconcile.WORKERS); fewer, and
    # urllib3 opens (TLS handshake) and drops connections beyond the pool in a burst
    configuration.connection_pool_maxsize = 2 * WORKERS
    return client.ApiClient(configuration)


def _emit(body: Any, event: st.Event) -> None:
    kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1024])


def operator() -> Operator:
    assert _operator is not None, "the startup handler has not run"
    return _operator


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _operator
    if PEERING:
        settings.peering.lifetime = PEERING_LIFETIME_S
    else:
        settings.peering.standalone = True  # one replica; no KopfPeering objects needed
    settings.posting.level = logging.WARNING  # our own Events, not "Handler ... succeeded"
    # Server-side filters: only our JobSets and pods, only the Events that say pods are refused.
    settings.watching.label_selectors["v1", "pods"] = r.JOB_LABEL
    settings.watching.label_selectors[JOBSET_GROUP, JOBSET_PLURAL] = r.JOB_LABEL
    settings.watching.field_selectors["v1", "events"] = FAILED_CREATE_SELECTOR
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    _operator = Operator(api_client(), images=IMAGE_DEFAULTS, emit=_emit)


def _queue(namespace: str | None, name: str | None) -> bool:
    """Whether the event names a job; starts the workers on the first (they post Events
    through kopf, which needs the context of its handlers)."""
    if not namespace or not name:
        return False
    op = operator()
    if not op._workers:
        op.start(contextvars.copy_context())
    return True


@kopf.on.event(GROUP, VERSION, PLURAL)
async def job_event(event: Mapping[str, Any], type: str | None, **_: Any) -> None:
    body = event["object"]
    meta = body.get("metadata") or {}
    if _queue(meta.get("namespace"), meta.get("name")):
        operator().observe_job(body, type)


@kopf.on.event(JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL, labels={r.JOB_LABEL: kopf.PRESENT})
async def jobset_event(
    event: Mapping[str, Any], namespace: str | None, labels: Mapping[str, str], type: str | None,
    **_: Any,
) -> None:  # fmt: skip
    job = labels[r.JOB_LABEL]
    if _queue(namespace, job):
        operator().observe_jobset((str(namespace), job), event["object"], type)


def job_of_workload(body: Mapping[str, Any]) -> str | None:
    """The PostTrainJob behind a Kueue Workload: its owner JobSet carries the job's name."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "JobSet" and str(ref.get("apiVersion", "")).startswith(
            JOBSET_GROUP + "/"
        ):
            return str(ref.get("name") or "") or None
    return None


# Kueue's reasons (quota, preemption) change the Workload, not the JobSet. Without Kueue in the
# cluster its CRD is absent and kopf watches nothing here (it starts when the CRD appears).
@kopf.on.event(KUEUE_GROUP, KUEUE_VERSION, WORKLOAD_PLURAL)
async def workload_event(
    namespace: str | None, body: Mapping[str, Any], type: str | None, **_: Any
) -> None:
    job = job_of_workload(body)
    if type is not None and type != "DELETED" and _queue(namespace, job):
        operator().enqueue(str(namespace), str(job))


@kopf.on.event("v1", "events")
async def failed_create_event(
    event: Mapping[str, Any], namespace: str | None, type: str | None, **_: Any
) -> None:
    # type None: the initial listing, so a restarted operator still knows (Events live an hour)
    body = event["object"]
    job = job_of_child_job(str((body.get("involvedObject") or {}).get("name") or ""))
    if _queue(namespace, job):
        operator().observe_failed_create((str(namespace), str(job)), body, type)


@kopf.on.event("v1", "pods", labels={r.JOB_LABEL: kopf.PRESENT})
async def pod_event(
    namespace: str | None, labels: Mapping[str, str], type: str | None, **_: Any
) -> None:
    job = labels[r.JOB_LABEL]
    if _queue(namespace, job):
        operator().observe_pod((str(namespace), job), type)
