"""`posttrain validate FILE...`: check PostTrainJob manifests without a cluster."""

from __future__ import annotations

import argparse

from posttrain.api import parse_job
from posttrain.commands._documents import for_each_document


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check PostTrainJob manifests (multi-document YAML; '-' reads stdin)",
        description="Exit 0 when every document is a PostTrainJob the operator would run; "
        "otherwise print each error with the field's path and what is allowed, and exit 1.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # What the operator checks beyond the model (spec.output.dir, pod name length, ...): a job
    # valid here is one the operator runs. Imports no kopf or kubernetes client.
    from posttrain.operator.render import check_renderable

    def validate_one(path: str, name: str, doc: dict) -> None:
        check_renderable(parse_job(doc))
        print(f"{path}: {name}: valid")

    return 1 if for_each_document(args.files, validate_one) else 0
