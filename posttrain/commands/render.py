"""`posttrain render FILE...`: print the manifests the operator would create (like `helm template`)."""

from __future__ import annotations

import argparse
import sys

from posttrain.api import parse_job
from posttrain.commands._documents import for_each_document


def add_image_flags(p: argparse.ArgumentParser) -> None:
    """--trainer-image-{tpu,gpu,cpu}; default from POSTTRAIN_TRAINER_IMAGE_{TPU,GPU,CPU}."""
    for family in ("tpu", "gpu", "cpu"):
        p.add_argument(
            f"--trainer-image-{family}",
            metavar="IMAGE",
            help=f"trainer image for {family} jobs without spec.image "
            f"(default: $POSTTRAIN_TRAINER_IMAGE_{family.upper()} or the built-in default)",
        )


def image_defaults(args: argparse.Namespace):
    import os
    from dataclasses import replace

    from posttrain.operator.render import ImageDefaults

    given = {f: getattr(args, f"trainer_image_{f}") for f in ("tpu", "gpu", "cpu")}
    return replace(ImageDefaults.from_env(os.environ), **{k: v for k, v in given.items() if v})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "render",
        help="print the ConfigMap and JobSet the operator makes for a PostTrainJob (YAML)",
        description="Render each PostTrainJob (multi-document YAML; '-' reads stdin) into the "
        "manifests the operator applies: a ConfigMap with the recipe and a JobSet. A dry run: "
        "nothing is sent to a cluster. Exit 1 with each error by field when a job is invalid.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-n", "--namespace", help="render into this namespace (default: the job's)")
    add_image_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from posttrain.operator.render import render, to_yaml

    images = image_defaults(args)
    manifests: list[dict] = []

    def render_one(path: str, name: str, doc: dict) -> None:
        if args.namespace:
            doc.setdefault("metadata", {})["namespace"] = args.namespace
        manifests.extend(render(parse_job(doc), image_defaults=images))

    if for_each_document(args.files, render_one):
        return 1
    sys.stdout.write(to_yaml(manifests))
    return 0
