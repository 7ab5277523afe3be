"""The SFT quickstart as a user runs it: its data is what the generator writes, and (slow) the
built-in model learns the task: the loss falls and held-out accuracy is printed and high."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.api import load_documents, parse_job
from posttrain.trainer.tasks import arithmetic

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "local" / "sft-quickstart.yaml"


def test_shipped_data_is_the_generators_output(tmp_path):
    arithmetic.main(["--out", str(tmp_path)])
    prompts = {}
    for split in ("train", "test"):
        shipped = (
            ROOT / "examples" / "local" / "data" / "arithmetic" / f"{split}.jsonl"
        ).read_text()
        assert shipped == (tmp_path / f"{split}.jsonl").read_text()
        prompts[split] = {json.loads(line)["prompt"] for line in shipped.splitlines()}
    assert len(prompts["test"]) == 200 and not prompts["train"] & prompts["test"]


def test_quickstart_recipe_is_valid():
    (doc,) = load_documents(EXAMPLE)
    job = parse_job(doc)
    assert job.spec.model.base == "builtin:tiny" and job.spec.data.eval


@pytest.mark.slow
def test_quickstart_learns_the_task(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "run", str(EXAMPLE), "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.2 * losses[0]
    final = records[-1]
    assert final["eval_exact_match"] >= 0.8, final
    assert "eval_exact_match" in proc.stdout
