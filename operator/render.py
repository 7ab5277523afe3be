"""PostTrainJob -> Kubernetes manifests: a ConfigMap holding the recipe and one JobSet.

`render(job)` is the whole of the operator's knowledge of TPU and GPU node pools, and a pure
function: no I/O, no clock, no globals, no environment. `posttrain render FILE` prints it (a
dry run, like `helm template`); the operator applies it.

Shape of the JobSet (replicated job `slice` on TPU, `node` on GPU and CPU):

    TPU   replicas = slices; each child Job is one slice: parallelism = completions = hosts,
          completionMode Indexed; one pod per TPU VM asking for `google.com/tpu` = chips per
          host, on nodes labelled with the GKE TPU accelerator and topology. Multislice adds
          JobSet's exclusive-topology annotation (one slice per node pool) and MEGASCALE_*.
    GPU   replicas = 1, parallelism = completions = nodes; `nvidia.com/gpu` per pod.
    cpu   replicas = 1, parallelism = completions = nodes; plain pods.

Async RL (`spec.rollout.mode: async`) adds a second replicated job to the same JobSet, `rollout`:
replicas = rollout workers, each child Job one pod (one host of `spec.rollout.resources`, default
`spec.resources`) on its own node pool. The trainer's replicated job is unchanged; its pods also
get the role and the trainer's rollout service address (POSTTRAIN_ROLE, POSTTRAIN_TRAINER_ADDRESS,
port 8477). A worker is one process: no jax.distributed or MEGASCALE_* variables, its index from
the JobSet job index. Its Job recreates a failed pod in place (a large backoffLimit; disruptions
ignored), so a worker's crash restarts neither the trainer nor the set; the set succeeds when the
trainer's replicated job does (successPolicy), and Kueue admits both roles as one Workload.

Every pod gets the environment of `posttrain.runtime` (the contract with the trainer's
distributed init). The slice id and the host id come from the downward API: JobSet puts the
job index on each pod (`jobset.sigs.k8s.io/job-index`), the Job controller the completion
index (`batch.kubernetes.io/job-completion-index`). The coordinator is pod 0 of slice 0,
reached through the headless Service JobSet creates for `network.enableDNSHostnames`:
`<jobset>-<replicatedJob>-0-0.<subdomain>`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import yaml

from posttrain import __version__, runtime
from posttrain.api import accelerators as acc
from posttrain.api.geometry import check_geometry
from posttrain.api.load import FieldError, JobInvalid
from posttrain.api.v1alpha1 import (
    API_VERSION,
    KIND,
    OUTPUT_BESIDE_CHECKPOINTS,
    OUTPUT_DIR_REQUIRED,
    FieldValueError,
    PostTrainJob,
    ResourcesSpec,
)

JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"

# Labels on everything the operator makes; JOB_LABEL finds a PostTrainJob's children.
JOB_LABEL = "posttrain.dev/job"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "posttrain-operator"
# Kueue's own convention: labels on the job object. A PostTrainJob labelled with QUEUE_LABEL is
# queued exactly like one with spec.scheduling.queueName; both are carried to the JobSet, which
# is what Kueue watches.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"

# Set by the JobSet controller / Job controller on every pod; read through the downward API.
JOBSET_JOB_INDEX = "jobset.sigs.k8s.io/job-index"
JOB_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
EXCLUSIVE_TOPOLOGY = "alpha.jobset.sigs.k8s.io/exclusive-topology"
NODEPOOL_LABEL = "cloud.google.com/gke-nodepool"

GKE_TPU_ACCELERATOR = "cloud.google.com/gke-tpu-accelerator"
GKE_TPU_TOPOLOGY = "cloud.google.com/gke-tpu-topology"
GKE_ACCELERATOR = "cloud.google.com/gke-accelerator"
TPU_RESOURCE = "google.com/tpu"
GPU_RESOURCE = "nvidia.com/gpu"

# PostTrainJob annotations copied to the trainer pods, except these prefixes: kubectl's
# bookkeeping and the operator's own (kopf's progress and diff-base).
OPERATOR_ANNOTATION_PREFIX = "operator.posttrain.dev/"
NOT_COPIED_ANNOTATION_PREFIXES = ("kubectl.kubernetes.io/", OPERATOR_ANNOTATION_PREFIX)

CONTAINER = "trainer"
RECIPE_KEY = "recipe.yaml"
RECIPE_DIR = os.path.dirname(runtime.RECIPE_PATH)
DEFAULT_SERVICE_ACCOUNT = "posttrain-trainer"
TRAINER_UID = 65532  # USER of images/trainer/Dockerfile
# What every trainer pod runs: the trainer image's entrypoint (trainer/__main__.py), which reads
# the recipe and the env contract. Explicit, so an image given in spec.image runs it too.
TRAINER_COMMAND = ("python", "-m", "posttrain.trainer")
TRAINER_ARGS = ("--recipe", runtime.RECIPE_PATH)

# Failures a restart cannot fix end the job at once; disruptions restart it for free. The Job's
# podFailurePolicy fails the Job with reason PodFailurePolicy and a message ending in "matching
# FailJob rule at index N"; JobSet's rules (v0.10+: onJobFailureMessagePatterns) tell the two
# apart. Any other failure (a crash, OOM) restarts the set and counts towards maxRestarts.
CONFIG_ERROR_RULE, DISRUPTION_RULE = "ConfigurationError", "Disruption"
POD_FAILURE_RULES = (
    # index 0: the trainer refused its configuration (runtime.EXIT_CONFIG)
    {
        "action": "FailJob",
        "onExitCodes": {
            "containerName": CONTAINER,
            "operator": "In",
            "values": [runtime.EXIT_CONFIG],
        },
    },
    # index 1: preemption, eviction, node loss (the pod's DisruptionTarget condition)
    {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
)
JOBSET_FAILURE_RULES = (
    {
        "name": CONFIG_ERROR_RULE,
        "action": "FailJobSet",
        "onJobFailureReasons": ["PodFailurePolicy"],
        "onJobFailureMessagePatterns": ["matching FailJob rule at index 0$"],
    },
    {
        "name": DISRUPTION_RULE,
        "action": "RestartJobSetAndIgnoreMaxRestarts",
        "onJobFailureReasons": ["PodFailurePolicy"],
        "onJobFailureMessagePatterns": ["matching FailJob rule at index 1$"],
    },
)

# Async RL: the rollout workers' replicated job. Each child Job is one worker pod; a crash is
# retried in place by its Job up to ROLLOUT_BACKOFF_LIMIT times (the Job controller's back-off
# between tries grows to 6 minutes), a disruption (eviction, node loss) not counted at all, so
# neither restarts the trainer. A configuration error (exit 78) still fails the set (rule 0).
ROLLOUT_JOB = "rollout"
ROLLOUT_BACKOFF_LIMIT = 1000
ROLLOUT_POD_FAILURE_RULES = (
    POD_FAILURE_RULES[0],
    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
)

# Pod names are <jobset>-<rjob>-<jobIndex>-<podIndex>-<5 random>, at most 63 characters
# (JobSet's webhook refuses longer ones).
MAX_POD_NAME = 63
POD_NAME_SUFFIX = 6  # "-abcde"


@dataclass(frozen=True)
class ImageDefaults:
    """The trainer image per accelerator family when `spec.image` is unset.

    The operator takes these from flags or environment (`--trainer-image-tpu`,
    POSTTRAIN_TRAINER_IMAGE_TPU, ...), which the Helm chart sets.
    """

    tpu: str = f"posttrain/trainer:{__version__}-tpu"
    gpu: str = f"posttrain/trainer:{__version__}-gpu"
    cpu: str = f"posttrain/trainer:{__version__}-cpu"

    ENV_PREFIX: ClassVar[str] = "POSTTRAIN_TRAINER_IMAGE_"

    def for_accelerator(self, accelerator: str) -> str:
        if acc.is_tpu(accelerator):
            return self.tpu
        if acc.is_gpu(accelerator):
            return self.gpu
        return self.cpu

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ImageDefaults:
        found = {k: env.get(cls.ENV_PREFIX + k.upper()) for k in ("tpu", "gpu", "cpu")}
        return replace(cls(), **{k: v for k, v in found.items() if v})


@dataclass(frozen=True)
class Shape:
    """How a job maps onto pods: `replicas` child Jobs of `pods` pods each."""

    replicated_job: str
    replicas: int  # JobSet replicas = slices (TPU), 1 otherwise
    pods: int  # parallelism = completions per child Job
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    accelerator_resources: dict[str, str] = field(default_factory=dict)
    resources: ResourcesSpec | None = None  # what the pods ask for (cpu, memory, accelerator)

    @property
    def multislice(self) -> bool:
        return self.replicated_job == "slice" and self.replicas > 1


def shape_of(job: PostTrainJob) -> Shape:
    """The trainer's replicated job: `slice` on TPU, `node` on GPU and CPU."""
    r = job.spec.resources
    name = "slice" if acc.is_tpu(r.accelerator) else "node"
    return _shape(r, name, r.slices if acc.is_tpu(r.accelerator) else 1)


