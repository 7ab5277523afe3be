"""The operator under a burst: N PostTrainJobs created at once, time until each has its JobSet.

Needs the local control plane (`make cluster-up`; docs/development.md). Installs the CRD,
starts `posttrain operator --namespace NS` as a subprocess, creates N cpu jobs from `--clients`
threads at once, and watches JobSets: the latency of a job is (JobSet ADDED seen) - (create of
the PostTrainJob sent). The operator's peak RSS is its VmHWM at the end. Prints progress, then,
last, one JSON line:

    {"jobs": 200, "clients": 16, "p50_s": ..., "p99_s": ..., "max_s": ..., "rss_mb": ...,
     "jobset_p50_s": ..., "jobset_p99_s": ..., "ratio": p99_s / jobset_p99_s,
     "wall_s": ..., "all_created": true, "stages": {...}, "rounds": [...]}

The JobSet controller's figure, for comparison (a Go controller under the same burst): the same
N jobs rendered to JobSets (`posttrain render`, no operator running) are created straight from
the same `--clients` threads into a fresh namespace, and the latency of each is (its first Job
ADDED seen) - (create of the JobSet sent). With `--rounds R` the two runs alternate R times
(operator, JobSet, operator, ...), each on a fresh namespace deleted at its end; `p99_s`,
`jobset_p99_s` and `ratio` are then medians over the rounds, each round's figures in `rounds`.
`--no-jobset` skips the comparison.

`stages`: where a job's time goes, p50 and p99 over the jobs, each from the create sent, all on
this process's monotonic clock: `created` (the create call returned), `pending` (its status
phase seen on a watch of PostTrainJobs), `recipe` (its ConfigMap seen on a watch), `jobset` (the
latency above); `n`: how many jobs the stage saw (a watch the API server ends early under load
sees fewer). Every watch lists first and watches from that resourceVersion, so it misses no
event of the burst. At the end the benchmark deletes its namespace and waits for it to go (up to 2 min), so
that runs back to back start from the same, quiet cluster.

    .venv/bin/python -P benchmarks/operator_scale.py --jobs 200 --json [--rounds 3]
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
from collections.abc import Callable
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


def trace_summary(path: Path, sent: dict[str, float]) -> dict:
    """From operator_trace.py's records: when the operator first took up each job (its first
    reconcile began), how long each kind of call took (count, mean, p50, p99), and how many
    calls ran at once on average while the burst lasted."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    first: dict[str, float] = {}
    for rec in records:
        if rec["what"] == "reconcile" and rec["job"] in sent:
            first[rec["job"]] = min(first.get(rec["job"], rec["start"]), rec["start"])
    taken = [first[n] - sent[n] for n in first]
    by_what: dict[str, list[float]] = {}
    for rec in records:
        by_what.setdefault(rec["what"], []).append(rec["end"] - rec["start"])
    calls = {
        what: {
            "n": len(d),
            "mean_s": round(statistics.fmean(d), 3),
            "p50_s": round(statistics.median(d), 3),
            "p99_s": round(percentile(d, 0.99), 3),
        }
        for what, d in sorted(by_what.items())
    }
    api = [r for r in records if r["what"][:1].isupper()]  # "GET ...", "POST ..."
    if api:
        span = max(r["end"] for r in api) - min(r["start"] for r in api)
        busy = sum(r["end"] - r["start"] for r in api)
        in_flight = round(busy / span, 1) if span > 0 else None
    else:
        in_flight = None
    return {
        "first_reconcile": {
            "p50_s": round(statistics.median(taken), 3) if taken else None,
            "p99_s": round(percentile(taken, 0.99), 3) if taken else None,
        },
        "calls": calls,
        "api_calls_in_flight_mean": in_flight,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--clients", type=int, default=16, help="threads creating jobs at once")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the JobSets")
    p.add_argument("--run-seconds", type=int, default=600, help="how long each fake pod runs")
    p.add_argument(
        "--kubeconfig", default=os.environ.get("KUBECONFIG", str(REPO / ".cluster/kubeconfig"))
    )
    p.add_argument("--json", action="store_true", help="print the JSON summary line last")
    p.add_argument(
        "--trace",
        metavar="FILE",
        help="time the operator's API calls and handlers (benchmarks/operator_trace.py) into "
        "FILE, and add a summary of them to the JSON as `trace`",
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="operator and JobSet-controller runs, alternating"
    )
    p.add_argument("--no-jobset", action="store_true", help="skip the JobSet controller's run")
    return p.parse_args(argv)


