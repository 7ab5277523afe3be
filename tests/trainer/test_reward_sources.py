"""`http` and `rewardModel` reward items built by `rewards.build_rewards` (the trainer's path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from posttrain.api.settings.rl import RewardSpec
from posttrain.trainer import rewards as rw
from posttrain.trainer.rewards_http import HttpReward

REWARD_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf-reward"


def test_http_item_becomes_an_http_reward_named_by_its_item():
    spec = RewardSpec.model_validate(
        {
            "http": {
                "url": "http://127.0.0.1:9/score",
                "timeout": 3,
                "maxConcurrency": 2,
                "retries": 0,
                "default": -1.0,
            },
            "name": "judge",
        }  # fmt: skip
    )
    (reward,) = rw.build_rewards([spec], "spec.dapo.rewards")
    fn = reward.fn
    assert isinstance(fn, HttpReward)
    assert (fn.url, fn.timeout_s, fn.concurrency, fn.retries, fn.default) == (
        "http://127.0.0.1:9/score", 3.0, 2, 0, -1.0,
    )  # fmt: skip
    assert "spec.dapo.rewards[0] (judge)" in fn.where
    # Nothing listens on port 9: the default applies, the run goes on.
    assert fn(["p"], ["c"]) == [-1.0]


def test_reward_model_item_scores_prompt_plus_completion_as_transformers():
    folder = REWARD_FIXTURES / "qwen2-rm"
    expected = json.loads((folder / "expected.json").read_text())
    texts = [t for t in expected["texts"] if t["kind"] == "plain"]
    spec = RewardSpec.model_validate({"rewardModel": {"path": str(folder), "batchSize": 2}})
    (reward,) = rw.build_rewards([spec])
    assert reward.name == "reward-model"
    prompts = [t["text"][:5] for t in texts]
    completions = [t["text"][5:] for t in texts]
    scores = rw.score([reward], prompts, completions, {})[1]["reward-model"]
    np.testing.assert_allclose(scores, [t["score"] for t in texts], atol=1e-4, rtol=0)


def test_a_reward_model_that_cannot_load_is_named(tmp_path):
    spec = RewardSpec.model_validate({"rewardModel": {"path": str(tmp_path)}})
    with pytest.raises(rw.RewardError, match=r"spec.grpo.rewards\[0\].rewardModel: cannot load"):
        rw.build_rewards([spec])
