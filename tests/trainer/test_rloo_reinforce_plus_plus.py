"""RLOO and REINFORCE++: their advantages against numpy written from the papers' equations, then
each end to end on the tiny built-in model with the KL in the reward (real sampling, real steps)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from posttrain.api.v1alpha1 import PostTrainJob
from posttrain.trainer.algorithms import reinforce_plus_plus_loss as rpp
from posttrain.trainer.algorithms import rloo_loss
from posttrain.trainer.loop import train
from posttrain.trainer.tasks import arithmetic

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loop_jobs, as the loop tests do
import loop_jobs as jobs  # noqa: E402

RNG = np.random.default_rng(0)


def test_leave_one_out_is_the_reward_minus_the_others_mean():
    k, prompts = 4, 3
    r = RNG.normal(size=prompts * k)
    got = rloo_loss.leave_one_out_advantages(r, k)
    for p in range(prompts):
        for i in range(k):
            others = [r[p * k + j] for j in range(k) if j != i]
            assert got[p * k + i] == pytest.approx(r[p * k + i] - np.mean(others), abs=1e-12)
    # The leave-one-out advantage is k / (k - 1) times the group-mean one (Ahmadian et al.).
    centred = r.reshape(-1, k) - r.reshape(-1, k).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(got, centred.reshape(-1) * k / (k - 1), atol=1e-12)


def test_rloo_subtracts_the_sequence_kl_from_the_reward():
    r = np.array([1.0, 0.0])
    kl = np.array([[0.0, 0.5, 0.25, 9.0], [0.0, 1.0, 0.0, 9.0]])
    mask = np.array([[0, 1, 1, 0], [0, 1, 1, 0]], np.float64)  # the 9s are off the mask
    np.testing.assert_allclose(
        rloo_loss.kl_shaped_rewards(r, kl, mask, 0.1), [1.0 - 0.075, 0.0 - 0.1]
    )
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_loss.leave_one_out_advantages(r, 1)


def test_reinforce_plus_plus_returns_and_whitening_follow_the_definition():
    R, L, beta = 5, 7, 0.05
    mask = np.zeros((R, L))
    lengths = [3, 1, 5, 2, 4]
    for i, n in enumerate(lengths):
        mask[i, 2 : 2 + n] = 1
    r = RNG.normal(size=R)
    kl = RNG.normal(size=(R, L))
    got = rpp.advantages(r, kl, mask, beta)
    # By hand: reward on the last token, -beta kl on each, summed to go, whitened over tokens.
    returns = np.zeros((R, L))
    for i, n in enumerate(lengths):
        tokens = [2 + t for t in range(n)]
        rewards = {t: -beta * kl[i, t] for t in tokens}
        rewards[tokens[-1]] += r[i]
        for t in tokens:
            returns[i, t] = sum(rewards[s] for s in tokens if s >= t)
    values = returns[mask > 0]
    want = (returns - values.mean()) / np.sqrt(values.var(ddof=1) + rpp.WHITEN_EPS) * mask
    np.testing.assert_allclose(got, want, atol=1e-10)
    assert got[mask > 0].mean() == pytest.approx(0.0, abs=1e-10)
    assert got[mask == 0].tolist() == [0.0] * int((mask == 0).sum())


REWARDS = textwrap.dedent(
    """
    def digits(prompts, completions, **columns):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
    """
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rloo")
    arithmetic.write_jsonl(str(root / "train.jsonl"), arithmetic.problems("train")[:64])
    (root / "my_rewards.py").write_text(REWARDS)
    return root


def job(files: Path, algorithm: str, **block) -> PostTrainJob:
    return PostTrainJob.model_validate(jobs.rl_manifest(files, algorithm, batch_size=8, **block))


@pytest.mark.parametrize(
    ("algorithm", "block"),
    [("rloo", {"numGenerations": 4}), ("reinforce-plus-plus", {"numGenerations": 2})],
)
def test_reward_rises_with_the_kl_in_the_reward(files, tmp_path, algorithm, block):
    spec = job(files, algorithm, **block).spec.settings
    assert spec.beta > 0  # the papers' defaults put a KL in the reward: a reference is kept
    out = tmp_path / "run"
    train(job(files, algorithm, **block), str(out), progress_bar=False)
    steps: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["step"], {}).update(record)
    rewards = [steps[s]["reward_mean"] for s in sorted(steps) if "reward_mean" in steps[s]]
    assert len(rewards) == 12
    assert np.mean(rewards[-3:]) - np.mean(rewards[:3]) > 0.1, rewards
    assert all(np.isfinite(steps[s]["loss"]) for s in steps if "loss" in steps[s])
    assert "kl" not in steps[1]  # the loss has no KL term: it is in the advantages