def rollout_shape_of(job: PostTrainJob) -> Shape | None:
    """The rollout workers' replicated job of an async RL job (None otherwise): `rollout`, one
    replica per worker, one pod each, on `spec.rollout.resources` (default spec.resources)."""
    role = job.spec.rollout_role
    if not role.is_async:
        return None
    resources = role.resources or job.spec.resources
    shape = _shape(resources, ROLLOUT_JOB, role.workers)
    assert shape.pods == 1  # the model requires one host per worker
    return shape


def _shape(r: ResourcesSpec, name: str, replicas: int) -> Shape:
    if acc.is_tpu(r.accelerator):
        assert r.topology is not None  # the model requires it for TPUs
        s = acc.tpu_slice_shape(r.accelerator, r.topology, r.chips_per_host)
        gen = acc.TPU_GENERATIONS[r.accelerator]
        return Shape(
            name,
            replicas=replicas,
            pods=s.hosts,
            node_selector={
                GKE_TPU_ACCELERATOR: gen.gke_accelerator,
                GKE_TPU_TOPOLOGY: r.topology,
                **acc.host_machine_selector(r.accelerator, r.topology, s.chips_per_host),
            },
            tolerations=[{"key": TPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
            accelerator_resources={TPU_RESOURCE: str(s.chips_per_host)},
            resources=r,
        )
    if acc.is_gpu(r.accelerator):
        return Shape(
            name,
            replicas=replicas,
            pods=r.nodes,
            node_selector={GKE_ACCELERATOR: acc.GPU_TYPES[r.accelerator][0]},
            tolerations=[{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
            accelerator_resources={GPU_RESOURCE: str(r.gpus)},
            resources=r,
        )
    return Shape(name, replicas=replicas, pods=r.nodes, resources=r)


def job_labels(job: PostTrainJob) -> dict[str, str]:
    return {
        str(k): str(v) for k, v in ((job.metadata.model_extra or {}).get("labels") or {}).items()
    }


def queue_name(job: PostTrainJob) -> str | None:
    """The Kueue LocalQueue: the job's `kueue.x-k8s.io/queue-name` label (Kueue's convention),
    else spec.scheduling.queueName (check_renderable refuses the two disagreeing)."""
    return job_labels(job).get(QUEUE_LABEL) or job.spec.scheduling.queue_name or None


def jobset_name(job: PostTrainJob) -> str:
    return _name(job)


def configmap_name(job: PostTrainJob) -> str:
    return f"{_name(job)}-recipe"


def coordinator_host(job: PostTrainJob) -> str:
    """DNS name of pod 0 of slice 0 (JobSet's headless service has the JobSet's name)."""
    name = jobset_name(job)
    return f"{name}-{shape_of(job).replicated_job}-0-0.{name}"


def trainer_address(job: PostTrainJob) -> str:
    """host:port of the trainer's rollout service (async RL): process 0 of the trainer, the
    coordinator's pod."""
    return f"{coordinator_host(job)}:{runtime.ROLLOUT_PORT}"


def output_dir(job: PostTrainJob) -> str | None:
    """`spec.output.dir`, else beside the checkpoints: `<training.checkpoint.dir>-output`
    (gs://b/ckpt/run -> gs://b/ckpt/run-output). None when neither is set."""
    if job.spec.output.dir:
        return job.spec.output.dir
    ckpt = job.spec.training.checkpoint.dir
    return ckpt.rstrip("/") + OUTPUT_BESIDE_CHECKPOINTS if ckpt else None


def render(job: PostTrainJob, *, image_defaults: ImageDefaults | None = None) -> list[dict]:
    """The manifests for `job`: [ConfigMap (recipe), JobSet]. Raises JobInvalid naming the field
    when the job cannot be rendered (a name too long for its pods, a reserved env name, ...)."""
    images = image_defaults or ImageDefaults()
    check_renderable(job)
    return [_configmap(job), _jobset(job, images)]


def recipe(job: PostTrainJob) -> dict[str, Any]:
    """The validated manifest the trainer reads: defaults filled in (`output.dir` too), no
    status, metadata cut to name and namespace (so the recipe does not change with the object's
    bookkeeping)."""
    meta = {k: v for k, v in (("name", job.metadata.name), ("namespace", job.metadata.namespace))}
    spec = job.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    out = output_dir(job)
    if out:
        spec.setdefault("output", {})["dir"] = out
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {k: v for k, v in meta.items() if v},
        "spec": spec,
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the recipe) as literal blocks, so they read like the file they are."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(manifests: list[dict]) -> str:
    """Multi-document YAML, keys in the order rendered (like `helm template`)."""
    return yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False, width=100)


# ---------------------------------------------------------------------------------------------


def _name(job: PostTrainJob) -> str:
    if not job.metadata.name:
        raise JobInvalid([FieldError("metadata.name", "required field is missing")])
    return job.metadata.name


def check_renderable(job: PostTrainJob) -> None:
    """What a cluster needs beyond a valid spec (`posttrain validate` checks it too); raises
    JobInvalid naming each field."""
    errors: list[FieldError] = []
    name = _name(job)
    shape = shape_of(job)
    shapes = [s for s in (shape, rollout_shape_of(job)) if s is not None]
    longest_shape = max(shapes, key=lambda s: len(_last_pod(name, s)))
    longest = len(_last_pod(name, longest_shape))
    if longest + POD_NAME_SUFFIX > MAX_POD_NAME:
        fixed = longest - len(name) + POD_NAME_SUFFIX
        what = "<slice>-<host>" if longest_shape is shape else "<worker>-0"
        errors.append(
            FieldError(
                "metadata.name",
                f"{name!r} is too long for this job's pod names ({name}-"
                f"{longest_shape.replicated_job}-{what}-xxxxx must fit in {MAX_POD_NAME} "
                f"characters): use at most {MAX_POD_NAME - fixed} characters",
            )
        )
    for s in shapes:
        source = "spec.resources" if s is shape else "spec.rollout.resources"
        for key in sorted(set(job.spec.scheduling.node_selector) & set(s.node_selector)):
            errors.append(
                FieldError(
                    f"spec.scheduling.nodeSelector.{key}",
                    f"set from {source} ({s.node_selector[key]!r}); remove it here",
                )
            )
    if not output_dir(job):
        errors.append(FieldError("spec.output.dir", OUTPUT_DIR_REQUIRED))
    labelled, given = job_labels(job).get(QUEUE_LABEL), job.spec.scheduling.queue_name
    if labelled is not None and given and labelled != given:
        errors.append(
            FieldError(
                "spec.scheduling.queueName",
                f"{given!r} disagrees with the label metadata.labels[{QUEUE_LABEL!r}] "
                f"({labelled!r}): give the queue once (the label, as Kueue does), or the same in both",
            )
        )
    try:
        check_geometry(job.spec)
    except FieldValueError as err:
        errors.append(FieldError(err.field, str(err)))
    reserved = {e["name"] for e in _contract_env(job, shape)} | set(ROLE_ENV)
    for i, var in enumerate(job.spec.env):
        if var.name in reserved:
            errors.append(
                FieldError(
                    f"spec.env[{i}].name",
                    f"{var.name} is set by the operator (the trainer's distributed-init contract)",
                )
            )
    if errors:
        raise JobInvalid(errors)


def _last_pod(name: str, shape: Shape) -> str:
    """The longest pod name of `shape` before JobSet's random suffix."""
    return f"{name}-{shape.replicated_job}-{shape.replicas - 1}-{shape.pods - 1}"


def _labels(job: PostTrainJob) -> dict[str, str]:
    return {JOB_LABEL: _name(job), MANAGED_BY_LABEL: MANAGED_BY}


def _metadata(job: PostTrainJob, name: str, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if job.metadata.namespace:
        meta["namespace"] = job.metadata.namespace
    meta["labels"] = _labels(job)
    meta.update({k: v for k, v in extra.items() if v})
    uid = (job.metadata.model_extra or {}).get("uid")
    if uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": _name(job),
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


def _configmap(job: PostTrainJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, configmap_name(job)),
        "data": {RECIPE_KEY: yaml.safe_dump(recipe(job), sort_keys=False, width=100)},
    }


def _field_ref(path: str) -> dict[str, Any]:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def _contract_env(job: PostTrainJob, shape: Shape) -> list[dict[str, Any]]:
    """The env of runtime.py's contract, in a fixed order."""
    env: list[dict[str, Any]] = [
        {"name": runtime.JOB_NAME, "value": _name(job)},
        {"name": runtime.NAMESPACE, **_field_ref("metadata.namespace")},
        {"name": runtime.RECIPE, "value": runtime.RECIPE_PATH},
        {
            "name": runtime.COORDINATOR_ADDRESS,
            "value": f"{coordinator_host(job)}:{runtime.COORDINATOR_PORT}",
        },
        {"name": runtime.NUM_SLICES, "value": str(shape.replicas)},
        {"name": runtime.HOSTS_PER_SLICE, "value": str(shape.pods)},
        {"name": runtime.SLICE_ID, **_field_ref(f"metadata.annotations['{JOBSET_JOB_INDEX}']")},
        {"name": runtime.HOST_ID, **_field_ref(f"metadata.annotations['{JOB_COMPLETION_INDEX}']")},
    ]
    if shape.multislice:
        env += [
            {"name": runtime.MEGASCALE_COORDINATOR_ADDRESS, "value": coordinator_host(job)},
            {"name": runtime.MEGASCALE_NUM_SLICES, "value": str(shape.replicas)},
            {
                "name": runtime.MEGASCALE_SLICE_ID,
                **_field_ref(f"metadata.annotations['{JOBSET_JOB_INDEX}']"),
            },
            {"name": runtime.MEGASCALE_PORT_ENV, "value": str(runtime.MEGASCALE_PORT)},
        ]
    if job.spec.rollout_role.is_async:
        env += [
            {"name": runtime.ROLE, "value": runtime.ROLE_TRAINER},
            {"name": runtime.TRAINER_ADDRESS, "value": trainer_address(job)},
        ]
    return env


# The role variables of async RL: set by the operator on every pod of an async job, and refused
# in spec.env of any job (a sync job's trainer given POSTTRAIN_ROLE=rollout would not train).
ROLE_ENV = (runtime.ROLE, runtime.TRAINER_ADDRESS, runtime.ROLLOUT_WORKER)


def _rollout_env(job: PostTrainJob) -> list[dict[str, Any]]:
    """A rollout worker's env: which job, the recipe, its role, the trainer's rollout service
    and its index; no coordinator, slice or host (a worker is its own single process)."""
    return [
        {"name": runtime.JOB_NAME, "value": _name(job)},
        {"name": runtime.NAMESPACE, **_field_ref("metadata.namespace")},
        {"name": runtime.RECIPE, "value": runtime.RECIPE_PATH},
        {"name": runtime.ROLE, "value": runtime.ROLE_ROLLOUT},
        {"name": runtime.TRAINER_ADDRESS, "value": trainer_address(job)},
        {
            "name": runtime.ROLLOUT_WORKER,
            **_field_ref(f"metadata.annotations['{JOBSET_JOB_INDEX}']"),
        },
    ]


def _user_env(job: PostTrainJob) -> list[dict[str, Any]]:
    out = []
    for var in job.spec.env:
        if var.value_from is not None:
            ref = var.value_from.secret_key_ref
            out.append(
                {
                    "name": var.name,
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
                }
            )
        else:
            out.append({"name": var.name, "value": var.value or ""})
    return out


def _resources(job: PostTrainJob, shape: Shape) -> dict[str, Any]:
    r = shape.resources or job.spec.resources
    requests: dict[str, str] = {}
    if r.cpu:
        requests["cpu"] = r.cpu
    if r.memory:
        requests["memory"] = r.memory
    requests.update(shape.accelerator_resources)
    limits = dict(shape.accelerator_resources)
    if r.memory:
        limits["memory"] = r.memory
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _pod_annotations(job: PostTrainJob) -> dict[str, str]:
    annotations = (job.metadata.model_extra or {}).get("annotations") or {}
    return {
        k: str(v)
        for k, v in sorted(annotations.items())
        if not k.startswith(NOT_COPIED_ANNOTATION_PREFIXES)
    }


def _pod_template(
    job: PostTrainJob, shape: Shape, images: ImageDefaults, *, rollout: bool = False
) -> dict[str, Any]:
    """A trainer pod, or (`rollout`) an async job's rollout worker: the same image, entrypoint
    and recipe, switched by POSTTRAIN_ROLE."""
    spec = job.spec
    accelerator = (shape.resources or spec.resources).accelerator
    ports: list[dict[str, Any]] = []
    if rollout:
        env = _rollout_env(job)
    else:
        env = _contract_env(job, shape)
        ports.append({"name": "coordinator", "containerPort": runtime.COORDINATOR_PORT})
        if shape.multislice:
            ports.append({"name": "megascale", "containerPort": runtime.MEGASCALE_PORT})
        if spec.rollout_role.is_async:
            ports.append({"name": "rollout", "containerPort": runtime.ROLLOUT_PORT})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or images.for_accelerator(accelerator),
        "command": list(TRAINER_COMMAND),
        "args": list(TRAINER_ARGS),
        "env": env + _user_env(job),
    }
    if ports:
        container["ports"] = ports
    container |= {
        "volumeMounts": [{"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True}],
        # A failed trainer's last log lines become the pod's termination message, which the
        # job's Failed condition quotes (e.g. the field a configuration error names).
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = _resources(job, shape)
    if resources:
        container["resources"] = resources
    volumes: list[dict[str, Any]] = [
        {"name": "recipe", "configMap": {"name": configmap_name(job)}},
    ]
    if acc.is_gpu(accelerator):
        # NCCL needs more shared memory than the container runtime's 64 MiB default.
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})

    container["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": spec.service_account_name or DEFAULT_SERVICE_ACCOUNT,
        # The trainer image's user (images/trainer/Dockerfile); passes the restricted Pod
        # Security Standard, and fsGroup makes mounted output volumes writable for it.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if spec.scheduling.priority_class_name:
        pod["priorityClassName"] = spec.scheduling.priority_class_name
    selector = {**shape.node_selector, **spec.scheduling.node_selector}
    if selector:
        pod["nodeSelector"] = selector
    tolerations = shape.tolerations + [
        t.model_dump(mode="json", by_alias=True, exclude_none=True)
        for t in spec.scheduling.tolerations
    ]
    if tolerations:
        pod["tolerations"] = tolerations
    pod["containers"] = [container]
    pod["volumes"] = volumes

    meta: dict[str, Any] = {"labels": _labels(job)}
    annotations = _pod_annotations(job)
    if annotations:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": pod}


def _jobset(job: PostTrainJob, images: ImageDefaults) -> dict[str, Any]:
    spec = job.spec
    shape = shape_of(job)
    name = jobset_name(job)
    labels = _labels(job)
    annotations = {EXCLUSIVE_TOPOLOGY: NODEPOOL_LABEL} if shape.multislice else None
    meta = _metadata(job, name, annotations=annotations)
    queue = queue_name(job)
    if queue:
        meta["labels"][QUEUE_LABEL] = queue
    priority = job_labels(job).get(PRIORITY_CLASS_LABEL)
    if priority:
        meta["labels"][PRIORITY_CLASS_LABEL] = priority
    child_job = {
        "metadata": {"labels": labels},
        "spec": {
            "parallelism": shape.pods,
            "completions": shape.pods,
            "completionMode": "Indexed",
            # One failed pod fails its Job at once; JobSet's failurePolicy restarts the whole
            # set (every host must rejoin the same distributed job).
            "backoffLimit": 0,
            "podFailurePolicy": {"rules": list(POD_FAILURE_RULES)},
            "template": _pod_template(job, shape, images),
        },
    }
    replicated_jobs = [
        {"name": shape.replicated_job, "replicas": shape.replicas, "template": child_job}
    ]
    rollout = rollout_shape_of(job)
    if rollout is not None:
        replicated_jobs.append(
            {
                "name": rollout.replicated_job,
                "replicas": rollout.replicas,
                "template": {
                    "metadata": {"labels": dict(labels)},
                    "spec": {
                        "parallelism": 1,
                        "completions": 1,
                        # A worker's crash is retried in place; a disruption is not counted.
                        "backoffLimit": ROLLOUT_BACKOFF_LIMIT,
                        "podFailurePolicy": {
                            "rules": copy.deepcopy(list(ROLLOUT_POD_FAILURE_RULES))
                        },
                        "template": _pod_template(job, rollout, images, rollout=True),
                    },
                },
            }
        )
    jobset_spec: dict[str, Any] = {
        # With a Kueue queue the JobSet starts suspended and Kueue admits (unsuspends) it.
        "suspend": spec.suspend or bool(queue),
        "failurePolicy": {
            "maxRestarts": spec.max_restarts,
            "rules": [dict(rule) for rule in JOBSET_FAILURE_RULES],
        },
    }
    if rollout is not None:
        # Done when the trainer is: the workers' Jobs never complete on their own (JobSet
        # deletes them once the set has completed).
        jobset_spec["successPolicy"] = {
            "operator": "All",
            "targetReplicatedJobs": [shape.replicated_job],
        }
    jobset_spec |= {
        "network": {
            "enableDNSHostnames": True,
            "subdomain": name,
            "publishNotReadyAddresses": True,
        },
        "coordinator": {"replicatedJob": shape.replicated_job, "jobIndex": 0, "podIndex": 0},
        "replicatedJobs": replicated_jobs,
    }
    return {
        "apiVersion": JOBSET_API_VERSION,
        "kind": "JobSet",
        "metadata": meta,
        "spec": jobset_spec,
    }
