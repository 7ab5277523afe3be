"""Timing of the operator's own work, for benchmarks/operator_scale.py --trace.

Run inside the operator process (operator_scale.py starts it through `run()`): wraps the
kubernetes client's REST calls and the Operator's reconcile, and at exit
writes one JSON line per call to FILE: {"what", "job", "start", "end", "thread"}, times on the
system's monotonic clock (the benchmark's too). `what` is e.g. "PATCH posttrainjobs/status",
"POST jobsets", "reconcile".
Not a part of the product: kopf's own requests (aiohttp: watches, Events) are not seen.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import runpy
import sys
import threading
import time
from typing import Any

_records: list[dict[str, Any]] = []
_lock = threading.Lock()
_PATH = re.compile(
    r"/(?:api/v1|apis/[^/]+/[^/]+)/namespaces/[^/]+/(?P<kind>[a-z]+)(?:/(?P<name>[^/?]+))?"
    r"(?:/(?P<sub>status))?"
)


def _record(what: str, job: str | None, start: float, end: float) -> None:
    with _lock:
        _records.append(
            {
                "what": what,
                "job": job,
                "start": start,
                "end": end,
                "thread": threading.current_thread().name,
            }
        )


def install(out: str) -> None:
    from kubernetes.client import rest

    from posttrain.operator import reconcile

    original = rest.RESTClientObject.request

    def request(self, method, url, *args, **kwargs):  # type: ignore[no-untyped-def]
        m = _PATH.search(url)
        kind = m["kind"] if m else url
        name = (m["name"] if m else None) or None
        if name and kind == "configmaps":
            name = name.removesuffix("-recipe")
        what = f"{method} {kind}{'/status' if m and m['sub'] else ''}"
        start = time.monotonic()
        try:
            return original(self, method, url, *args, **kwargs)
        finally:
            _record(what, name, start, time.monotonic())

    rest.RESTClientObject.request = request  # type: ignore[method-assign]

    _wrap(reconcile.Operator, "reconcile")

    def dump() -> None:
        with open(out, "w") as f, _lock:
            for rec in _records:
                f.write(json.dumps(rec) + "\n")

    atexit.register(dump)


def _wrap(cls: type, method_name: str) -> None:
    original = getattr(cls, method_name)

    def traced(self, namespace, name, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.monotonic()
        try:
            return original(self, namespace, name, *args, **kwargs)
        finally:
            _record(method_name, name, start, time.monotonic())

    setattr(cls, method_name, traced)


def run(out: str, argv: list[str]) -> None:
    """`posttrain <argv>` with the tracing installed."""
    if "--kubeconfig" in argv:  # as `posttrain operator` does, before the client is imported
        # (the client reads $KUBECONFIG at import, and kopf's login uses that default)
        os.environ["KUBECONFIG"] = os.path.abspath(argv[argv.index("--kubeconfig") + 1])
    install(out)
    sys.argv = ["posttrain", *argv]
    runpy.run_module("posttrain.cli", run_name="__main__")


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2:])
