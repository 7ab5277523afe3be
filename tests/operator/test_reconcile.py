"""reconcile.py without a cluster: its pure parts, the work queue, what each event queues, and
the reconcile against a fake API that records its calls (the real API server: test_cluster.py)."""

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
    assert job_of_child_job("qwen-grpo-rollout-3") == "qwen-grpo"  # async RL's workers
    assert job_of_child_job("web-7f9c") is None


def test_both_runs_the_two_at_once_and_raises_an_error_of_either() -> None:
    import threading

    import pytest
    from kubernetes import client

    from posttrain.operator.reconcile import Operator

    op = Operator(client.ApiClient())
    barrier = threading.Barrier(2, timeout=5)  # each waits for the other: at once, or a timeout
    assert op._both(lambda: barrier.wait() * 0 + 7, barrier.wait) == 7

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


# ---- the work queue ------------------------------------------------------------------------------


def test_work_queue_dedups_and_never_hands_out_a_key_twice_at_once() -> None:
    from posttrain.operator.reconcile import WorkQueue

    q = WorkQueue()
    q.add("a"), q.add("b"), q.add("a")  # a burst of events for "a": queued once
    assert q.get(0) == "a" and q.get(0) == "b" and q.get(0) is None
    q.add("a")  # while "a" is handled: not handed out again ...
    q.add("a")
    assert q.get(0) is None
    q.done("a")  # ... but once more after it is done (it reads the state after the event)
    assert q.get(0) == "a" and q.get(0) is None
    q.done("a"), q.done("b")
    assert q.get(0) is None


def test_work_queue_add_after_waits() -> None:
    import time

    from posttrain.operator.reconcile import WorkQueue

    q = WorkQueue()
    q.add_after("a", 0.2)
    assert q.get(0.05) is None
    start = time.monotonic()
    assert q.get(2) == "a" and time.monotonic() - start < 1
    assert q.failed("a") == 1 and q.failed("a") == 2
    q.succeeded("a")
    assert q.failed("a") == 1


# ---- the reconcile against a fake API ------------------------------------------------------------


