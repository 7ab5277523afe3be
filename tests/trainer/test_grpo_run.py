"""GRPO / GSPO-token end to end on the shared loop: the tiny built-in model, real sampling, real
optimizer steps and orbax checkpoints. Shapes are tiny and fixed so each run compiles once."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from posttrain.api.v1alpha1 import PostTrainJob
from posttrain.trainer.loop import train
from posttrain.trainer.metrics import TIMING
from posttrain.trainer.rewards import RewardError
from posttrain.trainer.tasks import arithmetic

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loop_jobs, as the loop tests do
import loop_jobs as jobs  # noqa: E402
from loop_jobs import per_step  # noqa: E402

REWARDS = textwrap.dedent(
    """
    def digits(prompts, completions, answer, **columns):
        # Dense and easy to learn: the share of digits in the completion.
        assert len(answer) == len(completions)  # the data row's columns arrive aligned
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    def broken(prompts, completions, **columns):
        raise RuntimeError("reward service unavailable")
    """
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grpo")
    arithmetic.write_jsonl(str(root / "train.jsonl"), arithmetic.problems("train")[:64])
    (root / "my_rewards.py").write_text(REWARDS)
    return root


def job(files: Path, algorithm: str = "grpo", steps: int = 12, **grpo) -> PostTrainJob:
    block = {"numGenerations": 8, "beta": 0.0, **grpo}
    return PostTrainJob.model_validate(
        jobs.rl_manifest(files, algorithm, steps=steps, name="grpo-test", **block)
    )


def test_grpo_reward_rises_with_a_user_reward_from_a_file(files, tmp_path):
    out = tmp_path / "run"
    result = train(job(files, beta=0.04), str(out), progress_bar=False)
    steps = per_step(out)
    rewards = [steps[s]["reward_mean"] for s in sorted(steps)]
    assert np.mean(rewards[-3:]) - np.mean(rewards[:3]) > 0.2, rewards
    first = steps[1]
    for key in (
        "reward_mean", "reward_std", "reward/digits", "kl", "clip_fraction", "entropy",
        "completion_length", "generation_tokens_per_second", "train_tokens_per_second",
    ):  # fmt: skip
        assert first.get(key) is not None, key
    assert steps[12]["kl"] > 0  # the policy moved away from the reference
    assert result.final["reward_rise"] > 0.2
    assert (out / "reward.png").read_bytes()[:4] == b"\x89PNG"


def test_gspo_token_runs_and_differs_from_grpo_only_off_policy(files, tmp_path):
    # numIterations 2: the first pass of a batch is on-policy (both ratios are 1, so the two
    # algorithms take the same step); on the second pass GSPO-token's sequence ratio differs.
    runs = {}
    for algorithm in ("grpo", "gspo-token"):
        out = tmp_path / algorithm
        spec = job(files, algorithm, steps=2, numIterations=2, numMiniBatches=1)
        train(spec, str(out), progress_bar=False)
        runs[algorithm] = per_step(out)
    grpo, gspo = runs["grpo"], runs["gspo-token"]
    assert gspo[1]["loss"] == pytest.approx(grpo[1]["loss"], abs=1e-5)
    assert gspo[1]["reward_mean"] == grpo[1]["reward_mean"]  # same rollouts
    assert gspo[2]["ratio_mean"] != pytest.approx(grpo[2]["ratio_mean"], abs=1e-6)
    assert gspo[2]["loss"] != pytest.approx(grpo[2]["loss"], abs=1e-6)


def test_old_and_reference_logprobs_come_at_the_sampling_temperature(files, tmp_path):
    # On the first pass the policy is pi_old and pi_ref: the ratio is 1 and the KL 0 only if the
    # loop's hooks compute their log-probs at the temperature the loss uses.
    out = tmp_path / "out"
    spec = job(files, steps=1, numIterations=2, beta=0.1, temperature=0.5)
    train(spec, str(out), progress_bar=False)
    first = per_step(out)[1]
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)


def test_resume_mid_rl_equals_uninterrupted(files, tmp_path):
    # Warm-up steps 0-1 (SFT), then rollout groups of two steps: 2-3, 4-5, 6. Stopping after five
    # steps resumes in the middle of a group, whose rollouts come back from the checkpoint.
    spec = job(files, steps=7, sftWarmupSteps=2, numIterations=2)
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(spec, str(whole), progress_bar=False)
    first = train(spec, str(split), progress_bar=False, stop_after=5)
    assert first.preempted and first.step == 5
    second = train(spec, str(split), progress_bar=False)
    assert second.step == 7
    a, b = per_step(whole), per_step(split)
    assert sorted(a) == sorted(b) == list(range(1, 8))
    assert a[1]["sft_loss"] is not None and a[1]["reward_mean"] is None  # warm-up
    assert a[3]["sft_loss"] is None and a[3]["reward_mean"] is not None  # RL
    for s in range(1, 8):
        for key in set(a[s]) - TIMING:
            if a[s][key] is None:
                assert b[s][key] is None, (s, key)
            else:
                assert b[s][key] == pytest.approx(a[s][key], rel=1e-5, abs=1e-6), (s, key)


def test_a_failing_reward_stops_the_run_naming_it(files, tmp_path):
    spec = job(
        files,
        steps=2,
        rewards=[
            {"builtin": "length-penalty"},
            {"function": f"{files}/my_rewards.py:broken", "name": "judge"},
        ],
    )
    with pytest.raises(RewardError, match=r"spec.grpo.rewards\[1\] \(judge\) raised RuntimeError"):
        train(spec, str(tmp_path / "broken"), progress_bar=False)


def test_with_lora_the_reference_is_the_base_model(files, tmp_path):
    # Fresh adapters leave the model equal to its base, so the first step's KL is exactly zero;
    # the reference is the base with adapters off (the loop keeps no second copy of the weights).
    spec = job(files, steps=3, beta=0.1).model_dump(by_alias=True)
    spec["spec"]["model"]["lora"] = {"rank": 4, "alpha": 8}
    out = tmp_path / "lora"
    train(PostTrainJob.model_validate(spec), str(out), progress_bar=False)
    steps = per_step(out)
    assert steps[1]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert steps[3]["kl"] > 1e-6
