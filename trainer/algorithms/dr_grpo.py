"""Dr. GRPO (Liu et al., 2025, "GRPO done right"): advantages r - mean without the std and the
constant-normaliser loss; the defaults of the ``spec.grpo`` fields left unset (``GRPO_DEFAULTS``).
It runs GRPO's rollouts, batches and loss (``grpo.py``) and reads the ``spec.grpo`` block."""

from __future__ import annotations

from posttrain.trainer.algorithms import grpo
from posttrain.trainer.algorithms.base import Algorithm, Context


def build(ctx: Context) -> Algorithm:
    if ctx.spec.algorithm != "dr-grpo":
        raise ValueError(f"dr_grpo.build got algorithm {ctx.spec.algorithm!r}")
    return grpo.build(ctx)
