"""`posttrain crd`: print the PostTrainJob CRD generated from the API model."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "crd",
        help="print the PostTrainJob CustomResourceDefinition (YAML)",
        description="Print the CRD generated from the pydantic model; crds/ holds the checked-in copy.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from posttrain.api.crd import crd_yaml

    print(crd_yaml(), end="")
    return 0
