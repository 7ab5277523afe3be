"""posttrain.progress against a local HTTP server standing in for the API server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from posttrain.progress import ProgressReporter, status_path


class FakeApi:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail = False
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                code = 500 if api.fail else 200
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def api():
    fake = FakeApi()
    yield fake
    fake.server.shutdown()


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def reporter(api: FakeApi, clock: Clock, **env: str) -> ProgressReporter:
    return ProgressReporter(
        "job", "ml", api_server=api.url, token="tok", min_interval=10, env=env, clock=clock
    )


def test_patches_status_with_token_and_rate_limits(api: FakeApi) -> None:
    clock = Clock()
    rep = reporter(api, clock)
    assert rep.enabled
    assert rep.report(1, 100, {"loss": 2.5, "reward_mean": 0.1})
    clock.t = 5
    assert not rep.report(2, 100, {"loss": 2.4})  # held back
    clock.t = 10
    assert rep.report(3, 100, {"loss": 2.3})
    assert rep.report(100, 100, {"loss": 1.0})  # the last step is always sent
    assert not rep.flush()  # nothing held back
    assert len(api.requests) == 3
    first = api.requests[0]
    assert first["path"] == status_path("ml", "job")
    assert first["path"] == "/apis/posttrain.dev/v1alpha1/namespaces/ml/posttrainjobs/job/status"
    assert first["headers"]["Authorization"] == "Bearer tok"
    assert first["headers"]["Content-Type"] == "application/merge-patch+json"
    status = first["body"]["status"]
    assert status["progress"]["step"] == 1 and status["progress"]["totalSteps"] == 100
    assert status["progress"]["metrics"] == {"loss": 2.5, "reward_mean": 0.1}
    assert status["progress"]["updatedAt"].endswith("Z")
    assert status["summary"] == {"progress": "1%"}  # no pace yet: no ETA
    # a metric that disappeared is removed (merge-patch null)
    assert api.requests[1]["body"]["status"]["progress"]["metrics"] == {
        "loss": 2.3,
        "reward_mean": None,
    }


def test_flush_sends_the_latest_held_back(api: FakeApi) -> None:
    clock = Clock()
    rep = reporter(api, clock)
    rep.report(1, 10)
    rep.report(2, 10)
    rep.report(3, 10)
    assert rep.flush()
    assert [r["body"]["status"]["progress"]["step"] for r in api.requests] == [1, 3]


def test_failures_are_logged_not_raised(api: FakeApi, caplog: pytest.LogCaptureFixture) -> None:
    api.fail = True
    rep = reporter(api, Clock())
    assert not rep.report(1, 10, {"loss": float("nan"), "ok": 1})
    assert "progress report" in caplog.text and "HTTP 500" in caplog.text
    assert api.requests[0]["body"]["status"]["progress"]["metrics"] == {"ok": 1.0}  # NaN dropped
    down = ProgressReporter("job", "ml", api_server="http://127.0.0.1:9", token="t", env={})
    assert not down.report(1, 10)


def test_no_op_outside_a_cluster_and_off_rank0(api: FakeApi) -> None:
    assert not ProgressReporter(env={}).enabled  # no job, no API server, no token
    assert not ProgressReporter(env={}).report(1, 2)
    env = {
        "POSTTRAIN_JOB_NAME": "job",
        "POSTTRAIN_NAMESPACE": "ml",
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
    }
    rep = ProgressReporter(token="t", env=env)
    assert rep.enabled and rep.api_server == "https://10.0.0.1:443" and rep.name == "job"
    rank3 = {**env, "POSTTRAIN_HOSTS_PER_SLICE": "4", "POSTTRAIN_HOST_ID": "3"}
    assert not ProgressReporter(token="t", env=rank3).enabled
    assert not reporter(api, Clock(), POSTTRAIN_HOSTS_PER_SLICE="2", POSTTRAIN_HOST_ID="1").report(
        1, 1
    )
    assert api.requests == []


def test_eta_and_last_checkpoint_step(api: FakeApi) -> None:
    clock = Clock()
    rep = reporter(api, clock)
    rep.report(10, 110)  # the first report: the pace starts here (compilation not counted)
    clock.t = 20
    rep.report(20, 110)  # 10 steps in 20 s: 90 steps left = 180 s
    body = api.requests[-1]["body"]["status"]
    assert body["progress"]["etaSeconds"] == 180
    assert body["summary"] == {"progress": "18%", "eta": "3m"}
    assert "lastCheckpointStep" not in body["progress"]
    rep.checkpointed(20)  # nothing held back: the last report again, with the checkpoint
    assert rep.flush()
    body = api.requests[-1]["body"]["status"]
    assert body["progress"]["lastCheckpointStep"] == 20 and body["progress"]["step"] == 20
    clock.t = 25
    rep.report(21, 110)  # held back (rate limit), carries the checkpoint step too
    rep.checkpointed(21)
    assert rep.flush()
    assert api.requests[-1]["body"]["status"]["progress"]["lastCheckpointStep"] == 21
    clock.t = 200
    rep.report(110, 110)
    last = api.requests[-1]["body"]["status"]
    assert last["summary"] == {"progress": "100%", "eta": "0s"}
    assert last["progress"]["etaSeconds"] == 0


def test_display_eta() -> None:
    from posttrain.api.v1alpha1 import display_eta, display_progress

    assert [
        display_eta(s) for s in (0, 59, 60, 3599, 3600, 3 * 3600 + 5 * 60, 2 * 86400 + 7200)
    ] == [
        "0s",
        "59s",
        "1m",
        "59m",
        "1h00m",
        "3h05m",
        "2d02h",
    ]
    assert [display_progress(s, 1000) for s in (0, 1, 999, 1000)] == ["0%", "0%", "99%", "100%"]


def test_rollout_status_of_an_async_job(api: FakeApi) -> None:
    """report(rollout=...) writes status.rollout in the same merge patch, camelCase, None and
    values the schema would refuse left out; without it status.rollout is not touched."""
    clock = Clock()
    rep = reporter(api, clock)
    rollout = {
        "policy_version": 12,
        "staleness_mean": 0.75,
        "weight_sync_seconds": 1.25,
        "tokens_per_second": 5321.5,
        "workers": 2,
    }
    assert rep.report(12, 100, {"loss": 1.0}, rollout=rollout)
    status = api.requests[-1]["body"]["status"]
    assert status["rollout"] == {
        "policyVersion": 12,
        "stalenessMean": 0.75,
        "weightSyncSeconds": 1.25,
        "tokensPerSecond": 5321.5,
        "workers": 2,
    }
    assert status["progress"]["step"] == 12  # one request for both
    assert len(api.requests) == 1
    clock.t = 10
    partial = {"policy_version": 13.0, "weight_sync_seconds": None, "tokens_per_second": "nan",
               "workers": -1, "bogus": 3}  # fmt: skip
    assert rep.report(13, 100, rollout=partial)
    assert api.requests[-1]["body"]["status"]["rollout"] == {"policyVersion": 13}
    clock.t = 20
    assert rep.report(14, 100)
    assert "rollout" not in api.requests[-1]["body"]["status"]
    clock.t = 25
    rep.report(15, 100, rollout={"policy_version": 15})  # held back: flushed with its rollout
    assert rep.flush()
    assert api.requests[-1]["body"]["status"]["rollout"] == {"policyVersion": 15}
