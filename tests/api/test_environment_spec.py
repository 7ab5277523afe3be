"""`environment` on the GRPO family and the `http` / `rewardModel` reward items: errors name the
field the user wrote."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from posttrain.api import JobInvalid, parse_job
from posttrain.api.algorithms import REGISTRY

BASE: dict[str, Any] = {
    "apiVersion": "posttrain.dev/v1alpha1",
    "kind": "PostTrainJob",
    "metadata": {"name": "t"},
    "spec": {
        "algorithm": "grpo",
        "model": {"base": "builtin:tiny"},
        "data": {"train": "/d/train.jsonl"},
        "grpo": {
            "environment": {"class": "/envs/maze.py:Maze", "maxTurns": 2},
            "rewards": [{"http": {"url": "http://127.0.0.1:8000/score"}}],
        },
        "training": {"steps": 10},
        "resources": {"accelerator": "cpu"},
    },
}


def doc(algorithm: str = "grpo", **block: Any) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    grpo = {**d["spec"].pop("grpo"), **block}
    d["spec"]["algorithm"] = algorithm
    d["spec"][REGISTRY[algorithm].block] = {k: v for k, v in grpo.items() if v is not None}
    return d


def errors(d: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(JobInvalid) as info:
        parse_job(d)
    return {e.path: e.message for e in info.value.errors}


@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "dr-grpo", "gspo-token", "rloo"])
def test_the_contract_parses_on_every_grpo_variant(algorithm):
    g = parse_job(doc(algorithm)).spec.settings
    assert g.environment.class_ == "/envs/maze.py:Maze" and g.environment.max_turns == 2
    assert g.rewards[0].http.url == "http://127.0.0.1:8000/score"


def test_an_environment_needs_no_rewards_but_without_one_they_are_required():
    assert parse_job(doc(rewards=[])).spec.settings.rewards == []
    assert "at least 1 item" in errors(doc(rewards=[], environment=None))["spec.grpo.rewards"]


@pytest.mark.parametrize(
    ("block", "path", "message"),
    [
        (
            {"rewards": [{"http": {"url": "http://x/s"}, "builtin": "math-answer"}]},
            "spec.grpo.rewards[0]",
            "exactly one of builtin, function, http or rewardModel",
        ),
        ({"rewards": [{"http": {"url": "ftp://x"}}]}, "spec.grpo.rewards[0].http.url", "pattern"),
        ({"rewards": [{"http": {"url": "http://x", "timeout": 0}}]},
         "spec.grpo.rewards[0].http.timeout", "greater than 0"),
        ({"rewards": [{"rewardModel": {}}]}, "spec.grpo.rewards[0].rewardModel.path", "missing"),
        ({"environment": {"maxTurns": 2}}, "spec.grpo.environment.class", "missing"),
        ({"environment": {"class": "nocolon"}}, "spec.grpo.environment.class", "pattern"),
        ({"environment": {"class": "m:E", "maxTurns": 0}}, "spec.grpo.environment.maxTurns",
         "greater than or equal to 1"),
        ({"environment": {"class": "m:E", "tools": ["a:f", "/t.py:f"]}},
         "spec.grpo.environment.tools[1]", "already given by tools[0]"),
        ({"environment": {"class": "m:E", "tools": ["a:python"], "sandbox": {}}},
         "spec.grpo.environment.tools[0]", "sandbox"),
        ({"rewards": [{"builtin": "math-answer", "name": "environment"}]},
         "spec.grpo.rewards[0].name", "reward/environment"),
    ],
)  # fmt: skip
def test_errors_name_the_field(block, path, message):
    found = errors(doc(**block))
    assert path in found, found
    assert message in found[path], found[path]


def test_ppo_takes_the_new_reward_items():
    d = copy.deepcopy(BASE)
    d["spec"].pop("grpo")
    d["spec"]["algorithm"] = "ppo"
    d["spec"]["ppo"] = {"rewards": [{"rewardModel": {"path": "hf://org/rm"}, "weight": 0.5}]}
    assert parse_job(d).spec.settings.rewards[0].reward_model.path == "hf://org/rm"


def test_rewards_or_an_environment_is_a_cel_rule_of_each_grpo_block():
    from posttrain.api.crd import crd

    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = [r["rule"] for r in schema["properties"]["spec"]["x-kubernetes-validations"]]
    for block in ("grpo", "dapo", "drGrpo", "gspoToken", "rloo", "reinforcePlusPlus"):
        assert (
            f"!has(self.{block}) || has(self.{block}.environment) || "
            f"(has(self.{block}.rewards) && size(self.{block}.rewards) > 0)"
        ) in rules, block
    assert not any("self.ppo.environment" in r for r in rules)


def test_plan_compiles_a_multi_turn_job_at_its_longer_rows(tmp_path):
    """The step is compiled on rows of maxPromptLength + maxTurns x (maxNewTokens +
    maxObservationTokens), and the rollout at the last turn's context width."""
    import json
    import subprocess
    import sys

    import yaml

    d = copy.deepcopy(BASE)
    d["spec"]["model"] = {"base": "builtin:tiny"}
    d["spec"]["data"].update({"maxPromptLength": 16, "maxLength": 128})
    d["spec"]["grpo"].update({"numGenerations": 4, "maxNewTokens": 24, "beta": 0.04})
    d["spec"]["grpo"]["environment"].update({"maxTurns": 3, "maxObservationTokens": 12})
    d["spec"]["resources"] = {"accelerator": "tpu-v5e", "topology": "2x2"}
    d["spec"]["output"] = {"dir": "gs://b/out"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(d))
    cmd = [sys.executable, "-P", "-m", "posttrain.cli", "plan", str(path), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["fits"] and plan["activations"] > 0 and plan["rollout"] > 0
    # 32 (the default batchSize) x 4 rows; the widest context 16 + 2 x 36 + 12 = 100 (bucket 128) + 24 new (bucket 32);
    # 2 layers, K x D = 2 x 16, bf16.
    assert plan["kv_cache"] == 2 * 2 * 128 * (128 + 32) * 2 * 16 * 2