class Bench:
    """One burst in a fresh namespace: watches started before it, the namespace deleted after."""

    def __init__(self, args: argparse.Namespace, api: client.ApiClient, prefix: str) -> None:
        self.args = args
        self.kubectl = ["kubectl", "--kubeconfig", args.kubeconfig]
        self.ns = f"{prefix}-{secrets.token_hex(3)}"
        subprocess.run([*self.kubectl, "create", "namespace", self.ns], check=True,
                       capture_output=True)  # fmt: skip
        # the trainer's ServiceAccount, so that pods are created (as in a real namespace)
        subprocess.run([*self.kubectl, "-n", self.ns, "create", "serviceaccount",
                        "posttrain-trainer"], check=True, capture_output=True)  # fmt: skip
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.done = threading.Event()
        self.listening: list[threading.Event] = []
        self.sent: dict[str, float] = {}
        self.created: dict[str, float] = {}

    def watch_into(self, record: dict[str, float], key, list_call, *list_args, **kw) -> None:
        """Watch from the current resourceVersion (listed first), recording the first time
        key(event) is not None per name."""
        args = self.args
        ready = threading.Event()
        self.listening.append(ready)

        def run() -> None:
            listed = list_call(*list_args, **kw)
            rv = listed["metadata"]["resourceVersion"] if isinstance(listed, dict) else (
                listed.metadata.resource_version)  # fmt: skip
            ready.set()
            w = watch.Watch()
            for event in w.stream(list_call, *list_args, resource_version=rv,
                                  timeout_seconds=int(args.timeout) + 60, **kw):  # fmt: skip
                name = key(event)
                if name is not None:
                    record.setdefault(name, time.monotonic())
                if len(record) >= args.jobs or self.done.is_set():
                    w.stop()

        threading.Thread(target=run, daemon=True).start()

    def wait_listening(self) -> None:
        for ready in self.listening:
            ready.wait(30)
        time.sleep(0.5)  # the watch requests themselves, sent after the listings

    def burst(self, make: Callable[[str], None], seen: dict[str, float]) -> float:
        """Create the N objects from `--clients` threads; wait until `seen` has them all (or the
        timeout); the wall time."""
        args = self.args

        def create(i: int) -> None:
            name = f"j{i:04d}"
            self.sent[name] = time.monotonic()
            make(name)
            self.created[name] = time.monotonic()

        start = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(create, range(args.jobs)))
        print(f"{self.ns}: created {args.jobs} in {time.monotonic() - start:.1f}s", file=sys.stderr)
        deadline = time.monotonic() + args.timeout
        while len(seen) < args.jobs and time.monotonic() < deadline:
            time.sleep(0.5)
        self.done.set()
        return time.monotonic() - start

    def delete(self) -> None:
        subprocess.run([*self.kubectl, "delete", "namespace", self.ns, "--wait=true",
                        "--timeout=120s"], capture_output=True)  # fmt: skip

    def stage(self, record: dict[str, float]) -> dict[str, float] | None:
        values = [record[n] - self.sent[n] for n in self.sent if n in record]
        if not values:
            return None
        return {"p50_s": round(statistics.median(values), 3),
                "p99_s": round(percentile(values, 0.99), 3), "n": len(values)}  # fmt: skip


def operator_run(args: argparse.Namespace, api: client.ApiClient) -> dict:
    """The operator's burst: PostTrainJob create sent -> its JobSet seen."""
    b = Bench(args, api, "bench")
    ns, custom, core = b.ns, b.custom, b.core
    seen: dict[str, float] = {}  # JobSet ADDED
    pending: dict[str, float] = {}  # PostTrainJob with a status phase
    recipes: dict[str, float] = {}  # ConfigMap <job>-recipe ADDED

    def jobset_key(event: dict) -> str:
        return event["object"]["metadata"]["name"]

    def pending_key(event: dict) -> str | None:
        obj = event["object"]
        return obj["metadata"]["name"] if (obj.get("status") or {}).get("phase") else None

    def recipe_key(event: dict) -> str | None:
        return event["object"].metadata.name.removesuffix("-recipe")

    log = Path(f"/tmp/operator-scale-{ns}.log")
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    cmd = [sys.executable, "-P", "-m", "posttrain.cli", "operator", "--namespace", ns,
           "--kubeconfig", args.kubeconfig, "--trainer-image-cpu", "trainer:bench"]  # fmt: skip
    if args.trace:
        cmd[2:4] = [str(REPO / "benchmarks/operator_trace.py"), args.trace]
    with log.open("w") as out:
        operator = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        time.sleep(5)  # the operator's start-up (imports, kopf's initial listing)
        cpu_start = cpu_seconds(operator.pid)
        b.watch_into(seen, jobset_key, custom.list_namespaced_custom_object,
                     "jobset.x-k8s.io", "v1alpha2", ns, "jobsets")  # fmt: skip
        b.watch_into(pending, pending_key, custom.list_namespaced_custom_object,
                     GROUP, VERSION, ns, PLURAL)  # fmt: skip
        b.watch_into(recipes, recipe_key, core.list_namespaced_config_map, ns,
                     label_selector="posttrain.dev/job")  # fmt: skip
        b.wait_listening()
        wall = b.burst(
            lambda name: custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, job(name, args.run_seconds)
            ),
            seen,
        )
        rss = peak_rss_mb(operator.pid)
        cpu = cpu_seconds(operator.pid) - cpu_start
    finally:
        operator.terminate()
        operator.wait(30)
        b.delete()
    latencies = [seen[n] - b.sent[n] for n in b.sent if n in seen]
    print(f"operator log: {log}", file=sys.stderr)
    out = {
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p99_s": round(percentile(latencies, 0.99), 3) if latencies else None,
        "max_s": round(max(latencies), 3) if latencies else None,
        "rss_mb": round(rss, 1),
        "operator_cpu_s": round(cpu, 1),
        "wall_s": round(wall, 1),
        "all_created": len(latencies) == args.jobs,
        "stages": {
            "created": b.stage(b.created),
            "pending": b.stage(pending),
            "recipe": b.stage(recipes),
            "jobset": b.stage(seen),
        },
    }
    if args.trace:
        out["trace"] = trace_summary(Path(args.trace), b.sent)
    return out


