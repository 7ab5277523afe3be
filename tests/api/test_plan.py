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
