"""The renderer: golden files for a few jobs, table tests over the whole accelerator catalogue."""

from __future__ import annotations

import copy
import difflib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from posttrain import runtime
from posttrain.api import JobInvalid, parse_job
from posttrain.api import accelerators as acc
from posttrain.api import v1alpha1 as api
from posttrain.operator import render as r

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
ROOT = HERE.parents[1]

BASE: dict[str, Any] = {
    "apiVersion": "posttrain.dev/v1alpha1",
    "kind": "PostTrainJob",
    "metadata": {"name": "t", "namespace": "ml", "uid": "0b1c2d3e-0000-4000-8000-000000000001"},
    "spec": {
        "algorithm": "sft",
        "model": {"base": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
        "data": {"train": "gs://b/train.jsonl"},
        "training": {"steps": 10},
        "resources": {"accelerator": "cpu"},
        "output": {"dir": "gs://b/runs/t"},
    },
}


def make(resources: dict[str, Any] | None = None, **spec: Any) -> api.PostTrainJob:
    doc = copy.deepcopy(BASE)
    if resources is not None:
        doc["spec"]["resources"] = resources
    doc["spec"].update(spec)
    return parse_job(doc)


def jobset_of(job: api.PostTrainJob) -> dict[str, Any]:
    manifests = r.render(job)
    assert [m["kind"] for m in manifests] == ["ConfigMap", "JobSet"]
    return manifests[1]


def pod_spec(jobset: dict[str, Any]) -> dict[str, Any]:
    return jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


# ---- golden files ------------------------------------------------------------------------------

GOLDEN_JOBS: dict[str, dict[str, Any]] = {
    "tpu-v5e-2x4": {"resources": {"accelerator": "tpu-v5e", "topology": "2x4"}},
    "tpu-v5p-multislice": {
        "resources": {"accelerator": "tpu-v5p", "topology": "2x2x4", "slices": 2},
        "scheduling": {
            "queueName": "team-a",
            "priorityClassName": "high",
            "nodeSelector": {"example.com/pool": "reserved"},
            "tolerations": [{"key": "example.com/reserved", "operator": "Exists"}],
        },
        "maxRestarts": 5,
        "env": [
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            {"name": "XLA_FLAGS", "value": "--xla_dump_to=/tmp"},
        ],
    },
    "nvidia-h100-2-nodes": {
        "resources": {"accelerator": "nvidia-h100", "nodes": 2, "gpusPerNode": 8},
        "image": "example.com/trainer:dev",
        "serviceAccountName": "trainer",
        "suspend": True,
    },
    "cpu": {"resources": {"accelerator": "cpu", "cpu": "2", "memory": "4Gi"}},
    # async RL: the trainer on a v5e 2x4 host, two rollout workers on one L4 each; queued, so
    # Kueue admits both roles as one Workload
    "async-rl-tpu-trainer-gpu-rollout": {
        "algorithm": "grpo",
        "grpo": {"rewards": [{"builtin": "math-answer", "answerField": "answer"}]},
        "training": {"steps": 10, "batchSize": 8},
        "resources": {"accelerator": "tpu-v5e", "topology": "2x4"},
        "rollout": {
            "mode": "async",
            "replicas": 2,
            "maxPolicyLag": 2,
            "resources": {"accelerator": "nvidia-l4", "gpusPerNode": 1, "memory": "16Gi"},
        },
        "scheduling": {"queueName": "team-a"},
        "env": [{"name": "XLA_FLAGS", "value": "--xla_dump_to=/tmp"}],
    },
}


@pytest.mark.parametrize("name", sorted(GOLDEN_JOBS))
def test_golden(name: str, update_golden: bool) -> None:
    """Rendered YAML equals golden/NAME.yaml; `pytest --update-golden` rewrites them."""
    job = make(**GOLDEN_JOBS[name])
    got = r.to_yaml(r.render(job))
    path = GOLDEN / f"{name}.yaml"
    if update_golden:
        path.write_text(got)
    want = path.read_text()
    if got != want:
        diff = "".join(
            difflib.unified_diff(want.splitlines(True), got.splitlines(True), str(path), "rendered")
        )
        pytest.fail(f"render differs from {path.name} (pytest --update-golden):\n{diff}")


def test_render_is_deterministic_and_yaml_round_trips() -> None:
    job = make(**GOLDEN_JOBS["tpu-v5p-multislice"])
    first, second = r.render(job), r.render(job)
    assert first == second
    assert list(yaml.safe_load_all(r.to_yaml(first))) == first


# ---- the whole catalogue -------------------------------------------------------------------------

TPU_CASES = [(g, t) for g in acc.TPU_GENERATIONS for t in acc.TPU_GENERATIONS[g].topologies]


@pytest.mark.parametrize("slices", [1, 3])
@pytest.mark.parametrize("accelerator, topology", TPU_CASES)
def test_every_tpu_topology(accelerator: str, topology: str, slices: int) -> None:
    chips = acc.topology_chips(topology)
    # a batch that divides over every chip (a smaller one is refused: test_geometry.py)
    training = {"steps": 10, "batchSize": chips * slices}
    job = make(
        {"accelerator": accelerator, "topology": topology, "slices": slices}, training=training
    )
    js = jobset_of(job)
    single_host = topology in acc.TPU_GENERATIONS[accelerator].single_host
    per_host = chips if single_host else 4
    hosts = chips // per_host

    (rjob,) = js["spec"]["replicatedJobs"]
    assert rjob["name"] == "slice" and rjob["replicas"] == slices
    child = rjob["template"]["spec"]
    assert child["parallelism"] == child["completions"] == hosts
    assert child["completionMode"] == "Indexed"
    pod = pod_spec(js)
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": acc.TPU_GENERATIONS[accelerator].gke_accelerator,
        "cloud.google.com/gke-tpu-topology": topology,
    }
    res = pod["containers"][0]["resources"]
    assert res["requests"]["google.com/tpu"] == res["limits"]["google.com/tpu"] == str(per_host)
    assert {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["POSTTRAIN_HOSTS_PER_SLICE"]["value"] == str(hosts)
    assert env["POSTTRAIN_NUM_SLICES"]["value"] == str(slices)
    exclusive = js["metadata"].get("annotations", {}).get(r.EXCLUSIVE_TOPOLOGY)
    if slices > 1:
        assert exclusive == "cloud.google.com/gke-nodepool"
        assert env["MEGASCALE_NUM_SLICES"]["value"] == str(slices)
        assert "MEGASCALE_COORDINATOR_ADDRESS" in env and "MEGASCALE_SLICE_ID" in env
    else:
        assert exclusive is None
        assert not any(n.startswith("MEGASCALE_") for n in env)


def test_gke_accelerator_values() -> None:
    """The issue's GKE values, spelled out once so a catalogue typo shows up here."""
    assert {g: t.gke_accelerator for g, t in acc.TPU_GENERATIONS.items()} == {
        "tpu-v4": "tpu-v4-podslice",
        "tpu-v5e": "tpu-v5-lite-podslice",
        "tpu-v5p": "tpu-v5p-slice",
        "tpu-v6e": "tpu-v6e-slice",
    }
    assert {g: label for g, (label, _) in acc.GPU_TYPES.items()} == {
        "nvidia-h100": "nvidia-h100-80gb",
        "nvidia-h200": "nvidia-h200-141gb",
        "nvidia-a100": "nvidia-tesla-a100",
        "nvidia-l4": "nvidia-l4",
    }


@pytest.mark.parametrize("nodes", [1, 2, 16])
@pytest.mark.parametrize("accelerator", sorted(acc.GPU_TYPES))
def test_every_gpu_type(accelerator: str, nodes: int) -> None:
    gpus = min(4, acc.GPU_TYPES[accelerator][1])
    training = {"steps": 10, "batchSize": nodes * gpus}
    resources = {"accelerator": accelerator, "nodes": nodes, "gpusPerNode": gpus}
    js = jobset_of(make(resources, training=training))
    (rjob,) = js["spec"]["replicatedJobs"]
    assert rjob["name"] == "node" and rjob["replicas"] == 1
    assert (
        rjob["template"]["spec"]["parallelism"] == rjob["template"]["spec"]["completions"] == nodes
    )
    pod = pod_spec(js)
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": acc.GPU_TYPES[accelerator][0]
    }
    res = pod["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == str(gpus)
    assert "google.com/tpu" not in res["requests"]
    assert r.EXCLUSIVE_TOPOLOGY not in js["metadata"].get("annotations", {})


def test_gpu_default_is_8_per_node() -> None:
    training = {"steps": 10, "batchSize": 48}
    pod = pod_spec(jobset_of(make({"accelerator": "nvidia-h200", "nodes": 3}, training=training)))
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "8"}


