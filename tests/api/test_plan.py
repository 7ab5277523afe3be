"""`posttrain plan`: fit / no-fit from config.json alone, on simulated devices (a subprocess, since
JAX reads the device count once)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.api import load_documents, parse_job
from posttrain.api.algorithms import REGISTRY
from posttrain.api.settings.rl import RolloutSpec
from posttrain.commands.plan import chip_count, devices_needed, libtpu_version, model_config_json
from posttrain.commands.plan_models import KNOWN_CONFIGS

JOB = {
    "apiVersion": "posttrain.dev/v1alpha1",
    "kind": "PostTrainJob",
    "metadata": {"name": "planned"},
    "spec": {
        "algorithm": "sft",
        "data": {"train": "gs://b/train.jsonl", "maxLength": 64, "maxPromptLength": 32},
        "training": {"steps": 1, "batchSize": 8},
        "output": {"dir": "gs://b/out"},
    },
}


def _plan(tmp_path, model, resources, *, as_json=True, args=("--advice", "0"), env=None, **spec):
    """Runs `posttrain plan` on JOB with ``model`` and ``resources``; without the advice on a job
    that does not fit (each change tried is a compile) unless ``args`` say otherwise."""
    job = json.loads(json.dumps(JOB))
    job["spec"]["model"], job["spec"]["resources"] = model, resources
    job["spec"].update(spec)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    cmd = [sys.executable, "-P", "-m", "posttrain.cli", "plan", str(path), *args]
    cmd += ["--json"] if as_json else []
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    return done.returncode, done.stdout, done.stderr


def test_llama_8b_full_fine_tuning_is_refused_on_a_v5e_2x2(tmp_path):
    rc, out, err = _plan(
        tmp_path,
        {"base": "hf://meta-llama/Llama-3.1-8B", "dtype": "float32"},
        {"accelerator": "tpu-v5e", "topology": "2x2"},
    )
    assert rc == 2, err
    plan = json.loads(out)
    assert plan["devices"] == 4 and not plan["fits"]
    assert plan["biggest_consumer"] == "optimizer state"
    # 8.03e9 float32 weights over 4 chips; AdamW keeps two moments of each.
    assert 7.4 * 2**30 < plan["parameters"] < 7.6 * 2**30
    assert 0 <= plan["optimizer"] - 2 * plan["parameters"] < 2**20  # + step counters


def test_a_small_model_fits_with_its_compiled_activations(tmp_path):
    rc, out, err = _plan(
        tmp_path, {"base": "builtin:tiny"}, {"accelerator": "tpu-v5e", "topology": "2x2"}
    )
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["fits"] and plan["activations"] > 0 and plan["flops_per_step"] > 0
    # A TPU target's figures are libtpu's when it is installed, XLA:CPU's otherwise.
    assert plan["compiler"] == _expected_compiler("tpu-v5e")
    assert plan["fits_with"] == [] and plan["advice_tried"] == []


def test_unknown_model_without_config_is_a_clear_error(tmp_path):
    rc, _, err = _plan(
        tmp_path, {"base": "hf://org/unknown"}, {"accelerator": "tpu-v5e", "topology": "2x2"}
    )
    assert rc == 1 and "--config" in err and "meta-llama/Llama-3.1-8B" in err


RL = {
    "numGenerations": 4,
    "maxNewTokens": 24,
    "rewards": [{"builtin": "regex-format", "pattern": "x"}],
}
TINY_V5E = {"accelerator": "tpu-v5e", "topology": "2x2"}


def _plan_rl(tmp_path, algorithm, block, **model):
    job = json.loads(json.dumps(JOB))
    job["spec"]["algorithm"] = algorithm
    job["spec"]["data"]["maxPromptLength"] = 16
    if block is not None:
        job["spec"]["grpo" if "numGenerations" in block else "ppo"] = block
    job["spec"]["model"] = {"base": "builtin:tiny", **model}
    job["spec"]["resources"] = TINY_V5E
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    # XLA:CPU's figures, which the comparisons below were written for (libtpu's, when installed,
    # are dominated on this tiny model by the size of the program itself).
    cmd = [sys.executable, "-P", "-m", "posttrain.cli", "plan", str(path), "--json"]
    cmd += ["--compiler", "xla-cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_grpo_compiles_its_own_loss_and_the_rollout(tmp_path):
    plan = _plan_rl(tmp_path, "grpo", {**RL, "beta": 0.04})
    assert plan["loss"] == "grpo" and plan["fits"]
    assert plan["activations"] > 0 and plan["rollout"] > 0
    # Full fine-tuning with a KL term keeps a copy of the initial weights,
    # float32 master weights; the reference copy is kept in the compute dtype (bfloat16).
    assert plan["reference"] * 2 == plan["parameters"]
    # 8 x 4 rows x (16 prompt + 24 new slots, bucketed to 16 + 32), 2 layers, K x D = 2 x 16, bf16 (the default dtype).
    assert plan["kv_cache"] == 2 * 2 * 32 * (16 + 32) * 2 * 16 * 2
    assert plan["total"] == max(plan["train_total"], plan["rollout_total"])
    assert plan["rollout_total"] == plan["rollout"] + plan["train_total"] - plan["activations"]
    # The rollout is data-parallel: each device holds its rows' KV cache only.
    assert plan["data_parallel"] == 4
    assert plan["kv_cache_per_device"] * 4 == plan["kv_cache"]
    # generationBatchSize 8: the 32 rows in 4 chunks, 2 rows per device at a time.
    chunked = _plan_rl(tmp_path, "grpo", {**RL, "beta": 0.04, "generationBatchSize": 8})
    assert chunked["kv_cache_per_device"] * 16 == plan["kv_cache"]
    assert chunked["rollout"] < plan["rollout"]


def test_ppo_compiles_its_loss_with_the_value_head_and_lora_keeps_no_reference_copy(tmp_path):
    ppo = {"maxNewTokens": 24, "numMiniBatches": 2, "klCoef": 0.05}
    ppo["rewards"] = RL["rewards"]
    plan = _plan_rl(tmp_path, "ppo", ppo, lora={"rank": 4, "alpha": 8})
    assert plan["loss"] == "ppo" and plan["rollout"] > 0
    # LoRA: the reference is the base with adapters off, i.e. the adapters zeroed (float32), no
    # copy of the base; the value head trains but needs no reference copy: the parameters less
    # the tiny model's head (hidden 64 -> 1, float32).
    assert plan["reference"] > 0
    assert plan["parameters"] - plan["reference"] == 4 * (64 + 1)


def test_dpo_compiles_pairs(tmp_path):
    plan = _plan_rl(tmp_path, "dpo", None)
    assert plan["loss"] == "dpo" and plan["rollout"] is None and plan["activations"] > 0


# ---- the examples, and distillation's teacher ------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(ROOT.glob("examples/*.yaml"))
# Examples whose base is a bucket path: the config.json of the model each one names.
BUCKET_MODELS = {
    "dpo-job.yaml": "Qwen/Qwen2.5-1.5B-Instruct",  # gs://.../qwen-sft/final: a Qwen SFT export
    "gspo-token-job.yaml": "meta-llama/Llama-3.1-8B-Instruct",
}

# Plans each job in a fresh process (JAX reads the device count once): sys.argv = [-c, N, PATH,
# CONFIG or "", "state" or "compile", ...]; prints one JSON line (the plan and its report) per job.
# XLA:CPU's figures, whether libtpu is installed or not (the comparisons were written for them).
RUNNER = """
import json, sys
from posttrain.api import load_documents, parse_job
from posttrain.commands import plan as P

