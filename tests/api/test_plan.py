"""`posttrain plan`: fit / no-fit from config.json alone, on simulated devices (a subprocess, since
JAX reads the device count once)."""

from __future__ import annotations

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
from posttrain.commands.plan import chip_count, model_config_json
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


def _plan(tmp_path, model, resources, *, as_json=True, **spec):
    job = json.loads(json.dumps(JOB))
    job["spec"]["model"], job["spec"]["resources"] = model, resources
    job["spec"].update(spec)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    cmd = [sys.executable, "-P", "-m", "posttrain.cli", "plan", str(path)]
    cmd += ["--json"] if as_json else []
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
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
    cmd = [sys.executable, "-P", "-m", "posttrain.cli", "plan", str(path), "--json"]
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
RUNNER = """
import json, sys
from posttrain.api import load_documents, parse_job
from posttrain.commands import plan as P

n, mode, jobs = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
P._simulate_devices(n)
for path, config in zip(jobs[::2], jobs[1::2]):
    job = parse_job(load_documents(path)[0], source=path)
    devices = P.chip_count(job.spec.resources)
    plan = P.plan_job(job, P.config_reader(job, config or None), devices, state_only=mode == "state")
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
    devices = max(chip_count(parse_job(load_documents(p)[0]).spec.resources) for p, _ in jobs)
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
