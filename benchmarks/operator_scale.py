"""The operator under a burst: N PostTrainJobs created at once, time until each has its JobSet.

Needs the local control plane (`make cluster-up`; docs/development.md). Installs the CRD,
starts `posttrain operator --namespace NS` as a subprocess, creates N cpu jobs from `--clients`
threads at once, and watches JobSets: the latency of a job is (JobSet ADDED seen) - (create of
the PostTrainJob sent). The operator's peak RSS is its VmHWM at the end. Prints progress, then,
last, one JSON line:

    {"jobs": 200, "clients": 16, "p50_s": ..., "p99_s": ..., "max_s": ..., "rss_mb": ...,
     "wall_s": ..., "all_created": true}

    .venv/bin/python -P benchmarks/operator_scale.py --jobs 200 --json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "posttrain.dev", "v1alpha1", "posttrainjobs"


def job(name: str, run_seconds: int) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PostTrainJob",
        "metadata": {
            "name": name,
            "annotations": {"posttrain.dev/fake-run-seconds": str(run_seconds)},
        },
        "spec": {
            "algorithm": "sft",
            "model": {"base": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "data": {"train": "gs://b/train.jsonl"},
            "training": {"steps": 10},
            "resources": {"accelerator": "cpu"},
            "output": {"dir": "/tmp/out"},
        },
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--clients", type=int, default=16, help="threads creating jobs at once")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the JobSets")
    p.add_argument("--run-seconds", type=int, default=600, help="how long each fake pod runs")
    p.add_argument(
        "--kubeconfig", default=os.environ.get("KUBECONFIG", str(REPO / ".cluster/kubeconfig"))
    )
    p.add_argument("--json", action="store_true", help="print the JSON summary line last")
    args = p.parse_args(argv)

    kubectl = ["kubectl", "--kubeconfig", args.kubeconfig]
    subprocess.run([*kubectl, "apply", "--server-side", "-f", str(REPO / "crds/posttrain.dev_posttrainjobs.yaml")],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run([*kubectl, "wait", "--for=condition=Established", "crd/posttrainjobs.posttrain.dev"],
                   check=True, capture_output=True)  # fmt: skip
    ns = f"bench-{secrets.token_hex(3)}"
    subprocess.run([*kubectl, "create", "namespace", ns], check=True, capture_output=True)
    # the trainer's ServiceAccount, so that pods are created (as in a real namespace)
    subprocess.run([*kubectl, "-n", ns, "create", "serviceaccount", "posttrain-trainer"], check=True,
                   capture_output=True)  # fmt: skip

    config.load_kube_config(config_file=args.kubeconfig)
    api = client.ApiClient()
    api.configuration.connection_pool_maxsize = args.clients * 2  # type: ignore[attr-defined]
    custom = client.CustomObjectsApi(api)

    seen: dict[str, float] = {}
    done = threading.Event()

    def watch_jobsets() -> None:
        w = watch.Watch()
        for event in w.stream(custom.list_namespaced_custom_object, "jobset.x-k8s.io", "v1alpha2",
                              ns, "jobsets", timeout_seconds=int(args.timeout) + 60):  # fmt: skip
            name = event["object"]["metadata"]["name"]
            seen.setdefault(name, time.monotonic())
            if len(seen) >= args.jobs or done.is_set():
                w.stop()

    log = Path(f"/tmp/operator-scale-{ns}.log")
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    cmd = [sys.executable, "-P", "-m", "posttrain.cli", "operator", "--namespace", ns,
           "--kubeconfig", args.kubeconfig, "--trainer-image-cpu", "trainer:bench"]  # fmt: skip
    with log.open("w") as out:
        operator = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        time.sleep(5)  # the operator's start-up (imports, kopf's initial listing)
        cpu_start = cpu_seconds(operator.pid)
        watcher = threading.Thread(target=watch_jobsets, daemon=True)
        watcher.start()
        time.sleep(0.5)
        sent: dict[str, float] = {}

        def create(i: int) -> None:
            name = f"j{i:04d}"
            sent[name] = time.monotonic()
            custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, job(name, args.run_seconds)
            )

        start = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(create, range(args.jobs)))
        print(f"created {args.jobs} jobs in {time.monotonic() - start:.1f}s", file=sys.stderr)
        deadline = time.monotonic() + args.timeout
        while len(seen) < args.jobs and time.monotonic() < deadline:
            time.sleep(0.5)
        done.set()
        wall = time.monotonic() - start
        rss = peak_rss_mb(operator.pid)
        cpu = cpu_seconds(operator.pid) - cpu_start
    finally:
        operator.terminate()
        operator.wait(30)
        subprocess.run([*kubectl, "delete", "namespace", ns, "--wait=false"], capture_output=True)
    latencies = [seen[n] - sent[n] for n in sent if n in seen]
    summary = {
        "jobs": args.jobs,
        "clients": args.clients,
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p99_s": round(percentile(latencies, 0.99), 3) if latencies else None,
        "max_s": round(max(latencies), 3) if latencies else None,
        "rss_mb": round(rss, 1),
        "operator_cpu_s": round(cpu, 1),
        "wall_s": round(wall, 1),
        "all_created": len(latencies) == args.jobs,
    }
    print(f"operator log: {log}", file=sys.stderr)
    print(json.dumps(summary) if args.json else summary)
    return 0 if summary["all_created"] else 1


if __name__ == "__main__":
    sys.exit(main())