n, mode, jobs = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
P._simulate_devices(n)
for path, config in zip(jobs[::2], jobs[1::2]):
    job = parse_job(load_documents(path)[0], source=path)
    devices = P.chip_count(job.spec.resources)
    plan = P.plan_job(
        job, P.config_reader(job, config or None), devices, state_only=mode == "state",
        compiler=P.Compiler("xla-cpu"),
    )
    print(json.dumps({"path": path, "plan": P._as_dict(plan), "report": P.report(job, plan)}))
"""


def _plan_jobs(jobs: list[tuple[Path, str | None]], mode: str, tmp_path: Path) -> list[dict]:
    args = []
    for i, (path, model) in enumerate(jobs):
        config = ""
        if model is not None:
            config = str(tmp_path / f"config-{i}.json")
            Path(config).write_text(json.dumps(KNOWN_CONFIGS[model]))
        args += [str(path), config]
    devices = max(devices_needed(parse_job(load_documents(p)[0])) for p, _ in jobs)
    cmd = [sys.executable, "-P", "-c", RUNNER, str(devices), mode, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _example_jobs() -> list[tuple[Path, str | None]]:
    jobs = []
    for path in EXAMPLES:
        base = parse_job(load_documents(path)[0]).spec.model.base
        if base.startswith("gs://"):
            assert path.name in BUCKET_MODELS, f"{path.name}: say which model {base} is"
        jobs.append((path, BUCKET_MODELS.get(path.name)))
    return jobs


def test_every_example_names_models_plan_knows():
    """Every example's model (and teacher) has a config.json plan ships (plan_models), or one
    named here for a bucket path; each parses, and a teacher shares its student's vocabulary."""
    from posttrain.trainer.models import ModelConfig

    for path, bucket_model in _example_jobs():
        spec = parse_job(load_documents(path)[0]).spec
        refs = [spec.model.base] + ([spec.settings.teacher] if spec.algorithm == "distill" else [])
        configs = []
        for ref in refs:
            name = bucket_model if ref == spec.model.base and bucket_model else ref
            configs.append(ModelConfig.from_hf(model_config_json(name, None)))
        assert len({c.vocab_size for c in configs}) == 1, path.name


