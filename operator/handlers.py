"""The kopf handlers: thin. Each reads an object's name and hands it to reconcile.Operator.

    PostTrainJob created, resumed (operator start), spec or labels changed -> Operator.reconcile
    JobSet event (label posttrain.dev/job)                         -> Operator.sync_status
    pod event (label posttrain.dev/job), while the job starts      -> Operator.sync_status
    Event FailedCreate on one of its Jobs (pods refused)           -> Operator.pods_not_created
    Kueue Workload event (owned by one of our JobSets)             -> Operator.sync_status

JobSets and pods are watched with a server-side label selector (posttrain.dev/job), Events with
a field selector (reason FailedCreate, on Jobs): the operator never receives the cluster's
other pods.

No timers or daemons (kopf would put a finalizer on every PostTrainJob for them, and deletion
would hang while the operator is down) and no deletion handler: children go with their owner
through ownerReferences and the garbage collector. Handlers return None, so nothing of kopf's
lands in status (its schema is strict).

kopf's bookkeeping writes nothing in the normal case: the last-handled configuration (kopf's
"diff-base", what on.update diffs against) is kept in memory (MemoryDiffBase), not in an
annotation, which saves a PATCH of every PostTrainJob after its first reconcile, and the
watch event that PATCH causes. After a restart the memory is empty, so kopf sees every job as
new and runs reconcile for it (the `create` cause instead of `resume`: the same handler, and it
is idempotent). A handler that fails and is retried has its progress (retry count, delay) in
annotations under operator.posttrain.dev/, written only then: a retry needs a write to the
object, which is what wakes kopf up for it.
"""

from __future__ import annotations

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
    Retry,
    job_of_child_job,
)

ANNOTATION_PREFIX = r.OPERATOR_ANNOTATION_PREFIX.rstrip("/")
FAILED_CREATE_SELECTOR = "reason=FailedCreate,involvedObject.kind=Job"
# Set by `posttrain operator` before kopf starts (image defaults and --peering from its flags).
IMAGE_DEFAULTS: r.ImageDefaults = r.ImageDefaults.from_env(os.environ)
PEERING: str | None = None
# How long a replica's peering record outlives its last keep-alive (kopf sends one every
# lifetime - 5..10 s): a SIGKILLed active replica is replaced this long after its last one. One
# that exits normally removes its record, and a waiting replica takes over at once.
PEERING_LIFETIME_S = 15

_operator: Operator | None = None


class MemoryDiffBase(kopf.DiffBaseStorage):
    """kopf's last-handled configuration per object (by uid), in this process only."""

    def __init__(self) -> None:
        super().__init__()
        self._essences: dict[str, kopf.BodyEssence] = {}

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return self._essences.get(str(body.metadata.uid))

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self._essences[str(body.metadata.uid)] = essence

    def forget(self, uid: str) -> None:
        self._essences.pop(uid, None)


class ProgressAnnotations(kopf.AnnotationsProgressStorage):
    """kopf's per-handler progress in annotations, without kopf's `<prefix>/kopf-managed`
    marker (which marks the prefix for other kopf operators, and would be a PATCH of every
    object on its first handling: the record itself is only written for a retry)."""

    def _store_marker(self, prefix: str, patch: kopf.Patch, body: kopf.Body) -> None:
        pass


DIFFBASE = MemoryDiffBase()


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
    settings.persistence.progress_storage = ProgressAnnotations(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = DIFFBASE
    if PEERING:
        settings.peering.lifetime = PEERING_LIFETIME_S
    else:
        settings.peering.standalone = True  # one replica; no KopfPeering objects needed
    settings.posting.level = logging.WARNING  # our own Events, not "Handler ... succeeded"
    # Server-side filters: only our JobSets and pods, only the Events that say pods are refused.
    settings.watching.label_selectors["v1", "pods"] = r.JOB_LABEL
    settings.watching.label_selectors[JOBSET_GROUP, JOBSET_PLURAL] = r.JOB_LABEL
    settings.watching.field_selectors["v1", "events"] = FAILED_CREATE_SELECTOR
    # Handlers wait on the API server, not the CPU: more threads than kopf's default
    # (min(32, cores + 4)) keep a burst of new jobs from queueing behind each other.
    settings.execution.max_workers = WORKERS
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    _operator = Operator(api_client(), images=IMAGE_DEFAULTS, emit=_emit)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
# Kueue's labels (queue, priority) are read from the job's metadata: a label fixed after a
# refusal (queue label and spec.scheduling.queueName disagreeing) starts the job.
@kopf.on.update(GROUP, VERSION, PLURAL, field="metadata.labels")
def reconcile(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
    assert namespace is not None  # PostTrainJobs are namespaced
    try:
        operator().reconcile(namespace, name, seen=body)
    except Retry as err:
        raise kopf.TemporaryError(str(err), delay=5) from None


@kopf.on.event(GROUP, VERSION, PLURAL)
def job_event(
    type: str | None, uid: str | None, namespace: str | None, name: str | None, **_: Any
) -> None:
    if type == "DELETED":
        DIFFBASE.forget(str(uid))
        if namespace and name:
            operator().forget(namespace, name)


@kopf.on.event(JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL, labels={r.JOB_LABEL: kopf.PRESENT})
def jobset_event(
    namespace: str | None, labels: Mapping[str, str], type: str, meta: kopf.Meta, **_: Any
) -> None:
    if type is not None and namespace:  # None: the initial listing, which reconcile covers
        version = meta.get("resourceVersion")
        operator().sync_status(namespace, labels[r.JOB_LABEL], jobset_version=version)


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
def workload_event(
    namespace: str | None, body: Mapping[str, Any], type: str | None, **_: Any
) -> None:
    job = job_of_workload(body)
    if type is not None and type != "DELETED" and namespace and job:
        operator().sync_status(namespace, job)


@kopf.on.event("v1", "events")
def failed_create_event(
    namespace: str | None, body: Mapping[str, Any], type: str | None, **_: Any
) -> None:
    # type None: the initial listing, so a restarted operator still knows (Events live an hour)
    if type == "DELETED" or not namespace:
        return
    job = job_of_child_job(str((body.get("involvedObject") or {}).get("name") or ""))
    if job:
        operator().pods_not_created(namespace, job, str(body.get("message") or ""))


@kopf.on.event("v1", "pods", labels={r.JOB_LABEL: kopf.PRESENT})
def pod_event(namespace: str | None, labels: Mapping[str, str], type: str, **_: Any) -> None:
    job = labels[r.JOB_LABEL]
    # Pod events matter for Provisioning and Running; later changes reach the JobSet's status.
    if (
        type is not None
        and namespace
        and operator().phases.get((namespace, job))
        in (
            None,
            "Pending",
            "Provisioning",
        )
    ):
        operator().sync_status(namespace, job)
