"""The trainer's side of async RL: an HTTP service on trainer process 0 that publishes the policy
after every optimizer step and queues the trajectories rollout workers send back.

    service = RolloutService.start(job, say=say, consumed=0)
    service.publish(version, params)          # after each optimizer step (and once at start)
    t = service.take(index, first_step)       # the batch source, blocking until batch `index`
    service.close(finished=True)              # workers see `done` and exit

HTTP/1.1 on the standard library's threading server: the bytes are one safetensors blob per
version (``wire.py``), immutable once published, so every GET of a version reads the same bytes
whatever the trainer does meanwhile; a worker checks length and SHA-256 before it swaps them in.
Each trainer incarnation has its own ``run`` id: versions restart with a resumed trainer, so a
worker drops weights and trajectories of another incarnation rather than compare their numbers.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import jax
import jax.numpy as jnp
import numpy as np

from posttrain import runtime
from posttrain.trainer.async_rl import schedule, wire

# The trainer says once per wait that it is waiting, after this many seconds without the batch.
WAIT_NOTICE_SECONDS = float(os.environ.get("POSTTRAIN_ROLLOUT_WAIT_NOTICE_S", "10"))
LONG_POLL_SECONDS = 20.0  # the longest a worker's request is held waiting for news


def for_job(job: Any, source: Any, say: Callable[[str], None]) -> RolloutService | None:
    """The service when ``job`` runs async RL (on trainer process 0, the only one for now), wired
    into the batch source so it takes rollout batches from the workers; else None."""
    if not job.spec.rollout_role.is_async:
        return None
    if jax.process_count() > 1:
        raise ValueError(
            f"spec.rollout.mode: async trains on one process for now, not {jax.process_count()} "
            "(posttrain run --processes); run it with one"
        )
    service = RolloutService.start(job, say=say, consumed=source.next_rollout)
    source.remote = service
    return service


def named_leaves(tree: Any, dtype: Any = None) -> dict[str, np.ndarray]:
    """A pytree's leaves as host arrays named by their paths (``wire.encode_weights``); floating
    ones cast to ``dtype`` when given (the workers' compute dtype: half the bytes of float32
    masters for a bfloat16 model, and what the worker would cast them to anyway)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for path, leaf in flat:
        if dtype is not None and jnp.issubdtype(leaf.dtype, jnp.floating):
            leaf = leaf.astype(dtype)
        out[jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
    return out


def listen_address(env: dict[str, str] | None = None) -> tuple[str, int]:
    """Where the service listens: the port of $POSTTRAIN_TRAINER_ADDRESS (default 8477), on
    loopback when that address is loopback (local runs), else on every interface (a pod)."""
    address = (env if env is not None else os.environ).get(runtime.TRAINER_ADDRESS, "")
    host, _, port = address.rpartition(":")
    loopback = host in ("127.0.0.1", "localhost", "::1")
    return ("127.0.0.1" if loopback else "0.0.0.0", int(port) if port else runtime.ROLLOUT_PORT)


@dataclass
class Stats:
    """What the trainer logs about its workers (``host_metrics``) and reports to status.rollout."""

    lags: list[int] = field(default_factory=list)  # per rollout batch trained on
    wait_seconds: float = 0.0  # the last take's wait
    weight_sync_seconds: float | None = None  # the last one a worker reported
    weight_sync_bytes: float | None = None
    weight_sync_failures: float = 0.0
    tokens_per_second: dict[int, float] = field(default_factory=dict)  # per worker, last batch
    publish_seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        out = {
            "policy_lag": float(self.lags[-1]) if self.lags else 0.0,
            "staleness_mean": float(np.mean(self.lags)) if self.lags else 0.0,
            "trainer_wait_seconds": self.wait_seconds,
            "rollout_tokens_per_second": float(sum(self.tokens_per_second.values())),
            "weight_publish_seconds": self.publish_seconds,
            "weight_sync_failures": self.weight_sync_failures,
        }
        if self.weight_sync_seconds is not None:
            out["weight_sync_seconds"] = self.weight_sync_seconds
            out["weight_sync_bytes"] = float(self.weight_sync_bytes or 0.0)
        return out


class RolloutService:
    def __init__(
        self,
        *,
        lag: int,
        workers: int,
        warmup: int,
        steps_per_rollout: int,
        consumed: int,
        say: Callable[[str], None],
        address: tuple[str, int],
        dtype: Any = None,
    ):
        self.lag, self.workers = lag, workers
        self.warmup, self.steps_per_rollout = warmup, steps_per_rollout
        self.say, self.dtype = say, dtype
        self.run_id = uuid.uuid4().hex[:12]
        self.stats = Stats()
        self._cond = threading.Condition()
        self._weights: tuple[int, bytes, str] | None = None  # version, blob, sha256
        self._queue: dict[int, wire.Trajectories] = {}
        self._consumed = consumed  # the rollout index the trainer takes next
        self._done = False
        self._seen: dict[int, float] = {}  # worker -> last request (monotonic)
        self._told_done: set[int] = set()
        self._server = ThreadingHTTPServer(address, _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, job: Any, *, say: Callable[[str], None], consumed: int) -> RolloutService:
        g, role = job.spec.settings, job.spec.rollout_role
        service = cls(
            lag=role.lag,
            workers=role.workers,
            warmup=g.sft_warmup_steps,
            steps_per_rollout=g.num_iterations * getattr(g, "num_mini_batches", 1),
            consumed=consumed,
            say=say,
            address=listen_address(),
            dtype=jnp.dtype(job.spec.model.dtype),
        )
        say(
            f"rollout service on port {service.port}: {role.workers} rollout worker(s), "
            f"maxPolicyLag {role.lag}, run {service.run_id}"
        )
        return service

    # ----------------------------------------------------------------------- the trainer's calls

    def publish(self, version: int, params: Any) -> None:
        """Make ``params`` version ``version``: every later weights request gets these bytes."""
        needed = schedule.min_version(self._consumed, self.warmup, self.steps_per_rollout, self.lag)
        if version < needed:  # no worker may sample with it (e.g. during the SFT warm-up)
            return
        started = time.perf_counter()
        blob = wire.encode_weights(named_leaves(params, self.dtype), version)
        with self._cond:
            self._weights = (version, blob, wire.digest(blob))
            self._cond.notify_all()
        self.stats.publish_seconds = time.perf_counter() - started

    def take(self, index: int, first_step: int) -> wire.Trajectories:
        """Rollout batch ``index``, waiting for it; one sampled beyond maxPolicyLag is dropped
        (its worker samples it again)."""
        started, said = time.monotonic(), False
        with self._cond:
            self._consumed = index
            self._cond.notify_all()
            while True:
                t = self._queue.pop(index, None)
                if t is not None:
                    if schedule.lag_ok(
                        index, t.version, self.warmup, self.steps_per_rollout, self.lag
                    ):
                        break
                    self.say(
                        f"dropped rollout batch {index}: sampled by version {t.version}, "
                        f"{first_step - t.version} behind step {first_step} (maxPolicyLag "
                        f"{self.lag}); sampling it again"
                    )
                    continue
                waited = time.monotonic() - started
                if not said and waited > WAIT_NOTICE_SECONDS:
                    said = True
                    self.say(self._waiting_line(index, waited))
                self._cond.wait(timeout=1.0)
            self._consumed = index + 1
            for stale in [i for i in self._queue if i <= index]:
                del self._queue[stale]
        waited = time.monotonic() - started
        if said:
            self.say(f"rollout batch {index} arrived after {waited:.1f}s")
        s = self.stats
        s.lags.append(first_step - t.version)
        s.wait_seconds = waited
        if t.seconds > 0:
            s.tokens_per_second[t.worker] = float(t.lengths.sum()) / t.seconds
        if "weight_sync_seconds" in t.stats:
            s.weight_sync_seconds = t.stats["weight_sync_seconds"]
            s.weight_sync_bytes = t.stats.get("weight_sync_bytes")
        s.weight_sync_failures = max(s.weight_sync_failures, t.stats.get("weight_sync_failures", 0))
        return t

    def _waiting_line(self, index: int, waited: float) -> str:
        worker = index % self.workers
        seen = self._seen.get(worker)
        heard = (
            "never heard from it"
            if seen is None
            else f"last heard {time.monotonic() - seen:.0f}s ago"
        )
        return (
            f"waiting {waited:.0f}s for rollout batch {index} from rollout worker {worker} "
            f"({heard}); training goes on when it arrives"
        )

    @property
    def done(self) -> bool:
        return self._done

    def status(self, version: int) -> dict[str, Any]:
        """``status.rollout`` for the progress reporter."""
        now = time.monotonic()
        m = self.stats.metrics()
        return {
            "policy_version": version,
            "staleness_mean": round(m["staleness_mean"], 3),
            "weight_sync_seconds": (
                None
                if self.stats.weight_sync_seconds is None
                else round(self.stats.weight_sync_seconds, 3)
            ),
            "tokens_per_second": round(m["rollout_tokens_per_second"], 1),
            "workers": sum(1 for t in self._seen.values() if now - t < 60),
        }

    def close(self, *, finished: bool, grace: float = 30.0) -> None:
        """Stop serving. ``finished``: the run is done, and the workers are told so first (up to
        ``grace`` s for every worker heard from in the last minute to ask), so that they exit 0
        rather than find the service gone. A stopped (preempted) trainer tells them nothing:
        they wait for it to come back."""
        if not finished:
            self._server.shutdown()
            self._server.server_close()
            return
        with self._cond:
            self._done = True
            self._cond.notify_all()
            self._cond.wait_for(
                lambda: all(
                    w in self._told_done or time.monotonic() - t > 60 for w, t in self._seen.items()
                ),
                timeout=grace,
            )
        self._server.shutdown()
        self._server.server_close()

    # ----------------------------------------------------------------------- the workers' calls

    def assignment(self, worker: int) -> dict[str, Any]:
        with self._cond:
            self._seen[worker] = time.monotonic()
            if self._done:
                self._told_done.add(worker)
                self._cond.notify_all()
            index = schedule.next_index(worker, self.workers, self._consumed, self._queue)
            return {
                "run": self.run_id,
                "done": self._done,
                "index": index,
                "min_version": schedule.min_version(
                    index, self.warmup, self.steps_per_rollout, self.lag
                ),
                "version": self._weights[0] if self._weights else None,
            }

    def weights_after(self, after: int, wait: float) -> tuple[int, bytes, str] | None:
        with self._cond:
            self._cond.wait_for(
                lambda: self._done or (self._weights is not None and self._weights[0] > after),
                timeout=min(wait, LONG_POLL_SECONDS),
            )
            w = self._weights
            return w if w is not None and w[0] > after and not self._done else None

    def offer(self, t: wire.Trajectories) -> tuple[bool, str]:
        with self._cond:
            self._seen[t.worker] = time.monotonic()
            if t.run != self.run_id:
                return False, f"sampled for trainer run {t.run}, this is run {self.run_id}"
            if t.index < self._consumed:
                return False, f"rollout batch {t.index} is trained on already"
            self._queue[t.index] = t
            self._cond.notify_all()
            return True, "queued"


def _handler(service: RolloutService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # the trainer's own log says what matters

        def _json(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/v1/assign":
                self._json(200, service.assignment(int(q.get("worker", 0))))
            elif url.path == "/v1/weights":
                got = service.weights_after(int(q.get("after", -1)), float(q.get("wait", 0)))
                if got is None:
                    self._json(200, {"run": service.run_id, "done": service.done, "version": None})
                    return
                version, blob, sha = got
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(blob)))
                self.send_header("X-Posttrain-Run", service.run_id)
                self.send_header("X-Posttrain-Version", str(version))
                self.send_header("X-Posttrain-Sha256", sha)
                self.end_headers()
                self.wfile.write(blob)
            else:
                self._json(404, {"error": f"no such path {url.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if urlparse(self.path).path != "/v1/trajectories":
                self._json(404, {"error": "no such path"})
                return
            blob = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                t = wire.decode_trajectories(blob)
            except Exception as err:  # noqa: BLE001 - a bad upload is the sender's problem
                self._json(400, {"error": f"unreadable trajectories: {err}"})
                return
            ok, why = service.offer(t)
            self._json(200 if ok else 409, {"accepted": ok, "reason": why})

    return Handler