@pytest.mark.slow
def test_every_example_has_its_models_config_and_a_per_device_state(tmp_path):
    """Every example plans from the configs shipped in plan_models (no download): the resident
    state per device of the run the trainer would build (without compiling: see the next test).
    20-40 s per example on a busy 2-core CPU (building each model under eval_shape)."""
    planned = _plan_jobs(_example_jobs(), "state", tmp_path)
    assert [Path(p["path"]).name for p in planned] == [p.name for p in EXAMPLES]
    for p in planned:
        job = parse_job(load_documents(p["path"])[0])
        plan, name = p["plan"], Path(p["path"]).name
        assert plan["devices"] == chip_count(job.spec.resources), name
        assert plan["parameters"] > 0 and plan["optimizer"] > 0, name
        assert (plan["teacher"] > 0) == (job.spec.algorithm == "distill"), name
        assert (plan["frozen"] > 0) == (job.spec.model.lora is not None), name
        assert plan["activations"] is None and plan["loss"] == job.spec.algorithm, name
        assert f"{job.metadata.name}: {plan['devices']} x " in p["report"], name
        assert "per device:" in p["report"] and "optimizer state" in p["report"], name


# 11 full-size compiles would add 10-30 minutes to `make test` on 2 cores: opt in.
ALL_COMPILES = os.environ.get("POSTTRAIN_PLAN_ALL_EXAMPLES") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not ALL_COMPILES, reason="set POSTTRAIN_PLAN_ALL_EXAMPLES=1 (minutes each)")
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_compiles_and_prints_per_device_memory(path, tmp_path):
    """The whole plan of each example: its step (and rollout) compiled at full size. 1-3 minutes
    each on a 2-core CPU. On these simulated CPU devices most examples report more activations
    than their chip holds (see docs/performance.md on XLA:CPU's figures); the test checks the plan
    runs and reports, not the verdict."""
    (p,) = _plan_jobs([(path, BUCKET_MODELS.get(path.name))], "compile", tmp_path)
    plan, report = p["plan"], p["report"]
    job = parse_job(load_documents(path)[0])
    assert plan["activations"] > 0 and plan["compile_seconds"] > 0
    rl = issubclass(REGISTRY[job.spec.algorithm].settings, RolloutSpec)  # samples completions
    assert (plan["rollout"] is not None) == rl and ("rollout" in report) == rl
    lines = report.splitlines()
    assert (
        lines[0]
        == f"{job.metadata.name}: {plan['devices']} x {job.spec.resources.accelerator}"
        + (f" {job.spec.resources.topology}" if job.spec.resources.topology else "")
        + ", per device:"
    )
    for consumer in ("parameters", "optimizer state", "activations/temporaries", "total (peak)"):
        assert any(line.strip().startswith(consumer) and "GiB" in line for line in lines), consumer
    assert lines[-1] == "fits" or lines[-1].startswith("does not fit:")


def test_a_distillation_job_includes_its_frozen_teacher(tmp_path):
    job = json.loads(json.dumps(JOB))
    job["spec"].update(
        algorithm="distill",
        model={"base": "builtin:tiny"},
        distill={"teacher": "builtin:small"},
        resources=TINY_V5E,
    )
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(job))
    (p,) = _plan_jobs([(path, None)], "compile", tmp_path)
    plan = p["plan"]
    assert plan["loss"] == "distill" and plan["teacher"] > 0 and plan["activations"] > 0
    # Held through the step beside the student's state; it has no optimizer state of its own.
    assert plan["train_total"] == (
        plan["parameters"]
        + plan["frozen"]
        + plan["optimizer"]
        + plan["teacher"]
        + plan["activations"]
    )
    teacher = [line for line in p["report"].splitlines() if "teacher (frozen)" in line]
    assert len(teacher) == 1 and teacher[0].strip().endswith("GiB")


