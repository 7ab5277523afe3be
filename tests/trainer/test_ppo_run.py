"""PPO end to end on the shared loop: the tiny built-in model, real sampling, a real value head,
real optimizer steps and orbax checkpoints. Shapes are tiny and fixed so each run compiles once."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from posttrain.api.v1alpha1 import PostTrainJob
from posttrain.trainer.loop import train
from posttrain.trainer.metrics import TIMING

_spec = importlib.util.spec_from_file_location(
    "loop_jobs", os.path.join(os.path.dirname(__file__), "loop_jobs.py")
)
jobs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jobs)

METRICS = (
    "reward_mean", "value_loss", "explained_variance", "clip_fraction", "approx_kl", "entropy",
    "kl", "completion_length", "policy_loss", "reward/digits",
)  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return jobs.write_ppo_files(tmp_path_factory.mktemp("ppo"))


def job(files: Path, steps: int = 12, model: dict | None = None, **ppo) -> PostTrainJob:
    return jobs.ppo_job(files, steps=steps, model=model, **ppo)


def per_step(out: Path) -> dict[int, dict]:
    """The step records (the final summary line shares the last step number; merged in)."""
    steps: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        steps.setdefault(m["step"], {}).update(m)
    return steps


@pytest.mark.slow
def test_ppo_raises_a_user_reward_from_a_file(files, tmp_path):
    out = tmp_path / "run"
    result = train(job(files, steps=16), str(out), progress_bar=False)
    steps = per_step(out)
    rewards = [steps[s]["reward_mean"] for s in sorted(steps)]
    assert np.mean(rewards[-4:]) - np.mean(rewards[:4]) > 0.2, rewards
    for key in METRICS:
        assert steps[1].get(key) is not None, key
    assert steps[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollouts: pi_old = pi_ref
    assert steps[16]["kl"] > 0  # the policy moved away from the reference
    assert steps[1]["approx_kl"] < 1e-9  # old log-probs come from the same forward as the loss's
    assert steps[1]["value_mean"] == 0.0  # the zero-initialised head, before any update
    assert steps[16]["value_mean"] > 0.05  # the critic learned the rewards are positive
    # The run's summary says the same (its own windows, so its rise is not the 4-step one above).
    final = result.final
    assert final["reward_rise"] == pytest.approx(final["reward_last"] - final["reward_first"])
    assert final["reward_rise"] > 0.1


def test_resume_mid_rollout_equals_uninterrupted(files, tmp_path):
    # One SFT warm-up step, then rollout batches of 2 epochs x 2 mini-batches = 4 steps: 2-5, 6-7.
    # Stopping after four steps resumes in the middle of a rollout batch, restored from the
    # checkpoint, with the same mini-batch order.
    spec = job(files, steps=7, klCoef=0.0, sftWarmupSteps=1)
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(spec, str(whole), progress_bar=False)
    first = train(spec, str(split), progress_bar=False, stop_after=4)
    assert first.preempted and first.step == 4
    second = train(spec, str(split), progress_bar=False)
    assert second.step == 7
    a, b = per_step(whole), per_step(split)
    assert sorted(a) == sorted(b) == list(range(1, 8))
    assert a[1]["sft_loss"] is not None and a[1]["reward_mean"] is None  # warm-up
    assert a[2]["sft_loss"] is None and a[2]["value_loss"] is not None  # RL
    for s in range(1, 8):
        for key in set(a[s]) - TIMING:
            if a[s][key] is None:
                assert b[s][key] is None, (s, key)
            else:
                assert b[s][key] == pytest.approx(a[s][key], rel=1e-5, abs=1e-6), (s, key)


@pytest.mark.parametrize(
    "model",
    [
        {"lora": {"rank": 4, "alpha": 8}},
        pytest.param(
            {"lora": {"rank": 4, "alpha": 8}, "quantization": {"type": "nf4", "blockSize": 32}},
            marks=pytest.mark.slow,
        ),
    ],
    ids=["lora", "qlora"],
)
def test_with_lora_the_value_head_trains_and_the_reference_is_the_base(files, tmp_path, model):
    # Fresh adapters leave the model equal to its base, so the first rollouts' KL is exactly
    # zero; the zero-initialised value head predicts 0 until it has trained.
    out = tmp_path / "lora"
    train(job(files, steps=5, model=model, valueLearningRate=3e-2), str(out), progress_bar=False)
    steps = per_step(out)
    assert steps[1]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert steps[1]["value_mean"] == 0.0
    assert steps[5]["value_mean"] != 0.0  # rollouts 2 were valued by the trained head
    assert steps[5]["kl"] > 1e-6


def test_a_separate_critic_trains_beside_the_policy(files, tmp_path):
    # ppo.critic: separate: a second copy of the base with its own value head, trained in full
    # while the policy trains only its adapters (LoRA).
    said: list[str] = []
    lora = {"lora": {"rank": 4, "alpha": 8}}
    out = tmp_path / "separate"
    train(job(files, steps=5, model=lora, critic="separate"), str(out), say=said.append)
    steps = per_step(out)
    assert steps[1]["value_mean"] == 0.0 and steps[5]["value_mean"] != 0.0
    assert steps[1]["kl"] == pytest.approx(0.0, abs=1e-7)
    setup = next(line for line in said if "trainable" in line)
    trainable, total = (
        int(n.replace(",", "")) for n in re.findall(r"([\d,]+) (?:trainable|param)", setup)
    )
    assert trainable > total / 2  # the critic's copy trains in full, the policy's base is frozen