class FakeApi:
    """The calls reconcile.py makes, on dicts; `calls` records (verb, kind) of each."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.applies: list[dict] = []  # the options of each apply
        self.objects: dict[tuple[str, str], dict] = {}
        self.version = 100

    def _bump(self, obj: dict) -> dict:
        self.version += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.version)
        return obj

    # CustomObjectsApi
    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        import copy

        from kubernetes.client.exceptions import ApiException

        self.calls.append(("get", plural))
        if (plural, name) not in self.objects:
            raise ApiException(status=404)
        return copy.deepcopy(self.objects[(plural, name)])

    def patch_namespaced_custom_object(self, group, version, ns, plural, name, body, **options):
        """Only server-side applies; the fake keeps the applied object (plus uid and status)."""
        import copy
        import json
        import types

        self.calls.append(("apply", plural))
        self.applies.append(options)
        old = self.objects.get((plural, name)) or {}
        self.applied = copy.deepcopy(body)
        obj = self._bump(copy.deepcopy(body))
        obj["metadata"]["uid"] = (old.get("metadata") or {}).get("uid") or f"uid-{plural}"
        if "status" in old:
            obj["status"] = old["status"]
        self.objects[(plural, name)] = obj
        return types.SimpleNamespace(data=json.dumps(obj).encode())

    def patch_namespaced_custom_object_status(self, group, version, ns, plural, name, patch):
        import copy

        from kubernetes.client.exceptions import ApiException

        self.calls.append(("patch-status", plural))
        obj = self.objects[(plural, name)]
        if patch["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise ApiException(status=409)
        status = obj.setdefault("status", {})
        for k, v in patch["status"].items():  # a merge patch, two levels deep as used here
            status[k] = {**(status.get(k) or {}), **v} if isinstance(v, dict) else v
        return copy.deepcopy(self._bump(obj))

    def list_namespaced_custom_object(self, *a, **k):
        self.calls.append(("list", a[3]))
        return {"items": []}

    # CoreV1Api
    def read_namespaced_config_map(self, name, ns, _preload_content):
        import json
        import types

        from kubernetes.client.exceptions import ApiException

        self.calls.append(("get", "configmaps"))
        if ("configmaps", name) not in self.objects:
            raise ApiException(status=404)
        return types.SimpleNamespace(data=json.dumps(self.objects[("configmaps", name)]).encode())

    def patch_namespaced_config_map(self, name, ns, body, **options):
        import json
        import types

        self.calls.append(("apply", "configmaps"))
        self.applies.append(options)
        self.objects[("configmaps", name)] = self._bump(json.loads(json.dumps(body)))
        return types.SimpleNamespace(data=json.dumps(self.objects[("configmaps", name)]).encode())

    def list_namespaced_pod(self, ns, label_selector, _preload_content):
        import types

        self.calls.append(("list", "pods"))
        return types.SimpleNamespace(data=b'{"items": []}')


def fake_operator():
    import copy

    from kubernetes import client

    from posttrain.operator.reconcile import Operator

    api = FakeApi()
    op = Operator(client.ApiClient(), now=lambda: "2026-01-01T00:00:00Z")
    op.custom = op.core = api  # type: ignore[assignment]
    job = copy.deepcopy(BASE)
    job["metadata"].update(generation=1, resourceVersion="100")
    api.objects[("posttrainjobs", "t")] = copy.deepcopy(job)
    return op, api, job


def test_a_new_job_pending_and_recipe_then_its_jobset_then_nothing_more() -> None:
    op, api, job = fake_operator()
    op.observe_job(job, "ADDED")
    assert op.queue.get(0) == ("ml", "t")
    op.process(("ml", "t"))
    op.queue.done(("ml", "t"))
    # the job came from the watch: not read; its JobSet read (an apply must not adopt an
    # earlier job's), Pending beside the recipe (read, applied), then the JobSet, then status
    assert api.calls[0] == ("get", "jobsets")
    assert api.calls[-2:] == [("apply", "jobsets"), ("patch-status", "posttrainjobs")]
    assert sorted(api.calls[1:4]) == [
        ("apply", "configmaps"),
        ("get", "configmaps"),
        ("patch-status", "posttrainjobs"),
    ]
    assert api.calls.index(("get", "configmaps")) < api.calls.index(("apply", "configmaps"))
    assert len(api.calls) == 6
    assert api.applies == 2 * [
        {"field_manager": "posttrain-operator", "force": True,
         "_content_type": "application/apply-patch+yaml", "_preload_content": False}
    ]  # fmt: skip
    status = api.objects[("posttrainjobs", "t")]["status"]
    assert status["phase"] == "Pending" and status["jobSetName"] == "t"

    # The ADDED event of the JobSet just made (the version its create returned): nothing new.
    jobset = api.objects[("jobsets", "t")]
    op.observe_jobset(("ml", "t"), jobset, "ADDED")
    assert op.queue.get(0) is None
    # The watch's echo of the operator's own status writes: cached, no reconcile.
    op.observe_job(api.objects[("posttrainjobs", "t")], "MODIFIED")
    assert op.queue.get(0) is None
    # A JobSet change: one reconcile, which reads neither the job nor the JobSet (both cached)
    # and parses nothing (the spec is cached by uid and generation).
    api.calls.clear()
    changed = {**jobset, "metadata": {**jobset["metadata"], "resourceVersion": "999"}}
    op.observe_jobset(("ml", "t"), changed, "MODIFIED")
    assert op.queue.get(0) == ("ml", "t")
    parsed = op._parsed[job["metadata"]["uid"]]
    op.process(("ml", "t"))
    assert api.calls == [("list", "pods")]  # Pending/CreatingPods still: no write
    assert op._parsed[job["metadata"]["uid"]] is parsed


def test_a_status_from_a_stale_job_is_refused_and_the_job_read_again() -> None:
    op, api, job = fake_operator()
    op.observe_job(job, None)  # the initial listing
    api.objects[("posttrainjobs", "t")]["metadata"]["resourceVersion"] = "150"  # changed since
    key = op.queue.get(0)
    op.process(key)  # Pending refused (409): no JobSet made
    op.queue.done(key)
    assert ("apply", "jobsets") not in api.calls
    assert op.queue.get(0) == ("ml", "t")  # again at once, reading the job this time
    api.calls.clear()
    op.process(("ml", "t"))
    assert api.calls[0] == ("get", "posttrainjobs") and ("apply", "jobsets") in api.calls
    assert not op._listed  # logged as reconciled


def test_what_a_job_event_queues() -> None:
    op, api, job = fake_operator()
    op.observe_job(job, "ADDED")
    assert op.queue.get(0) == ("ml", "t")
    op.queue.done(("ml", "t"))
    status_only = {**job, "metadata": {**job["metadata"], "resourceVersion": "101"}, "status": {}}
    op.observe_job(status_only, "MODIFIED")
    assert op.queue.get(0) is None
    for change in ({"generation": 2}, {"labels": {"a": "b"}}, {"deletionTimestamp": "t"}):
        newer = {**job, "metadata": {**job["metadata"], **change, "resourceVersion": "102"}}
        op.observe_job(status_only, "MODIFIED")
        op.observe_job(newer, "MODIFIED")
        assert op.queue.get(0) == ("ml", "t"), change
        op.queue.done(("ml", "t"))
    op.observe_job(job, "DELETED")
    assert ("ml", "t") not in op._jobs and not op._parsed


def test_pod_events_queue_a_job_only_while_it_starts() -> None:
    op, api, job = fake_operator()
    for phase, queued in (("Pending", True), ("Provisioning", True), ("Running", False)):
        op._jobs[("ml", "t")] = {**job, "status": {"phase": phase}}
        op.observe_pod(("ml", "t"), "MODIFIED")
        assert (op.queue.get(0) is not None) == queued, phase
        op.queue.done(("ml", "t"))


def test_pod_events_of_a_running_async_job_queue_it() -> None:
    """Its rollout workers' pods come and go while it runs (the Running message counts them)."""
    op, api, job = fake_operator()
    spec = {**job["spec"], "rollout": {"mode": "async"}}
    for phase, queued in (("Running", True), ("Succeeded", False), ("Queued", False)):
        op._jobs[("ml", "t")] = {**job, "spec": spec, "status": {"phase": phase}}
        op.observe_pod(("ml", "t"), "MODIFIED")
        assert (op.queue.get(0) is not None) == queued, phase
        op.queue.done(("ml", "t"))


