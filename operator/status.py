"""JobSet and pods -> PostTrainJob status. Pure functions; the handlers feed them what they read.

    phase_of(...)        what the job is doing now: a phase, a reason and a message
    next_status(...)     the status to write: phase, conditions (reasons, observedGeneration,
                         transition times kept while unchanged), restarts, times, summary
    transitions(...)     the Events a change of status deserves

| JobSet / pods                                                    | phase        | reason             |
|------------------------------------------------------------------|--------------|--------------------|
| spec invalid (or cannot be rendered)                             | Failed       | InvalidSpec        |
| no JobSet yet                                                    | Pending      | Creating           |
| no JobSet, though status.jobSetName says it was made (deleted)   | Failed       | JobSetDeleted      |
| JobSet condition Completed=True                                  | Succeeded    | AllJobsCompleted   |
| JobSet condition Failed=True, a pod exited with EXIT_CONFIG (78) | Failed       | ConfigurationError |
| JobSet condition Failed=True                                     | Failed       | JobSet's reason    |
| spec.suspend (JobSet suspended, or being suspended)              | Suspended    | Suspended          |
| JobSet suspended with a Kueue queue, spec.suspend false:         | Queued       | (Kueue's, below)   |
|   no Workload yet                                                |              | Queued             |
|   evicted (Workload Evicted=True; preempted: reason Preempted)   |              | Evicted's reason   |
|   Workload QuotaReserved=False (no quota free)                   |              | WaitingForQuota    |
|   QuotaReserved=False, another reason (no such LocalQueue, ...)  |              | Kueue's reason     |
|   quota reserved, admission checks pending                       |              | WaitingForAdmission|
|   admitted; Kueue is about to unsuspend the JobSet               |              | Admitted           |
| JobSet suspended, spec.suspend false, no queue                   | Suspended    | Resuming           |
| no pods of the current attempt, the Job controller cannot create | Pending      | FailedCreatePods   |
| no pods of the current attempt yet                               | Pending      | CreatingPods       |
| a pod not scheduled (no node fits yet; node pools provisioning)  | Provisioning | WaitingForNodes    |
| every pod scheduled, some not running yet                        | Provisioning | StartingPods       |
| every pod running (or done)                                      | Running      | Running            |
| async RL: every trainer pod running, rollout workers or not      | Running      | Running            |

"Pods of the current attempt" are those whose `jobset.sigs.k8s.io/restart-attempt` label equals
the JobSet's `status.restarts`: a restart replaces every pod.

Async RL jobs have two roles in the JobSet, told apart by the pods' replicated-job label: the
trainer's (`slice` or `node`) and the rollout workers' (`rollout`). The job is Running while the
trainer's pods run; the message says how many workers run and why the others wait. Until the
trainer runs, every pod counts as above (a worker waiting for nodes is WaitingForNodes too). A
worker's pod that fails is recreated by its own Job (render.py): the JobSet does not restart,
`status.restarts` does not move, and its failure is quoted only after the trainer's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain import runtime
from posttrain.api.load import FieldError
from posttrain.api.v1alpha1 import display_progress
from posttrain.operator.render import ROLLOUT_JOB

RESTART_ATTEMPT = "jobset.sigs.k8s.io/restart-attempt"
REPLICATED_JOB = "jobset.sigs.k8s.io/replicatedjob-name"
TERMINAL = ("Succeeded", "Failed")
# Condition types, in the order they are listed.
CONDITION_TYPES = ("Valid", "Suspended", "Running", "Succeeded", "Failed")
INVALID = "InvalidSpec"
CONFIG_ERROR = "ConfigurationError"
JOBSET_DELETED = "JobSetDeleted"
FAILED_CREATE = "FailedCreatePods"
# Reasons that deserve a Warning Event although the phase is not Failed.
WARNING_REASONS = (FAILED_CREATE,)


@dataclass(frozen=True)
class Outcome:
    phase: str
    reason: str
    message: str


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def _condition(obj: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def _pod_scheduled(pod: Mapping[str, Any]) -> bool:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled":
            return c.get("status") == "True"
    return bool((pod.get("spec") or {}).get("nodeName"))


def _unschedulable_message(pod: Mapping[str, Any]) -> str:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") != "True":
            return str(c.get("message") or c.get("reason") or "")
    return ""


def current_pods(jobset: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> list[Mapping]:
    """Pods of the JobSet's current restart attempt, not being deleted."""
    attempt = str(((jobset.get("status") or {}).get("restarts")) or 0)
    return [
        p
        for p in pods
        if not (p.get("metadata") or {}).get("deletionTimestamp")
        and ((p.get("metadata") or {}).get("labels") or {}).get(RESTART_ATTEMPT, "0") == attempt
    ]


