"""A reward computed by an HTTP service (a judge model, a verifier farm), as a reward function.

The schema is a contract. Each request is

    POST <url>   Content-Type: application/json
    {"prompts": [str, ...], "completions": [str, ...], "columns": {name: [value, ...], ...}}

with the three lists aligned (one entry per completion; `columns` holds the data row's other
columns, as the reward-function contract of `rewards.py` does), and the reply must be

    200  {"rewards": [float, ...]}     one finite number per completion, in order.

`HttpReward(url)` is a reward function (`fn(prompts, completions, **columns) -> list[float]`):
it splits the batch into chunks of `chunk_size` completions, sends up to `concurrency` chunks at
once, and retries what may be transient (connection errors, timeouts, HTTP 429 and 5xx) up to
`retries` more times with exponential backoff. A chunk that still fails, or whose reply breaks
the schema (other HTTP errors, not JSON, no `rewards`, wrong count, a non-number, NaN), raises a
`RewardServiceError` naming the reward, its url and the completions concerned; it is never read
as zeros. Only with `default` set do that chunk's completions get `default` instead (logged).

Plain standard library (urllib, threads): no client dependency for the trainer image.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from posttrain.trainer.rewards import RewardError

log = logging.getLogger(__name__)


class RewardServiceError(RewardError):
    """The reward service failed or broke the schema; the message names the reward and url."""


class _Transient(Exception):
    """Worth another attempt."""


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars from the data readers
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass(frozen=True)
class HttpReward:
    url: str
    name: str = ""  # for messages; default: the url
    timeout_s: float = 60.0  # per request
    retries: int = 3  # further attempts after the first, for transient failures only
    backoff_s: float = 1.0  # wait before retry k: backoff_s * 2**k
    chunk_size: int = 64  # completions per request
    concurrency: int = 4  # requests in flight
    default: float | None = None  # reward for completions whose chunk failed; None: raise
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"reward service url must be http(s)://..., got {self.url!r}")
        if self.chunk_size < 1 or self.concurrency < 1 or self.retries < 0:
            raise ValueError("chunk_size and concurrency must be >= 1 and retries >= 0")

    @property
    def where(self) -> str:
        return (
            f"reward service {self.name} ({self.url})"
            if self.name
            else f"reward service {self.url}"
        )

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        n = len(completions)
        if len(prompts) != n or any(len(v) != n for v in columns.values()):
            raise ValueError(f"{self.where}: prompts and every column need {n} entries")
        starts = list(range(0, n, self.chunk_size))

        def one(start: int) -> list[float]:
            end = min(start + self.chunk_size, n)
            body = {
                "prompts": list(prompts[start:end]),
                "completions": list(completions[start:end]),
                "columns": {k: list(v[start:end]) for k, v in columns.items()},
            }
            try:
                return self._post(body, end - start, f"completions {start}-{end - 1}")
            except RewardServiceError as err:
                if self.default is None:
                    raise
                log.warning("%s; using default %s for those %d", err, self.default, end - start)
                return [float(self.default)] * (end - start)

        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(starts)))) as pool:
            chunks = list(pool.map(one, starts))
        return [r for chunk in chunks for r in chunk]

    def _post(self, body: dict[str, Any], count: int, what: str) -> list[float]:
        try:
            data = json.dumps(body, default=_json_default).encode()
        except (TypeError, ValueError) as err:
            raise RewardServiceError(f"{self.where}: cannot encode the request: {err}") from err
        headers = {"Content-Type": "application/json", **self.headers}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                reply = self._send(data, headers)
            except _Transient as err:
                last = str(err)
                continue
            except RewardServiceError as err:
                raise RewardServiceError(f"{self.where}: {what}: {err}") from None
            return self._rewards(reply, count, what)
        attempts = self.retries + 1
        raise RewardServiceError(
            f"{self.where}: {what}: failed after {attempts} attempt{'s' * (attempts > 1)}: {last}"
        )

    def _send(self, data: bytes, headers: dict[str, str]) -> bytes:
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            detail = err.read(500).decode("utf-8", errors="replace")
            message = f"HTTP {err.code}: {detail}".rstrip(": ")
            if err.code == 429 or err.code >= 500:
                raise _Transient(message) from None
            raise RewardServiceError(message) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise _Transient(f"{type(reason).__name__}: {reason}") from None

    def _rewards(self, reply: bytes, count: int, what: str) -> list[float]:
        def bad(message: str) -> RewardServiceError:
            return RewardServiceError(f"{self.where}: {what}: {message}")

        try:
            payload = json.loads(reply)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad(f"reply is not JSON ({err}): {reply[:200]!r}") from None
        rewards = payload.get("rewards") if isinstance(payload, dict) else None
        if not isinstance(rewards, list):
            raise bad(f'reply has no "rewards" list: {str(payload)[:200]}')
        if len(rewards) != count:
            raise bad(f'"rewards" has {len(rewards)} values for {count} completions')
        out = []
        for i, value in enumerate(rewards):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad(f'"rewards"[{i}] is {value!r}, not a number')
            if not math.isfinite(value):
                raise bad(f'"rewards"[{i}] is {value}; rewards must be finite')
            out.append(float(value))
        return out
