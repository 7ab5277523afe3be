"""What `validate` and `render` share: walk the documents of several files, report each error
with its file, job name and field paths, and count the failures."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from posttrain.api import JobInvalid, load_documents


def for_each_document(paths: list[str], handle: Callable[[str, str, dict[str, Any]], None]) -> int:
    """Call handle(path, name, doc) for every YAML document; a JobInvalid it raises (or an
    unreadable file) is printed to stderr. Returns how many documents or files failed."""
    failed = 0
    for path in paths:
        try:
            docs = load_documents(path)
        except (OSError, JobInvalid) as err:
            print(f"{path}: {err}", file=sys.stderr)
            failed += 1
            continue
        if not docs:
            print(f"{path}: no YAML documents", file=sys.stderr)
            failed += 1
        for i, doc in enumerate(docs):
            name = (doc.get("metadata") or {}).get("name") or f"document {i + 1}"
            try:
                handle(path, name, doc)
            except JobInvalid as err:
                failed += 1
                print(f"{path}: {name}: invalid", file=sys.stderr)
                for e in err.errors:
                    print(f"  {e}", file=sys.stderr)
    return failed
