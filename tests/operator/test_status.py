"""JobSet + pods -> PostTrainJob status: the mapping table, conditions, times, events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from posttrain.api.load import FieldError
from posttrain.operator import status as st

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:05:00Z"


def jobset(
    *,
    suspend: bool = False,
    restarts: int = 0,
    conditions: list[dict] | None = None,
    replicas: int = 2,
    parallelism: int = 2,
) -> dict[str, Any]:
    return {
        "metadata": {"name": "j", "namespace": "ml"},
        "spec": {
            "suspend": suspend,
            "replicatedJobs": [
                {
                    "name": "slice",
                    "replicas": replicas,
                    "template": {"spec": {"parallelism": parallelism}},
                }
            ],
        },
        "status": {"restarts": restarts, "conditions": conditions or []},
    }


def pod(
    phase: str = "Running",
    *,
    scheduled: bool = True,
    attempt: int = 0,
    name: str = "p",
    message: str = "",
    terminated: dict | None = None,
) -> dict[str, Any]:
    conditions = [
        {
            "type": "PodScheduled",
            "status": "True" if scheduled else "False",
            "reason": "" if scheduled else "Unschedulable",
            "message": message,
        }
    ]
    status: dict[str, Any] = {"phase": phase, "conditions": conditions}
    if terminated:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    return {
        "metadata": {"name": name, "labels": {st.RESTART_ATTEMPT: str(attempt)}},
        "spec": {"nodeName": "n1"} if scheduled else {},
        "status": status,
    }


def cond(type_: str, reason: str = "R", message: str = "m") -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": LATER,
    }


def phase(**kwargs: Any) -> tuple[str, str]:
    args = {"suspend": False, "queue_name": None, "jobset": None, "pods": []} | kwargs
    outcome = st.phase_of(**args)
    return outcome.phase, outcome.reason


@pytest.mark.parametrize(
    "kwargs, want",
    [
        ({}, ("Pending", "Creating")),
        ({"suspend": True}, ("Suspended", "Suspended")),
        ({"jobset": jobset()}, ("Pending", "CreatingPods")),
        (
            {"jobset": jobset(), "pods": [pod("Pending", scheduled=False)] + [pod()] * 3},
            ("Provisioning", "WaitingForNodes"),
        ),
        (
            {"jobset": jobset(), "pods": [pod("Pending")] + [pod()] * 3},
            ("Provisioning", "StartingPods"),
        ),
        ({"jobset": jobset(), "pods": [pod()] * 4}, ("Running", "Running")),
        (
            {"jobset": jobset(), "pods": [pod()] * 2 + [pod("Succeeded")] * 2},
            ("Running", "Running"),
        ),
        (
            {"jobset": jobset(conditions=[cond("Completed", "AllJobsCompleted")]), "pods": []},
            ("Succeeded", "AllJobsCompleted"),
        ),
        (
            {"jobset": jobset(conditions=[cond("Failed", "ReachedMaxRestarts")])},
            ("Failed", "ReachedMaxRestarts"),
        ),
        ({"jobset": jobset(suspend=True), "suspend": True}, ("Suspended", "Suspended")),
        ({"jobset": jobset(), "suspend": True, "pods": [pod()] * 4}, ("Suspended", "Suspending")),
        ({"jobset": jobset(suspend=True)}, ("Suspended", "Resuming")),
        ({"jobset": jobset(suspend=True), "queue_name": "q"}, ("Queued", "Queued")),
        # after a restart the old attempt's pods do not count
        ({"jobset": jobset(restarts=1), "pods": [pod(attempt=0)] * 4}, ("Pending", "CreatingPods")),
        ({"jobset": jobset(restarts=1), "pods": [pod(attempt=1)] * 4}, ("Running", "Running")),
        # a Suspended condition left on a resumed JobSet does not matter
        (
            {
                "jobset": jobset(conditions=[{"type": "Suspended", "status": "False"}]),
                "pods": [pod()] * 4,
            },
            ("Running", "Running"),
        ),
    ],
)
def test_phase_table(kwargs: dict[str, Any], want: tuple[str, str]) -> None:
    assert phase(**kwargs) == want


def test_provisioning_message_quotes_the_scheduler() -> None:
    out = st.phase_of(
        suspend=False,
        queue_name=None,
        jobset=jobset(),
        pods=[pod("Pending", scheduled=False, message="0/4 nodes are available")] * 2,
    )
    assert out.message == "2 of 4 pods wait for nodes: 0/4 nodes are available"


def test_failure_message_names_the_pod_and_exit() -> None:
    js = jobset(
        conditions=[
            cond(
                "Failed",
                "ReachedMaxRestarts",
                "jobset failed due to reaching max number of restarts",
            )
        ]
    )
    pods = [
        pod(
            "Failed",
            name="j-slice-0-1-x",
            terminated={"exitCode": 3, "reason": "OOMKilled", "message": "out of memory"},
        )
    ]
    out = st.phase_of(suspend=False, queue_name=None, jobset=js, pods=pods)
    assert out.message == (
        "jobset failed due to reaching max number of restarts; pod j-slice-0-1-x: container "
        "trainer exited with code 3 (OOMKilled): out of memory"
    )


def status_for(previous: dict | None, outcome: st.Outcome, now: str = NOW, **kw: Any) -> dict:
    return st.next_status(previous, outcome, generation=3, now=now, **kw)


def test_conditions_carry_reason_generation_and_keep_transition_times() -> None:
    running = st.Outcome("Running", "Running", "all 4 pods running")
    first = status_for(
        None,
        running,
        jobset=jobset(restarts=1),
        summary={"model": "m", "accelerator": "a"},
        total_steps=10,
    )
    assert first["phase"] == "Running" and first["observedGeneration"] == 3
    assert first["restarts"] == 1 and first["jobSetName"] == "j"
    assert first["startTime"] == NOW and "completionTime" not in first
    assert first["summary"] == {"model": "m", "accelerator": "a", "progress": "0%"}
    by_type = {c["type"]: c for c in first["conditions"]}
    assert set(by_type) == {"Valid", "Running"}
    assert by_type["Running"] == {
        "type": "Running",
        "status": "True",
        "reason": "Running",
        "message": "all 4 pods running",
        "lastTransitionTime": NOW,
        "observedGeneration": 3,
    }
    # same outcome later: transition times and start time stay
    again = status_for(first, running, now=LATER, jobset=jobset(restarts=1))
    assert again["conditions"] == first["conditions"] and again["startTime"] == NOW
    assert not st.changed(first, again)

    done = st.Outcome("Succeeded", "AllJobsCompleted", "jobset completed successfully")
    js = jobset(conditions=[cond("Completed", "AllJobsCompleted")])
    final = status_for(again, done, now=LATER, jobset=js)
    by_type = {c["type"]: c for c in final["conditions"]}
    assert by_type["Running"]["status"] == "False"
    assert by_type["Running"]["lastTransitionTime"] == LATER
    assert by_type["Succeeded"]["status"] == "True"
    assert final["completionTime"] == LATER  # the JobSet's condition time
    assert final["startTime"] == NOW


def test_progress_is_never_overwritten() -> None:
    prev = {
        "phase": "Running",
        "summary": {"progress": "5/10"},
        "progress": {"step": 5, "totalSteps": 10},
    }
    new = status_for(
        prev, st.Outcome("Running", "Running", "x"), summary={"model": "m"}, total_steps=10
    )
    assert "progress" not in new and new["summary"] == {"model": "m"}


def test_suspended_condition_stays_listed_after_resume() -> None:
    s1 = status_for(None, st.Outcome("Suspended", "Suspended", "s"))
    assert {c["type"]: c["status"] for c in s1["conditions"]}["Suspended"] == "True"
    s2 = status_for(s1, st.Outcome("Running", "Running", "r"), now=LATER)
    assert {c["type"]: c["status"] for c in s2["conditions"]}["Suspended"] == "False"


def test_invalid_spec() -> None:
    out = st.invalid_outcome(
        [
            FieldError("spec.resources.topology", "'3x3' is not valid"),
            FieldError("spec.training.steps", "must be >= 1"),
        ]
    )
    assert (out.phase, out.reason) == ("Failed", "InvalidSpec")
    status = status_for(None, out)
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["Valid"]["status"] == "False"
    assert "spec.resources.topology: '3x3' is not valid" in by_type["Valid"]["message"]
    assert by_type["Failed"]["status"] == "True" and status["phase"] == "Failed"
    # fixed: Pending again, completion time cleared
    fixed = status_for(status, st.Outcome("Pending", "Creating", "c"), now=LATER)
    assert fixed["completionTime"] is None and fixed["phase"] == "Pending"
    assert {c["type"]: c["status"] for c in fixed["conditions"]}["Valid"] == "True"


def test_events_on_transitions_and_restarts() -> None:
    pending = st.Outcome("Pending", "Creating", "creating")
    s1 = status_for(None, pending)
    assert st.transitions(None, s1, pending) == [
        st.Event("Normal", "Pending", "Creating: creating")
    ]
    assert st.transitions(s1, s1, pending) == []
    prov = st.Outcome("Provisioning", "WaitingForNodes", "1 of 4 pods wait")
    s2 = status_for(s1, prov, jobset=jobset(restarts=1))
    assert st.transitions(s1, s2, prov) == [
        st.Event("Warning", "Restarted", "JobSet restarted every pod (restart 1)"),
        st.Event("Normal", "Provisioning", "WaitingForNodes: 1 of 4 pods wait"),
    ]
    failed = st.Outcome("Failed", "ReachedMaxRestarts", "max")
    s3 = status_for(s2, failed, jobset=jobset(restarts=1))
    assert st.transitions(s2, s3, failed) == [
        st.Event("Warning", "Failed", "ReachedMaxRestarts: max")
    ]


# ---- faults: configuration errors, refused pods, a deleted JobSet -------------------------------


def test_config_error_exit_fails_with_its_own_reason() -> None:
    from posttrain import runtime

    failed = {"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "job failed"}
    bad = pod("Failed", name="j-slice-0-0", terminated={"exitCode": runtime.EXIT_CONFIG})
    out = st.phase_of(
        suspend=False, queue_name=None, jobset=jobset(conditions=[failed]), pods=[bad]
    )
    assert (out.phase, out.reason) == ("Failed", st.CONFIG_ERROR)
    assert "refused its configuration (exit code 78)" in out.message
    assert "exited with code 78" in out.message  # which pod
    crash = pod("Failed", name="j-slice-0-0", terminated={"exitCode": 1})
    out = st.phase_of(
        suspend=False, queue_name=None, jobset=jobset(conditions=[failed]), pods=[crash]
    )
    assert out.reason == "FailedJobs"


SA_MESSAGE = (
    'Error creating: pods "j-node-0-0-abcde" is forbidden: error looking up service account '
    'ml/posttrain-trainer: serviceaccount "posttrain-trainer" not found'
)


@pytest.mark.parametrize(
    ("message", "fix"),
    [
        (SA_MESSAGE, "create the ServiceAccount posttrain-trainer in namespace ml"),
        (
            'Error creating: pods "x" is forbidden: exceeded quota: q, requested: cpu=2',
            "raise the namespace's ResourceQuota",
        ),
        (
            'Error creating: admission webhook "v.example.com" denied the request: no',
            "an admission webhook refused the pods",
        ),
        ("Error creating: something new", "see the message above"),
    ],
)
def test_create_failure_fix_names_the_fix(message: str, fix: str) -> None:
    assert st.create_failure_fix(message, "ml").startswith(fix)


def test_pods_that_cannot_be_created_say_why_and_warn() -> None:
    why = f"{SA_MESSAGE}. Fix: {st.create_failure_fix(SA_MESSAGE, 'ml')}"
    out = st.phase_of(suspend=False, queue_name=None, jobset=jobset(), pods=[], create_failure=why)
    assert (out.phase, out.reason) == ("Pending", st.FAILED_CREATE)
    assert 'serviceaccount "posttrain-trainer" not found' in out.message
    assert "set spec.serviceAccountName" in out.message
    new = st.next_status({}, out, generation=1, now=NOW, jobset=jobset())
    (event,) = st.transitions({}, new, out)
    assert (event.type, event.reason) == ("Warning", "Pending")
    # once pods exist the failure no longer matters
    out = st.phase_of(
        suspend=False, queue_name=None, jobset=jobset(), pods=[pod()], create_failure=why
    )
    assert out.reason != st.FAILED_CREATE


def test_a_deleted_jobset_fails_the_job_instead_of_being_made_again() -> None:
    out = st.phase_of(suspend=False, queue_name=None, jobset=None, pods=[], deleted_jobset="j")
    assert (out.phase, out.reason) == ("Failed", st.JOBSET_DELETED)
    assert "JobSet j was deleted" in out.message and "restart count" in out.message


def test_pod_failure_names_the_cause_not_the_pods_deleted_after_it() -> None:
    killed = pod("Failed", name="a-0", terminated={"exitCode": 143, "reason": "Error"})
    killed["metadata"]["deletionTimestamp"] = NOW  # deleted by the restart it caused
    cause = pod("Failed", name="b-1", terminated={"exitCode": 3, "reason": "OOMKilled"})
    assert st.pod_failure([killed, cause]).startswith(
        "pod b-1: container trainer exited with code 3"
    )


# ---- Kueue: why a queued job waits (Workloads recorded from the local control plane's Kueue) ----

KUEUE = Path(__file__).parent / "kueue"


def workload(name: str) -> dict[str, Any]:
    return json.loads((KUEUE / f"workload-{name}.json").read_text())


def queued(wl: dict[str, Any] | None) -> st.Outcome:
    return st.phase_of(
        suspend=False, queue_name="team-a", jobset=jobset(suspend=True), pods=[], workload=wl
    )


def test_queued_without_a_workload_yet() -> None:
    assert queued(None) == st.Outcome(
        "Queued", "Queued", "waiting for Kueue to admit it (queue team-a)"
    )


def test_queued_waiting_for_quota_quotes_kueue() -> None:
    out = queued(workload("waiting-for-quota"))
    assert (out.phase, out.reason) == ("Queued", "WaitingForQuota")
    assert out.message.startswith(
        "Kueue: couldn't assign flavors to pod set slice: insufficient unused quota for "
        "google.com/tpu in flavor "
    ), out.message
    assert out.message.endswith("8 more needed (queue team-a, Workload jobset-second-a127d)")


def test_queued_after_preemption_says_why_and_what_it_waits_for() -> None:
    out = queued(workload("preempted"))
    assert (out.phase, out.reason) == ("Queued", "Preempted")
    assert out.message.startswith(
        "evicted by Kueue (Preempted): Preempted to accommodate a workload (UID: "
    ), out.message
    assert "due to prioritization in the ClusterQueue" in out.message
    assert "; waiting to be admitted again: couldn't assign flavors" in out.message


def test_queued_but_admitted_is_about_to_start() -> None:
    out = queued(workload("admitted"))
    assert (out.phase, out.reason) == ("Queued", "Admitted")
    assert out.message.startswith("admitted by Kueue (ClusterQueue t-test-kueue-quota"), out.message


def test_kueue_reasons_other_than_pending_pass_through() -> None:
    wl = {
        "metadata": {"name": "jobset-q-1"},
        "status": {
            "conditions": [
                {
                    "type": "QuotaReserved",
                    "status": "False",
                    "reason": "Inadmissible",
                    "message": "LocalQueue team-a doesn't exist",
                }
            ]
        },
    }
    assert queued(wl) == st.Outcome(
        "Queued",
        "Inadmissible",
        "Kueue: LocalQueue team-a doesn't exist (queue team-a, Workload jobset-q-1)",
    )


def test_a_workload_does_not_matter_once_the_jobset_runs() -> None:
    out = st.phase_of(
        suspend=False,
        queue_name="team-a",
        jobset=jobset(),
        pods=[pod()] * 4,
        workload=workload("preempted"),
    )
    assert (out.phase, out.reason) == ("Running", "Running")


def test_readmissions_are_kueue_evictions_counted_apart_from_restarts() -> None:
    wl = workload("preempted")
    assert st.kueue_readmissions(wl) == 1
    running = st.Outcome("Running", "Running", "x")
    new = status_for(None, running, jobset=jobset(restarts=2), workload=wl)
    assert new["restarts"] == 2 and new["readmissions"] == 1
    # never lowered (a Workload made anew starts from 0); spec.suspend's deactivations not counted
    fresh = {
        "status": {"schedulingStats": {"evictions": [{"reason": "InactiveWorkload", "count": 3}]}}
    }
    assert st.kueue_readmissions(fresh) == 0
    assert status_for(new, running, jobset=jobset(restarts=2), workload=fresh)["readmissions"] == 1
    assert "readmissions" not in status_for(None, running, jobset=jobset())


# ---- async RL: trainer and rollout workers in one JobSet ---------------------------------------


def async_jobset(*, workers: int = 2, restarts: int = 0, **kw: Any) -> dict[str, Any]:
    js = jobset(replicas=1, parallelism=1, restarts=restarts, **kw)
    js["spec"]["replicatedJobs"].append(
        {"name": "rollout", "replicas": workers, "template": {"spec": {"parallelism": 1}}}
    )
    return js


def worker(phase: str = "Running", **kw: Any) -> dict[str, Any]:
    p = pod(phase, **kw)
    p["metadata"]["labels"][st.REPLICATED_JOB] = "rollout"
    return p


def trainer(phase: str = "Running", **kw: Any) -> dict[str, Any]:
    p = pod(phase, **kw)
    p["metadata"]["labels"][st.REPLICATED_JOB] = "slice"
    return p


def test_expected_pods_by_role() -> None:
    js = async_jobset(workers=3)
    assert st.expected_pods(js) == 4
    assert st.expected_pods(js, "trainer") == 1 and st.expected_pods(js, "rollout") == 3
    assert st.expected_pods(jobset(), "trainer") == 4


def test_async_job_runs_when_its_trainer_runs() -> None:
    js = async_jobset(workers=2)
    busy = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    out = st.phase_of(
        suspend=False,
        queue_name=None,
        jobset=js,
        pods=[trainer(), worker(name="w0"), worker("Pending", scheduled=False, message=busy)],
    )
    assert (out.phase, out.reason) == ("Running", "Running")
    assert out.message == (
        "all 1 trainer pods running; 1 of 2 rollout workers running; 1 wait for nodes: " + busy
    )
    out = st.phase_of(
        suspend=False, queue_name=None, jobset=js, pods=[trainer(), worker(), worker()]
    )
    assert out.message == "all 1 trainer pods running; all 2 rollout workers running"
    # a worker whose pod failed, its Job making a new one: still Running, no restart
    crashed = worker("Failed", name="w1-old", terminated={"exitCode": 1})
    out = st.phase_of(
        suspend=False, queue_name=None, jobset=js, pods=[trainer(), worker(), crashed]
    )
    assert (out.phase, out.reason) == ("Running", "Running")
    assert out.message.endswith("1 of 2 rollout workers running; 1 being created again")
    out = st.phase_of(
        suspend=False,
        queue_name=None,
        jobset=js,
        pods=[trainer(), worker(), crashed, worker("Pending", name="w1-new")],
    )
    assert out.message.endswith("1 of 2 rollout workers running; the others starting")


def test_async_job_provisions_until_its_trainer_runs() -> None:
    js = async_jobset(workers=1)
    wait = [trainer(), worker("Pending", scheduled=False, message="no GPU node")]
    # the trainer running alone is enough; its pod waiting for nodes is not
    assert phase(jobset=js, pods=wait) == ("Running", "Running")
    out = st.phase_of(
        suspend=False,
        queue_name=None,
        jobset=js,
        pods=[trainer("Pending", scheduled=False, message="no TPU node"), worker()],
    )
    assert (out.phase, out.reason) == ("Provisioning", "WaitingForNodes")
    assert out.message == "1 of 2 pods wait for nodes: no TPU node"
    assert phase(jobset=js, pods=[trainer("Pending"), worker()]) == (
        "Provisioning",
        "StartingPods",
    )
    assert phase(jobset=js, pods=[worker()]) == ("Provisioning", "StartingPods")
    assert phase(jobset=js) == ("Pending", "CreatingPods")


def test_a_sync_job_with_a_pod_labelled_by_its_replicated_job_is_unchanged() -> None:
    pods = [trainer()] * 3 + [trainer("Pending", scheduled=False)]
    assert phase(jobset=jobset(), pods=pods) == ("Provisioning", "WaitingForNodes")


def test_async_failure_quotes_the_trainer_before_a_worker() -> None:
    js = async_jobset(conditions=[cond("Failed", "ReachedMaxRestarts", "max restarts")])
    pods = [
        worker("Failed", name="j-rollout-0-0-a", terminated={"exitCode": 1, "reason": "Error"}),
        trainer("Failed", name="j-slice-0-0-b", terminated={"exitCode": 3, "reason": "OOMKilled"}),
    ]
    out = st.phase_of(suspend=False, queue_name=None, jobset=js, pods=pods)
    assert "pod j-slice-0-0-b: container trainer exited with code 3 (OOMKilled)" in out.message
    # a worker refusing the recipe fails the set (its Job's rule 0): said as such
    pods = [worker("Failed", name="j-rollout-0-0-a", terminated={"exitCode": 78})]
    out = st.phase_of(suspend=False, queue_name=None, jobset=js, pods=pods)
    assert out.reason == st.CONFIG_ERROR
    assert out.message.startswith("a rollout worker refused its configuration (exit code 78)")


def test_rollout_status_is_the_trainers_and_kept() -> None:
    """The operator's status never carries status.rollout: a merge patch leaves the trainer's
    numbers as they are (the same as status.progress)."""
    prev = {
        "phase": "Running",
        "rollout": {"policyVersion": 7, "stalenessMean": 0.5, "workers": 2},
        "progress": {"step": 7, "totalSteps": 10},
    }
    js = async_jobset()
    outcome = st.phase_of(
        suspend=False, queue_name=None, jobset=js, pods=[trainer(), worker(), worker()]
    )
    new = status_for(prev, outcome, jobset=js, summary={"model": "m"}, total_steps=10)
    assert "rollout" not in new and "progress" not in new
    assert new["restarts"] == 0
    # a worker's pod replaced: the JobSet's restarts did not move, nor does the job's
    again = status_for(new, outcome, jobset=js, now=LATER)
    assert again["restarts"] == 0
    assert not [e for e in st.transitions(new, again, outcome) if e.reason == "Restarted"]