def is_rollout_worker(pod: Mapping[str, Any]) -> bool:
    """Whether the pod is an async job's rollout worker (JobSet's replicated-job label)."""
    return ((pod.get("metadata") or {}).get("labels") or {}).get(REPLICATED_JOB) == ROLLOUT_JOB


def expected_pods(jobset: Mapping[str, Any], role: str | None = None) -> int:
    """Pods of one attempt: all, or (`role`) the trainer's ("trainer") or the workers'
    ("rollout")."""
    total = 0
    for rjob in (jobset.get("spec") or {}).get("replicatedJobs") or []:
        if role is not None and (rjob.get("name") == ROLLOUT_JOB) != (role == ROLLOUT_JOB):
            continue
        per_job = ((rjob.get("template") or {}).get("spec") or {}).get("parallelism", 1)
        total += int(rjob.get("replicas", 1)) * int(per_job)
    return total


def pod_failure(pods: Sequence[Mapping[str, Any]]) -> str:
    """`pod P: exit code 3 (OOMKilled): message` for the first failed pod, else ''. Pods that
    failed on their own come first: a pod deleted while running (a restart, an eviction) also
    ends Failed, but is a consequence, not the cause."""

    def order(pod: Mapping[str, Any]) -> tuple[bool, bool, str]:
        meta = pod.get("metadata") or {}
        # an async job's trainer before its rollout workers (whose failures do not end a job)
        return (bool(meta.get("deletionTimestamp")), is_rollout_worker(pod), meta.get("name", ""))

    for pod in sorted(pods, key=order):
        status = pod.get("status") or {}
        if status.get("phase") != "Failed":
            continue
        name = (pod.get("metadata") or {}).get("name", "?")
        for cs in status.get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if term:
                text = f"pod {name}: container {cs.get('name')} exited with code {term.get('exitCode')}"
                if term.get("reason"):
                    text += f" ({term['reason']})"
                if term.get("message"):
                    text += f": {term['message']}"
                return text
        return f"pod {name} failed" + (f": {status['reason']}" if status.get("reason") else "")
    return ""


def exit_code_of(pods: Sequence[Mapping[str, Any]], code: int) -> bool:
    """Whether a failed pod's container exited with `code`."""
    return any(
        ((cs.get("state") or {}).get("terminated") or {}).get("exitCode") == code
        for pod in pods
        if (pod.get("status") or {}).get("phase") == "Failed"
        for cs in (pod.get("status") or {}).get("containerStatuses") or []
    )


def create_failure_fix(message: str, namespace: str) -> str:
    """What to do about a pod the Job controller could not create, from its FailedCreate
    Event's message (`Error creating: pods "..." is forbidden: ...`)."""
    if sa := re.search(r'serviceaccount "([^"]+)" not found', message):
        return (
            f"create the ServiceAccount {sa.group(1)} in namespace {namespace} (the Helm chart "
            "does, for each namespace in trainer.namespaces), or set spec.serviceAccountName"
        )
    if "exceeded quota" in message:
        return "raise the namespace's ResourceQuota, or ask for less in spec.resources"
    if "admission webhook" in message:
        return "an admission webhook refused the pods: see its message above"
    if "violates PodSecurity" in message:
        return "the namespace's Pod Security level refuses the trainer pods"
    return "see the message above"


