"""A rollout worker (``POSTTRAIN_ROLE=rollout``): sample, score and send rollout batches with the
newest policy it holds, for as long as the trainer hands out work.

    loop:  assign (which rollout index, the oldest version that may sample it)
           -> newest weights (waiting while the held ones are too old) -> sample + score
           -> POST the trajectories, tagged with the version that sampled them

It builds the run exactly as the trainer does (``setup.build_run``, the algorithm's ``build``),
so prompts, seeds, the sampler and the rewards are the trainer's own code; only the weights come
over the network. A failed or cut transfer is retried and never applied in part: the new leaves
are placed first and swapped in with one assignment.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import jax

from posttrain import runtime
from posttrain.trainer.async_rl import wire
from posttrain.trainer.async_rl.service import LONG_POLL_SECONDS

RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0)  # backoff while the trainer is unreachable (then 2 s on)


class WeightSyncError(RuntimeError):
    """A weight transfer that arrived short or corrupted; the held weights stay."""


class TrainerClient:
    """HTTP calls to the trainer's rollout service, retried while it is unreachable (starting,
    restarting after preemption): a worker waits for its trainer rather than fail."""

    def __init__(self, address: str, say: Callable[[str], None]):
        self.base = f"http://{address}"
        self.say = say
        self._unreachable_since: float | None = None

    def _call(self, make: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                out = make()
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
                if self._unreachable_since is None:
                    self._unreachable_since = time.monotonic()
                    self.say(f"trainer at {self.base} unreachable ({_reason(err)}); waiting for it")
                time.sleep(RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)])
                attempt += 1
                continue
            if self._unreachable_since is not None:
                gone = time.monotonic() - self._unreachable_since
                self.say(f"trainer reachable again after {gone:.0f}s")
                self._unreachable_since = None
            return out

    def assign(self, worker: int) -> dict[str, Any]:
        def get() -> dict[str, Any]:
            with urllib.request.urlopen(f"{self.base}/v1/assign?worker={worker}", timeout=30) as r:
                return json.loads(r.read())

        return self._call(get)

    def weights(self, after: int, wait: float) -> tuple[dict[str, Any], bytes | None]:
        """(what the headers say, the verified blob) when a version newer than ``after`` exists
        (waiting up to ``wait`` s for one), else (the service's JSON answer, None). The headers'
        ``seconds`` is the transfer's own time, from the response's first byte (not the wait)."""

        def get() -> tuple[dict[str, Any], bytes | None]:
            url = f"{self.base}/v1/weights?after={after}&wait={wait}"
            with urllib.request.urlopen(url, timeout=wait + 60) as r:
                if r.headers.get("Content-Type") == "application/json":
                    return json.loads(r.read()), None
                started = time.perf_counter()
                expected = int(r.headers["Content-Length"])
                try:
                    blob = r.read()
                except Exception as err:  # http.client.IncompleteRead: the connection was cut
                    raise WeightSyncError(f"transfer cut: {err}") from None
                if len(blob) != expected:
                    raise WeightSyncError(f"transfer cut at {len(blob)} of {expected} bytes")
                if wire.digest(blob) != r.headers["X-Posttrain-Sha256"]:
                    raise WeightSyncError("SHA-256 mismatch: the bytes arrived corrupted")
                meta = {
                    "run": r.headers["X-Posttrain-Run"],
                    "version": int(r.headers["X-Posttrain-Version"]),
                    "seconds": time.perf_counter() - started,
                }
                return meta, blob

        return self._call(get)

    def send(self, t: wire.Trajectories) -> tuple[bool, str]:
        body = wire.encode_trajectories(t)

        def post() -> tuple[bool, str]:
            req = urllib.request.Request(
                f"{self.base}/v1/trajectories",
                data=body,
                headers={"Content-Type": "application/octet-stream"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    answer = json.loads(r.read())
            except urllib.error.HTTPError as err:
                if err.code != 409:
                    raise
                answer = json.loads(err.read())
            return bool(answer["accepted"]), str(answer["reason"])

        return self._call(post)


def _reason(err: BaseException) -> str:
    return str(getattr(err, "reason", None) or err)


class HeldWeights:
    """The policy a worker samples with: swapped whole, one version at a time."""

    def __init__(self, state: Any):
        self.state = state  # setup.TrainState: the engine's model reads state.params
        self.version, self.run = -1, ""
        self.names = list(_paths(state.params))
        self.syncs = 0
        self.failures = 0
        self.last_seconds: float | None = None
        self.last_bytes = 0

    def apply(self, blob: bytes, version: int, run: str) -> None:
        named = wire.decode_weights(blob, self.names)
        flat, treedef = jax.tree_util.tree_flatten_with_path(self.state.params)
        placed = [
            jax.device_put(named[jax.tree_util.keystr(path)].astype(leaf.dtype), leaf.sharding)
            for path, leaf in flat
        ]
        jax.block_until_ready(placed)
        self.state.params = jax.tree_util.tree_unflatten(treedef, placed)  # the swap
        self.version, self.run = version, run


def _paths(tree: Any) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(path) for path, _ in flat]


def sync(client: TrainerClient, held: HeldWeights, run: str, need: int, say: Callable) -> bool:
    """Bring ``held`` to the newest version of trainer run ``run``, waiting while it is older
    than ``need``. False when the trainer says the run is done (or it restarted: ask again)."""
    while True:
        after = held.version if held.run == run else -1
        wait = LONG_POLL_SECONDS if after < need else 0.0
        try:
            meta, blob = client.weights(after, wait)
        except WeightSyncError as err:
            held.failures += 1
            say(f"weight sync failed ({err}); keeping version {held.version}, retrying")
            time.sleep(RETRY_SECONDS[min(held.failures, len(RETRY_SECONDS)) - 1])
            continue
        if blob is None:
            if meta.get("done") or meta.get("run") != run:
                return False
        else:
            if meta["run"] != run:
                return False  # the trainer restarted since the assignment: ask again
            started = time.perf_counter()
            held.apply(blob, meta["version"], meta["run"])
            held.syncs += 1
            held.last_seconds = meta["seconds"] + time.perf_counter() - started
            held.last_bytes = len(blob)
        if held.run == run and held.version >= need:
            return True


def worker_run(job: Any) -> Any:
    """The run a worker samples with: the trainer's ``build_run`` on ``rollout_job`` (the weights
    in the compute dtype: nothing trains here), without the reference or teacher (the trainer
    computes every log-prob pass) and without optimizer state."""
    from posttrain.trainer.setup import build_run, rollout_job

    run = build_run(rollout_job(job), frozen_models=False)
    run.opt_state = None
    return run


def serve(job: Any, output_dir: str, *, say: Callable[[str], None] = print) -> int:
    """The worker's life: build the run, then sample for the trainer until it is done."""
    from posttrain.trainer.loop import make_context
    from posttrain.trainer.setup import TrainState

    worker = int(os.environ.get(runtime.ROLLOUT_WORKER, "0"))
    address = os.environ.get(runtime.TRAINER_ADDRESS) or f"127.0.0.1:{runtime.ROLLOUT_PORT}"
    log = lambda msg: say(f"rollout worker {worker}: {msg}")  # noqa: E731
    run = worker_run(job)
    state = TrainState(run.params, None)
    ctx = make_context(job, run, state, output_dir, log)
    algo = run.module.build(ctx)
    source, engine = algo.source, algo.source.engine
    client, held = TrainerClient(address, log), HeldWeights(state)
    log(f"sampling for the trainer at {address}")
    while True:
        a = client.assign(worker)
        if a["done"]:
            log(f"the trainer is done; {held.syncs} weight syncs, {held.failures} failed")
            return 0
        if not sync(client, held, a["run"], a["min_version"], log):
            continue
        rows, seed = source.rollout_request(a["index"])
        out = engine.rollout(ctx.model(), rows, seed)
        stats = {"weight_sync_failures": float(held.failures)}
        if held.last_seconds is not None:
            stats["weight_sync_seconds"] = held.last_seconds
            stats["weight_sync_bytes"] = float(held.last_bytes)
        ok, why = client.send(
            wire.Trajectories(
                index=a["index"],
                version=held.version,
                run=held.run,
                worker=worker,
                arrays=out.arrays,
                rewards=out.rewards,
                reward_terms=out.reward_terms,
                lengths=out.lengths,
                seconds=out.seconds,
                texts=out.texts,
                stats=stats,
            )
        )
        if not ok:
            log(f"rollout batch {a['index']} refused: {why}")
