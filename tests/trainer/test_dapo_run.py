"""DAPO and Dr. GRPO end to end on the shared loop (the tiny built-in model, real sampling, real
optimizer steps and orbax checkpoints), and a resume in the middle of dynamic sampling."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from posttrain.api.v1alpha1 import PostTrainJob
from posttrain.trainer.loop import train
from posttrain.trainer.metrics import TIMING
from posttrain.trainer.tasks import arithmetic

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loop_jobs, as the loop tests do
import loop_jobs as jobs  # noqa: E402
from loop_jobs import per_step  # noqa: E402

REWARDS = textwrap.dedent(
    """
    def digits(prompts, completions, **columns):
        # Dense and easy to learn: the share of digits in the completion.
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    def starts_with_digit(prompts, completions, **columns):
        # Sparse for an untrained model: many groups of G are all 0, so dynamic sampling filters.
        return [float(c[:1].isdigit()) for c in completions]
    """
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dapo")
    arithmetic.write_jsonl(str(root / "train.jsonl"), arithmetic.problems("train")[:64])
    (root / "my_rewards.py").write_text(REWARDS)
    return root


def job(files: Path, algorithm: str, steps: int, reward: str = "digits", **grpo) -> PostTrainJob:
    block = {"numGenerations": 8, **grpo}
    return PostTrainJob.model_validate(
        jobs.rl_manifest(files, algorithm, steps=steps, reward=reward, name="dapo-test", **block)
    )


def rise(steps: dict[int, dict], key: str) -> float:
    values = [steps[s][key] for s in sorted(steps)]
    return float(np.mean(values[-3:]) - np.mean(values[:3]))


@pytest.mark.slow
def test_dapo_raises_a_user_reward_with_its_defaults(files, tmp_path):
    out = tmp_path / "dapo"
    # One optimizer step per rollout batch (numMiniBatches 1, not DAPO's 16): 12 rollout
    # batches, so the sampled reward can rise (test_rl_mini_batches.py runs the default 16).
    train(job(files, "dapo", steps=12, numMiniBatches=1), str(out), progress_bar=False)
    steps = per_step(out)
    # The policy learns both terms: stop before maxNewTokens (the penalty fades) and more digits.
    assert rise(steps, "reward_mean") > 0.3, [steps[s]["reward_mean"] for s in sorted(steps)]
    assert rise(steps, "reward/digits") > 0.1, [steps[s]["reward/digits"] for s in sorted(steps)]
    assert rise(steps, "truncated_fraction") < -0.2
    first = steps[1]
    # DAPO's defaults are on: dynamic sampling and the soft overlong penalty (buffer 8 // 5 = 1:
    # only a completion of maxNewTokens tokens loses reward, exactly -1; every truncated one does,
    # and one whose EOS is its 8th token too).
    for key in ("groups_filtered_fraction", "sampling_rounds", "truncated_fraction"):
        assert first.get(key) is not None, key
    assert "kl" not in first  # beta 0: no reference
    for s in steps.values():
        assert -1 <= s["reward/overlong"] <= -s["truncated_fraction"] + 1e-6
        assert 1 <= s["sampling_rounds"] <= 10


@pytest.mark.slow
def test_dr_grpo_raises_a_user_reward(files, tmp_path):
    out = tmp_path / "dr-grpo"
    train(job(files, "dr-grpo", steps=12), str(out), progress_bar=False)
    steps = per_step(out)
    assert rise(steps, "reward_mean") > 0.2, [steps[s]["reward_mean"] for s in sorted(steps)]
    assert "groups_filtered_fraction" not in steps[1]  # Dr. GRPO samples once per step


def test_resume_in_the_middle_of_dynamic_sampling_continues_exactly(files, tmp_path):
    # A sparse reward, so steps take two rounds (and prompts) and one runs short after them;
    # numIterations 2, so stopping after three steps leaves a batch half trained. The checkpoint
    # must bring back that batch and how many prompts the rounds have used.
    spec = job(
        files,
        "dapo",
        steps=6,
        reward="starts_with_digit",
        numGenerations=4,  # fewer completions per prompt: more groups with equal rewards
        numIterations=2,
        numMiniBatches=1,  # a rollout batch per two steps: rounds on every other step
        maxSamplingRounds=2,
        overlong={"mode": "filter"},
    )
    whole, split = tmp_path / "whole", tmp_path / "split"
    said: list[str] = []
    train(spec, str(whole), progress_bar=False, say=said.append)
    first = train(spec, str(split), progress_bar=False, stop_after=3)
    assert first.preempted and first.step == 3
    assert train(spec, str(split), progress_bar=False).step == 6
    a, b = per_step(whole), per_step(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    rounds = [a[s]["sampling_rounds"] for s in sorted(a)]
    assert max(rounds) == 2, rounds  # some step needed a second round of prompts
    filler = [a[s]["groups_with_equal_rewards"] for s in sorted(a)]
    assert max(filler) > 0, filler  # and some step ran short: equal-reward groups filled it
    short = [m for m in said if m.startswith("dynamic sampling: only")]
    assert len(short) == 1 and "after 2 rounds (spec.dapo.maxSamplingRounds)" in short[0], said
    for s in range(1, 7):
        for key in set(a[s]) - TIMING:
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-5, abs=1e-6), (s, key)


def test_messages_name_the_algorithms_own_block(files, tmp_path):
    """A setting refused at build time is named by the block the job writes: spec.drGrpo."""
    from posttrain.trainer.algorithms import dr_grpo
    from posttrain.trainer.algorithms.base import Context
    from posttrain.trainer.setup import load_tokenizer

    spec = job(files, "dr-grpo", steps=2, maxNewTokens=20)  # 8 prompt + 20 new > maxLength 24
    tok = load_tokenizer(spec.spec.model)
    with pytest.raises(ValueError, match=r"^spec\.drGrpo\.maxNewTokens: 20 new tokens"):
        dr_grpo.build(Context(job=spec, tokenizer=tok, output_dir=str(tmp_path)))
