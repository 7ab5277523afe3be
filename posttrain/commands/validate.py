"""`posttrain validate FILE...`: check PostTrainJob manifests without a cluster."""

from __future__ import annotations

import argparse
import sys

from posttrain.api import JobInvalid, load_documents, parse_job


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check PostTrainJob manifests (multi-document YAML; '-' reads stdin)",
        description="Exit 0 when every document is a valid PostTrainJob; otherwise print each "
        "error with the field's path and what is allowed, and exit 1.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
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
                parse_job(doc)
            except JobInvalid as err:
                failed += 1
                print(f"{path}: {name}: invalid", file=sys.stderr)
                for e in err.errors:
                    print(f"  {e}", file=sys.stderr)
            else:
                print(f"{path}: {name}: valid")
    return 1 if failed else 0