def test_cpu_is_plain_pods() -> None:
    js = jobset_of(
        make({"accelerator": "cpu", "nodes": 3}, training={"steps": 10, "batchSize": 33})
    )
    pod = pod_spec(js)
    assert js["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] == 3
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "resources" not in pod["containers"][0]
    assert pod["containers"][0]["image"] == r.ImageDefaults().cpu


@pytest.mark.parametrize(
    "resources, field, listed",
    [
        ({"accelerator": "tpu-v5e", "topology": "2x2x2"}, "topology", "1x1, 2x2, 2x4, 4x4"),
        ({"accelerator": "tpu-v4", "topology": "2x4"}, "topology", "2x2x1, 2x2x2"),
        ({"accelerator": "tpu-v6e", "topology": "3x3"}, "topology", "8x16, 16x16"),
        ({"accelerator": "tpu-v5p"}, "topology", "2x2x1"),
        ({"accelerator": "tpu-v5e", "topology": "2x4", "nodes": 2}, "nodes", "topology"),
        ({"accelerator": "nvidia-l4", "topology": "2x4"}, "topology", "nodes"),
        ({"accelerator": "nvidia-h100", "gpusPerNode": 16}, "gpusPerNode", "8"),
        ({"accelerator": "nvidia-a100", "slices": 2}, "slices", "nodes"),
        ({"accelerator": "cpu", "gpusPerNode": 1}, "gpusPerNode", "GPUs"),
        ({"accelerator": "tpu-v7"}, "accelerator", "tpu-v5e"),
    ],
)
def test_invalid_combinations_list_valid_choices(
    resources: dict[str, Any], field: str, listed: str
) -> None:
    with pytest.raises(JobInvalid) as info:
        make(resources)
    errors = {e.path: e.message for e in info.value.errors}
    assert f"spec.resources.{field}" in errors, errors
    assert listed in errors[f"spec.resources.{field}"]


# ---- the rest of the spec ------------------------------------------------------------------------


def test_owner_reference_only_with_uid() -> None:
    job = make()
    for m in r.render(job):
        (ref,) = m["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "posttrain.dev/v1alpha1",
            "kind": "PostTrainJob",
            "name": "t",
            "uid": BASE["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    doc = copy.deepcopy(BASE)
    del doc["metadata"]["uid"]
    assert all("ownerReferences" not in m["metadata"] for m in r.render(parse_job(doc)))


def test_names_labels_and_recipe() -> None:
    cm, js = r.render(make())
    assert cm["metadata"]["name"] == "t-recipe" and js["metadata"]["name"] == "t"
    assert js["metadata"]["namespace"] == cm["metadata"]["namespace"] == "ml"
    for m in (cm, js):
        assert m["metadata"]["labels"][r.JOB_LABEL] == "t"
    recipe = yaml.safe_load(cm["data"]["recipe.yaml"])
    # The trainer parses the recipe with the same model and gets the same job back.
    assert parse_job(recipe).spec == make().spec
    assert recipe["metadata"] == {"name": "t", "namespace": "ml"}
    pod = pod_spec(js)
    assert pod["volumes"][0] == {"name": "recipe", "configMap": {"name": "t-recipe"}}
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/etc/posttrain"


def test_scheduling_and_service_account() -> None:
    js = jobset_of(make(**GOLDEN_JOBS["tpu-v5p-multislice"]))
    pod = pod_spec(js)
    assert js["metadata"]["labels"][r.QUEUE_LABEL] == "team-a"
    assert js["spec"]["suspend"] is True  # Kueue admits it by unsuspending
    assert js["spec"]["failurePolicy"]["maxRestarts"] == 5
    assert pod["priorityClassName"] == "high"
    assert pod["nodeSelector"]["example.com/pool"] == "reserved"
    assert {"key": "example.com/reserved", "operator": "Exists"} in pod["tolerations"]
    assert pod["serviceAccountName"] == "posttrain-trainer"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["XLA_FLAGS"]["value"] == "--xla_dump_to=/tmp"
    plain = jobset_of(make())
    assert plain["spec"]["suspend"] is False and r.QUEUE_LABEL not in plain["metadata"]["labels"]
    assert plain["spec"]["failurePolicy"]["maxRestarts"] == 3


def test_suspend() -> None:
    assert jobset_of(make(suspend=True))["spec"]["suspend"] is True


def test_images() -> None:
    images = r.ImageDefaults(tpu="t:1", gpu="g:1", cpu="c:1")
    for resources, want in (
        ({"accelerator": "tpu-v6e", "topology": "1x1"}, "t:1"),
        ({"accelerator": "nvidia-l4"}, "g:1"),
        ({"accelerator": "cpu"}, "c:1"),
    ):
        js = r.render(make(resources), image_defaults=images)[1]
        assert pod_spec(js)["containers"][0]["image"] == want
    js = r.render(make(image="mine:2"), image_defaults=images)[1]
    assert pod_spec(js)["containers"][0]["image"] == "mine:2"
    env = {"POSTTRAIN_TRAINER_IMAGE_GPU": "g:env"}
    assert r.ImageDefaults.from_env(env) == r.ImageDefaults(gpu="g:env")


def test_pod_annotations_copied_except_bookkeeping() -> None:
    doc = copy.deepcopy(BASE)
    doc["metadata"]["annotations"] = {
        "gke-gcsfuse/volumes": "true",
        "kubectl.kubernetes.io/last-applied-configuration": "{}",
        "operator.posttrain.dev/last-handled-configuration": "{}",
    }
    meta = jobset_of(parse_job(doc))["spec"]["replicatedJobs"][0]["template"]["spec"]["template"][
        "metadata"
    ]
    assert meta["annotations"] == {"gke-gcsfuse/volumes": "true"}


def test_unrenderable_jobs_name_the_field() -> None:
    long = copy.deepcopy(BASE)
    long["metadata"]["name"] = "a" * 50
    with pytest.raises(JobInvalid) as info:
        r.render(parse_job(long))
    (err,) = info.value.errors
    assert err.path == "metadata.name" and "at most 48 characters" in err.message

    with pytest.raises(JobInvalid) as info:
        r.render(
            make(
                {"accelerator": "tpu-v5e", "topology": "2x4"},
                scheduling={"nodeSelector": {"cloud.google.com/gke-tpu-topology": "4x4"}},
                env=[{"name": "POSTTRAIN_HOST_ID", "value": "3"}],
            )
        )
    paths = {e.path for e in info.value.errors}
    assert paths == {
        "spec.scheduling.nodeSelector.cloud.google.com/gke-tpu-topology",
        "spec.env[0].name",
    }


def test_longest_allowed_name_renders() -> None:
    doc = copy.deepcopy(BASE)
    doc["metadata"]["name"] = "a" * 48  # a-...-node-0-0-xxxxx is 63
    r.render(parse_job(doc))


# ---- the CLI -------------------------------------------------------------------------------------


def test_cli_render(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from posttrain.cli import main

    path = tmp_path / "job.yaml"
    doc = copy.deepcopy(BASE)
    del doc["metadata"]["uid"], doc["metadata"]["namespace"]
    path.write_text(yaml.safe_dump(doc))
    assert main(["render", str(path), "-n", "dev", "--trainer-image-cpu", "c:9"]) == 0
    cm, js = yaml.safe_load_all(capsys.readouterr().out)
    assert cm["kind"] == "ConfigMap" and js["kind"] == "JobSet"
    assert js["metadata"]["namespace"] == "dev"
    assert pod_spec(js)["containers"][0]["image"] == "c:9"

    doc["spec"]["resources"] = {"accelerator": "tpu-v5e", "topology": "3x3"}
    path.write_text(yaml.safe_dump(doc))
    assert main(["render", str(path)]) == 1
    err = capsys.readouterr().err
    assert "spec.resources.topology" in err and "valid: 1x1, 2x2" in err


def test_cli_render_of_a_dapo_job_writes_dapos_defaults_into_the_recipe(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The recipe holds the job's spec with its algorithm's defaults filled in: the trainer reads
    DAPO's clip-higher, token-mean loss, dynamic sampling and no KL from spec.dapo, not GRPO's."""
    from posttrain.cli import main

    example = ROOT / "examples" / "dapo-job.yaml"
    written = yaml.safe_load(example.read_text())["spec"]["dapo"]
    assert not {"epsilonHigh", "lossAggregation", "dynamicSampling", "beta"} & set(written)
    assert main(["render", str(example)]) == 0
    cm, _ = yaml.safe_load_all(capsys.readouterr().out)
    recipe = yaml.safe_load(cm["data"][r.RECIPE_KEY])
    assert "grpo" not in recipe["spec"]
    dapo = recipe["spec"]["dapo"]
    assert (dapo["epsilon"], dapo["epsilonHigh"]) == (0.2, 0.28)
    assert (dapo["lossAggregation"], dapo["dynamicSampling"], dapo["beta"]) == (
        "token-mean",
        True,
        0,
    )
    assert dapo["overlong"] == {"mode": "penalty", "buffer": 1024, "penaltyFactor": 1.0}
    # What the trainer parses from the recipe is the job as written, defaults and all.
    assert (
        parse_job(recipe).spec.settings
        == parse_job(yaml.safe_load(example.read_text())).spec.settings
    )


def test_every_cluster_example_renders() -> None:
    from posttrain.api import load_documents

    paths = sorted(ROOT.glob("examples/*.yaml"))
    assert paths
    for path in paths:
        for doc in load_documents(path):
            assert [m["kind"] for m in r.render(parse_job(doc))] == ["ConfigMap", "JobSet"]


def test_a_job_without_output_dir_is_refused_in_a_cluster() -> None:
    doc = copy.deepcopy(BASE)
    del doc["spec"]["output"]
    with pytest.raises(JobInvalid) as info:
        r.render(parse_job(doc))
    assert [e.path for e in info.value.errors] == ["spec.output.dir"]


def test_outputs_go_beside_a_checkpoint_dir() -> None:
    doc = copy.deepcopy(BASE)
    del doc["spec"]["output"]
    doc["spec"]["training"]["checkpoint"] = {"dir": "gs://b/ckpt/run/"}
    configmap, _ = r.render(parse_job(doc))
    recipe = yaml.safe_load(configmap["data"][r.RECIPE_KEY])
    # the trainer reads output.dir from the recipe: filled in, beside the checkpoints
    assert recipe["spec"]["output"]["dir"] == "gs://b/ckpt/run-output"
    assert recipe["spec"]["training"]["checkpoint"]["dir"] == "gs://b/ckpt/run/"
    # an explicit output.dir wins
    assert r.output_dir(make()) == "gs://b/runs/t"


def test_readme_job_renders_as_written() -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (doc,) = [d for d in yaml.safe_load_all(block) if d]
    assert doc["kind"] == "PostTrainJob" and "output" not in doc["spec"]
    configmap, jobset = r.render(parse_job(doc))
    recipe = yaml.safe_load(configmap["data"][r.RECIPE_KEY])
    assert recipe["spec"]["output"]["dir"] == "gs://my-bucket/ckpt/qwen-grpo-output"


def test_failure_policy_fails_config_errors_and_restarts_disruptions_for_free() -> None:
    js = jobset_of(make())
    child = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    rules = child["podFailurePolicy"]["rules"]
    # the Job's rule i fails it with a message ending "matching FailJob rule at index i"
    config = rules[0]["onExitCodes"]
    assert config["values"] == [runtime.EXIT_CONFIG] and config["containerName"] == r.CONTAINER
    assert rules[1]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    by_name = {rule["name"]: rule for rule in js["spec"]["failurePolicy"]["rules"]}
    assert by_name[r.CONFIG_ERROR_RULE]["action"] == "FailJobSet"
    assert by_name[r.CONFIG_ERROR_RULE]["onJobFailureMessagePatterns"] == [
        "matching FailJob rule at index 0$"
    ]
    assert by_name[r.DISRUPTION_RULE]["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    assert by_name[r.DISRUPTION_RULE]["onJobFailureMessagePatterns"] == [
        "matching FailJob rule at index 1$"
    ]
    assert child["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it


@pytest.mark.parametrize(
    ("accelerator", "chips_per_host", "hosts", "per_pod", "machine"),
    [
        ("tpu-v5e", None, 1, "8", None),  # default: one 8-chip host (ct5lp-hightpu-8t)
        ("tpu-v5e", 4, 2, "4", "ct5lp-hightpu-4t"),  # two 4-chip hosts, the shape xpk trains on
        ("tpu-v6e", 4, 2, "4", "ct6e-standard-4t"),
        ("tpu-v6e", 8, 1, "8", None),
    ],
)
def test_chips_per_host_picks_the_host_shape(
    accelerator, chips_per_host, hosts, per_pod, machine
) -> None:
    resources = {"accelerator": accelerator, "topology": "2x4"}
    if chips_per_host:
        resources["chipsPerHost"] = chips_per_host
    js = jobset_of(make(resources))
    child = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert child["parallelism"] == child["completions"] == hosts
    limits = child["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits[r.TPU_RESOURCE] == per_pod
    env = {e["name"]: e.get("value") for e in child["template"]["spec"]["containers"][0]["env"]}
    assert env[runtime.HOSTS_PER_SLICE] == str(hosts)
    # Both host shapes share the topology label: two hosts must also pin the 4-chip machine type,
    # or the pods could land together on an idle 8-chip host.
    selector = child["template"]["spec"]["nodeSelector"]
    assert selector.get("node.kubernetes.io/instance-type") == machine


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        (
            {"accelerator": "tpu-v5e", "topology": "2x4", "chipsPerHost": 2},
            "tpu-v5e 2x4 comes with 8 or 4 chips per host, not 2",
        ),
        (
            {"accelerator": "tpu-v5p", "topology": "2x2x2", "chipsPerHost": 8},
            "tpu-v5p 2x2x2 comes with 4 chips per host, not 8",
        ),
        ({"accelerator": "cpu", "chipsPerHost": 4}, "chipsPerHost is for TPUs, not cpu"),
    ],
)
def test_chips_per_host_refused_where_gke_has_no_such_host(resources, message) -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"]["resources"] = resources
    with pytest.raises(JobInvalid) as info:
        parse_job(doc)
    assert [(e.path, e.message) for e in info.value.errors] == [
        ("spec.resources.chipsPerHost", message)
    ]


def test_render_imports_neither_kopf_nor_kubernetes() -> None:
    code = (
        "import sys, posttrain.cli, posttrain.operator.render, posttrain.commands.render,"
        " posttrain.progress;"
        "bad = [m for m in ('kopf', 'kubernetes', 'jax') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pods_run_the_trainer_entrypoint(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rendered command is the trainer image's entrypoint, and it reads the rendered recipe.

    The entrypoint runs with the rendered args (the mounted path swapped for a local copy of the
    ConfigMap's recipe); an algorithm the trainer lacks (here: a trainer without DPO, as an image
    older than the API would be) makes it stop before JAX, naming the algorithm it read from
    that recipe.
    """
    from posttrain.trainer import algorithms
    from posttrain.trainer.__main__ import main

    monkeypatch.delitem(algorithms.REGISTRY, "dpo")
    configmap, jobset = r.render(make(algorithm="dpo"))
    container = pod_spec(jobset)["containers"][0]
    assert container["command"] == ["python", "-m", "posttrain.trainer"]
    assert runtime.RECIPE_PATH in container["args"]
    local = tmp_path / "recipe.yaml"
    local.write_text(configmap["data"]["recipe.yaml"])
    args = [str(local) if a == runtime.RECIPE_PATH else a for a in container["args"]]
    assert main(args) == runtime.EXIT_CONFIG
    assert "spec.algorithm: 'dpo' is not built" in capsys.readouterr().err


# ---- Kueue's labels on the job ---------------------------------------------------------------


def labelled(labels: dict[str, str], **spec: Any) -> api.PostTrainJob:
    doc = copy.deepcopy(BASE)
    doc["metadata"]["labels"] = labels
    doc["spec"].update(spec)
    return parse_job(doc)


def test_queue_label_on_the_job_queues_it_like_spec_queue_name() -> None:
    by_label = jobset_of(labelled({r.QUEUE_LABEL: "team-a"}))
    by_spec = jobset_of(make(scheduling={"queueName": "team-a"}))
    assert by_label["metadata"]["labels"][r.QUEUE_LABEL] == "team-a"
    assert by_label["spec"]["suspend"] is True  # Kueue admits it by unsuspending
    assert by_label == by_spec
    # both given and the same: fine
    both = labelled({r.QUEUE_LABEL: "team-a"}, scheduling={"queueName": "team-a"})
    assert jobset_of(both) == by_spec


def test_queue_label_and_spec_disagreeing_are_refused_naming_both() -> None:
    job = labelled({r.QUEUE_LABEL: "team-a"}, scheduling={"queueName": "team-b"})
    with pytest.raises(JobInvalid) as info:
        r.render(job)
    (err,) = info.value.errors
    assert err.path == "spec.scheduling.queueName"
    assert "'team-b'" in err.message and "'team-a'" in err.message
    assert r.QUEUE_LABEL in err.message


def test_priority_class_label_is_carried_to_the_jobset() -> None:
    js = jobset_of(labelled({r.QUEUE_LABEL: "q", r.PRIORITY_CLASS_LABEL: "high", "team": "x"}))
    labels = js["metadata"]["labels"]
    assert labels[r.PRIORITY_CLASS_LABEL] == "high" and labels[r.QUEUE_LABEL] == "q"
    assert "team" not in labels  # other labels stay on the job
    assert r.PRIORITY_CLASS_LABEL not in jobset_of(make())["metadata"]["labels"]


def test_cli_validate_refuses_bad_geometry_and_queue_conflict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from posttrain.cli import main

    doc = copy.deepcopy(BASE)
    doc["spec"]["resources"] = {"accelerator": "tpu-v5e", "topology": "2x4"}
    doc["spec"]["training"]["batchSize"] = 12
    doc["metadata"]["labels"] = {r.QUEUE_LABEL: "a"}
    doc["spec"]["scheduling"] = {"queueName": "b"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "spec.training.batchSize" in err and "8 data-parallel devices" in err
    assert "spec.scheduling.queueName" in err
    doc["spec"]["training"]["batchSize"] = 16
    doc["spec"]["scheduling"] = {"queueName": "a"}
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path)]) == 0


# ---- async RL: the rollout role --------------------------------------------------------------

GRPO = {"rewards": [{"builtin": "math-answer", "answerField": "answer"}]}


def async_job(rollout: dict[str, Any] | None = None, **spec: Any) -> api.PostTrainJob:
    spec.setdefault("training", {"steps": 10, "batchSize": 8})
    return make(algorithm="grpo", grpo=GRPO, rollout={"mode": "async", **(rollout or {})}, **spec)


def rjobs(jobset: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {rj["name"]: rj for rj in jobset["spec"]["replicatedJobs"]}


def env_of(rjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (container,) = rjob["template"]["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def test_sync_rl_jobs_render_one_role() -> None:
    for rollout in (None, {"mode": "sync"}):
        js = jobset_of(
            make(algorithm="grpo", grpo=GRPO, training={"steps": 10, "batchSize": 8},
                 **({"rollout": rollout} if rollout else {}))
        )  # fmt: skip
        assert list(rjobs(js)) == ["node"] and "successPolicy" not in js["spec"]
        env = env_of(rjobs(js)["node"])
        assert not set(env) & set(r.ROLE_ENV)
        ports = rjobs(js)["node"]["template"]["spec"]["template"]["spec"]["containers"][0]["ports"]
        assert [p["containerPort"] for p in ports] == [runtime.COORDINATOR_PORT]


def test_async_job_adds_a_rollout_role_beside_an_unchanged_trainer() -> None:
    resources = {"accelerator": "tpu-v5e", "topology": "2x4"}
    rollout = {"replicas": 3, "resources": {"accelerator": "nvidia-h100", "gpusPerNode": 2}}
    js = jobset_of(async_job(rollout, resources=resources))
    sync = jobset_of(
        make(algorithm="grpo", grpo=GRPO, training={"steps": 10, "batchSize": 8},
             resources=resources)
    )  # fmt: skip
    assert list(rjobs(js)) == ["slice", "rollout"]
    # the trainer: the sync job's replicated job, plus its role, address and service port
    trainer = rjobs(js)["slice"]
    container = trainer["template"]["spec"]["template"]["spec"]["containers"][0]
    env = env_of(trainer)
    assert env[runtime.ROLE]["value"] == runtime.ROLE_TRAINER
    assert env[runtime.TRAINER_ADDRESS]["value"] == "t-slice-0-0.t:8477"
    assert {"name": "rollout", "containerPort": runtime.ROLLOUT_PORT} in container["ports"]
    stripped = copy.deepcopy(trainer)
    c = stripped["template"]["spec"]["template"]["spec"]["containers"][0]
    c["env"] = [e for e in c["env"] if e["name"] not in r.ROLE_ENV]
    c["ports"] = [p for p in c["ports"] if p["name"] != "rollout"]
    assert stripped == rjobs(sync)["slice"]
    assert js["spec"]["coordinator"] == sync["spec"]["coordinator"]
    assert js["spec"]["failurePolicy"] == sync["spec"]["failurePolicy"]
    # done when the trainer is; the workers never complete on their own
    assert js["spec"]["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["slice"]}

    # the workers: one single-pod Job each, on their own GPU pool, retried in place
    workers = rjobs(js)["rollout"]
    assert workers["replicas"] == 3
    child = workers["template"]["spec"]
    assert child["parallelism"] == child["completions"] == 1
    assert child["backoffLimit"] == r.ROLLOUT_BACKOFF_LIMIT >= 100
    rules = child["podFailurePolicy"]["rules"]
    assert rules[0] == r.POD_FAILURE_RULES[0]  # a config error still fails the set (rule 0)
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == (
        "DisruptionTarget"
    )
    pod = child["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    (container,) = pod["containers"]
    assert container["resources"] == {
        "requests": {"nvidia.com/gpu": "2"},
        "limits": {"nvidia.com/gpu": "2"},
    }
    assert container["image"] == r.ImageDefaults().gpu  # the rollout's accelerator family
    assert container["command"] == list(r.TRAINER_COMMAND)
    assert container["args"] == list(r.TRAINER_ARGS)
    assert "ports" not in container
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    env = env_of(workers)
    assert env[runtime.ROLE]["value"] == runtime.ROLE_ROLLOUT
    assert env[runtime.TRAINER_ADDRESS]["value"] == "t-slice-0-0.t:8477"
    assert env[runtime.ROLLOUT_WORKER]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['jobset.sigs.k8s.io/job-index']"
    )
    assert env[runtime.JOB_NAME]["value"] == "t" and runtime.NAMESPACE in env
    assert env[runtime.RECIPE]["value"] == runtime.RECIPE_PATH
    for name in (
        runtime.COORDINATOR_ADDRESS, runtime.NUM_SLICES, runtime.HOSTS_PER_SLICE,
        runtime.SLICE_ID, runtime.HOST_ID,
    ):  # fmt: skip
        assert name not in env
    assert not any(n.startswith("MEGASCALE_") for n in env)
    assert pod["volumes"][0] == {"name": "recipe", "configMap": {"name": "t-recipe"}}


def test_rollout_resources_default_to_the_trainers_and_one_worker() -> None:
    js = jobset_of(async_job(resources={"accelerator": "cpu", "cpu": "2", "memory": "4Gi"}))
    workers = rjobs(js)["rollout"]
    assert workers["replicas"] == 1
    pod = workers["template"]["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"memory": "4Gi"},
    }
    assert pod["containers"][0]["image"] == r.ImageDefaults().cpu


def test_rollout_workers_on_a_tpu_host_get_its_pool_and_chips() -> None:
    rollout = {"replicas": 2, "resources": {"accelerator": "tpu-v6e", "topology": "2x2"}}
    js = jobset_of(async_job(rollout, resources={"accelerator": "nvidia-h100", "gpusPerNode": 8}))
    pod = rjobs(js)["rollout"]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
        "cloud.google.com/gke-tpu-topology": "2x2",
    }
    assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": "4"}
    assert pod["containers"][0]["image"] == r.ImageDefaults().tpu
    assert r.EXCLUSIVE_TOPOLOGY not in js["metadata"].get("annotations", {})
    trainer = rjobs(js)["node"]["template"]["spec"]["template"]["spec"]
    assert trainer["containers"][0]["image"] == r.ImageDefaults().gpu


def test_queued_async_job_is_one_jobset_for_kueue() -> None:
    js = jobset_of(async_job(scheduling={"queueName": "team-a", "priorityClassName": "high"}))
    assert js["metadata"]["labels"][r.QUEUE_LABEL] == "team-a" and js["spec"]["suspend"] is True
    # Kueue reads the JobSet's label: one Workload, a podset per replicated job
    for rjob in rjobs(js).values():
        template = rjob["template"]["spec"]["template"]
        assert template["spec"]["priorityClassName"] == "high"
        assert r.QUEUE_LABEL not in template["metadata"]["labels"]


def test_rollout_pod_names_and_selectors_are_checked_too() -> None:
    doc = copy.deepcopy(BASE)
    doc["metadata"]["name"] = "a" * 45  # a...-node-0-0 fits; a...-rollout-11-0 does not
    doc["spec"].update(
        algorithm="grpo", grpo=GRPO, training={"steps": 10, "batchSize": 8},
        rollout={"mode": "async", "replicas": 12,
                 "resources": {"accelerator": "nvidia-l4", "gpusPerNode": 1}},
        scheduling={"nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}},
    )  # fmt: skip
    with pytest.raises(JobInvalid) as info:
        r.render(parse_job(doc))
    errors = {e.path: e.message for e in info.value.errors}
    assert set(errors) == {
        "metadata.name",
        "spec.scheduling.nodeSelector.cloud.google.com/gke-accelerator",
    }
    assert f"{'a' * 45}-rollout-<worker>-0-xxxxx" in errors["metadata.name"]
    assert "at most 44 characters" in errors["metadata.name"]
    assert (
        "spec.rollout.resources"
        in errors["spec.scheduling.nodeSelector.cloud.google.com/gke-accelerator"]
    )


@pytest.mark.parametrize("name", [runtime.ROLE, runtime.TRAINER_ADDRESS, runtime.ROLLOUT_WORKER])
def test_role_env_is_reserved_in_every_job(name: str) -> None:
    for job in (make(env=[{"name": name, "value": "x"}]),
                async_job(env=[{"name": name, "value": "x"}])):  # fmt: skip
        with pytest.raises(JobInvalid) as info:
            r.render(job)
        assert [e.path for e in info.value.errors] == ["spec.env[0].name"]
