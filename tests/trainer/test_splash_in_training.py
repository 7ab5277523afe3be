"""The trainer's jitted steps run splash attention per shard on a multi-device mesh: SFT on a
(fsdp=2, tensor=2) mesh of 4 fake CPU devices with ``training.attention: splash`` (Pallas
interpret mode) trains to the same losses and eval loss as ``attention: reference``, and the
kernel saw each shard's rows and heads, not the whole batch.

XLA_FLAGS must be set before JAX initialises, so the checks run in a fresh interpreter.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loop_jobs, as the loop tests do
import loop_jobs as jobs  # noqa: E402


def test_the_api_names_every_attention_kernel():
    from typing import get_args

    from posttrain.api.v1alpha1 import TrainingSpec
    from posttrain.trainer.models.attention_kernels import IMPLEMENTATIONS

    field = TrainingSpec.model_fields["attention"]
    assert get_args(field.annotation) == IMPLEMENTATIONS
    assert field.default == "auto"
    with pytest.raises(ValueError, match="attention"):
        TrainingSpec(attention="flash")


def test_splash_runs_per_shard_in_the_training_step_on_four_cpu_devices(run_on_cpu_devices):
    run_on_cpu_devices(
        __file__, "splash training checks passed", timeout=600, env=jobs.subprocess_env()
    )


def _main() -> None:
    import jax
    import numpy as np

    from posttrain.trainer.loop import train
    from posttrain.trainer.models import attention_kernels as ak

    assert jax.device_count() == 4, jax.devices()
    seen: list[tuple[int, ...]] = []
    local = ak._splash_local

    def spy(q, *args, **kwargs):
        seen.append(q.shape)
        return local(q, *args, **kwargs)

    ak._splash_local = spy
    root = Path(tempfile.mkdtemp(prefix="splash-training-"))
    results = {}
    for attention in ("reference", "splash"):
        job = jobs.job(
            root / attention,
            data={"maxLength": ak.SPLASH_BLOCK},
            training={
                "steps": 2,
                "batchSize": 4,
                "attention": attention,
                "mesh": {"data": 1, "fsdp": 2, "tensor": 2},
                "checkpoint": {"everySteps": 100, "keep": 1},
            },
        )
        out = root / attention / "out"
        train(job, str(out), say=lambda *_: None, progress_bar=False)
        records = jobs.metrics(out)
        results[attention] = (
            jobs.losses(out),
            [r["eval_loss"] for r in records if "eval_loss" in r],
        )
    # The tiny model has 4 query / 2 kv heads: a shard holds 2 of the 4 rows (fsdp) and 1 kv
    # head's 2 query heads (tensor).
    assert seen and all(shape[0] == 2 and shape[2] == 2 for shape in seen), seen
    assert all(shape[1] == ak.SPLASH_BLOCK for shape in seen), seen
    (want_losses, want_eval), (got_losses, got_eval) = results["reference"], results["splash"]
    assert sorted(got_losses) == [1, 2] and len(got_eval) >= 2, results
    for step, want in want_losses.items():
        np.testing.assert_allclose(got_losses[step], want, rtol=1e-4, err_msg=f"step {step}")
    np.testing.assert_allclose(got_eval, want_eval, rtol=1e-4)
    print("splash training checks passed", results)


if __name__ == "__main__":
    _main()
