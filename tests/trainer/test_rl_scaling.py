"""RL that does what its settings say (issue #23), end to end on the tiny built-in model:
mini-batches make DAPO's clipping act, rollout correction logs the sampler/learner mismatch,
the first rollout's tokens do not depend on the device count, and every completion is scored
once across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from posttrain.api.v1alpha1 import PostTrainJob
from posttrain.trainer.tasks import arithmetic

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loop_jobs, as the loop tests do
import loop_jobs as jobs  # noqa: E402
from loop_jobs import per_step  # noqa: E402

REWARDS = textwrap.dedent(
    """
    import os

    def digits(prompts, completions, **columns):
        # Dense and easy to learn: the share of digits in the completion.
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    def counted(prompts, completions, **columns):
        # digits, and one line per call: this process's pid and how many completions it scored.
        with open(os.environ["REWARD_CALLS"], "a") as f:
            f.write(f"{os.getpid()} {len(completions)}\\n")
        return digits(prompts, completions)
    """
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rl23")
    arithmetic.write_jsonl(str(root / "train.jsonl"), arithmetic.problems("train")[:64])
    (root / "my_rewards.py").write_text(REWARDS)
    return root


def manifest(files: Path, algorithm: str, steps: int, reward: str = "digits", **block) -> dict:
    block = {"numGenerations": 8, **block}
    return jobs.rl_manifest(files, algorithm, steps=steps, reward=reward, name="rl23", **block)


def test_dapo_default_mini_batches_make_its_clipping_act(files, tmp_path):
    # DAPO's default numMiniBatches (16) with a smaller batch: a rollout batch of 2 x 16 prompts
    # x G = 8, each step training on 2 x 8 of its rows. Step 1 runs on the weights that sampled
    # (ratio exactly 1, nothing clipped); steps 2.. are off-policy, and clip-higher acts.
    from posttrain.trainer.loop import train

    m = manifest(files, "dapo", steps=4)
    m["spec"]["training"]["batchSize"] = 2
    job = PostTrainJob.model_validate(m)
    assert job.spec.settings.num_mini_batches == 16  # the default, not written
    out = tmp_path / "dapo"
    train(job, str(out), progress_bar=False)
    steps = per_step(out)
    assert steps[1]["ratio_mean"] == 1.0 and steps[1]["approx_kl"] == 0.0
    assert steps[1]["clip_fraction"] == 0.0
    later = [steps[s]["clip_fraction"] for s in (2, 3, 4)]
    assert max(later) > 0, later
    assert all(steps[s]["approx_kl"] > 0 for s in (2, 3, 4))
    # One rollout batch for the four steps: the rollout metrics are the same on each.
    assert len({steps[s]["reward_mean"] for s in (1, 2, 3, 4)}) == 1


def test_grpo_with_rollout_correction_logs_the_mismatch_and_learns(files, tmp_path):
    from posttrain.trainer.loop import train

    # Also what RL users look at: the held-out greedy reward every evalEverySteps, and the
    # completion log every logCompletionsEverySteps.
    correction = {"importanceSampling": "token", "rejection": "sequence"}
    m = manifest(
        files,
        "grpo",
        steps=12,
        beta=0.0,
        rolloutCorrection=correction,
        logCompletionsEverySteps=5,
    )
    arithmetic.write_jsonl(str(tmp_path / "eval.jsonl"), arithmetic.problems("test")[:16])
    m["spec"]["data"]["eval"] = str(tmp_path / "eval.jsonl")
    m["spec"]["training"]["evalEverySteps"] = 6
    job = PostTrainJob.model_validate(m)
    out = tmp_path / "grpo"
    result = train(job, str(out), progress_bar=False)
    steps = per_step(out)
    for s in steps.values():
        if "mismatch_kl" not in s:
            continue
        # float32 sampler and learner on CPU: the same model, so the mismatch is rounding only.
        assert abs(s["mismatch_kl"]) < 1e-3 and 0 <= s["mismatch_k3_kl"] < 1e-3
        assert s["rollout_is_mean"] == pytest.approx(1.0, abs=1e-3)
        assert s["rollout_rejected_fraction"] == 0.0
    assert all("mismatch_kl" in steps[s] for s in range(1, 13))
    rewards = [steps[s]["reward_mean"] for s in sorted(steps)]
    assert np.mean(rewards[-3:]) - np.mean(rewards[:3]) > 0.2, rewards
    assert result.final["reward_rise"] > 0.2
    assert [s for s in sorted(steps) if "eval_reward" in steps[s]] == [6]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in samples}) == [1, 6, 11]  # steps 0, 5, 10 (0-based)
    assert len(samples) == 3 * 16 and {"prompt", "completion", "reward"} <= set(samples[0])


def _run_script(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-P", __file__, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_first_rollout_is_the_same_on_four_devices_as_on_one(files, tmp_path):
    # A float32 GRPO run on 4 simulated CPU devices (mesh data 4) and on one: the first rollout
    # batch (saved in the checkpoint after its first of two steps) holds the same tokens. Past
    # the first update the weights differ by rounding (other reduction orders), so later
    # rollouts are other samples of nearly the same policy: alike in distribution only.
    batches, runs = {}, {}
    for devices in (1, 4):
        flags = f"--xla_force_host_platform_device_count={devices}"
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        m = manifest(files, "grpo", steps=8, beta=0.0, numIterations=2)
        m["spec"]["training"]["mesh"] = {"data": devices}
        m["spec"]["training"]["microBatchSize"] = 4
        recipe = tmp_path / f"job{devices}.yaml"
        recipe.write_text(yaml.safe_dump(m))
        out = tmp_path / f"out{devices}"
        _run_script(["first-rollout", str(recipe), str(out), str(devices)], env)
        batches[devices] = np.load(out / "first_rollout.npz")
        runs[devices] = per_step(out)
    for key in ("input_ids", "completion_mask", "attention_mask"):
        np.testing.assert_array_equal(batches[4][key], batches[1][key], err_msg=key)
    np.testing.assert_allclose(batches[4]["sampler_logp"], batches[1]["sampler_logp"], atol=1e-5)
    assert batches[1]["completion_mask"].sum() > 0
    one, four = runs[1], runs[4]
    assert sorted(one) == sorted(four) == list(range(1, 9))
    for s in (1, 2):  # the first rollout batch: the same completions, so the same rewards
        assert four[s]["reward_mean"] == pytest.approx(one[s]["reward_mean"], abs=1e-6)
    later = [(one[s]["reward_mean"], four[s]["reward_mean"]) for s in (3, 5, 7)]
    a, b = np.mean([x for x, _ in later]), np.mean([y for _, y in later])
    assert abs(a - b) < 0.15, later  # 3 rollout batches of 32 completions each, per layout


def test_two_processes_score_each_completion_once(files, tmp_path):
    # `posttrain run --processes 2`: each process scores its half of every rollout batch and the
    # rewards are gathered; the user's reward logs each call with its pid and size.
    calls = tmp_path / "calls.txt"
    m = manifest(files, "grpo", steps=2, reward="counted", beta=0.0)
    recipe = tmp_path / "job.yaml"
    recipe.write_text(yaml.safe_dump(m))
    out = tmp_path / "two"
    env = {**os.environ, "REWARD_CALLS": str(calls)}
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "posttrain.cli", "run", str(recipe), "--output", str(out),
         "--processes", "2"],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = [line.split() for line in calls.read_text().splitlines()]
    by_pid: dict[str, int] = {}
    for pid, n in lines:
        by_pid[pid] = by_pid.get(pid, 0) + int(n)
    rows = 4 * 8  # batchSize x G per rollout batch, one rollout batch per step
    assert len(by_pid) == 2, lines  # both processes scored
    assert sorted(by_pid.values()) == [rows, rows], lines  # half of 2 rollouts each: 2 x 16
    assert sum(by_pid.values()) == 2 * rows  # every completion exactly once
    steps = per_step(out)
    assert sorted(steps) == [1, 2] and steps[1]["reward_mean"] is not None


def _first_rollout(recipe: str, out: str, devices: int) -> None:
    import jax

    from posttrain.api import parse_job
    from posttrain.trainer.checkpoint import Checkpointer, checkpoint_dir
    from posttrain.trainer.loop import train

    assert jax.device_count() == devices, jax.devices()
    job = parse_job(yaml.safe_load(Path(recipe).read_text()))
    result = train(job, out, progress_bar=False, stop_after=1)
    assert result.preempted and result.step == 1
    t = job.spec.training
    ckpt = Checkpointer(checkpoint_dir(t.checkpoint, out), t.checkpoint)
    from posttrain.trainer.algorithms.rollout import saved_batch

    batch = saved_batch(ckpt, 1)
    ckpt.close()
    assert batch is not None
    np.savez(Path(out) / "first_rollout.npz", **batch)
    assert train(job, out, progress_bar=False).step == t.steps  # resumed, to the end
    print(f"first rollout saved on {devices} devices")


if __name__ == "__main__":
    if sys.argv[1] == "first-rollout":
        _first_rollout(sys.argv[2], sys.argv[3], int(sys.argv[4]))
