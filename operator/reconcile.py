"""What the handlers do, against the API server: read, render, apply, map status.

No kopf here (the handlers in handlers.py are one line each); events go through `emit`, which
the handlers bind to kopf's event poster. Everything the operator does to the cluster is in
this file, so docs/operator.md's RBAC list can be checked against it:

    posttrainjobs          get                      (fresh state before computing status)
    posttrainjobs/status   patch                    (phase, conditions, ...)
    configmaps             create, get, update      (the recipe; update: a stale one of ours)
    jobsets                create, get, patch       (patch: spec.suspend only)
    pods                   list                     (Provisioning: which pods wait for nodes)
    workloads (Kueue)      list, patch              (why Kueue holds the JobSet; patch: spec.active
                                                     only, which is how a queued job suspends)

A new job takes three writes: status `Pending` (from then on the CRD's CEL rule freezes the
spec) and the recipe, both at once, then the JobSet, after both.

Crash safety: every step is create-or-check by deterministic name, so an operator killed at any
point and started again finds what it made and goes on. What it finds is checked: a child not
owned (controller ownerReference with the job's uid) is an earlier job's of the same name, on
its way out with the garbage collector (retry); a recipe of ours that differs from the rendered
one is replaced while the JobSet does not exist yet, so before any pod could read it (a running
job keeps the recipe it started with, even under an operator that renders differently).
A JobSet is made at most once per job: once status.jobSetName is set, a missing JobSet means
it was deleted, and the job fails rather than start again with a fresh restart budget.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from posttrain.api import GROUP, PLURAL, VERSION, JobInvalid, parse_job
from posttrain.api.load import FieldError
from posttrain.api.v1alpha1 import PostTrainJob, display_accelerator, display_model
from posttrain.operator import render as r
from posttrain.operator import status as st

log = logging.getLogger("posttrain.operator")

# Threads running the (blocking) handlers; each may run one more call at once on a side thread
# (a new job's Pending status beside its recipe), so the client needs 2 * WORKERS connections.
WORKERS = 32

JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
KUEUE_GROUP, KUEUE_VERSION, WORKLOAD_PLURAL = "kueue.x-k8s.io", "v1beta2", "workloads"
# Kueue labels the Workload it makes for a job (our JobSet) with the job's uid.
KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"

Emit = Callable[[Mapping[str, Any], st.Event], None]


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Operator:
    """The operator's state: an API client, image defaults, an event poster, per-job locks."""

    api: client.ApiClient
    images: r.ImageDefaults = field(default_factory=r.ImageDefaults)
    emit: Emit = lambda obj, event: None  # noqa: E731
    now: Callable[[], str] = utc_now
    _locks: dict[tuple[str, str], threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)
    # Last phase seen per job: pod events only matter while a job is not yet Running.
    phases: dict[tuple[str, str], str] = field(default_factory=dict)
    # Why the Job controller cannot create a job's pods (its FailedCreate Events), with the fix;
    # dropped once the job has pods.
    create_failures: dict[tuple[str, str], str] = field(default_factory=dict)
    # Jobs with a status sync waiting for the job's lock, not yet reading: a new event for one
    # of them needs no sync of its own (see sync_status).
    _queued: set[tuple[str, str]] = field(default_factory=set)
    # The JobSet resourceVersion each job's status was last computed from: a JobSet event of
    # that version (e.g. the ADDED of a JobSet this operator just made) needs no sync.
    _synced_jobset: dict[tuple[str, str], str] = field(default_factory=dict)
    # A new job's Pending status is written on one of these while its thread makes the recipe.
    _side: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(WORKERS, thread_name_prefix="side")
    )

    def __post_init__(self) -> None:
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    # ---- reads ----------------------------------------------------------------------------

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _absent_is_none(
            lambda: self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name
            )
        )

    def get_jobset(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _absent_is_none(
            lambda: self.custom.get_namespaced_custom_object(
                JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSET_PLURAL, name
            )
        )

    def list_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(
            namespace, label_selector=f"{r.JOB_LABEL}={name}", _preload_content=False
        )
        return list(json.loads(cast(Any, pods).data).get("items") or [])

    def get_workload(self, jobset: Mapping[str, Any]) -> dict[str, Any] | None:
        """Kueue's Workload of a JobSet (the newest, if several), or None: none yet, or no
        Kueue in the cluster (its CRD absent), or no permission to read Workloads."""
        meta = jobset.get("metadata") or {}
        try:
            found = self.custom.list_namespaced_custom_object(
                KUEUE_GROUP,
                KUEUE_VERSION,
                str(meta.get("namespace")),
                WORKLOAD_PLURAL,
                label_selector=f"{KUEUE_JOB_UID}={meta.get('uid')}",
            )
        except ApiException as err:
            if err.status in (403, 404):
                log.warning("cannot read Kueue Workloads (%s): %s", err.status, _message(err))
                return None
            raise
        items = cast(dict[str, Any], found).get("items") or []
        items.sort(key=lambda w: (w.get("metadata") or {}).get("creationTimestamp") or "")
        return items[-1] if items else None

    # ---- create / resume / update ---------------------------------------------------------

    def reconcile(self, namespace: str, name: str, seen: Mapping[str, Any] | None = None) -> None:
        """Validate, render and apply the job's children (idempotent), then sync its status.
        `seen`: the object as the watch delivered it; used as is while it has no status (a new
        job, which nothing else writes to before this), else read again."""
        with self._lock(namespace, name):
            fresh = seen is not None and not (seen.get("status") or {}).get("phase")
            body = copy.deepcopy(dict(seen)) if fresh and seen else self.get_job(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            prev = body.get("status") or {}
            if prev.get("phase") in st.TERMINAL and _reason(prev) != st.INVALID:
                if prev.get("observedGeneration") != body["metadata"].get("generation"):
                    self._patch_status(body, {"observedGeneration": body["metadata"]["generation"]})
                    self.emit(
                        body,
                        st.Event(
                            "Warning",
                            "SpecChangeIgnored",
                            f"the job has {prev['phase'].lower()}; delete the PostTrainJob and "
                            "create it again to run a changed spec",
                        ),
                    )
                return
            try:
                job = parse_job(job_manifest(body))
            except JobInvalid as err:
                self._sync(body, job=None, errors=err.errors)
                return
            try:
                manifests = r.render(job, image_defaults=self.images)
            except JobInvalid as err:
                if not prev.get("jobSetName"):
                    self._sync(body, job=None, errors=err.errors)
                    return
                # Its JobSet was made from an earlier render, and the spec is frozen since: what
                # changed is the job's labels (e.g. a queue label now disagreeing with
                # spec.scheduling.queueName). The JobSet keeps its own; the job goes on.
                message = f"not applied to the job's existing JobSet: {err}"
                log.warning("%s/%s: %s", namespace, name, message)
                self.emit(body, st.Event("Warning", "ChangeIgnored", message))
                self._sync(body, job=job)
                return
            configmap, jobset = manifests
            # Never reconciled (no phase): no JobSet of this job can exist yet, since Pending is
            # written before one is made; an earlier job's answers the create with 409.
            existing = self.get_jobset(namespace, name) if prev.get("phase") else None
            if existing is not None and not owned_by(existing, body):
                raise Retry(f"JobSet {namespace}/{name} belongs to an earlier job of that name")
            if existing is None and prev.get("jobSetName"):
                self._sync(body, job=job)  # made once and deleted since: Failed, not remade
                return
            created = False
            try:
                if existing is None:
                    # Pending (from then on the CRD's CEL rule freezes the spec) and the recipe
                    # at once, the JobSet after both: a crash in between leaves no phase or a
                    # recipe without a JobSet, which the next reconcile checks and goes on from.
                    self._both(
                        lambda: self._sync(body, job=job, children=(None, []), quiet=True),
                        lambda: self._ensure_configmap(body, configmap, replace_stale=True),
                    )
                    existing, created = self._create_or_get_jobset(namespace, jobset)
                else:
                    self._ensure_configmap(body, configmap, replace_stale=False)
            except ApiException as err:
                if err.status not in (400, 422):  # others: kopf retries with backoff
                    raise
                # Refused (e.g. by JobSet's webhook): retrying cannot help.
                why = FieldError("", f"the API server refused the children: {_message(err)}")
                self._sync(body, job=None, errors=[why])
                return
            if created:
                log.info("%s/%s: JobSet %s applied", namespace, name, r.jobset_name(job))
            elif not owned_by(existing, body):
                raise Retry(f"JobSet {namespace}/{name} belongs to an earlier job of that name")
            self._ensure_suspend(job, existing)
            # A JobSet made just now has no pods yet: no need to list them.
            self._sync(body, job=job, children=(existing, []) if created else None)

    def _both(self, first: Callable[[], None], second: Callable[[], None]) -> None:
        """Run `first` on a side thread and `second` here; wait for both, then raise the error
        of either (second's, if both fail)."""
        side = self._side.submit(first)
        try:
            second()
        finally:
            err = side.exception()  # waits
        if err is not None:
            raise err

    def _ensure_configmap(
        self, owner: dict[str, Any], manifest: dict[str, Any], *, replace_stale: bool
    ) -> None:
        """Create the recipe; when one exists, it must be this job's, and (`replace_stale`:
        before its JobSet exists) say what it renders. Once the JobSet runs, its recipe stays
        (an operator upgrade that renders differently must not change a running job)."""
        namespace, name = owner["metadata"]["namespace"], manifest["metadata"]["name"]
        try:
            self.core.create_namespaced_config_map(namespace, cast(Any, manifest))
            return
        except ApiException as err:
            if err.status != 409:  # AlreadyExists: a previous run, or an earlier job's
                raise
        found = _absent_is_none(
            lambda: json.loads(
                cast(
                    Any,
                    self.core.read_namespaced_config_map(name, namespace, _preload_content=False),
                ).data
            )
        )
        if found is None:
            raise Retry(f"ConfigMap {namespace}/{name} exists and vanished")
        if not owned_by(found, owner):
            raise Retry(
                f"ConfigMap {namespace}/{name} is not this job's (an earlier job's of the same "
                "name, which the garbage collector removes, or someone else's: delete it)"
            )
        if replace_stale and found.get("data") != manifest["data"]:
            # Ours but stale (a spec fixed after a refused apply, a crash between renders):
            # replace it, guarded by its resourceVersion; the JobSet is made after this.
            replacement = {**manifest, "metadata": {**manifest["metadata"]}}
            replacement["metadata"]["resourceVersion"] = found["metadata"]["resourceVersion"]
            self.core.replace_namespaced_config_map(name, namespace, cast(Any, replacement))
            log.info("%s/%s: replaced a stale recipe", namespace, name)

    def _create_or_get_jobset(
        self, namespace: str, manifest: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """(the JobSet, whether this call made it)."""
        name = manifest["metadata"]["name"]
        try:
            made = self.custom.create_namespaced_custom_object(
                JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSET_PLURAL, manifest
            )
            return cast(dict[str, Any], made), True
        except ApiException as err:
            if err.status != 409:
                raise
        found = self.get_jobset(namespace, name)
        if found is None:
            raise Retry(f"JobSet {namespace}/{name} exists and vanished")
        return found, False

    def _ensure_suspend(self, job: PostTrainJob, jobset: dict[str, Any]) -> None:
        """spec.suspend -> JobSet spec.suspend, for a job without a Kueue queue. A queued job's
        JobSet is Kueue's to suspend and resume (it would undo ours at once, an admitted Workload
        being "running"): its spec.suspend goes to the Workload's spec.active instead
        (_ensure_workload_active, on every sync, since the Workload comes after the JobSet)."""
        if queue_of(job, jobset):
            return
        want = job.spec.suspend
        have = bool((jobset.get("spec") or {}).get("suspend"))
        if want == have:
            return
        if _condition_true(jobset, "Completed") or _condition_true(jobset, "Failed"):
            return
        meta = jobset["metadata"]
        self.custom.patch_namespaced_custom_object(
            JOBSET_GROUP,
            JOBSET_VERSION,
            meta["namespace"],
            JOBSET_PLURAL,
            meta["name"],
            {"spec": {"suspend": want}},
        )
        jobset.setdefault("spec", {})["suspend"] = want
        log.info(
            "%s/%s: JobSet %s", meta["namespace"], meta["name"], "suspended" if want else "resumed"
        )

    def _ensure_workload_active(self, job: PostTrainJob, workload: dict[str, Any]) -> None:
        """spec.suspend -> the Workload's spec.active (false: Kueue evicts the job and suspends
        its JobSet; true again: Kueue queues it and admits it when there is quota)."""
        want = not job.spec.suspend
        if bool((workload.get("spec") or {}).get("active", True)) == want:
            return
        meta = workload["metadata"]
        self.custom.patch_namespaced_custom_object(
            KUEUE_GROUP,
            KUEUE_VERSION,
            meta["namespace"],
            WORKLOAD_PLURAL,
            meta["name"],
            {"spec": {"active": want}},
        )
        workload.setdefault("spec", {})["active"] = want
        log.info(
            "%s/%s: Kueue Workload %s %s",
            meta["namespace"],
            job.metadata.name,
            meta["name"],
            "activated" if want else "deactivated (spec.suspend)",
        )

    # ---- status ---------------------------------------------------------------------------

    def forget(self, namespace: str, name: str) -> None:
        """The job is gone (its DELETED event): drop what is kept about it."""
        key = (namespace, name)
        self.phases.pop(key, None)
        self.create_failures.pop(key, None)
        self._synced_jobset.pop(key, None)

    def pods_not_created(self, namespace: str, name: str, message: str) -> None:
        """A FailedCreate Event of one of the job's Jobs: say why in the job's status."""
        fix = st.create_failure_fix(message, namespace)
        self.create_failures[(namespace, name)] = f"{message.strip()}. Fix: {fix}"
        self.sync_status(namespace, name)

    def sync_status(self, namespace: str, name: str, jobset_version: str | None = None) -> None:
        """Recompute the job's status from its JobSet and pods (JobSet and pod events).

        `jobset_version`: the resourceVersion of the JobSet of the event; when the status was
        last computed from that very version (the ADDED event of the JobSet reconcile just made
        and synced from), there is nothing new: pods, the job and Kueue's Workload have events
        of their own.

        Coalesced: while a sync of the job waits for its lock and has not read anything yet,
        further events need none of their own (that sync reads the state after them), so a
        burst of pod and JobSet events costs a few syncs, not one each, and frees the workers
        for the jobs being created."""
        key = (namespace, name)
        if jobset_version is not None and self._synced_jobset.get(key) == jobset_version:
            return
        with self._guard:
            if key in self._queued:
                return
            self._queued.add(key)
        with self._lock(namespace, name):
            with self._guard:
                self._queued.discard(key)
            body = self.get_job(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                self.phases.pop((namespace, name), None)
                self.create_failures.pop((namespace, name), None)
                self._synced_jobset.pop((namespace, name), None)
                return
            prev = body.get("status") or {}
            if prev.get("phase") in st.TERMINAL:
                return  # final; an invalid job changes only through reconcile()
            if not prev.get("phase"):
                return  # reconcile() has not seen it yet
            try:
                job = parse_job(job_manifest(body))
            except JobInvalid:
                return
            self._sync(body, job=job)

    def _sync(
        self,
        body: dict[str, Any],
        *,
        job: PostTrainJob | None,
        errors: list[FieldError] | None = None,
        children: tuple[dict[str, Any] | None, list[dict[str, Any]]] | None = None,
        quiet: bool = False,
    ) -> None:
        """Compute and patch the status; `children` = (JobSet, pods) when already known;
        `quiet`: no Events (a step the next sync supersedes at once)."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        prev = body.get("status") or {}
        summary: dict[str, str] = {}
        total = None
        jobset: dict[str, Any] | None = None
        workload = None
        if job is None:
            outcome = st.invalid_outcome(errors or [])
        else:
            if children is None:
                jobset = self.get_jobset(namespace, name)
                if jobset is not None and not owned_by(jobset, body):
                    jobset = None  # an earlier job's, on its way out (garbage collector)
                pods = self.list_pods(namespace, name) if jobset else []
            else:
                jobset, pods = children
            key = (namespace, name)
            queue = queue_of(job, jobset)
            if (
                jobset is not None
                and queue
                and not _condition_true(jobset, "Completed")
                and not _condition_true(jobset, "Failed")
            ):
                # why Kueue holds it (Queued); and where a queued job's spec.suspend goes
                workload = self.get_workload(jobset)
                if workload is not None:
                    self._ensure_workload_active(job, workload)
            if st.current_pods(jobset or {}, pods):
                self.create_failures.pop(key, None)
            outcome = st.phase_of(
                suspend=job.spec.suspend,
                queue_name=queue,
                jobset=jobset,
                pods=pods,
                create_failure=self.create_failures.get(key),
                deleted_jobset=prev.get("jobSetName") if jobset is None else None,
                workload=workload,
            )
            summary = {
                "model": display_model(job.spec.model.base),
                "accelerator": display_accelerator(job.spec.resources),
            }
            total = job.spec.training.steps
        new = st.next_status(
            prev,
            outcome,
            generation=meta.get("generation"),
            now=self.now(),
            jobset=jobset,
            summary=summary,
            total_steps=total,
            workload=workload,
        )
        self.phases[(namespace, name)] = outcome.phase
        if st.changed(prev, new):
            self._patch_status(body, new)
        version = ((jobset or {}).get("metadata") or {}).get("resourceVersion")
        if version:
            self._synced_jobset[(namespace, name)] = version
        else:
            self._synced_jobset.pop((namespace, name), None)
        if not st.changed(prev, new):
            return
        for event in [] if quiet else st.transitions(prev, new, outcome):
            self.emit(body, event)
        if outcome.phase != prev.get("phase"):
            log.info(
                "%s/%s: %s (%s: %s)",
                namespace,
                name,
                outcome.phase,
                outcome.reason,
                outcome.message,
            )

    def _patch_status(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        """Merge-patch the status; `body` then holds the status the server has."""
        meta = body["metadata"]
        patched = self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], {"status": status}
        )
        body["status"] = cast(dict[str, Any], patched).get("status") or {}


class Retry(Exception):
    """Not yet: try again in a few seconds (the handlers turn it into kopf's TemporaryError)."""


def owned_by(child: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    uid = (owner.get("metadata") or {}).get("uid")
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


_CHILD_JOB = re.compile(r"^(?P<job>.+)-(?:slice|node)-\d+$")


def job_of_child_job(job_name: str) -> str | None:
    """The PostTrainJob behind a JobSet's child Job: JobSet names them
    `<jobset>-<replicatedJob>-<index>`, our JobSet is named like the job, and its replicated
    job is `slice` or `node` (render.py)."""
    m = _CHILD_JOB.match(job_name)
    return m["job"] if m else None


def job_manifest(body: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the object the model validates: no status (the operator's own output),
    metadata cut to what the renderer reads."""
    meta = body.get("metadata") or {}
    keep = {
        k: meta[k] for k in ("name", "namespace", "uid", "labels", "annotations") if meta.get(k)
    }
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": keep,
        "spec": body.get("spec"),
    }


def queue_of(job: PostTrainJob, jobset: Mapping[str, Any] | None) -> str | None:
    """The job's Kueue queue: the JobSet's label once the JobSet exists (what Kueue acts on; the
    job's labels are not frozen like its spec), else what the job asks for (label or spec)."""
    if jobset is not None:
        return ((jobset.get("metadata") or {}).get("labels") or {}).get(r.QUEUE_LABEL) or None
    return r.queue_name(job)


def _reason(status: Mapping[str, Any]) -> str | None:
    return next(
        (
            c.get("reason")
            for c in status.get("conditions") or []
            if c.get("type") == "Valid" and c.get("status") == "False"
        ),
        None,
    )


def _condition_true(obj: Mapping[str, Any], type_: str) -> bool:
    return any(
        c.get("type") == type_ and c.get("status") == "True"
        for c in (obj.get("status") or {}).get("conditions") or []
    )


def _message(err: ApiException) -> str:
    try:
        return str(json.loads(err.body or "{}").get("message") or err.reason)
    except (TypeError, ValueError):
        return str(err.reason)


def _absent_is_none(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ApiException as err:
        if err.status == 404:
            return None
        raise