def test_an_8b_teacher_over_a_1b_student_does_not_fit_one_v5e_chip(tmp_path):
    """Llama-3.2-1B student (float32 master weights + AdamW: ~13.8 GiB) and a frozen Llama-3.1-8B
    teacher in bfloat16 (~15 GiB) on one 16 GiB v5e chip: refused on the state alone."""
    rc, out, err = _plan(
        tmp_path,
        {"base": "hf://meta-llama/Llama-3.2-1B"},
        {"accelerator": "tpu-v5e", "topology": "1x1"},
        algorithm="distill",
        distill={"teacher": "hf://meta-llama/Llama-3.1-8B"},
    )
    assert rc == 2, err
    plan = json.loads(out)
    assert plan["devices"] == 1 and not plan["fits"] and plan["activations"] is None
    assert plan["biggest_consumer"] == "teacher (frozen)"
    assert 14.9 * 2**30 < plan["teacher"] < 15.0 * 2**30  # 8.03e9 bf16 weights
    assert 4.5 * 2**30 < plan["parameters"] < 4.7 * 2**30  # 1.24e9 float32 weights
    rc, text, _ = _plan(
        tmp_path,
        {"base": "hf://meta-llama/Llama-3.2-1B"},
        {"accelerator": "tpu-v5e", "topology": "1x1"},
        as_json=False,
        algorithm="distill",
        distill={"teacher": "hf://meta-llama/Llama-3.1-8B"},
    )
    assert rc == 2 and "teacher (frozen)" in text
    assert "biggest consumer: teacher (frozen)" in text.splitlines()[-1]


# ---- async RL: the rollout role, each worker on its own devices ------------------------------

# The keys of a plan's JSON before async rollouts (a sync plan keeps exactly these).
SYNC_KEYS = {
    "devices", "hbm_bytes", "parameters", "frozen", "optimizer", "activations",
    "flops_per_step", "peak_flops", "loss", "reference", "teacher", "compile_seconds",
    "rollout", "kv_cache", "kv_cache_per_device", "data_parallel", "train_total",
    "rollout_total", "total", "fits", "compiler", "refused", "fits_with", "advice_tried",
}  # fmt: skip


