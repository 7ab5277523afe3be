"""The GRPO quickstart as a user runs it: the recipe is valid, a shortened copy runs end to end
(warm-up, RL, greedy eval before/after, summary, reward plot) and (slow) the whole run lifts the
task reward by at least 0.15."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.api import load_documents, parse_job

sys.path.insert(0, str(Path(__file__).parent))
from loop_jobs import ROOT  # noqa: E402
from loop_jobs import posttrain_run as run  # noqa: E402

EXAMPLE = ROOT / "examples" / "local" / "grpo-quickstart.yaml"


def test_quickstart_recipe_is_valid():
    (doc,) = load_documents(EXAMPLE)
    job = parse_job(doc)
    g = job.spec.grpo
    assert job.spec.algorithm == "grpo" and job.spec.model.base.startswith("builtin:")
    assert 0 < g.sft_warmup_steps < job.spec.training.steps and g.beta == 0
    assert [r.builtin for r in g.rewards] == ["math-answer"] and job.spec.data.eval


def test_a_shortened_quickstart_runs_end_to_end(tmp_path):
    (doc,) = load_documents(EXAMPLE)
    doc["spec"]["grpo"]["sftWarmupSteps"] = 2
    doc["spec"]["training"]["steps"] = 4
    doc["spec"]["training"]["batchSize"] = 8  # smaller rollouts; the eval runs in more chunks
    recipe = tmp_path / "short.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    proc = run(recipe, out, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_mean"] is None for r in records[:4]] == [True, True, False, False]
    final = records[-1]
    for key in ("reward_first", "reward_last", "eval_reward_before", "eval_reward_after"):
        assert 0 <= final[key] <= 1, key
    assert "eval_reward_after" in proc.stdout and "reward plot" in proc.stdout
    assert (out / "reward.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_quickstart_lifts_the_task_reward(tmp_path):
    out = tmp_path / "out"
    proc = run(EXAMPLE, out, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["reward_rise"] >= 0.15, final
    # RL must not cost greedy accuracy beyond the eval's noise: one standard error of a
    # 200-problem eval near 0.86 is 0.025 (the greedy answers are mostly right after the warm-up;
    # RL sharpens sampling). Runs that differ only in float rounding gave 0.83 -> 0.875,
    # 0.85 -> 0.87, 0.895 -> 0.92 and 0.865 -> 0.855 (docs/rl.md).
    assert final["eval_reward_after"] >= final["eval_reward_before"] - 0.025, final
