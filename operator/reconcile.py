"""The operator's one reconcile: read a job and what it owns, compute the desired state, apply it.

Every event that concerns a job (the PostTrainJob itself, its JobSet, its pods, its Kueue
Workload, a FailedCreate Event of one of its Jobs) only puts the job's key (namespace, name)
on a work queue (handlers.py); worker threads take keys off it and run `Operator.reconcile`,
which is level-triggered: it reads the current state and converges on it, whatever the event
was. No kopf here; Kubernetes Events go through `emit`, which the handlers bind to kopf's
poster. Everything the operator does to the cluster is in this file, so docs/operator.md's RBAC
list can be checked against it:

    posttrainjobs          get                      (a job not in the cache, or after a conflict)
    posttrainjobs/status   patch                    (phase, conditions, ...; with the
                                                     resourceVersion it was computed from)
    configmaps             get, create, patch       (the recipe: read to check, then applied;
                                                     an apply that makes it needs create)
    jobsets                get, create, patch       (applied: made once, then spec.suspend only)
    pods                   list                     (Provisioning: which pods wait for nodes)
    workloads (Kueue)      list, patch              (why Kueue holds the JobSet; patch: spec.active
                                                     only, which is how a queued job suspends)

What lives in memory, and why none of it is state the API server lacks:

- the work queue (`WorkQueue`, as controller-runtime's): a key is queued at most once and
  handled by one worker at a time; a key added while it is handled is handled once more after.
  It holds which jobs need a look and their retry back-off, not anything about the jobs; lost
  on a restart, it is rebuilt by the initial listing, which queues every job.
- caches of API objects as the watches (kopf) delivered them, and as the operator's own writes
  returned them: PostTrainJobs, JobSets, and the FailedCreate Events of each job's Jobs. A
  reconcile reads the job and its JobSet from there (the API server when absent), so an event
  costs no read of either; a status written from a stale job fails its resourceVersion
  precondition (409) and the reconcile runs again on a fresh read. A JobSet missing from the
  cache is read before the operator concludes it is gone.
- the parsed spec and its render, keyed by the job's (uid, generation, labels, annotations):
  a pure function of the job, so events do not parse it again. Beside it two flags of side
  effects done for that version (a ChangeIgnored Event posted, an existing recipe checked):
  idempotent, done again after a restart.

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

Children are server-side applied (field manager FIELD_MANAGER, force): the operator declares
the object it wants and the API server merges it with what other managers (Kueue, kubectl, the
JobSet controller) set, each field owned by its manager. An apply creates as well as updates, so
what an apply would land on is read first and must be the job's: over an earlier job's child of
the same name it would replace that job's ownerReference with this one's (the same manager set
it) and take the child over, over an orphaned one adopt it. A new child is applied as rendered. An existing JobSet is immutable (but
spec.suspend), and keeps what it was made with (an operator that renders differently, a changed
job label, must not change it): its desired state is what the operator applied to it, read back
from its managedFields (`applied_config`, client-go's Extract), with spec.suspend as the job
says; when that is what it has, nothing is sent. Status is not applied but merge-patched
(`_patch_status`): it carries fields the operator keeps without recomputing them
(status.jobSetName once the JobSet is gone, startTime), which an apply that left them out
would remove.
"""

from __future__ import annotations

import contextvars
import copy
import datetime as dt
import heapq
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
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

# Worker threads running reconciles (they wait on the API server, not the CPU); each may run
# one more call at once on a side thread (a new job's Pending status beside its recipe), so the
# client needs 2 * WORKERS connections.
WORKERS = 32
# Back-off of a job whose reconcile failed: Retry's fixed delay, else doubling up to the cap.
RETRY_DELAY_S = 5.0
ERROR_DELAY_S, ERROR_DELAY_MAX_S = 1.0, 60.0

JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
KUEUE_GROUP, KUEUE_VERSION, WORKLOAD_PLURAL = "kueue.x-k8s.io", "v1beta2", "workloads"
# The field manager of the operator's server-side applies (its managedFields entries, operation
# Apply). Status keeps its merge patch, whose manager is the client's default.
FIELD_MANAGER = "posttrain-operator"
APPLY_PATCH = "application/apply-patch+yaml"
# Kueue labels the Workload it makes for a job (our JobSet) with the job's uid.
KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"
# Pod events matter while a job starts; later changes reach the JobSet's status.
PHASES_WATCHING_PODS = (None, "Pending", "Provisioning")

Key = tuple[str, str]  # (namespace, name) of a PostTrainJob
Emit = Callable[[Mapping[str, Any], st.Event], None]


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class WorkQueue:
    """controller-runtime's work queue: keys to handle, each queued at most once and handled by
    one worker at a time; a key added while it is handled is queued again when it is done, so
    a burst of events costs one reconcile after the running one, not one each. `add_after`
    queues a key later (retries)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[Hashable] = deque()
        self._dirty: set[Hashable] = set()  # queued, or to be queued when done
        self._processing: set[Hashable] = set()
        self._later: list[tuple[float, int, Hashable]] = []  # heap: (when, seq, key)
        self._seq = 0
        self._failures: dict[Hashable, int] = {}

    def add(self, key: Hashable) -> None:
        with self._cond:
            self._add(key)

    def _add(self, key: Hashable) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.append(key)
            self._cond.notify()

    def add_after(self, key: Hashable, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            self._seq += 1
            heapq.heappush(self._later, (time.monotonic() + delay, self._seq, key))
            self._cond.notify()

    def get(self, timeout: float | None = None) -> Hashable | None:
        """The next key (now being handled: call done() after), or None after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    self._add(heapq.heappop(self._later)[2])
                if self._queue:
                    key = self._queue.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                waits = [w for w in (deadline, self._later[0][0] if self._later else None) if w]
                if deadline is not None and now >= deadline:
                    return None
                self._cond.wait(min(waits) - now if waits else None)

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._queue.append(key)
                self._cond.notify()

    def failed(self, key: Hashable) -> int:
        """Count a failure of the key; how many in a row."""
        with self._cond:
            self._failures[key] = self._failures.get(key, 0) + 1
            return self._failures[key]

    def succeeded(self, key: Hashable) -> None:
        with self._cond:
            self._failures.pop(key, None)

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._later)


@dataclass
class Parsed:
    """A job's spec parsed and rendered: a pure function of `fingerprint`'s fields."""

    fingerprint: tuple[Any, ...]
    job: PostTrainJob | None
    errors: list[FieldError] | None  # the spec is invalid
    manifests: list[dict[str, Any]] | None  # [ConfigMap, JobSet]
    render_error: JobInvalid | None  # valid, but cannot be rendered
    # Side effects already done for this very fingerprint (done again after a restart: both
    # are idempotent): the ChangeIgnored Event posted; the recipe of an existing JobSet checked.
    warned: bool = False
    recipe_checked: bool = False