def _grpo_job(tmp_path: Path, name: str, rollout: dict | None, **model) -> Path:
    job = json.loads(json.dumps(JOB))
    job["metadata"]["name"] = name
    job["spec"].update(
        algorithm="grpo",
        model={"base": "builtin:tiny", **model},
        resources=TINY_V5E,
        grpo={**RL, "beta": 0.04},
    )
    job["spec"]["data"]["maxPromptLength"] = 16
    if rollout is not None:
        job["spec"]["rollout"] = rollout
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_an_async_job_plans_its_rollout_workers_on_their_own_devices(tmp_path):
    """The trainer as a sync job's on spec.resources (a v5e 2x2); each rollout worker on
    spec.rollout.resources (default spec.resources): the policy in bf16, the KV cache of the
    rollout batch split over the worker's data-parallel devices, its sampler compiled there."""
    jobs = [
        _grpo_job(tmp_path, "sync", None),
        # maxPolicyLag 0: no rollout correction, so the trainer's step is the sync job's.
        _grpo_job(tmp_path, "default", {"mode": "async", "maxPolicyLag": 0, "replicas": 3}),
        _grpo_job(
            tmp_path,
            "h100",
            {"mode": "async", "resources": {"accelerator": "nvidia-h100", "gpusPerNode": 1}},
        ),
    ]
    sync, default, h100 = _plan_jobs([(p, None) for p in jobs], "compile", tmp_path)

    # A sync job's plan: the keys and report it always had, no rollout role.
    assert set(sync["plan"]) == SYNC_KEYS and "rollout role" not in sync["report"]
    assert sync["report"].splitlines()[-1] == "fits"
    # The trainer role of an async job is planned as the sync job's, on spec.resources (with
    # maxPolicyLag 1, rollout correction's columns change the step's temporaries only).
    same = lambda p, skip: {k: v for k, v in p.items() if k in SYNC_KEYS - skip}  # noqa: E731
    timed = {"compile_seconds"}
    assert same(default["plan"], timed) == same(sync["plan"], timed)
    step = timed | {"activations", "train_total", "total"}
    assert same(h100["plan"], step) == same(sync["plan"], step)
    for p in (default, h100):
        assert p["plan"]["fits"] and p["report"].splitlines()[-1] == "fits"
        assert set(p["plan"]) == SYNC_KEYS | {"rollout_role"}

    kv = 2 * 2 * 32 * (16 + 32) * 2 * 16 * 2  # the rollout batch's cache (see the GRPO test)
    d, h = default["plan"]["rollout_role"], h100["plan"]["rollout_role"]
    for role in (d, h):
        assert role["rows"] == 32 and role["kv_cache"] == kv and role["fits"]
        assert role["rollout"] > 0 and role["total"] == role["weights"] + role["rollout"]
        assert role["kv_cache_per_device"] * role["data_parallel"] == kv
    # Default: the trainer's devices (4 v5e chips of 16 GiB), here three workers.
    assert (d["resources"], d["workers"]) == ("spec.resources", 3)
    assert (d["accelerator"], d["topology"], d["devices"]) == ("tpu-v5e", "2x2", 4)
    assert d["data_parallel"] == 4 and d["hbm_bytes"] == 16 * 2**30
    # One H100 (80 GiB): all 32 rows' cache and every weight on it; the tiny model's 98,624
    # weights in bfloat16 (no float32 master copy, no optimizer state, no reference copy).
    assert (h["resources"], h["workers"]) == ("spec.rollout.resources", 1)
    assert (h["accelerator"], h["topology"], h["devices"]) == ("nvidia-h100", None, 1)
    assert h["hbm_bytes"] == 80 * 2**30
    assert (h["data_parallel"], h["kv_cache_per_device"]) == (1, kv)
    assert h["weights"] == 98_624 * 2 and h["weights"] > d["weights"]
    assert h["rollout"] > d["rollout"]
    lines = h100["report"].splitlines()
    role_at = next(i for i, line in enumerate(lines) if line.startswith("rollout role: "))
    assert lines[role_at] == (
        "rollout role: 1 worker, each 1 x nvidia-h100 (spec.rollout.resources), per device:"
    )
    assert lines[-2].strip().startswith("total (peak)") and "of 80 GiB HBM" in lines[-2]
    assert "rollout role: 3 workers, each 4 x tpu-v5e 2x2 (spec.resources)" in default["report"]


def test_a_rollout_worker_that_does_not_fit_names_spec_rollout_resources(tmp_path):
    """Llama-3.1-8B: the trainer's float32 full fine-tuning is over a v5e 2x2 and a worker's
    bf16 weights (~15 GiB) plus the rollout batch's KV cache over one 16 GiB v5e chip; neither
    compiles."""
    job = json.loads(json.dumps(JOB))
    job["spec"].update(
        algorithm="grpo",
        model={"base": "hf://meta-llama/Llama-3.1-8B"},
        resources=TINY_V5E,
        grpo={**RL, "maxNewTokens": 1024},
        rollout={"mode": "async", "resources": {**TINY_V5E, "topology": "1x1"}},
    )
    job["spec"]["data"]["maxPromptLength"] = 16
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(job))
    (p,) = _plan_jobs([(path, None)], "compile", tmp_path)
    plan, role = p["plan"], p["plan"]["rollout_role"]
    assert not plan["fits"] and plan["biggest_consumer"] == "optimizer state"
    assert not role["fits"] and role["rollout"] is None and role["devices"] == 1
    assert role["biggest_consumer"] == "policy weights"
    assert 14.9 * 2**30 < role["weights"] < 15.0 * 2**30  # 8.03e9 bf16 weights
    # 32 layers x K/V x 32 rows x (16 + 1024 slots) x 8 heads x 128 x bf16.
    assert role["kv_cache"] == role["kv_cache_per_device"] == 2 * 32 * 32 * 1040 * 8 * 128 * 2
    last = p["report"].splitlines()[-2:]
    assert last[0].startswith("does not fit: ") and "optimizer state" in last[0]
    assert last[1].startswith("does not fit: spec.rollout.resources (tpu-v5e 1x1): a rollout")
    assert "biggest consumer: policy weights" in last[1]


