"""GKE-like node pools for the local kwok cluster, created on demand like node auto-provisioning.

At start it creates the default pool of plain nodes. Then it polls for pods the scheduler has
marked Unschedulable and, for each group of them that asks for a TPU slice or a GPU type,
creates a new pool shaped the way GKE would make it:

* TPU: nodeSelector `cloud.google.com/gke-tpu-accelerator` + `cloud.google.com/gke-tpu-topology`
  -> one node per host of the slice (see `tpu_slice_shape`), each with `google.com/tpu`
  capacity and the `google.com/tpu=present:NoSchedule` taint.
* GPU: nodeSelector `cloud.google.com/gke-accelerator` -> one node per pod of the group, each
  with `nvidia.com/gpu` capacity.

A group is the pods of one Job (so each child Job of a JobSet -- one slice of a multislice
run -- gets its own pool, which JobSet's exclusive-topology placement on
`cloud.google.com/gke-nodepool` requires), or a single pod without a Job. Pools it created
are deleted again once no pod has used them for --scale-down-after seconds.

Nodes carry the `kwok.x-k8s.io/node: fake` annotation, so kwok runs them (see hack/cluster.sh).
The pure functions at the top hold the topology tables; tests/cluster/test_nodepools.py tests them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import secrets
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("nodepool-provisioner")

# ---- the tables: what GKE's node pools look like -------------------------------------------

TPU_ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"
GPU_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
NODEPOOL_LABEL = "cloud.google.com/gke-nodepool"
TPU_RESOURCE = "google.com/tpu"
GPU_RESOURCE = "nvidia.com/gpu"
AUTO_LABEL = "posttrain.dev/auto-provisioned"
DEFAULT_POOL = "default-pool"


@dataclass(frozen=True)
class TpuFamily:
    dims: int  # 2 for v5e/v6e (2D torus), 3 for v4/v5p (3D)
    # single-host topologies -> machine type; a v5e/v6e host holds 1, 4 or 8 chips
    single_host: dict[str, str]
    multi_host_machine: str  # multi-host slices always have 4 chips per host


# Values of cloud.google.com/gke-tpu-accelerator that GKE sets, and their machine types.
TPU_FAMILIES: dict[str, TpuFamily] = {
    "tpu-v4-podslice": TpuFamily(3, {"2x2x1": "ct4p-hightpu-4t"}, "ct4p-hightpu-4t"),
    "tpu-v5p-slice": TpuFamily(3, {"2x2x1": "ct5p-hightpu-4t"}, "ct5p-hightpu-4t"),
    "tpu-v5-lite-podslice": TpuFamily(
        2,
        {"1x1": "ct5lp-hightpu-1t", "2x2": "ct5lp-hightpu-4t", "2x4": "ct5lp-hightpu-8t"},
        "ct5lp-hightpu-4t",
    ),
    "tpu-v5-lite-device": TpuFamily(
        2,
        {"1x1": "ct5l-hightpu-1t", "2x2": "ct5l-hightpu-4t", "2x4": "ct5l-hightpu-8t"},
        "ct5l-hightpu-4t",
    ),
    "tpu-v6e-slice": TpuFamily(
        2,
        {"1x1": "ct6e-standard-1t", "2x2": "ct6e-standard-4t", "2x4": "ct6e-standard-8t"},
        "ct6e-standard-4t",
    ),
}
CHIPS_PER_MULTI_HOST = 4

# cloud.google.com/gke-accelerator -> (machine type, GPUs per machine)
GPU_MACHINES: dict[str, tuple[str, int]] = {
    "nvidia-tesla-t4": ("n1-standard-16", 4),
    "nvidia-l4": ("g2-standard-96", 8),
    "nvidia-tesla-a100": ("a2-highgpu-8g", 8),
    "nvidia-a100-80gb": ("a2-ultragpu-8g", 8),
    "nvidia-h100-80gb": ("a3-highgpu-8g", 8),
    "nvidia-h100-mega-80gb": ("a3-megagpu-8g", 8),
    "nvidia-h200-141gb": ("a3-ultragpu-8g", 8),
}


@dataclass(frozen=True)
class TpuSlice:
    hosts: int
    chips_per_host: int
    machine_type: str

    @property
    def chips(self) -> int:
        return self.hosts * self.chips_per_host


def tpu_slice_shape(accelerator: str, topology: str, chips_per_pod: int = 0) -> TpuSlice:
    """Hosts and chips per host of a TPU slice, as GKE provisions it.

    Single-host v5e/v6e slices (1x1, 2x2, 2x4) put all 1, 4 or 8 chips on one host; every
    multi-host slice has 4 chips per host, so hosts = chips / 4. A 2x4 whose pods ask for 4
    chips each is GKE's other shape of it: two 4-chip hosts (the multi-host machine type).
    """
    family = TPU_FAMILIES.get(accelerator)
    if family is None:
        raise ValueError(f"unknown TPU accelerator {accelerator!r}; known: {sorted(TPU_FAMILIES)}")
    try:
        dims = [int(d) for d in topology.split("x")]
    except ValueError:
        raise ValueError(f"TPU topology {topology!r} is not of the form AxB or AxBxC") from None
    if len(dims) != family.dims or any(d < 1 for d in dims):
        raise ValueError(
            f"{accelerator} needs a {family.dims}-dimensional topology, got {topology!r}"
        )
    chips = math.prod(dims)
    two_hosts = chips_per_pod == CHIPS_PER_MULTI_HOST < chips  # e.g. a 2x4 as 2 x 4 chips
    if topology in family.single_host and not two_hosts:
        return TpuSlice(1, chips, family.single_host[topology])
    if chips % CHIPS_PER_MULTI_HOST:
        raise ValueError(
            f"{accelerator} topology {topology!r} has {chips} chips, not a multiple of 4"
        )
    return TpuSlice(chips // CHIPS_PER_MULTI_HOST, CHIPS_PER_MULTI_HOST, family.multi_host_machine)


def gpu_machine(accelerator: str, requested: int) -> tuple[str, int]:
    """Machine type and GPUs per node for a GPU pool (at least what one pod requested)."""
    if accelerator not in GPU_MACHINES:
        raise ValueError(f"unknown GPU accelerator {accelerator!r}; known: {sorted(GPU_MACHINES)}")
    machine, gpus = GPU_MACHINES[accelerator]
    return machine, max(gpus, requested)


def fake_node(
    name: str,
    pool: str,
    labels: dict[str, str],
    capacity: dict[str, str],
    taints: list[dict] | None = None,
    auto: bool = False,
) -> dict:
    """A Node manifest that kwok will run (kwok fills in conditions, addresses, heartbeats)."""
    all_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "topology.kubernetes.io/region": "us-central1",
        "topology.kubernetes.io/zone": "us-central1-a",
        NODEPOOL_LABEL: pool,
        "type": "kwok",
        **labels,
    }
    if auto:
        all_labels[AUTO_LABEL] = "true"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": all_labels,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": taints or []},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def default_pool_nodes(count: int) -> list[dict]:
    capacity = {"cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "100Gi"}
    labels = {"node.kubernetes.io/instance-type": "e2-standard-32"}
    return [
        fake_node(f"gke-local-{DEFAULT_POOL}-{i}", DEFAULT_POOL, labels, capacity)
        for i in range(count)
    ]


def tpu_pool_nodes(
    pool: str, accelerator: str, topology: str, chips_per_pod: int = 0
) -> list[dict]:
    shape = tpu_slice_shape(accelerator, topology, chips_per_pod)
    labels = {
        TPU_ACCELERATOR_LABEL: accelerator,
        TPU_TOPOLOGY_LABEL: topology,
        "node.kubernetes.io/instance-type": shape.machine_type,
    }
    capacity = {
        "cpu": "224",
        "memory": "400Gi",
        "pods": "110",
        "ephemeral-storage": "100Gi",
        TPU_RESOURCE: str(shape.chips_per_host),
    }
    taints = [{"key": TPU_RESOURCE, "value": "present", "effect": "NoSchedule"}]
    return [
        fake_node(f"gke-{pool}-{i}", pool, labels, capacity, taints, auto=True)
        for i in range(shape.hosts)
    ]


def gpu_pool_nodes(pool: str, accelerator: str, nodes: int, requested_per_pod: int) -> list[dict]:
    machine, gpus = gpu_machine(accelerator, requested_per_pod)
    labels = {GPU_ACCELERATOR_LABEL: accelerator, "node.kubernetes.io/instance-type": machine}
    capacity = {
        "cpu": "208",
        "memory": "1800Gi",
        "pods": "110",
        "ephemeral-storage": "100Gi",
        GPU_RESOURCE: str(gpus),
    }
    # GKE's taint; the apiserver's ExtendedResourceToleration admission plugin gives pods
    # that request nvidia.com/gpu the matching toleration, so only they land here.
    taints = [{"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}]
    return [
        fake_node(f"gke-{pool}-{i}", pool, labels, capacity, taints, auto=True)
        for i in range(nodes)
    ]


def pool_request(pod: dict) -> tuple[str, str, str] | None:
    """What kind of new pool a pending pod asks for: ("tpu", accel, topology), ("gpu", accel, "")
    or None (plain pods, and pods pinned to an existing pool by name)."""
    selector = pod.get("spec", {}).get("nodeSelector") or {}
    if NODEPOOL_LABEL in selector:
        return None
    if TPU_ACCELERATOR_LABEL in selector and TPU_TOPOLOGY_LABEL in selector:
        return ("tpu", selector[TPU_ACCELERATOR_LABEL], selector[TPU_TOPOLOGY_LABEL])
    if GPU_ACCELERATOR_LABEL in selector:
        return ("gpu", selector[GPU_ACCELERATOR_LABEL], "")
    return None


def group_key(pod: dict) -> str:
    """Pods of one Job share a pool (one slice); any other pod is a group of its own."""
    for ref in pod["metadata"].get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "Job":
            return f"job/{ref['uid']}"
    return f"pod/{pod['metadata']['uid']}"


def pool_name(kind: str, accelerator: str, topology: str) -> str:
    short = (
        accelerator.removeprefix("tpu-")
        .removeprefix("nvidia-")
        .replace("-podslice", "")
        .replace("-slice", "")
    )
    return "-".join(p for p in ("nap", short, topology, secrets.token_hex(3)) if p)


# ---- the controller loop -------------------------------------------------------------------


class Provisioner:
    def __init__(self, core, grace_s: float, scale_down_after_s: float):
        self.core = core
        self.grace_s = grace_s
        self.scale_down_after_s = scale_down_after_s
        self.provisioned: dict[str, str] = {}  # group key -> pool created for it
        self.first_seen: dict[str, float] = {}  # group key -> when first seen unschedulable
        self.idle_since: dict[str, float] = {}  # auto pool -> when it was last seen without pods
        self.last_scale_down = 0.0

    def create_nodes(self, nodes: list[dict]) -> None:
        from kubernetes.client.exceptions import ApiException

        for node in nodes:
            try:
                self.core.create_node(node)
            except ApiException as e:
                if e.status != 409:  # already there: a restart of this process
                    raise

    def ensure_default_pool(self, count: int) -> None:
        self.create_nodes(default_pool_nodes(count))
        log.info("default pool: %d nodes", count)

    def step(self) -> None:
        now = time.monotonic()
        pods = _items(self.core.list_pod_for_all_namespaces, field_selector="status.phase=Pending")
        groups: dict[str, list[dict]] = {}
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp") or not _unschedulable(pod):
                continue
            groups.setdefault(group_key(pod), []).append(pod)
        for key in list(self.first_seen):
            if key not in groups:
                del self.first_seen[key]
        for key, members in groups.items():
            if key in self.provisioned:
                continue
            # Give the scheduler a moment: right after pods are deleted (e.g. a JobSet restart)
            # it may still report Unschedulable for pods that will fit on the freed nodes.
            if now - self.first_seen.setdefault(key, now) < self.grace_s:
                continue
            request = pool_request(members[0])
            if request is None:
                continue
            try:
                self.provision(key, request, members)
            except ValueError as e:  # an accelerator or topology GKE would not offer either
                log.warning("cannot provision for %s: %s", key, e)
                self.provisioned[key] = ""
        if now - self.last_scale_down >= 10:  # it lists every pod: not every scan
            self.last_scale_down = now
            self.scale_down(now)

    def provision(self, key: str, request: tuple[str, str, str], members: list[dict]) -> None:
        kind, accelerator, topology = request
        pool = pool_name(kind, accelerator, topology)
        if kind == "tpu":
            chips = _requested(members[0], TPU_RESOURCE)
            nodes = tpu_pool_nodes(pool, accelerator, topology, chips)
        else:
            nodes = gpu_pool_nodes(
                pool,
                accelerator,
                self.group_size(key, members),
                _requested(members[0], GPU_RESOURCE),
            )
        self.create_nodes(nodes)
        self.provisioned[key] = pool
        log.info(
            "created pool %s (%s %s %s, %d nodes) for %s",
            pool,
            kind,
            accelerator,
            topology,
            len(nodes),
            key,
        )

    def group_size(self, key: str, members: list[dict]) -> int:
        """Pods a GPU group will have: the Job's parallelism, else the pods seen pending."""
        if key.startswith("job/"):
            ref = next(
                r for r in members[0]["metadata"]["ownerReferences"] if r.get("kind") == "Job"
            )
            try:
                from kubernetes import client

                job = client.BatchV1Api(self.core.api_client).read_namespaced_job(
                    ref["name"], members[0]["metadata"]["namespace"]
                )
                return max((job.spec.parallelism if job.spec else None) or 1, len(members))
            except Exception as e:  # the Job may be gone already; the pods seen are enough
                log.debug("reading Job %s: %s", ref["name"], e)
        return len(members)

    def scale_down(self, now: float) -> None:
        if self.scale_down_after_s <= 0:
            return
        pools: dict[str, list[str]] = {}
        for node in _items(self.core.list_node, label_selector=f"{AUTO_LABEL}=true"):
            pools.setdefault(node["metadata"]["labels"][NODEPOOL_LABEL], []).append(
                node["metadata"]["name"]
            )
        if not pools:
            return
        busy = set()
        for pod in _items(self.core.list_pod_for_all_namespaces):
            if pod["spec"].get("nodeName") and pod.get("status", {}).get("phase") in (
                "Pending",
                "Running",
            ):
                busy.add(pod["spec"]["nodeName"])
        for pool, names in pools.items():
            if any(n in busy for n in names) or self._waiting_for(pool):
                self.idle_since.pop(pool, None)
                continue
            if now - self.idle_since.setdefault(pool, now) >= self.scale_down_after_s:
                for name in names:
                    self.core.delete_node(name)
                self.idle_since.pop(pool, None)
                self.provisioned = {k: v for k, v in self.provisioned.items() if v != pool}
                log.info("deleted idle pool %s (%d nodes)", pool, len(names))

    def _waiting_for(self, pool: str) -> bool:
        """A pool just created for a group that is still pending counts as in use."""
        return any(v == pool and k in self.first_seen for k, v in self.provisioned.items())


