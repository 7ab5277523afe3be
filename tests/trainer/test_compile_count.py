"""One compile per program: over 3 steps of SFT (with evaluation), DPO and GRPO (old and
reference log-probs, the sampler) the train step, the eval step, the sampler and every no-gradient
forward are each lowered once. A second lowering of the same program means its inputs changed
sharding, layout, committedness or type between steps (issue #27: the opt_state's moments came out
of ``tx.init`` uncommitted, so step 2 compiled the whole train step again)."""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import re
from pathlib import Path

import pytest

from posttrain.trainer.loop import train
from posttrain.trainer.tasks import preferences

_spec = importlib.util.spec_from_file_location(
    "loop_jobs", os.path.join(os.path.dirname(__file__), "loop_jobs.py")
)
jobs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jobs)

# jax logs every lowering (a jit cache miss, before any persistent-cache lookup) at DEBUG here.
PXLA_LOGGER = "jax._src.interpreters.pxla"
PROGRAMS = re.compile(r"jit\((train_step|evaluate|_generate_jit|forward_\w+)\)")
TRAINING = {"steps": 3, "checkpoint": {"everySteps": 1000}}


class Lowerings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        m = re.match(r"Compiling (\S+) with global shapes", record.getMessage())
        if m and PROGRAMS.fullmatch(m.group(1)):
            self.counts[m.group(1)] += 1


def lowerings_of(job, out: Path) -> collections.Counter[str]:
    import jax

    # Programs an earlier test of this process compiled with the same shapes would be jit cache
    # hits here, never lowered: every program must show up once.
    jax.clear_caches()
    logger = logging.getLogger(PXLA_LOGGER)
    handler, level = Lowerings(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        result = train(job, str(out), say=lambda _m: None, progress_bar=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert result.step == 3
    return handler.counts


def sft(tmp: Path, **training):
    training = {**TRAINING, "evalEverySteps": 1, **training}
    return jobs.job(tmp, training=training, output={"export": False})


def sft_scanned(tmp: Path):
    return sft(tmp, scanLayers=True, remat="full")


def dpo(tmp: Path):
    pairs = str(tmp / "pairs.jsonl")
    preferences.write_jsonl(pairs, preferences.pairs("train", max_operand=19, held_out=16)[:64])
    training = {**TRAINING, "microBatchSize": 4}
    data = {"train": pairs, "eval": None}
    return jobs.job(tmp, algorithm="dpo", training=training, output={"export": False}, data=data)


def grpo(tmp: Path):
    return jobs.grpo_job(tmp, numIterations=2)  # beta 0.04 and mu 2: reference and old log-probs


SFT_PROGRAMS = {
    "jit(train_step)",
    "jit(evaluate)",
    "jit(_generate_jit)",
}  # finish: sampled accuracy
EXPECTED = {
    "sft": SFT_PROGRAMS,
    "sft-scanned": SFT_PROGRAMS,
    "dpo": {"jit(train_step)", "jit(forward_forward)"},
    "grpo": {
        "jit(train_step)",
        "jit(_generate_jit)",
        "jit(forward_policy_logprobs)",
        "jit(forward_reference_logprobs)",
    },
}


@pytest.mark.parametrize("algorithm", ["sft", "sft-scanned", "dpo", "grpo"])
def test_each_program_compiles_once_in_three_steps(tmp_path, algorithm):
    job = {"sft": sft, "sft-scanned": sft_scanned, "dpo": dpo, "grpo": grpo}[algorithm](tmp_path)
    counts = lowerings_of(job, tmp_path / "out")
    assert set(counts) == EXPECTED[algorithm], counts  # the programs the run is expected to have
    twice = {name: n for name, n in counts.items() if n > 1}
    assert not twice, f"compiled more than once in 3 steps: {twice}"