def phase_of(
    *,
    suspend: bool,
    queue_name: str | None,
    jobset: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    create_failure: str | None = None,
    deleted_jobset: str | None = None,
    workload: Mapping[str, Any] | None = None,
) -> Outcome:
    """What the job is doing, from its JobSet and the JobSet's pods (see the module's table).
    `create_failure`: the last FailedCreate message of the job's Jobs, with its fix;
    `deleted_jobset`: the JobSet's name when it existed once (status.jobSetName) and is gone;
    `workload`: Kueue's Workload of the JobSet, when it has a queue and Kueue made one."""
    if jobset is None:
        if deleted_jobset:
            return Outcome(
                "Failed",
                JOBSET_DELETED,
                f"JobSet {deleted_jobset} was deleted; it is not made again (that would reset its "
                "restart count): delete the PostTrainJob and create it again to rerun",
            )
        if suspend:
            return Outcome("Suspended", "Suspended", "suspended (spec.suspend) before starting")
        return Outcome("Pending", "Creating", "creating the JobSet")
    name = (jobset.get("metadata") or {}).get("name", "")
    done = _condition(jobset, "Completed")
    if done:
        return Outcome(
            "Succeeded", done.get("reason") or "Completed", done.get("message") or "completed"
        )
    failed = _condition(jobset, "Failed")
    if failed:
        message = failed.get("message") or "failed"
        cause = pod_failure([p for p in pods if p.get("status", {}).get("phase") == "Failed"])
        reason = failed.get("reason") or "Failed"
        if exit_code_of(pods, runtime.EXIT_CONFIG):
            reason = CONFIG_ERROR
            who = "the trainer"
            if not exit_code_of([p for p in pods if not is_rollout_worker(p)], runtime.EXIT_CONFIG):
                who = "a rollout worker"
            message = (
                f"{who} refused its configuration (exit code {runtime.EXIT_CONFIG}); "
                "restarting cannot help, so no restart was spent: fix the spec and create the job "
                "again"
            )
        return Outcome("Failed", reason, f"{message}; {cause}" if cause else message)
    jobset_suspended = bool((jobset.get("spec") or {}).get("suspend"))
    if suspend:
        if jobset_suspended:
            return Outcome("Suspended", "Suspended", f"JobSet {name} suspended (spec.suspend)")
        return Outcome("Suspended", "Suspending", f"suspending JobSet {name}")
    if jobset_suspended:
        if queue_name:
            # Kueue admits by unsuspending, and evicts (preemption) by suspending again.
            return queued_outcome(queue_name, workload)
        return Outcome("Suspended", "Resuming", f"resuming JobSet {name}")

    live = current_pods(jobset, pods)
    want = expected_pods(jobset)
    if not live:
        if create_failure:
            return Outcome(
                "Pending", FAILED_CREATE, f"the pods cannot be created: {create_failure}"
            )
        return Outcome("Pending", "CreatingPods", f"waiting for the {want} pods to be created")
    trainer_want = expected_pods(jobset, "trainer")
    if trainer_want < want:  # async RL: Running once the trainer runs
        trainers = [p for p in live if not is_rollout_worker(p)]
        if len(_running(trainers)) >= trainer_want:
            workers = [p for p in live if is_rollout_worker(p)]
            message = f"all {trainer_want} trainer pods running; " + _workers_message(
                workers, want - trainer_want
            )
            return Outcome("Running", "Running", message)
    waiting = [p for p in live if not _pod_scheduled(p)]
    if waiting:
        why = _unschedulable_message(waiting[0])
        message = f"{len(waiting)} of {want} pods wait for nodes"
        return Outcome("Provisioning", "WaitingForNodes", f"{message}: {why}" if why else message)
    running = _running(live)
    if len(running) >= want:
        return Outcome("Running", "Running", f"all {want} pods running")
    return Outcome("Provisioning", "StartingPods", f"{len(running)} of {want} pods running")


