"""`posttrain plan`: fit / no-fit from config.json alone, on simulated devices (a subprocess, since
JAX reads the device count once)."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

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


def _plan(tmp_path, model, resources):
    job = json.loads(json.dumps(JOB))
    job["spec"]["model"], job["spec"]["resources"] = model, resources
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    cmd = [sys.executable, "-P", "-m", "posttrain.cli", "plan", str(path), "--json"]
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


def test_ppo_compiles_its_loss_with_the_value_head_and_lora_keeps_no_reference_copy(tmp_path):
    ppo = {"maxNewTokens": 24, "numMiniBatches": 2, "klCoef": 0.05}
    ppo["rewards"] = RL["rewards"]
    plan = _plan_rl(tmp_path, "ppo", ppo, lora={"rank": 4, "alpha": 8})
    assert plan["loss"] == "ppo" and plan["rollout"] > 0
    assert plan["reference"] == 0  # LoRA: the reference is the base with adapters off


def test_dpo_compiles_pairs(tmp_path):
    plan = _plan_rl(tmp_path, "dpo", None)
    assert plan["loss"] == "dpo" and plan["rollout"] is None and plan["activations"] > 0