def jobset_manifest(name: str, namespace: str, run_seconds: int) -> dict:
    """What the operator would make for `job(name)`: its rendered JobSet (no owner)."""
    from posttrain.api import parse_job
    from posttrain.operator import render as r

    doc = job(name, run_seconds)
    doc["metadata"]["namespace"] = namespace
    jobset = r.render(parse_job(doc), image_defaults=r.ImageDefaults(cpu="trainer:bench"))[1]
    return jobset


def jobset_run(args: argparse.Namespace, api: client.ApiClient) -> dict:
    """The JobSet controller's burst: JobSet create sent -> its first Job seen."""
    b = Bench(args, api, "bench-js")
    ns = b.ns
    first_job: dict[str, float] = {}

    def job_key(event: dict) -> str | None:
        labels = event["object"].metadata.labels or {}
        return labels.get("jobset.sigs.k8s.io/jobset-name")

    manifests = {f"j{i:04d}": jobset_manifest(f"j{i:04d}", ns, args.run_seconds)
                 for i in range(args.jobs)}  # fmt: skip
    try:
        b.watch_into(first_job, job_key, b.batch.list_namespaced_job, ns,
                     label_selector="jobset.sigs.k8s.io/jobset-name")  # fmt: skip
        b.wait_listening()
        wall = b.burst(
            lambda name: b.custom.create_namespaced_custom_object(
                "jobset.x-k8s.io", "v1alpha2", ns, "jobsets", manifests[name]
            ),
            first_job,
        )
    finally:
        b.delete()
    latencies = [first_job[n] - b.sent[n] for n in b.sent if n in first_job]
    return {
        "jobset_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "jobset_p99_s": round(percentile(latencies, 0.99), 3) if latencies else None,
        "jobset_max_s": round(max(latencies), 3) if latencies else None,
        "jobset_wall_s": round(wall, 1),
        "jobset_all_created": len(latencies) == args.jobs,
        "jobset_created": b.stage(b.created),
    }


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kubectl = ["kubectl", "--kubeconfig", args.kubeconfig]
    subprocess.run([*kubectl, "apply", "--server-side", "-f", str(REPO / "crds/posttrain.dev_posttrainjobs.yaml")],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run([*kubectl, "wait", "--for=condition=Established", "crd/posttrainjobs.posttrain.dev"],
                   check=True, capture_output=True)  # fmt: skip
    config.load_kube_config(config_file=args.kubeconfig)
    api = client.ApiClient()
    api.configuration.connection_pool_maxsize = args.clients * 2  # type: ignore[attr-defined]

    rounds: list[dict] = []
    for i in range(args.rounds):
        result = {"round": i + 1, "load_before": round(os.getloadavg()[0], 1)}
        result.update(operator_run(args, api))
        if not args.no_jobset:
            result["load_before_jobset"] = round(os.getloadavg()[0], 1)
            result.update(jobset_run(args, api))
            if result["p99_s"] and result["jobset_p99_s"]:
                result["ratio"] = round(result["p99_s"] / result["jobset_p99_s"], 2)
        print(json.dumps(result), file=sys.stderr)
        rounds.append(result)

    last = rounds[-1]
    summary: dict = {"jobs": args.jobs, "clients": args.clients}
    for key in ("p50_s", "p99_s", "max_s", "rss_mb", "operator_cpu_s", "wall_s"):
        summary[key] = _median([r[key] for r in rounds])
    summary["rss_mb"] = max(r["rss_mb"] for r in rounds)  # the worst peak
    if not args.no_jobset:
        for key in ("jobset_p50_s", "jobset_p99_s"):
            summary[key] = _median([r.get(key) for r in rounds])
        summary["ratio"] = _median([r.get("ratio") for r in rounds])
    summary["all_created"] = all(
        r["all_created"] and r.get("jobset_all_created", True) for r in rounds
    )
    summary["stages"] = last["stages"]
    if args.trace:
        summary["trace"] = last["trace"]
    summary["rounds"] = [
        {k: v for k, v in r.items() if k not in ("stages", "trace")} for r in rounds
    ]
    print(json.dumps(summary) if args.json else summary)
    return 0 if summary["all_created"] else 1


if __name__ == "__main__":
    sys.exit(main())