def test_the_verdict_when_only_the_rollout_workers_are_over():
    """The exit code and JSON when the trainer fits but a worker does not (no JAX needed)."""
    from posttrain.commands import plan as P

    role = P.RolloutRolePlan(
        workers=2, resources="spec.rollout.resources", accelerator="nvidia-l4", topology=None,
        devices=1, hbm_bytes=24 * 2**30, weights=20 * 2**30, rows=64, kv_cache=8 * 2**30,
        kv_cache_per_device=8 * 2**30, data_parallel=1,
    )  # fmt: skip
    trainer = P.Plan(
        devices=8, hbm_bytes=80 * 2**30, parameters=2**30, frozen=0, optimizer=2**31,
        activations=2**30, flops_per_step=1e12, peak_flops=989e12, rollout=2**30,
    )  # fmt: skip
    plan = P.Plan(**{**trainer.__dict__, "rollout_role": role})
    assert plan.trainer_fits and not plan.fits
    out = P._as_dict(plan)
    assert out["fits"] is False and out["biggest_consumer"] == "policy weights"
    assert out["rollout_role"]["total"] == 28 * 2**30 and not out["rollout_role"]["fits"]
    assert set(P._as_dict(trainer)) == SYNC_KEYS
    job = json.loads(json.dumps(JOB))
    job["spec"].update(
        algorithm="grpo",
        model={"base": "builtin:tiny"},
        resources={"accelerator": "nvidia-h100"},
        grpo=RL,
        rollout={"mode": "async", "replicas": 2, "resources": {"accelerator": "nvidia-l4"}},
    )
    lines = P.report(parse_job(job), plan).splitlines()
    assert lines[-1] == (
        "does not fit: spec.rollout.resources (nvidia-l4): a rollout worker needs 28.00 GiB per "
        "device > 24 GiB; biggest consumer: policy weights (20.00 GiB)"
    )
    assert not any(line.startswith("does not fit: 4") for line in lines)  # the trainer fits
    assert "rollout role: 2 workers, each 1 x nvidia-l4 (spec.rollout.resources)" in lines[-6]


# ---- whose figures, and what would make a job fit --------------------------------------------


def _expected_compiler(accelerator: str) -> str:
    tpu = accelerator.startswith("tpu-") and libtpu_version() is not None
    return f"libtpu {libtpu_version()}" if tpu else "XLA:CPU"


def test_gpu_figures_say_they_come_from_xla_cpu(tmp_path):
    rc, out, err = _plan(
        tmp_path, {"base": "builtin:tiny"}, {"accelerator": "nvidia-h100", "gpusPerNode": 1}
    )
    assert rc == 0, err
    assert json.loads(out)["compiler"] == "XLA:CPU"
    from posttrain.commands import plan as P

    job = json.loads(json.dumps(JOB))
    job["spec"].update(model={"base": "builtin:tiny"}, resources={"accelerator": "nvidia-h100"})
    lines = P.report(parse_job(job), P.Plan(**_a_plan_over())).splitlines()
    assert (
        lines[1]
        == "  (figures from XLA:CPU on simulated host devices, not the accelerator's compiler)"
    )


