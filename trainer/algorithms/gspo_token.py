"""GSPO-token (Zheng et al., 2025): GRPO's rollouts and batches with the sequence-level ratio
applied per token (``grpo_loss.gspo_token_loss``). It reads the ``spec.grpo`` block."""

from __future__ import annotations

from posttrain.trainer.algorithms import grpo
from posttrain.trainer.algorithms.base import Algorithm, Context


def build(ctx: Context) -> Algorithm:
    if ctx.spec.algorithm != "gspo-token":
        raise ValueError(f"gspo_token.build got algorithm {ctx.spec.algorithm!r}")
    return grpo.build(ctx)