def fingerprint(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What the parsed and rendered job depends on: the spec (by generation, which the API
    server raises on every change of it), labels (Kueue's) and annotations (copied to pods)."""
    meta = body.get("metadata") or {}
    return (
        meta.get("uid"),
        meta.get("generation"),
        json.dumps(meta.get("labels") or {}, sort_keys=True),
        json.dumps(meta.get("annotations") or {}, sort_keys=True),
    )


class Conflict(Exception):
    """The job changed since it was read (a resourceVersion precondition failed): read it
    again and reconcile at once."""


class Retry(Exception):
    """Not yet: try again in a few seconds."""


@dataclass
class Operator:
    """An API client, image defaults, an event poster; the work queue and the caches (module
    docstring)."""

    api: client.ApiClient
    images: r.ImageDefaults = field(default_factory=r.ImageDefaults)
    emit: Emit = lambda obj, event: None  # noqa: E731
    now: Callable[[], str] = utc_now
    queue: WorkQueue = field(default_factory=WorkQueue)
    _guard: threading.Lock = field(default_factory=threading.Lock)
    # Caches of API objects (watch events and the operator's own writes; the later
    # resourceVersion wins), so an event costs no read of the job or its JobSet. Each is a
    # copy of what the API server holds, and nothing follows from an absence without a read.
    _jobs: dict[Key, dict[str, Any]] = field(default_factory=dict)
    _jobsets: dict[Key, dict[str, Any]] = field(default_factory=dict)
    # The FailedCreate Events of each job's Jobs (the Events are API objects, listed again
    # after a restart): Event uid -> message (the newest last).
    _failed_create: dict[Key, dict[str, str]] = field(default_factory=dict)
    # The parsed spec and its render, by job uid: a pure function of the cached job (Parsed's
    # fingerprint), so no event parses the spec again; dropped with the job.
    _parsed: dict[str, Parsed] = field(default_factory=dict)
    # Jobs of the initial listing not yet reconciled: each logs FOUND_AT_START once it is.
    _listed: set[Key] = field(default_factory=set)
    _workers: list[threading.Thread] = field(default_factory=list)
    # A new job's Pending status is written on one of these while its worker makes the recipe.
    _side: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(WORKERS, thread_name_prefix="side")
    )

    FOUND_AT_START = "reconciled, found at start"

    def __post_init__(self) -> None:
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)

    # ---- the work queue -------------------------------------------------------------------

    def start(self, context: contextvars.Context | None = None, workers: int = WORKERS) -> None:
        """Start the worker threads (once); each runs in a copy of `context` (kopf's, for its
        Event poster)."""
        with self._guard:
            if self._workers:
                return
            for i in range(workers):
                ctx = (context or contextvars.copy_context()).copy()
                t = threading.Thread(
                    target=ctx.run, args=(self._work,), name=f"reconcile-{i}", daemon=True
                )
                self._workers.append(t)
                t.start()

    def enqueue(self, namespace: str, name: str) -> None:
        self.queue.add((namespace, name))

    def _work(self) -> None:
        while True:
            key = cast(Key, self.queue.get())
            try:
                self.process(key)
            finally:
                self.queue.done(key)

    def process(self, key: Key) -> None:
        """One reconcile of the key, and what its outcome asks of the queue."""
        namespace, name = key
        try:
            self.reconcile(namespace, name)
        except Conflict:
            self._forget_job_body(key)
            if self.queue.failed(key) > 3:  # something keeps changing it: slow down a little
                self.queue.add_after(key, ERROR_DELAY_S)
            else:
                self.queue.add(key)
            return
        except Retry as err:
            log.info("%s/%s: %s; again in %.0fs", namespace, name, err, RETRY_DELAY_S)
            self.queue.failed(key)
            self.queue.add_after(key, RETRY_DELAY_S)
            return
        except Exception as err:
            n = self.queue.failed(key)
            delay = min(ERROR_DELAY_S * 2 ** (n - 1), ERROR_DELAY_MAX_S)
            if isinstance(err, ApiException):
                log.warning(
                    "%s/%s: %s %s; again in %.0fs",
                    namespace,
                    name,
                    err.status,
                    _message(err),
                    delay,
                )
            else:
                log.exception("%s/%s: reconcile failed; again in %.0fs", namespace, name, delay)
            self._forget_job_body(key)
            self.queue.add_after(key, delay)
            return
        self.queue.succeeded(key)
        with self._guard:
            listed = key in self._listed
            self._listed.discard(key)
        if listed:
            log.info("%s/%s: %s", namespace, name, self.FOUND_AT_START)

    # ---- what the watches deliver (handlers.py): caches, and whether to reconcile ---------

    def observe_job(self, body: Mapping[str, Any], type_: str | None) -> None:
        """A PostTrainJob event. Reconcile on the initial listing (type None: a restart finds
        every job) and on a change of what the reconcile reads from the job itself: spec
        (generation), labels, annotations, deletion. A change of status only (the operator's
        own writes, the trainer's progress) is cached and needs no reconcile."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if type_ == "DELETED":
            with self._guard:
                self._jobs.pop(key, None)
                self._jobsets.pop(key, None)
                self._failed_create.pop(key, None)
                self._parsed.pop(str(meta.get("uid")), None)
                self._listed.discard(key)
            return
        with self._guard:
            old = self._jobs.get(key)
            if old is None or not _older(body, old):
                self._jobs[key] = dict(body)
            if type_ is None:
                self._listed.add(key)
        if old is None or type_ is None or _spec_or_metadata_changed(old, body):
            self.enqueue(*key)

    def observe_jobset(self, job: Key, body: Mapping[str, Any], type_: str | None) -> None:
        """A JobSet event (label posttrain.dev/job). A JobSet the cache already has at this
        resourceVersion (the one the operator just made: its apply returned it) is nothing new."""
        with self._guard:
            old = self._jobsets.get(job)
            if type_ == "DELETED":
                self._jobsets.pop(job, None)
            elif old is not None and _same_version(old, body):
                return
            elif old is None or not _older(body, old):
                self._jobsets[job] = dict(body)
        if type_ is not None:  # the initial listing: the jobs' own listing queues them
            self.enqueue(*job)

    def observe_pod(self, job: Key, type_: str | None) -> None:
        """A pod event (label posttrain.dev/job): a reconcile while the job is starting, and
        while an async RL job runs (its rollout workers come and go without the JobSet
        restarting; the Running message counts them)."""
        if type_ is None:
            return
        with self._guard:
            cached = self._jobs.get(job)
        phase = ((cached or {}).get("status") or {}).get("phase")
        if cached is None or phase in PHASES_WATCHING_PODS:
            self.enqueue(*job)
        elif phase == "Running" and _is_async(cached):
            self.enqueue(*job)

    def observe_failed_create(self, job: Key, event: Mapping[str, Any], type_: str | None) -> None:
        """A FailedCreate Event of one of the job's Jobs: the Job controller cannot create its
        pods (the initial listing too: Events live an hour)."""
        uid = str((event.get("metadata") or {}).get("uid"))
        with self._guard:
            found = self._failed_create.setdefault(job, {})
            found.pop(uid, None)
            if type_ != "DELETED":
                found[uid] = str(event.get("message") or "")
            if not found:
                self._failed_create.pop(job, None)
        if type_ != "DELETED":
            self.enqueue(*job)

    def _forget_job_body(self, key: Key) -> None:
        with self._guard:
            self._jobs.pop(key, None)

    def _remember(self, cache: dict[Key, dict[str, Any]], key: Key, body: dict[str, Any]) -> None:
        with self._guard:
            old = cache.get(key)
            if old is None or not _older(body, old):
                cache[key] = body

    def _create_failure(self, key: Key) -> str | None:
        with self._guard:
            messages = list((self._failed_create.get(key) or {}).values())
        if not messages:
            return None
        message = messages[-1].strip()
        return f"{message}. Fix: {st.create_failure_fix(message, key[0])}"

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

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _absent_is_none(
            lambda: json.loads(
                cast(
                    Any,
                    self.core.read_namespaced_config_map(name, namespace, _preload_content=False),
                ).data
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

    def _job(self, key: Key) -> dict[str, Any] | None:
        """The job: as cached, else read (and cached)."""
        with self._guard:
            body = self._jobs.get(key)
        if body is None:
            body = self.get_job(*key)
            if body is not None:
                self._remember(self._jobs, key, body)
        return body

    def _jobset(self, key: Key, owner: Mapping[str, Any]) -> dict[str, Any] | None:
        """The job's JobSet: as cached when it is this job's, else read. None: there is none.
        Retry: there is an earlier job's of that name, on its way out (garbage collector)."""
        with self._guard:
            cached = self._jobsets.get(key)
        if cached is not None and owned_by(cached, owner):
            return cached
        found = self.get_jobset(*key)  # absent or not ours in the cache: make sure
        if found is None:
            with self._guard:
                self._jobsets.pop(key, None)
            return None
        self._remember(self._jobsets, key, found)
        if not owned_by(found, owner):
            raise Retry(f"JobSet {key[0]}/{key[1]} belongs to an earlier job of that name")
        return found

    def _parse(self, body: Mapping[str, Any]) -> Parsed:
        """The job parsed and rendered, from the cache while its fingerprint holds."""
        print_ = fingerprint(body)
        uid = str(print_[0])
        with self._guard:
            cached = self._parsed.get(uid)
        if cached is not None and cached.fingerprint == print_:
            return cached
        try:
            job = parse_job(job_manifest(body))
        except JobInvalid as err:
            parsed = Parsed(print_, None, err.errors, None, None)
        else:
            try:
                manifests = r.render(job, image_defaults=self.images)
                parsed = Parsed(print_, job, None, manifests, None)
            except JobInvalid as err:
                parsed = Parsed(print_, job, None, None, err)
        with self._guard:
            self._parsed[uid] = parsed
        return parsed

    # ---- the reconcile --------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> None:
        """Read the job and what it owns, compute the desired children and status, apply them.
        Idempotent, and level-triggered: what happened since the last time does not matter."""
        key = (namespace, name)
        body = self._job(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        prev = body.get("status") or {}
        if prev.get("phase") in st.TERMINAL and _reason(prev) != st.INVALID:
            # Final. A spec change (allowed: the job is not active) is acknowledged, not run.
            generation = body["metadata"].get("generation")
            if prev.get("observedGeneration") != generation:
                self._patch_status(body, {"observedGeneration": generation})
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
        parsed = self._parse(body)
        if parsed.job is None:
            self._write_status(body, job=None, errors=parsed.errors)
            return
        job = parsed.job
        if parsed.render_error is not None and not prev.get("jobSetName"):
            self._write_status(body, job=None, errors=parsed.render_error.errors)
            return
        # Read before anything is applied (the cache, else the API server), also for a job never
        # reconciled: an apply creates as well as updates, so an earlier job's JobSet of that
        # name must be found here (Retry), not adopted.
        jobset = self._jobset(key, body)
        if parsed.render_error is not None:
            # Its JobSet was made from an earlier render, and the spec is frozen since: what
            # changed is the job's labels (e.g. a queue label now disagreeing with
            # spec.scheduling.queueName). The JobSet keeps its own; the job goes on.
            if not parsed.warned:
                message = f"not applied to the job's existing JobSet: {parsed.render_error}"
                log.warning("%s/%s: %s", namespace, name, message)
                self.emit(body, st.Event("Warning", "ChangeIgnored", message))
                parsed.warned = True
            self._write_status(body, job=job, children=self._children(key, jobset))
            return
        if jobset is None and prev.get("jobSetName"):
            # made once and deleted since: Failed, not made again
            self._write_status(body, job=job, children=(None, []))
            return
        configmap, jobset_manifest = cast(list[dict[str, Any]], parsed.manifests)
        created = False
        try:
            if jobset is None:
                # Pending (from then on the CRD's CEL rule freezes the spec) and the recipe at
                # once, the JobSet after both: a crash in between leaves no phase or a recipe
                # without a JobSet, which the next reconcile checks and goes on from.
                body = self._both(
                    lambda: self._write_status(body, job=job, children=(None, []), quiet=True),
                    lambda: self._ensure_configmap(body, configmap, replace_stale=True),
                )
                jobset, created = self._apply_new_jobset(key, body, jobset_manifest), True
                parsed.recipe_checked = True
            elif not parsed.recipe_checked:
                # once per job and process (an operator restart): the recipe is there and ours
                self._ensure_configmap(body, configmap, replace_stale=False)
                parsed.recipe_checked = True
        except ApiException as err:
            if err.status not in (400, 422):  # others: retried with back-off
                raise
            # Refused (e.g. by JobSet's webhook): retrying cannot help.
            why = FieldError("", f"the API server refused the children: {_message(err)}")
            self._write_status(body, job=None, errors=[why])
            return
        if created:
            log.info("%s/%s: JobSet %s applied", namespace, name, r.jobset_name(job))
        elif not owned_by(jobset, body):
            raise Retry(f"JobSet {namespace}/{name} belongs to an earlier job of that name")
        jobset = self._ensure_suspend(key, job, jobset)
        # A JobSet made just now has no pods yet: no need to list them.
        children = (jobset, []) if created else self._children(key, jobset)
        self._write_status(body, job=job, children=children)

    def _children(
        self, key: Key, jobset: dict[str, Any] | None
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        return jobset, self.list_pods(*key) if jobset is not None else []

    def _both(self, first: Callable[[], Any], second: Callable[[], None]) -> Any:
        """Run `first` on a side thread and `second` here; wait for both, then raise the error
        of either (second's, if both fail), or return first's result."""
        side = self._side.submit(contextvars.copy_context().run, first)
        try:
            second()
        finally:
            err = side.exception()  # waits
        if err is not None:
            raise err
        return side.result()

    def _apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of a ConfigMap or JobSet (field manager FIELD_MANAGER, force: the
        operator's declared state wins a conflict with another manager over a field it sets);
        the object as the API server returns it. A metadata.resourceVersion in `manifest` is a
        precondition (409 when the object changed since)."""
        meta = manifest["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        # Not deserialized by the client: it maps a patch's 200 to an object but not the 201 of
        # an apply that made the object (it returns None for that).
        options: dict[str, Any] = {
            "field_manager": FIELD_MANAGER,
            "force": True,
            "_content_type": APPLY_PATCH,
            "_preload_content": False,
        }
        found: Any
        if manifest.get("kind") == "ConfigMap":
            found = self.core.patch_namespaced_config_map(name, namespace, manifest, **options)
        else:
            found = self.custom.patch_namespaced_custom_object(
                JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSET_PLURAL, name, manifest, **options
            )
        return cast(dict[str, Any], json.loads(found.data))

    def _ensure_configmap(
        self, owner: dict[str, Any], manifest: dict[str, Any], *, replace_stale: bool
    ) -> None:
        """The recipe, read then applied: absent, it is applied as rendered; present, it must be
        this job's, and (`replace_stale`: before its JobSet exists) is applied as rendered when
        it differs, guarded by the resourceVersion it was read at. Once the JobSet runs, its
        recipe stays (an operator upgrade that renders differently must not change a running
        job): only checked."""
        namespace, name = owner["metadata"]["namespace"], manifest["metadata"]["name"]
        found = self.get_configmap(namespace, name)
        if found is not None and not owned_by(found, owner):
            raise Retry(
                f"ConfigMap {namespace}/{name} is not this job's (an earlier job's of the same "
                "name, which the garbage collector removes, or someone else's: delete it)"
            )
        if found is None:
            self._apply_checked(owner, manifest)
        elif replace_stale and applied_config(found) != manifest:
            # Ours but not as rendered (a spec fixed after a refused apply, a crash between
            # renders, a recipe made by another client): applied over, at the version read.
            self._apply(_at_version(manifest, found))
            if found.get("data") != manifest["data"]:
                log.info("%s/%s: replaced a stale recipe", namespace, owner["metadata"]["name"])

    def _apply_checked(self, owner: Mapping[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
        """Apply a child read as absent. Refused, and the child there after all, not the job's
        (made since the read, by another client: two controller ownerReferences are invalid):
        Retry. (One made since by this operator's field manager for an earlier job would be
        taken over, its ownerReference replaced: the read before is what rules that out; only
        two replicas acting at once, a hand-over, on a job deleted and made again in between,
        could race it.)"""
        try:
            return self._apply(manifest)
        except ApiException as err:
            if not 400 <= (err.status or 0) < 500 or err.status in (404, 429):
                raise
            meta = manifest["metadata"]
            read = self.get_configmap if manifest.get("kind") == "ConfigMap" else self.get_jobset
            found = read(meta["namespace"], meta["name"])
            if found is not None and not owned_by(found, owner):
                raise Retry(
                    f"{manifest['kind']} {meta['namespace']}/{meta['name']} belongs to an "
                    "earlier job of that name"
                ) from None
            raise

    def _apply_new_jobset(
        self, key: Key, owner: Mapping[str, Any], manifest: dict[str, Any]
    ) -> dict[str, Any]:
        """Apply the JobSet of a job that has none (as read just before), as rendered; cached."""
        made = self._apply_checked(owner, manifest)
        self._remember(self._jobsets, key, made)
        return made

    def _ensure_suspend(
        self, key: Key, job: PostTrainJob, jobset: dict[str, Any]
    ) -> dict[str, Any]:
        """spec.suspend -> JobSet spec.suspend, for a job without a Kueue queue; the JobSet as
        it is now. A queued job's JobSet is Kueue's to suspend and resume (it would undo ours at
        once, an admitted Workload being "running"): its spec.suspend goes to the Workload's
        spec.active instead (_ensure_workload_active, since the Workload comes after the
        JobSet)."""
        if queue_of(job, jobset):
            return jobset
        want = job.spec.suspend
        have = bool((jobset.get("spec") or {}).get("suspend"))
        if want == have:
            return jobset
        if _condition_true(jobset, "Completed") or _condition_true(jobset, "Failed"):
            return jobset
        meta = jobset["metadata"]
        # What the operator applied to it (the rest is immutable, and stays as it was made),
        # with spec.suspend as the job says; fields of other managers are not in it, and stay.
        desired = applied_config(jobset)
        desired.setdefault("spec", {})["suspend"] = want
        # only onto the JobSet read (its uid: a precondition; an apply makes nothing then)
        desired["metadata"]["uid"] = meta["uid"]
        patched = self._apply(desired)
        self._remember(self._jobsets, key, patched)
        log.info(
            "%s/%s: JobSet %s", meta["namespace"], meta["name"], "suspended" if want else "resumed"
        )
        return patched

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

    def _write_status(
        self,
        body: dict[str, Any],
        *,
        job: PostTrainJob | None,
        errors: list[FieldError] | None = None,
        children: tuple[dict[str, Any] | None, list[dict[str, Any]]] = (None, []),
        quiet: bool = False,
    ) -> dict[str, Any]:
        """Compute the status from the job and its (JobSet, pods), patch it when it changed,
        post the Events of the change (`quiet`: none, a step the next write supersedes at once);
        the job as it is now."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        key = (namespace, name)
        prev = body.get("status") or {}
        summary: dict[str, str] = {}
        total = None
        jobset, pods = children
        workload = None
        if job is None:
            outcome = st.invalid_outcome(errors or [])
            jobset = None
        else:
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
            if jobset is not None and st.current_pods(jobset, pods):
                with self._guard:  # the job has pods: its Jobs' FailedCreate Events are past
                    self._failed_create.pop(key, None)
            outcome = st.phase_of(
                suspend=job.spec.suspend,
                queue_name=queue,
                jobset=jobset,
                pods=pods,
                create_failure=self._create_failure(key),
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
        if not st.changed(prev, new):
            return body
        body = self._patch_status(body, new)
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
        return body

    def _patch_status(self, body: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the status, on the condition that the job is still at the
        resourceVersion it was computed from (else Conflict); the job as the server returns it,
        cached."""
        meta = body["metadata"]
        patch = {"metadata": {"resourceVersion": meta.get("resourceVersion")}, "status": status}
        try:
            patched = self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch
            )
        except ApiException as err:
            if err.status == 409:
                raise Conflict(f"{meta['namespace']}/{meta['name']} changed") from None
            raise
        new = cast(dict[str, Any], patched)
        self._remember(self._jobs, (meta["namespace"], meta["name"]), new)
        return new


def _version(body: Mapping[str, Any]) -> int | None:
    try:
        return int(str((body.get("metadata") or {}).get("resourceVersion")))
    except ValueError:
        return None


def _older(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """Whether `new` is an older version of the same object than `old` (a watch event that
    arrives after the operator's own write returned a newer one). resourceVersions are opaque;
    where they are not the integers etcd makes them, nothing is taken as older (the status
    write's precondition catches a stale job)."""
    uid = (new.get("metadata") or {}).get("uid")
    if uid != (old.get("metadata") or {}).get("uid"):
        return False
    a, b = _version(new), _version(old)
    return a is not None and b is not None and a < b


def _same_version(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    ma, mb = a.get("metadata") or {}, b.get("metadata") or {}
    return ma.get("uid") == mb.get("uid") and ma.get("resourceVersion") == mb.get("resourceVersion")


def _spec_or_metadata_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """What a job event changed that the reconcile reads from the job, beside its status."""
    mo, mn = old.get("metadata") or {}, new.get("metadata") or {}
    return any(
        mo.get(k) != mn.get(k)
        for k in ("uid", "generation", "labels", "annotations", "deletionTimestamp")
    )


def owned_by(child: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    uid = (owner.get("metadata") or {}).get("uid")
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def applied_config(obj: Mapping[str, Any], manager: str = FIELD_MANAGER) -> dict[str, Any]:
    """What `manager` last server-side applied to `obj`, with the values `obj` has now (client-go's
    Extract<Kind>): its managedFields entry (operation Apply, not a subresource's) names the
    fields, and they are taken from the object. Applied again, it changes nothing; changed, it
    changes only what changed, and leaves every field of other managers alone. Empty (but
    apiVersion, kind, name, namespace) when the manager never applied it."""
    fields: dict[str, Any] = {}
    meta = obj.get("metadata") or {}
    for entry in meta.get("managedFields") or []:
        if (
            entry.get("manager") == manager
            and entry.get("operation") == "Apply"
            and not entry.get("subresource")
        ):
            fields = entry.get("fieldsV1") or {}
    config = _extract(obj, fields) if fields else {}
    config = copy.deepcopy(config if isinstance(config, dict) else {})
    config.pop("apiVersion", None), config.pop("kind", None)
    head = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind")}
    out_meta = config.pop("metadata", None) or {}
    ident = {k: meta[k] for k in ("name", "namespace") if k in meta}
    return {**head, "metadata": {**ident, **out_meta}, **config}


def _extract(value: Any, fields: Mapping[str, Any]) -> Any:
    """The part of `value` that a managedFields fieldsV1 set names: `f:<name>` a field of a
    map, `k:<json>` the item of a list with those key fields, `v:<json>` the item with that
    value, `.` the map or item itself; a field with nothing under it is taken whole."""
    children = {k: v for k, v in fields.items() if k != "."}
    if not children:
        return {} if "." in fields and isinstance(value, dict) else value
    if isinstance(value, dict):
        return {
            k[2:]: _extract(value[k[2:]], sub)
            for k, sub in children.items()
            if k.startswith("f:") and k[2:] in value
        }
    if isinstance(value, list):
        items = []
        for item in value:
            for k, sub in children.items():
                if k.startswith("k:") and isinstance(item, dict):
                    keys = json.loads(k[2:])
                    if all(item.get(a) == b for a, b in keys.items()):
                        part = _extract(item, sub)
                        items.append({**keys, **part} if isinstance(part, dict) else part)
                        break
                elif k.startswith("v:") and item == json.loads(k[2:]):
                    items.append(item)
                    break
        return items
    return value


def _at_version(manifest: dict[str, Any], found: Mapping[str, Any]) -> dict[str, Any]:
    """`manifest` applied on the condition that the object is still at `found`'s version."""
    version = (found.get("metadata") or {}).get("resourceVersion")
    return {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": version}}


_CHILD_JOB = re.compile(r"^(?P<job>.+)-(?:slice|node|rollout)-\d+$")


def _is_async(body: Mapping[str, Any]) -> bool:
    """An async RL job (spec.rollout.mode async), from the raw object."""
    return ((body.get("spec") or {}).get("rollout") or {}).get("mode") == "async"


def job_of_child_job(job_name: str) -> str | None:
    """The PostTrainJob behind a JobSet's child Job: JobSet names them
    `<jobset>-<replicatedJob>-<index>`, our JobSet is named like the job, and its replicated
    job is `slice` or `node` (render.py), or an async job's `rollout`."""
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
