"""On-policy distillation and the generalised JSD wired into the spec (issue #26): settings, the
student's own samples as batches (seeded, resumable), every vocabulary term in chunks in the
compiled step of a 152k-vocabulary job, and a short end-to-end run."""

from __future__ import annotations

import importlib.util
import os
import re

import jax
import numpy as np
import pytest

from posttrain.api.settings.distill import DistillSpec
from posttrain.trainer.loop import train
from posttrain.trainer.models.config import builtin_config
from posttrain.trainer.models.logprobs import chunk_tokens_for
from posttrain.trainer.setup import Abstract, build_run

_spec = importlib.util.spec_from_file_location(
    "loop_jobs", os.path.join(os.path.dirname(__file__), "loop_jobs.py")
)
jobs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jobs)
jobs.enable_compile_cache()

QWEN_VOCAB = 152_064


def test_settings():
    d = DistillSpec.model_validate({"teacher": "builtin:tiny"})
    assert (d.on_policy, d.beta, d.lmbda, d.jsd_beta) == (False, None, 0.5, None)
    on = DistillSpec.model_validate({"teacher": "builtin:tiny", "onPolicy": True})
    assert on.jsd_beta == 1.0  # reverse KL by default on-policy
    assert DistillSpec.model_validate({"teacher": "x", "beta": 0.5}).jsd_beta == 0.5
    with pytest.raises(ValueError, match="onPolicy is read by strategy logit only"):
        DistillSpec.model_validate({"teacher": "x", "strategy": "attention", "onPolicy": True})
    with pytest.raises(ValueError):
        DistillSpec.model_validate({"teacher": "x", "beta": 1.5})


def vocab_arrays(hlo: str, vocab: int) -> list[int]:
    counts = []
    for dims in re.findall(r"f32\[([\d,]+)\]", hlo):
        shape = [int(d) for d in dims.split(",")]
        if vocab in shape:
            counts.append(int(np.prod(shape)))
    return counts


@pytest.mark.parametrize(
    "distill", [{"strategy": "logit", "onPolicy": True}, {"strategy": "attention"}]
)
def test_compiled_step_of_a_152k_vocabulary_job_holds_one_chunk_of_logits(tmp_path, distill):
    """The step ``posttrain plan`` compiles (``run.lower_step()``), student and teacher with
    Qwen2.5's vocabulary: no float32 array over the vocabulary exceeds one chunk of tokens
    (``chunk_tokens_for(V)`` x V), far below the batch's [B, T, V]."""
    job = jobs.job(
        tmp_path,
        algorithm="distill",
        model={"base": "builtin:micro"},
        distill={"teacher": "builtin:tiny", **distill},
        data={"maxLength": 64, "maxPromptLength": 16},
        training={"batchSize": 8},
    )

    def config_of(ref: str):
        return builtin_config(ref.split(":", 1)[1], vocab_size=QWEN_VOCAB)

    run = build_run(job, abstract=Abstract(config_of, jax.devices()[:1]))
    # on-policy: the student's sampling is declared, so ``plan`` counts its KV cache too
    assert (run.declaration.rollout is not None) is bool(distill.get("onPolicy"))
    hlo = run.lower_step().compile().as_text()
    sizes = vocab_arrays(hlo, QWEN_VOCAB)
    chunk = chunk_tokens_for(QWEN_VOCAB) * QWEN_VOCAB
    assert sizes, "the LM head's weights at least have the vocabulary"
    assert max(sizes) <= chunk, sorted(set(sizes))
    assert chunk < 8 * 64 * QWEN_VOCAB  # the [B, T, V] the step never builds


def on_policy_job(tmp_path, **training):
    return jobs.job(
        tmp_path,
        algorithm="distill",
        model={"base": "builtin:micro"},
        distill={
            "teacher": "builtin:tiny",
            "strategy": "logit",
            "onPolicy": True,
            "lmbda": 0.5,
            "temperature": 1.0,
        },
        training={"microBatchSize": 4, "evalEverySteps": 3, **training},
    )


def test_on_policy_run_samples_some_steps_and_resumes_exactly(tmp_path):
    job = on_policy_job(tmp_path)
    whole = train(job, str(tmp_path / "whole"), say=lambda _m: None, progress_bar=False)
    records = [r for r in jobs.metrics(tmp_path / "whole") if "loss" in r]
    shares = [r["on_policy"] for r in records]
    assert set(shares) == {0.0, 1.0}  # lmbda 0.5 over 6 steps, seed 3: both kinds
    assert all(np.isfinite(r["distill_loss"]) and r["distill_loss"] >= 0 for r in records)
    # on a sampled step the cross-entropy has no labels: the student's samples are not targets
    assert all(r["ce_loss"] == 0.0 for r in records if r["on_policy"] == 1.0)
    first = train(
        job, str(tmp_path / "parts"), say=lambda _m: None, progress_bar=False, stop_after=3
    )
    assert first.preempted
    second = train(job, str(tmp_path / "parts"), say=lambda _m: None, progress_bar=False)
    assert jobs.losses(tmp_path / "parts") == jobs.losses(tmp_path / "whole")
    assert second.final == whole.final