def test_tpu_figures_without_libtpu_say_how_to_get_the_tpus(monkeypatch, tmp_path, capsys):
    """No JAX needed: the report's line, and --compiler libtpu refused, when libtpu is absent."""
    from posttrain.commands import plan as P

    monkeypatch.setattr(P, "libtpu_version", lambda: None)
    job = json.loads(json.dumps(JOB))
    job["spec"].update(model={"base": "builtin:tiny"}, resources=TINY_V5E)
    assert P.Compiler().label(parse_job(job).spec.resources) == "XLA:CPU"
    line = P.report(parse_job(job), P.Plan(**_a_plan_over())).splitlines()[1]
    assert (
        "not the TPU's compiler (libtpu is not installed: pip install 'posttrain[tpu-plan]'" in line
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    args = argparse.Namespace(
        file=str(path), config=None, json=True, compiler="libtpu", advice=0, hbm=None
    )
    assert P.run(args) == P.EXIT_INVALID
    assert "--compiler libtpu: libtpu is not installed" in capsys.readouterr().err
    job["spec"]["resources"] = {"accelerator": "nvidia-h100"}
    path.write_text(yaml.safe_dump(job))
    assert P.run(args) == P.EXIT_INVALID
    assert "--compiler libtpu: nvidia-h100 is not a TPU" in capsys.readouterr().err


def _a_plan_over() -> dict:
    return dict(
        devices=8, hbm_bytes=16 * 2**30, parameters=2**30, frozen=14 * 2**30, optimizer=2**30,
        activations=100 * 2**30, flops_per_step=1e12, peak_flops=197e12,
    )  # fmt: skip


def test_the_changes_tried_come_in_the_order_users_try_them():
    """Pure (no JAX): remat, smaller micro-batches, more chips; only those the trainer would run
    (a micro-batch divides over the data-parallel devices)."""
    from posttrain.commands import plan as P

    doc = json.loads(json.dumps(JOB))
    doc["spec"].update(model={"base": "builtin:tiny"}, resources=TINY_V5E)
    tried = [(c.kind, c.changes) for c in P.advice_candidates(doc, parse_job(doc))]
    remat = {"spec.training.remat": "full"}
    assert tried == [
        ("remat", remat),
        ("micro-batches", {"spec.training.microBatchSize": 4}),
        ("micro-batches", {**remat, "spec.training.microBatchSize": 4}),  # 2 rows: not over 4
        ("chips", {"spec.resources.topology": "2x4"}),
        ("chips", {"spec.resources.topology": "2x4", **remat}),
        # 8 rows do not divide over 16 chips: 4 x 4 of them split each layer (fsdp 4, tensor 4)
        ("chips", {"spec.resources.topology": "4x4", **MORE_TENSOR}),
        ("chips", {"spec.resources.topology": "4x4", **MORE_TENSOR, **remat}),
    ]
    # Already remat: full, micro-batches of 4; GPUs: more nodes.
    doc["spec"]["training"].update(remat="full", microBatchSize=4, batchSize=16)
    doc["spec"]["resources"] = {"accelerator": "nvidia-h100", "gpusPerNode": 1}
    tried = [(c.kind, c.changes) for c in P.advice_candidates(doc, parse_job(doc))]
    assert tried == [
        ("micro-batches", {"spec.training.microBatchSize": 2}),
        ("micro-batches", {"spec.training.microBatchSize": 1}),
        ("chips", {"spec.resources.nodes": 2}),
        ("chips", {"spec.resources.nodes": 4}),
    ]


MORE_TENSOR = {"spec.training.mesh.fsdp": 4, "spec.training.mesh.tensor": -1}


def test_a_job_over_its_chip_is_told_what_would_make_it_fit(tmp_path):
    """The tiny model against a chip with less memory than its step needs (``--hbm``): remat or
    a smaller micro-batch brings the step's temporaries under it."""
    model = {"base": "builtin:tiny"}
    rc, out, err = _plan(tmp_path, model, TINY_V5E)
    assert rc == 0, err
    whole = json.loads(out)
    state = whole["total"] - whole["activations"]
    hbm = state + 0.85 * whole["activations"]
    args = ("--advice", "2", "--hbm", repr(hbm / 2**30))
    rc, out, err = _plan(tmp_path, model, TINY_V5E, args=args)
    assert rc == 2, err
    plan = json.loads(out)
    assert not plan["fits"] and plan["compiler"] == whole["compiler"]
    tried = [a["changes"] for a in plan["advice_tried"]]
    assert tried[0] == {"spec.training.remat": "full"} and len(tried) <= 2
    assert {"spec.training.microBatchSize": 4} in tried
    assert {"spec.training.microBatchSize": 4} in [a["changes"] for a in plan["fits_with"]]
    for a in plan["fits_with"]:  # one of each kind at most: remat, micro-batches, chips
        assert a["fits"] and a["total"] <= hbm
        assert a["devices"] == (8 if "spec.resources.topology" in a["changes"] else 4)


def test_the_advice_in_the_report():
    from posttrain.commands import plan as P

    job = json.loads(json.dumps(JOB))
    job["spec"].update(model={"base": "builtin:tiny"}, resources=TINY_V5E)
    remat = P.Advice({"spec.training.remat": "full"}, int(13.48 * 2**30), 8, True)
    chips = P.Advice({"spec.resources.topology": "4x4"}, int(9.5 * 2**30), 16, True)
    plan = P.Plan(**{**_a_plan_over(), "fits_with": (remat, chips), "advice_tried": (remat, chips)})
    lines = P.report(parse_job(job), plan).splitlines()
    assert lines[-2].startswith("does not fit: 116.00 GiB > 16 GiB")
    assert lines[-1] == (
        "would fit with: spec.training.remat: full (13.48 GiB per device); "
        "spec.resources.topology: 4x4 (16 chips, 9.50 GiB per device)"
    )
    out = P._as_dict(plan)
    assert out["fits_with"][0] == {
        "changes": {"spec.training.remat": "full"}, "total": int(13.48 * 2**30), "devices": 8,
        "fits": True,
    }  # fmt: skip
    over = P.Advice({"spec.training.remat": "full"}, 20 * 2**30, 8, False)
    plan = P.Plan(**{**_a_plan_over(), "advice_tried": (over,)})
    assert P.report(parse_job(job), plan).splitlines()[-1] == (
        "no change tried fits: spec.training.remat: full (20.00 GiB per device)"
    )


def test_libtpus_refusal_over_hbm_gives_its_figure():
    """libtpu does not compile a program over the chip's HBM: its error names the temporaries."""
    import jax

    from posttrain.commands import plan as P

    class Refused:
        def compile(self):
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                "temporaries (50.74G) exceeds available HBM (15.75G)."
            )

    assert P._temporaries(Refused()) == (int(50.74 * 2**30), True)


