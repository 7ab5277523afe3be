"""The tools quickstart as a user runs it: the recipe is valid, a shortened copy runs end to end
(multi-turn warm-up, RL with the environment's calculator, samples.jsonl with the tool turns),
and (slow) the whole run lifts the sampled reward."""

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

EXAMPLE = ROOT / "examples" / "local" / "grpo-tools-quickstart.yaml"


def test_tools_quickstart_recipe_is_valid():
    (doc,) = load_documents(EXAMPLE)
    g = parse_job(doc).spec.grpo
    assert g.environment is not None and g.environment.max_turns == 2 and g.rewards == []
    assert 0 < g.sft_warmup_steps


def test_a_shortened_tools_quickstart_runs_end_to_end(tmp_path):
    (doc,) = load_documents(EXAMPLE)
    doc["spec"]["grpo"]["sftWarmupSteps"] = 2
    doc["spec"]["training"]["steps"] = 4
    doc["spec"]["training"]["batchSize"] = 4
    doc["spec"]["data"].pop("eval")
    recipe = tmp_path / "short.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    proc = run(recipe, out, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_mean"] is None for r in records[:4]] == [True, True, False, False]
    for key in ("turns", "tool_calls", "environment_seconds", "reward/environment"):
        assert records[2][key] is not None, key
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 and samples[0]["messages"][0]["role"] == "user"


@pytest.mark.slow
def test_tools_quickstart_lifts_the_sampled_reward(tmp_path):
    out = tmp_path / "out"
    proc = run(EXAMPLE, out, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["reward_rise"] >= 0.05, final