def test_the_parsed_spec_is_cached_by_uid_generation_labels_and_annotations() -> None:
    op, api, job = fake_operator()
    first = op._parse(job)
    assert op._parse({**job, "status": {"phase": "Running"}}) is first
    relabelled = {**job, "metadata": {**job["metadata"], "labels": {"x": "y"}}}
    assert op._parse(relabelled) is not first


def test_a_failed_create_event_is_cached_with_its_fix_until_the_job_has_pods() -> None:
    op, api, job = fake_operator()
    event = {"metadata": {"uid": "e1"}, "message": 'serviceaccount "sa" not found '}
    op.observe_failed_create(("ml", "t"), event, "ADDED")
    assert op.queue.get(0) == ("ml", "t")
    message = op._create_failure(("ml", "t"))
    assert message and message.startswith('serviceaccount "sa" not found. Fix: ')
    assert "create the ServiceAccount sa in namespace ml" in message
    op.observe_failed_create(("ml", "t"), event, "DELETED")  # Events expire
    assert op._create_failure(("ml", "t")) is None and not op._failed_create


# ---- server-side apply: what the operator applied, read back from managedFields ------------------


def test_applied_config_is_what_the_manager_applied_with_the_values_now() -> None:
    from posttrain.operator.reconcile import FIELD_MANAGER, applied_config

    obj = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": "j",
            "namespace": "ml",
            "uid": "u",
            "resourceVersion": "5",
            "labels": {"posttrain.dev/job": "j", "kueue": "x"},
            "annotations": {"kubectl-added": "yes"},
            "ownerReferences": [{"uid": "o", "kind": "PostTrainJob", "controller": True}],
            "managedFields": [
                {
                    "manager": FIELD_MANAGER,
                    "operation": "Apply",
                    "fieldsV1": {
                        "f:metadata": {
                            "f:labels": {"f:posttrain.dev/job": {}},
                            "f:ownerReferences": {'k:{"uid":"o"}': {}},
                        },
                        "f:spec": {
                            "f:suspend": {},
                            "f:replicatedJobs": {
                                'k:{"name":"node"}': {".": {}, "f:replicas": {}},
                            },
                            "f:args": {'v:"a"': {}},
                        },
                    },
                },
                {"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:metadata": {}}},
                {
                    "manager": FIELD_MANAGER,
                    "operation": "Apply",
                    "subresource": "status",
                    "fieldsV1": {"f:status": {}},
                },
            ],
        },
        "spec": {
            "suspend": True,
            "replicatedJobs": [
                {"name": "node", "replicas": 2, "template": {"x": 1}},
                {"name": "other", "replicas": 1},
            ],
            "args": ["a", "b"],
            "defaulted": "by a webhook",
        },
        "status": {"restarts": 0},
    }
    assert applied_config(obj) == {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": "j",
            "namespace": "ml",
            "labels": {"posttrain.dev/job": "j"},
            "ownerReferences": [{"uid": "o", "kind": "PostTrainJob", "controller": True}],
        },
        "spec": {
            "suspend": True,
            "replicatedJobs": [{"name": "node", "replicas": 2}],
            "args": ["a"],
        },
    }
    # never applied by the manager: nothing but what names the object
    assert applied_config(obj, "someone") == {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": "j", "namespace": "ml"},
    }
    # a copy: changing it leaves the object alone
    applied_config(obj)["metadata"]["ownerReferences"][0]["uid"] = "changed"
    assert obj["metadata"]["ownerReferences"][0]["uid"] == "o"


