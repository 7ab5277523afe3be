"""``benchmarks/gpu.sh`` waits for a session that is lent a GPU, and gets one try there: its CPU
smoke run (``SMALL=1``, a tiny model, GRPO's ``--small``) must work here and print every figure
the GPU run reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_benchmark_runs_end_to_end_on_a_tiny_model():
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        SMALL="1",
        BATCH="2",
        SEQ="32",
        DECODE_BATCH="2",
        NEW_TOKENS="8",
        GRPO_ARGS="--small",
        JAX_PLATFORMS="cpu",
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2, proc.stdout[-3000:]
    sft, grpo = lines
    for key in ("sft_step_s", "sft_tokens_per_s", "sft_mfu", "decode_tokens_per_s"):
        assert math.isfinite(sft[key]) and sft[key] > 0, (key, sft)
    assert 0 < sft["decode_hbm_fraction"] < 1
    for key in ("grpo_step_s", "rollout_s", "update_s", "rollout_tokens_per_s", "update_mfu"):
        assert math.isfinite(grpo[key]) and grpo[key] > 0, (key, grpo)
    assert grpo["generated_tokens_per_step"] == 4 * 4 * 16  # --small: 4 prompts x G 4 x 16
