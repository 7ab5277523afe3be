"""Issue #23's parts that need no training run: settings, EOS ids, exports' generation config,
micro-batched no-gradient passes, rollout correction on a batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from posttrain.api import JobInvalid, parse_job
from posttrain.api.settings.dapo import DapoSpec
from posttrain.api.settings.grpo import GrpoSpec
from posttrain.api.settings.gspo_token import GspoTokenSpec
from posttrain.api.settings.ppo import PpoSpec
from posttrain.trainer.algorithms import rollout
from posttrain.trainer.algorithms.base import in_micro_batches

REWARD = [{"builtin": "math-answer"}]


def manifest(algorithm: str, block: dict) -> dict:
    name = {"gspo-token": "gspoToken"}.get(algorithm, algorithm)
    return {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainJob",
        "metadata": {"name": "t"},
        "spec": {
            "algorithm": algorithm,
            "model": {"base": "builtin:tiny"},
            "data": {"train": "/data/train.jsonl"},
            name: {"rewards": REWARD, **block},
            "training": {"steps": 10},
            "resources": {"accelerator": "cpu"},
            "output": {"dir": "/tmp/out"},
        },
    }


def test_mini_batch_defaults_per_algorithm():
    assert GrpoSpec(rewards=REWARD).num_mini_batches == 1
    assert DapoSpec(rewards=REWARD).num_mini_batches == 16
    assert GspoTokenSpec(rewards=REWARD).num_mini_batches == 4
    assert DapoSpec(rewards=REWARD, numMiniBatches=2).num_mini_batches == 2


def test_k1_as_a_loss_term_is_refused_naming_the_field():
    with pytest.raises(JobInvalid) as err:
        parse_job(manifest("grpo", {"klEstimator": "k1"}))
    text = str(err.value)
    assert "spec.grpo.klEstimator" in text and "k2" in text and "k3+" in text
    assert parse_job(manifest("grpo", {"klEstimator": "k3+"})).spec.settings.kl_estimator == "k3+"


def test_rollout_correction_settings():
    assert not GrpoSpec(rewards=REWARD).rollout_correction.enabled  # off by default
    assert not PpoSpec(rewards=REWARD).rollout_correction.enabled
    job = parse_job(manifest("ppo", {"rolloutCorrection": {"importanceSampling": "token"}}))
    c = job.spec.settings.rollout_correction
    assert c.enabled and c.importance_sampling_threshold == 2.0
    with pytest.raises(JobInvalid, match=r"spec\.grpo\.rolloutCorrection\.vetoThreshold"):
        parse_job(manifest("grpo", {"rolloutCorrection": {"vetoThreshold": 1e-4}}))


def test_cut_at_eos_stops_at_any_eos_id():
    tokens = np.array([[5, 7, 3, 9], [5, 2, 7, 9], [5, 5, 5, 5]])
    valid = np.ones_like(tokens)
    np.testing.assert_array_equal(
        rollout.cut_at_eos(tokens, valid, [2, 7]), [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    )
    from posttrain.trainer.algorithms import overlong

    np.testing.assert_array_equal(overlong.truncated(tokens, valid, (2, 7)), [False, False, True])


def test_exports_keep_every_eos_id(tmp_path):
    from posttrain.trainer.models import builtin_config, create_model, load_pretrained
    from posttrain.trainer.models.checkpoint_io import save_pretrained

    config = builtin_config("tiny", vocab_size=64, eos_token_id=2)
    config = config.with_generation_config({"eos_token_id": [9, 2, 11]})
    model = create_model(config, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert written["eos_token_id"] == [9, 2, 11]
    assert load_pretrained(tmp_path / "out").config.eos_token_ids == (9, 2, 11)


def test_no_gradient_passes_run_in_micro_batches():
    seen: list[int] = []

    def call(batch):
        seen.append(len(batch["x"]))
        return {"y": batch["x"] * 2, "z": batch["x"][:, None] + 1}

    x = np.arange(10)
    out = in_micro_batches(call, {"x": x}, 4)
    assert seen == [4, 4, 4]  # the short last chunk is padded: one shape, one compile
    np.testing.assert_array_equal(out["y"], x * 2)
    np.testing.assert_array_equal(out["z"][:, 0], x + 1)
    assert in_micro_batches(call, {"x": x}, None)["y"].shape == (10,)


def test_rollout_correction_on_a_batch():
    from posttrain.api.settings.rl import RolloutCorrectionSpec
    from posttrain.trainer.algorithms.grpo import correct

    mask = np.zeros((3, 5), np.float32)
    mask[:, 1:4] = 1
    old = np.full((3, 5), -1.0, np.float32)
    sampler = old.copy()
    sampler[1, 2] = -3.0  # learner / sampler = e^2 on one token of row 1: TIS caps it at 2
    sampler[2, 1:4] = -1.5  # row 2's product e^1.5 > 2... and its tokens e^0.5 each
    batch = {"completion_mask": mask.copy(), "old_logp": old, "sampler_logp": sampler}
    c = RolloutCorrectionSpec(importanceSampling="token", rejection="sequence")
    correct(batch, c)
    assert batch["is_weights"][1, 2] == pytest.approx(2.0)
    assert batch["is_weights"][0, 1] == pytest.approx(1.0) and batch["is_weights"][0, 0] == 0
    np.testing.assert_array_equal(batch["rollout_rejected"], [False, True, True])
    assert batch["completion_mask"][0].sum() == 3 and batch["completion_mask"][1:].sum() == 0