def _unschedulable(pod: dict) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if (
            cond["type"] == "PodScheduled"
            and cond["status"] == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return True
    return False


def _requested(pod: dict, resource: str) -> int:
    total = 0
    for c in pod["spec"].get("containers") or []:
        limits = (c.get("resources") or {}).get("limits") or {}
        requests = (c.get("resources") or {}).get("requests") or {}
        total += int(limits.get(resource) or requests.get(resource) or 0)
    return total


def _items(list_fn, **kwargs) -> list[dict]:
    """List objects as the API's own JSON (camelCase), which the pure functions above read."""
    resp = list_fn(_preload_content=False, **kwargs)
    return json.loads(resp.data)["items"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="GKE-like node auto-provisioning for the kwok cluster")
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--default-pool-nodes", type=int, default=4)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between scans")
    ap.add_argument(
        "--grace",
        type=float,
        default=2.0,
        help="seconds a group stays unschedulable before a pool is made",
    )
    ap.add_argument(
        "--scale-down-after",
        type=float,
        default=60.0,
        help="delete an auto-provisioned pool idle this long (0: never)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(message)s"
    )

    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(config_file=args.kubeconfig))
    prov = Provisioner(core, args.grace, args.scale_down_after)
    prov.ensure_default_pool(args.default_pool_nodes)
    while True:
        try:
            prov.step()
        except Exception:  # keep going: the apiserver may be restarting; the log says why
            log.exception("scan failed")
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