def _libtpu() -> tuple[str, dict[str, str]] | None:
    """(libtpu's version, the environment its processes need): installed in the virtualenv
    (``.[tpu-plan]``), else the folder ``hack/libtpu.sh`` installs it into (CI runs it), put on
    PYTHONPATH; None when neither has it."""
    import importlib.metadata

    if libtpu_version() is not None:
        return libtpu_version(), dict(os.environ)
    script = Path(__file__).resolve().parents[2] / "hack" / "libtpu.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    asked = subprocess.run(
        ["bash", str(script), "--folder"], env=env, capture_output=True, text=True
    )
    if asked.returncode != 0:  # e.g. this jax pins no libtpu
        return None
    folder = asked.stdout.strip()
    found = [d for d in importlib.metadata.distributions(path=[folder]) if d.name == "libtpu"]
    if not found:
        return None
    path = os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)
    return found[0].version, {**os.environ, "PYTHONPATH": path}


@pytest.mark.skipif(
    _libtpu() is None,
    reason="libtpu is not installed (hack/libtpu.sh, or pip install -e '.[tpu-plan]'): the "
    "TPU compiler's path",
)
def test_libtpu_compiles_for_the_tpu_topology_on_this_host(tmp_path):
    """libtpu's compile-only devices for each generation's topologies (as MaxText's
    train_compile.py), and a plan whose figures are libtpu's."""
    found = _libtpu()
    assert found is not None
    version, env = found
    check = """
from posttrain.api import accelerators as acc
from posttrain.commands import plan as P
for name, g in acc.TPU_GENERATIONS.items():
    for topology, slices in ((g.topologies[0], 1), (g.topologies[1], 2)):
        devices = P.tpu_devices(name, topology, slices)
        assert len(devices) == acc.topology_chips(topology) * slices, (name, topology)
        assert devices[0].platform == "tpu", devices[0]
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-P", "-c", check], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.stdout.strip() == "ok", done.stderr[-3000:]
    rc, out, err = _plan(
        tmp_path, {"base": "builtin:tiny"}, TINY_V5E, args=("--compiler", "libtpu"), env=env
    )
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["compiler"] == f"libtpu {version}" and plan["devices"] == 4
    assert plan["activations"] > 0 and plan["fits"]


@pytest.mark.skipif(_libtpu() is None, reason="libtpu is not installed (hack/libtpu.sh)")
def test_libtpu_plans_the_step_with_the_tpus_attention_kernel(tmp_path):
    """For libtpu the step is traced as a TPU runs it: splash attention per shard (its Pallas
    kernel compiled by libtpu, not interpreted), which keeps the [B, H, T, T] scores out of
    memory, where the plain-XLA reference holds them for the backward pass."""
    found = _libtpu()
    assert found is not None
    version, env = found
    data = {"train": "gs://b/train.jsonl", "maxLength": 1024, "maxPromptLength": 32}
    activations = {}
    for attention in ("auto", "reference"):
        rc, out, err = _plan(
            tmp_path,
            {"base": "builtin:tiny"},
            TINY_V5E,
            args=("--compiler", "libtpu", "--advice", "0"),
            env=env,
            data=data,
            training={"steps": 1, "batchSize": 8, "attention": attention},
        )
        assert rc == 0, err
        plan = json.loads(out)
        assert plan["compiler"] == f"libtpu {version}", plan
        activations[attention] = plan["activations"]
    # 8 rows x 1024 tokens: the reference's float32 scores alone are 16 MiB per head and layer.
    assert activations["auto"] < 0.5 * activations["reference"], activations