def _running(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [p for p in pods if (p.get("status") or {}).get("phase") in ("Running", "Succeeded")]


def _workers_message(workers: Sequence[Mapping[str, Any]], want: int) -> str:
    """`2 of 3 rollout workers running; 1 waits for nodes: <the scheduler's message>`. A
    worker's failed pods (its Job makes a new one) are not counted."""
    running = len(_running(workers))
    if running >= want:
        return f"all {want} rollout workers running"
    text = f"{running} of {want} rollout workers running"
    alive = [p for p in workers if (p.get("status") or {}).get("phase") != "Failed"]
    waiting = [p for p in alive if not _pod_scheduled(p)]
    if waiting:
        why = _unschedulable_message(waiting[0])
        text += f"; {len(waiting)} wait for nodes" + (f": {why}" if why else "")
    elif len(alive) < want:
        text += f"; {want - len(alive)} being created again"
    else:
        text += "; the others starting"
    return text


def _kueue_condition(workload: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for c in (workload.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def queued_outcome(queue_name: str, workload: Mapping[str, Any] | None) -> Outcome:
    """Why Kueue holds the job's JobSet suspended, from the Workload's conditions (Kueue's
    reason and message): evicted (preempted), no quota free, admission checks, or admitted and
    about to start."""
    if workload is None:
        return Outcome("Queued", "Queued", f"waiting for Kueue to admit it (queue {queue_name})")
    wl_name = (workload.get("metadata") or {}).get("name", "")
    where = f"queue {queue_name}, Workload {wl_name}"
    status = workload.get("status") or {}
    reserved = _kueue_condition(workload, "QuotaReserved") or {}
    admitted = _kueue_condition(workload, "Admitted") or {}
    evicted = _kueue_condition(workload, "Evicted") or {}
    if admitted.get("status") == "True":
        cq = (status.get("admission") or {}).get("clusterQueue", "")
        return Outcome(
            "Queued", "Admitted", f"admitted by Kueue (ClusterQueue {cq}); starting ({where})"
        )
    pending = str(reserved.get("message") or "") if reserved.get("status") == "False" else ""
    if evicted.get("status") == "True":
        reason = str(evicted.get("reason") or "Evicted")
        message = f"evicted by Kueue ({reason}): {evicted.get('message') or reason}"
        if pending:
            message += f"; waiting to be admitted again: {pending}"
        return Outcome("Queued", reason, f"{message} ({where})")
    if reserved.get("status") == "True":
        return Outcome(
            "Queued",
            "WaitingForAdmission",
            f"quota reserved; waiting for admission checks: {admitted.get('message') or ''} "
            f"({where})",
        )
    if pending:
        # Kueue's "Pending": no quota free now; others (e.g. "Inadmissible": the LocalQueue or
        # its ClusterQueue is missing or stopped) are passed on as they are.
        kueue_reason = str(reserved.get("reason") or "Pending")
        reason = "WaitingForQuota" if kueue_reason == "Pending" else kueue_reason
        return Outcome("Queued", reason, f"Kueue: {pending} ({where})")
    return Outcome("Queued", "Queued", f"waiting for Kueue to admit it ({where})")


def invalid_outcome(errors: Sequence[FieldError]) -> Outcome:
    return Outcome("Failed", INVALID, "; ".join(str(e) for e in errors))


def _wanted_conditions(outcome: Outcome, had: set[str]) -> dict[str, tuple[str, str, str]]:
    """type -> (status, reason, message) for this outcome. Suspended, Succeeded and Failed are
    listed once they have been true; Valid and Running always."""
    p, r, m = outcome.phase, outcome.reason, outcome.message
    out: dict[str, tuple[str, str, str]] = {}
    if r == INVALID:
        out["Valid"] = ("False", INVALID, m)
    else:
        out["Valid"] = ("True", "SpecValid", "the spec is valid")
    if p == "Suspended" or "Suspended" in had:
        out["Suspended"] = ("True", r, m) if p == "Suspended" else ("False", "NotSuspended", m)
    out["Running"] = ("True", r, m) if p == "Running" else ("False", r, m)
    for terminal in TERMINAL:
        if p == terminal or terminal in had:
            out[terminal] = ("True", r, m) if p == terminal else ("False", r, m)
    return out


def next_status(
    previous: Mapping[str, Any] | None,
    outcome: Outcome,
    *,
    generation: int | None,
    now: str,
    jobset: Mapping[str, Any] | None = None,
    summary: Mapping[str, str] | None = None,
    total_steps: int | None = None,
    workload: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The status to merge-patch. `progress` is the trainer's and is never written here;
    `summary.progress` is set to 0% only while nobody has reported progress. `restarts` are the
    JobSet's (failures, disruptions), `readmissions` Kueue's evictions of it back to the queue
    (from its Workload; never lowered, a Workload can be made anew)."""
    prev = dict(previous or {})
    old = {c.get("type"): c for c in prev.get("conditions") or []}
    conditions = []
    for type_, (value, reason, message) in _wanted_conditions(outcome, set(old)).items():
        before = old.get(type_) or {}
        unchanged = before.get("status") == value
        cond: dict[str, Any] = {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message[:32768],
            "lastTransitionTime": before.get("lastTransitionTime") if unchanged else now,
        }
        if generation is not None:
            cond["observedGeneration"] = generation
        conditions.append(cond)
    conditions.sort(key=lambda c: CONDITION_TYPES.index(c["type"]))

    status: dict[str, Any] = {"phase": outcome.phase, "conditions": conditions}
    if generation is not None:
        status["observedGeneration"] = generation
    if jobset is not None:
        status["jobSetName"] = (jobset.get("metadata") or {}).get("name")
        status["restarts"] = int((jobset.get("status") or {}).get("restarts") or 0)
    readmissions = max(int(prev.get("readmissions") or 0), kueue_readmissions(workload))
    if readmissions:
        status["readmissions"] = readmissions
    started = prev.get("startTime")
    if not started and jobset is not None and outcome.phase in ("Running", *TERMINAL):
        started = now
    if started:
        status["startTime"] = started
    completed = prev.get("completionTime")
    if not completed and outcome.phase in TERMINAL:
        terminal = _condition(jobset, "Completed") or _condition(jobset, "Failed") or {}
        completed = terminal.get("lastTransitionTime") or now
    if completed and outcome.phase in TERMINAL:
        status["completionTime"] = completed
    elif completed:
        status["completionTime"] = None  # a fixed invalid job starts again
    new_summary = dict(summary or {})
    reported = (prev.get("summary") or {}).get("progress") or prev.get("progress")
    if not reported and total_steps is not None:
        new_summary["progress"] = display_progress(0, total_steps)
    if new_summary:
        status["summary"] = new_summary
    return status


# Kueue evicts a Workload on spec.active false (our spec.suspend of a queued job): the user's
# doing, not a re-admission.
DEACTIVATED_REASONS = ("InactiveWorkload", "Deactivated")


def kueue_readmissions(workload: Mapping[str, Any] | None) -> int:
    """How many times Kueue evicted the Workload back to its queue (preemption, a lost node,
    waitForPodsReady, ...), from its status.schedulingStats.evictions; spec.suspend's
    deactivations are not counted."""
    stats = ((workload or {}).get("status") or {}).get("schedulingStats") or {}
    return sum(
        int(e.get("count") or 0)
        for e in stats.get("evictions") or []
        if e.get("reason") not in DEACTIVATED_REASONS
    )


def changed(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether patching `new` over `previous` changes anything."""
    prev = previous or {}
    for key, value in new.items():
        if isinstance(value, dict):
            if any((prev.get(key) or {}).get(k) != v for k, v in value.items()):
                return True
        elif prev.get(key) != value:
            return True
    return False


def transitions(
    previous: Mapping[str, Any] | None, new: Mapping[str, Any], outcome: Outcome
) -> list[Event]:
    """One Event per change of phase (or of reason within a phase), one per JobSet restart."""
    prev = previous or {}
    events = []
    restarts, before = new.get("restarts", 0), prev.get("restarts", 0) or 0
    if restarts > before:
        events.append(
            Event("Warning", "Restarted", f"JobSet restarted every pod (restart {restarts})")
        )
    old_reason = next(
        (c.get("reason") for c in prev.get("conditions") or [] if c.get("type") == "Running"), None
    )
    if prev.get("phase") != outcome.phase or old_reason != outcome.reason:
        warn = outcome.phase == "Failed" or outcome.reason in WARNING_REASONS
        kind = "Warning" if warn else "Normal"
        events.append(Event(kind, outcome.phase, f"{outcome.reason}: {outcome.message}"))
    return events
