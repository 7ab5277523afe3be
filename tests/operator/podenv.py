"""Resolve a rendered container's env for one pod, the way the kubelet does, so tests can feed
it to `ProcessTopology.from_env` (unit tests: pod metadata as JobSet and the Job controller set
it; cluster tests: the real pods' metadata)."""

from __future__ import annotations

import re
from typing import Any

_FIELD = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


def resolve_env(env: list[dict[str, Any]], pod_metadata: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for var in env:
        if "value" in var:
            out[var["name"]] = var["value"]
            continue
        ref = (var.get("valueFrom") or {}).get("fieldRef")
        if ref is None:
            continue  # secrets: not part of the contract
        path = ref["fieldPath"]
        if path == "metadata.namespace":
            out[var["name"]] = pod_metadata["namespace"]
        elif path == "metadata.name":
            out[var["name"]] = pod_metadata["name"]
        else:
            m = _FIELD.match(path)
            assert m, f"unsupported fieldRef {path}"
            value = (pod_metadata.get(m.group(1)) or {}).get(m.group(2))
            assert value is not None, f"{path} is not set on pod {pod_metadata.get('name')}"
            out[var["name"]] = value
    return out
