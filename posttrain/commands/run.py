"""`posttrain run FILE --output DIR [--processes N]`: the job on this machine, no cluster.

An async RL job (``spec.rollout.mode: async``) runs as its roles would in a cluster: the trainer
and ``spec.rollout.replicas`` rollout workers as local processes, talking over loopback HTTP, the
same transport as between pods (``trainer/async_rl``); the workers run at a lower CPU priority
than the trainer (``WORKER_NICE``).

With ``--processes N`` it starts N local trainer processes joined by jax.distributed on loopback
(CPU collectives), with the same environment variables the operator sets on pods
(``posttrain.runtime``), which is how multi-host training is exercised without a cluster. Each
process sees its own local devices (one CPU device by default), so the mesh spans N devices.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys

from posttrain import runtime


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a PostTrainJob on this machine (no cluster)",
        description="Train locally: metrics, checkpoints and the exported model go to --output. "
        "Running again with the same --output continues from the latest checkpoint.",
    )
    p.add_argument("file", metavar="FILE", help="the PostTrainJob YAML")
    p.add_argument(
        "--output", "-o", required=True, metavar="DIR", help="output folder (local or gs://)"
    )
    p.add_argument(
        "--processes",
        "-n",
        type=int,
        default=1,
        metavar="N",
        help="local processes joined by jax.distributed (default 1)",
    )
    p.set_defaults(func=run)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> int:
    if args.processes < 1:
        print("posttrain run: --processes must be at least 1", file=sys.stderr)
        return 2
    entry = [
        sys.executable,
        "-m",
        "posttrain.trainer",
        "--recipe",
        args.file,
        "--output",
        args.output,
    ]
    workers = _rollout_workers(args.file)
    if args.processes == 1 and not workers:
        from posttrain.trainer.__main__ import main

        return main(entry[3:])
    address = f"127.0.0.1:{free_port()}"
    children = []
    roles: dict[str, str] = {}
    if workers:  # async RL: the trainer's rollout service on loopback, the workers beside it
        trainer_address = f"127.0.0.1:{free_port()}"
        roles = {runtime.ROLE: runtime.ROLE_TRAINER, runtime.TRAINER_ADDRESS: trainer_address}
    for i in range(args.processes):
        topology = runtime.ProcessTopology(
            address, num_slices=1, hosts_per_slice=args.processes, host_id=i
        )
        env = {**os.environ, **topology.to_env(), runtime.RECIPE: args.file, **roles}
        # Own session: a terminal's Ctrl-C reaches only this launcher, which stops them cleanly.
        children.append(_start(entry, env))
    trainers = list(children)
    for w in range(workers):
        env = {
            **os.environ,
            runtime.RECIPE: args.file,
            runtime.ROLE: runtime.ROLE_ROLLOUT,
            runtime.ROLLOUT_WORKER: str(w),
            runtime.TRAINER_ADDRESS: roles[runtime.TRAINER_ADDRESS],
        }
        children.append(_start(entry, env, WORKER_NICE))

    stops = 0

    def stop(signum, frame):  # noqa: ARG001
        # SIGTERM to every process, as a cluster preempting pods would: they agree on a step,
        # save a checkpoint and exit 0. A second Ctrl-C kills them.
        nonlocal stops
        stops += 1
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM if stops == 1 else signal.SIGKILL)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [child.wait() for child in trainers]
        # The trainer is done (or stopped): its workers exit when told so; stop any left.
        for child in children[len(trainers) :]:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.terminate()
                child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [c for c in codes if c != 0]
    return failed[0] if failed else 0


# A local async run's workers yield the CPU to the trainer (nice 10): on a shared CPU the trainer's
# step is the bottleneck, and the workers sample in the cycles it leaves. Measured with
# benchmarks/async_rl.py on 2 cores: 1.13x the sync step this way, 0.98x with the roles pinned to
# a core each (docs/performance.md).
WORKER_NICE = 10


def _start(entry: list[str], env: dict[str, str], nice: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        entry,
        env=env,
        start_new_session=True,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,  # noqa: PLW1509
    )


def _rollout_workers(path: str) -> int:
    """Rollout workers an async RL job runs beside its trainer (0 for every other job); a bad
    file is left for the trainer to report."""
    from posttrain.api import JobInvalid
    from posttrain.trainer.__main__ import read_recipe

    try:
        return read_recipe(path).spec.rollout_role.workers
    except (OSError, JobInvalid):
        return 0
