"""The HTTP reward client against a real local server (127.0.0.1, a free port) that counts calls."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from posttrain.trainer import rewards
from posttrain.trainer.rewards_http import HttpReward, RewardServiceError

Reply = tuple[int, str] | Callable[[dict], tuple[int, str]]


class Service:
    """Replies from a script: one entry per call, the last one repeated."""

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.bodies: list[dict] = []
        self.delay_s = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    @property
    def calls(self) -> int:
        return len(self.bodies)

    def reply(self, body: dict) -> tuple[int, str]:
        with self.lock:
            index = len(self.bodies)
            self.bodies.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            entry = self.script[min(index, len(self.script) - 1)]
            return entry(body) if callable(entry) else entry
        finally:
            with self.lock:
                self.in_flight -= 1


def lengths(body: dict) -> tuple[int, str]:
    """A well-behaved service: reward = completion length."""
    return 200, json.dumps({"rewards": [len(c) for c in body["completions"]]})


@pytest.fixture
def service() -> Iterator[tuple[Service, str]]:
    state = Service()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            code, text = state.reply(body)
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(text.encode())
            except OSError:  # the client gave up (timeout test)
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()
    server.server_close()


def test_good_replies_in_order_across_concurrent_chunks(service):
    state, url = service
    state.script = [lengths]
    state.delay_s = 0.2
    completions = [f"answer {'x' * i}" for i in range(10)]
    reward = HttpReward(url, name="judge", chunk_size=3, concurrency=2)
    out = reward(["p"] * 10, completions, answer=np.arange(10), topic=["t"] * 10)
    assert out == [float(len(c)) for c in completions]
    assert state.calls == 4  # chunks of 3, 3, 3, 1
    assert state.max_in_flight == 2  # bounded by concurrency
    first = next(b for b in state.bodies if b["completions"][0] == completions[0])
    assert first == {
        "prompts": ["p"] * 3,
        "completions": completions[:3],
        "columns": {"answer": [0, 1, 2], "topic": ["t"] * 3},
    }


def test_works_as_a_reward_in_the_weighted_sum(service):
    state, url = service
    state.script = [lengths]
    spec = rewards.Reward(name="judge", weight=0.5, fn=HttpReward(url), where="rewards[0] (judge)")
    total, each = rewards.score([spec], ["p", "q"], ["ab", "abcd"], {})
    np.testing.assert_allclose(each["judge"], [2.0, 4.0])
    np.testing.assert_allclose(total, [1.0, 2.0])


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ((200, "not json"), "reply is not JSON"),
        ((200, json.dumps({"scores": [1.0, 2.0]})), 'reply has no "rewards" list'),
        ((200, json.dumps({"rewards": [1.0]})), '"rewards" has 1 values for 2 completions'),
        (
            (200, json.dumps({"rewards": [1.0, "high"]})),
            r"\"rewards\"\[1\] is 'high', not a number",
        ),
        ((200, json.dumps({"rewards": [1.0, None]})), r"\"rewards\"\[1\] is None"),
        ((200, '{"rewards": [1.0, NaN]}'), r"\"rewards\"\[1\] is nan; rewards must be finite"),
        ((400, "missing field prompts"), "HTTP 400: missing field prompts"),
    ],
)
def test_malformed_replies_raise_naming_the_reward_and_are_not_retried(service, reply, message):
    state, url = service
    state.script = [reply]
    reward = HttpReward(url, name="judge", backoff_s=0.01)
    with pytest.raises(RewardServiceError, match=message) as err:
        reward(["p", "q"], ["a", "b"])
    assert f"reward service judge ({url}): completions 0-1" in str(err.value)
    assert state.calls == 1


def test_server_errors_are_retried_then_succeed(service):
    state, url = service
    state.script = [(500, "overloaded"), (503, ""), (429, "slow down"), lengths]
    reward = HttpReward(url, retries=3, backoff_s=0.05)
    start = time.perf_counter()
    assert reward(["p"], ["abc"]) == [3.0]
    assert state.calls == 4
    assert time.perf_counter() - start >= 0.05 + 0.1 + 0.2  # exponential backoff


def test_persistent_server_errors_raise_after_the_retries(service):
    state, url = service
    state.script = [(500, "overloaded")]
    reward = HttpReward(url, name="judge", retries=2, backoff_s=0.01)
    with pytest.raises(RewardServiceError, match="failed after 3 attempts: HTTP 500: overloaded"):
        reward(["p"], ["abc"])
    assert state.calls == 3


def test_timeouts_are_retried_and_then_reported(service):
    state, url = service
    state.script = [lengths]
    state.delay_s = 1.0
    reward = HttpReward(url, timeout_s=0.2, retries=1, backoff_s=0.01)
    start = time.perf_counter()
    with pytest.raises(RewardServiceError, match="failed after 2 attempts: .*timed out"):
        reward(["p"], ["abc"])
    assert time.perf_counter() - start < 1.5
    assert state.calls == 2


def test_default_replaces_only_the_failed_chunk(service):
    state, url = service
    state.script = [lambda b: (500, "x") if "bad" in b["completions"] else lengths(b)]
    reward = HttpReward(url, chunk_size=2, concurrency=1, retries=0, default=-1.0)
    assert reward(["p"] * 4, ["ok", "bad", "four", "x"]) == [-1.0, -1.0, 4.0, 1.0]


def test_unreachable_service_is_an_error_not_zeros():
    # A port nothing listens on: bind, read the port, close.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reward = HttpReward(f"http://127.0.0.1:{port}/", retries=1, backoff_s=0.01)
    with pytest.raises(RewardServiceError, match="failed after 2 attempts: ConnectionRefusedError"):
        reward(["p"], ["a"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="must be http"):
        HttpReward("ftp://127.0.0.1/")
    with pytest.raises(ValueError, match="chunk_size"):
        HttpReward("http://127.0.0.1/", chunk_size=0)