def test_suspend_applies_what_the_operator_applied_with_the_new_suspend() -> None:
    op, api, job = fake_operator()
    op.observe_job(job, "ADDED")
    op.process(op.queue.get(0))
    op.queue.done(("ml", "t"))
    jobset = api.objects[("jobsets", "t")]
    assert jobset["spec"].get("suspend") is not True
    # as the API server would record the operator's apply (every field it sent, roughly)
    jobset["metadata"]["managedFields"] = [
        {
            "manager": "posttrain-operator",
            "operation": "Apply",
            "fieldsV1": {
                "f:metadata": {"f:labels": {}, "f:ownerReferences": {}},
                "f:spec": {k: {} for k in (f"f:{k}" for k in jobset["spec"])},
            },
        }
    ]
    jobset["metadata"]["annotations"] = {"someone-else": "x"}
    op._jobsets[("ml", "t")] = jobset
    suspended = {**job, "metadata": {**job["metadata"], "generation": 2}}
    suspended["spec"] = {**job["spec"], "suspend": True}
    api.objects[("posttrainjobs", "t")]["spec"] = suspended["spec"]
    api.objects[("posttrainjobs", "t")]["metadata"]["generation"] = 2
    op._forget_job_body(("ml", "t"))
    api.calls.clear()
    op.process(("ml", "t"))
    assert ("apply", "jobsets") in api.calls
    applied = api.objects[("jobsets", "t")]
    assert applied["spec"]["suspend"] is True
    assert applied["spec"]["replicatedJobs"] == jobset["spec"]["replicatedJobs"]
    assert "annotations" not in applied["metadata"]  # another manager's: not in the apply
    assert api.applied["metadata"]["uid"] == jobset["metadata"]["uid"]  # onto this one only
