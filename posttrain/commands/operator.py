"""`posttrain operator`: run the kopf operator (in a pod, or from a laptop with a kubeconfig)."""

from __future__ import annotations

import argparse

from posttrain.commands.render import add_image_flags, image_defaults

LOG_FORMATS = ("plain", "full", "json")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "operator",
        help="run the operator: PostTrainJob -> JobSet, status from the JobSet (needs the operator extra)",
        description="Watch PostTrainJobs and turn each into a ConfigMap (recipe) and a JobSet; "
        "map the JobSet's state back into the PostTrainJob's status. See docs/operator.md.",
    )
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable; kopf globs like 'team-*' work); all when absent",
    )
    p.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="kubeconfig to use (default: in-cluster service account, else $KUBECONFIG or ~/.kube/config)",
    )
    p.add_argument(
        "--liveness",
        metavar="URL",
        help="serve a liveness probe at this URL, e.g. http://0.0.0.0:8080/healthz",
    )
    p.add_argument(
        "--peering",
        metavar="NAME",
        help="run as one of several replicas (kopf peering): of the operators sharing the "
        "peering object NAME one is active, the others wait and take over when it is gone",
    )
    p.add_argument("--log-format", choices=LOG_FORMATS, default="plain", help="log line format")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    add_image_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import secrets

    if args.kubeconfig:
        # Before importing kopf: the kubernetes client reads $KUBECONFIG when first imported,
        # and kopf's login goes through it.
        os.environ["KUBECONFIG"] = os.path.abspath(args.kubeconfig)
    try:
        import kopf
    except ImportError:
        raise SystemExit(
            "posttrain operator needs kopf and kubernetes: pip install 'posttrain[operator]'"
        ) from None

    from posttrain.operator import handlers

    handlers.IMAGE_DEFAULTS = image_defaults(args)
    handlers.PEERING = args.peering
    kopf.configure(
        verbose=args.verbose,
        log_format={
            "plain": kopf.LogFormat.PLAIN,
            "full": kopf.LogFormat.FULL,
            "json": kopf.LogFormat.JSON,
        }[args.log_format],
    )
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
        standalone=not args.peering,
        peering_name=args.peering,
        # kopf pauses every operator of equal priority, so each replica draws its own: the
        # highest is active, the others wait.
        priority=secrets.randbelow(2**31) if args.peering else None,
    )
    return 0
