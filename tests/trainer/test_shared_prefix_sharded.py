"""The shared prompt forward on a data-parallel mesh: a GRPO run on 4 fake CPU devices (rows
sharded over fsdp=4, two micro-batches of 8 rows, so a group of 4 spans two devices) logs the
same losses, gradient norms, KL and clip fractions with ``sharePromptForward`` on and off.

XLA_FLAGS must be set before JAX initialises, so the checks run in a fresh interpreter.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loop_jobs, as the loop tests do
import loop_jobs as jobs  # noqa: E402

KEYS = ("loss", "grad_norm", "kl", "clip_fraction", "reward_mean")


def test_shared_prompt_forward_on_four_cpu_devices(run_on_cpu_devices):
    run_on_cpu_devices(
        __file__, "sharded shared-prompt checks passed", timeout=600, env=jobs.subprocess_env()
    )


def _main() -> None:
    import jax
    import pytest

    assert jax.device_count() == 4, jax.devices()
    root = Path(tempfile.mkdtemp(prefix="shared-prompt-sharded-"))
    training = {
        "steps": 2,
        "microBatchSize": 2,
        "learningRate": 1e-2,
        "schedule": {"name": "constant", "warmupSteps": 0},
    }
    runs = {}
    for share in (True, False):
        folder = root / f"share-{share}"
        folder.mkdir()
        job = jobs.grpo_job(
            folder, prompts=32, training=training, numIterations=2, sharePromptForward=share
        )
        jobs.run_training(job, folder / "run")
        runs[share] = [m for m in jobs.metrics(folder / "run") if "loss" in m]
    assert len(runs[True]) == 2 and runs[True][1]["clip_fraction"] > 0, runs[True]
    for shared, plain in zip(runs[True], runs[False], strict=True):
        for key in KEYS:
            assert shared[key] == pytest.approx(plain[key], rel=2e-3, abs=1e-5), (
                key,
                shared,
                plain,
            )
    print("sharded shared-prompt checks passed")


if __name__ == "__main__":
    jobs.enable_compile_cache()
    _main()
