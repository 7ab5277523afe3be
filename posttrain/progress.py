"""The trainer's progress, reported to its own PostTrainJob's status (no JAX, no kopf, no client
library: plain HTTPS to the API server with the pod's service-account token).

    from posttrain.progress import ProgressReporter

    reporter = ProgressReporter()          # in a trainer pod: everything from the environment
    for step in range(1, total + 1):
        ...
        reporter.report(step, total, {"loss": loss, "reward_mean": r})
    reporter.flush()                       # send what rate limiting held back

What it writes, as a JSON merge-patch to the `status` subresource of
posttrain.dev/v1alpha1 PostTrainJob $POSTTRAIN_JOB_NAME in $POSTTRAIN_NAMESPACE:

    status.progress = {step, totalSteps, metrics: {name: float}, updatedAt,
                       lastCheckpointStep (once one is saved), etaSeconds (once it can be told)}
    status.summary.progress = "12%"             (the PROGRESS column of kubectl get)
    status.summary.eta = "1h05m"                (the ETA column of kubectl get -o wide)
    status.rollout = {policyVersion, stalenessMean, weightSyncSeconds, tokensPerSecond,
                      workers}                  (async RL: `report(..., rollout={...})`; the
                                                 POLICY, STALENESS, SYNC-S, ROLLOUT-TOK/S columns)

The ETA is the steps left at this process's pace since its first report (so the first step's
compilation, or a restart's, is not counted as pace).

The operator never writes either (except `summary.progress: 0/total` before the first report),
so the two never fight. The trainer's service account needs a Role with `get` and `patch` on
`posttrainjobs/status` in the job's namespace (docs/operator.md).

Design:
- rate-limited: at most one request per `min_interval` seconds; the last step (step == total)
  is always sent; `flush()` sends the latest held-back report;
- failures are logged, never raised: losing a progress update must not kill a training run;
- a no-op outside a cluster (no service-account token or API server), when the job's name or
  namespace is unknown, on every process but rank 0 (POSTTRAIN_SLICE_ID/HOST_ID from the
  env contract), and in an async job's rollout workers (POSTTRAIN_ROLE=rollout: the trainer
  reports for them), so the trainer can call it unconditionally.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import math
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from posttrain import runtime
from posttrain.api.v1alpha1 import (
    GROUP,
    MAX_LIST,
    PLURAL,
    VERSION,
    display_eta,
    display_progress,
)

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_MIN_INTERVAL = 10.0  # seconds between requests
TIMEOUT = 10.0  # seconds per request


def status_path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ProgressReporter:
    """Reports training progress to the PostTrainJob's status. See the module docstring.

    ProgressReporter(name=None, namespace=None, *, api_server=None, token=None, ca_file=None,
                     min_interval=10.0, env=os.environ)

    name, namespace: the PostTrainJob (default: $POSTTRAIN_JOB_NAME, $POSTTRAIN_NAMESPACE).
    api_server: https://host:port (default: $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT).
    token, ca_file: bearer token and CA bundle (default: the pod's service-account files).
    min_interval: least seconds between two requests.

    report(step, total, metrics=None, rollout=None) -> bool: True when a request went out and
        succeeded. `rollout` (async RL): {policy_version, staleness_mean, weight_sync_seconds,
        tokens_per_second, workers}, written to status.rollout (None values left out).
    flush() -> bool: send the latest report held back by rate limiting, if any.
    checkpointed(step): the trainer saved a checkpoint at `step`; sent with the next report.
    enabled: False when reporting is a no-op (not in a cluster, no job, not rank 0).
    """

    def __init__(
        self,
        name: str | None = None,
        namespace: str | None = None,
        *,
        api_server: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        env = os.environ if env is None else env
        self.name = name or env.get(runtime.JOB_NAME) or None
        self.namespace = (
            namespace or env.get(runtime.NAMESPACE) or _file(SERVICE_ACCOUNT_DIR / "namespace")
        )
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if api_server is None and host:
            api_server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        self.api_server = api_server.rstrip("/") if api_server else None
        self._token = token if token is not None else _file(SERVICE_ACCOUNT_DIR / "token")
        if ca_file is None and (SERVICE_ACCOUNT_DIR / "ca.crt").exists():
            ca_file = SERVICE_ACCOUNT_DIR / "ca.crt"
        self._ca_file = ca_file
        self.min_interval = min_interval
        self._clock = clock
        self._last_sent: float | None = None
        self._pending: dict[str, Any] | None = None
        self._first: tuple[int, float] | None = None  # (step, clock) of this process's first report
        self._checkpoint: int | None = None
        self._last_body: dict[str, Any] | None = None
        self._sent_metrics: set[str] = set()
        try:
            rank0 = runtime.ProcessTopology.from_env(env).process_id == 0
        except ValueError:
            rank0 = False
        if env.get(runtime.ROLE) == runtime.ROLE_ROLLOUT:
            rank0 = False  # a rollout worker is process 0 of nothing: the trainer reports
        missing = [
            what
            for what, value in (
                ("job name", self.name),
                ("namespace", self.namespace),
                ("API server", self.api_server),
                ("token", self._token),
            )
            if not value
        ]
        self.enabled = rank0 and not missing
        if missing:
            log.debug("progress reporting off: no %s (not in a cluster?)", ", ".join(missing))

    # -----------------------------------------------------------------------------------------

    def checkpointed(self, step: int) -> None:
        """A checkpoint of `step` was saved: `progress.lastCheckpointStep` in the next report."""
        self._checkpoint = max(0, int(step))
        if self._pending is None and self._last_body is not None:
            # nothing held back: the last report again, with the checkpoint (flush sends it)
            self._pending = copy.deepcopy(self._last_body)
        if self._pending is not None:
            self._pending["status"]["progress"]["lastCheckpointStep"] = self._checkpoint
            self._pending["status"]["progress"]["updatedAt"] = _now()

    def eta_seconds(self, step: int, total: int) -> float | None:
        """Seconds to `total` at the pace since this process's first report; None before two."""
        now = self._clock()
        if self._first is None:
            self._first = (step, now)
            return None
        first_step, first_time = self._first
        if step <= first_step:
            return None
        return max(0.0, (total - step) * (now - first_time) / (step - first_step))

    def report(
        self,
        step: int,
        total: int,
        metrics: Mapping[str, float] | None = None,
        rollout: Mapping[str, float | int | None] | None = None,
    ) -> bool:
        if not self.enabled:
            return False
        self._pending = self._body(step, total, metrics or {})
        if rollout:
            fields = _rollout_status(rollout)
            if fields:
                self._pending["status"]["rollout"] = fields
        now = self._clock()
        due = self._last_sent is None or now - self._last_sent >= self.min_interval
        if due or step >= total:
            return self.flush()
        return False

    def flush(self) -> bool:
        if not self.enabled or self._pending is None:
            return False
        body, self._pending = self._pending, None
        self._last_sent = self._clock()
        ok = self._patch(body)
        self._last_body = body
        if ok:
            self._sent_metrics = set(body["status"]["progress"]["metrics"])
        return ok

    # -----------------------------------------------------------------------------------------

    def _body(self, step: int, total: int, metrics: Mapping[str, float]) -> dict[str, Any]:
        clean: dict[str, float | None] = {}
        for key in sorted(metrics)[:MAX_LIST]:
            try:
                value = float(metrics[key])
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):  # JSON has no NaN or inf
                clean[str(key)] = value
        # Merge-patch merges maps: null out metrics sent before and absent now.
        for gone in self._sent_metrics - set(clean):
            clean[gone] = None
        step, total = max(0, int(step)), max(0, int(total))
        progress: dict[str, Any] = {
            "step": step,
            "totalSteps": total,
            "metrics": clean,
            "updatedAt": _now(),
        }
        summary = {"progress": display_progress(step, total)}
        eta = 0.0 if step >= total else self.eta_seconds(step, total)
        if eta is not None:
            progress["etaSeconds"] = round(eta)
            summary["eta"] = display_eta(eta)
        if self._checkpoint is not None:
            progress["lastCheckpointStep"] = self._checkpoint
        return {"status": {"progress": progress, "summary": summary}}

    def _patch(self, body: dict[str, Any]) -> bool:
        assert self.api_server and self.namespace and self.name
        url = self.api_server + status_path(self.namespace, self.name)
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            method="PATCH",
            headers={
                "Content-Type": "application/merge-patch+json",
                "Accept": "application/json",
                "Authorization": f"Bearer {self._token}",
            },
        )
        context = ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
                response.read()
            return True
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            log.warning("progress report to %s failed: HTTP %s %s", url, err.code, detail)
        except (OSError, ValueError) as err:
            log.warning("progress report to %s failed: %s", url, err)
        return False


# report(rollout=...)'s keys -> status.rollout's (posttrain.api.v1alpha1.RolloutStatus)
ROLLOUT_FIELDS = {
    "policy_version": "policyVersion",
    "staleness_mean": "stalenessMean",
    "weight_sync_seconds": "weightSyncSeconds",
    "tokens_per_second": "tokensPerSecond",
    "workers": "workers",
}
ROLLOUT_INTEGERS = ("policy_version", "workers")


def _rollout_status(rollout: Mapping[str, float | int | None]) -> dict[str, float | int]:
    """status.rollout from the snake_case dict: camelCase keys; None, unknown keys and values
    that are not finite non-negative numbers left out (the schema refuses them, and the whole
    patch with them); counts as integers."""
    out: dict[str, float | int] = {}
    for key, name in ROLLOUT_FIELDS.items():
        raw = rollout.get(key)
        if raw is None:
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(value) or value < 0:
            continue
        out[name] = int(value) if key in ROLLOUT_INTEGERS else value
    unknown = set(rollout) - set(ROLLOUT_FIELDS)
    if unknown:
        log.debug("progress: unknown rollout fields ignored: %s", ", ".join(sorted(unknown)))
    return out


def _file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
