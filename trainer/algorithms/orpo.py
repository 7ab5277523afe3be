"""ORPO (Hong et al. 2024): the chosen completion's NLL plus lambda x an odds-ratio term, one loss,
no reference model (none is declared, so none is kept in memory).

One policy forward over both completions of every pair ([B, 2, T] -> [2B, T]) gives the chosen
tokens' NLL (token weights from the batch source, so accumulation equals one big batch) and each
completion's mean per-token log-prob for the odds (``orpo_loss`` in ``preference_loss.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from posttrain.api.settings.orpo import OrpoSpec
from posttrain.trainer.algorithms.base import (
    Algorithm,
    Context,
    Declaration,
    Metrics,
    ModelConfigs,
    Models,
)
from posttrain.trainer.algorithms.dpo import pair_columns, pair_token_logprobs, preference_pairs
from posttrain.trainer.algorithms.preference_loss import orpo_loss, sequence_logps
from posttrain.trainer.data import preference as data
from posttrain.trainer.data.text import pad_id_of


def make_loss(lam: float):
    def loss(models: Models, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        logp = pair_token_logprobs(models.policy, batch)  # [B, 2, T]
        mean_logps = sequence_logps(logp, batch["completion_mask"], average=True)
        nll = -jnp.sum(logp[:, 0] * batch["nll_weights"], axis=-1)
        return orpo_loss(mean_logps, nll, batch["row_weights"], lam=lam)

    return loss


def declare(spec: Any, configs: ModelConfigs) -> Declaration:  # noqa: ARG001
    orpo = spec.settings
    assert isinstance(orpo, OrpoSpec)
    return Declaration(
        loss=make_loss(orpo.lambda_), columns=pair_columns(spec), sequences_per_row=2
    )


def build(ctx: Context) -> Algorithm:
    spec = ctx.spec
    d, t = spec.data, spec.training
    tok = ctx.tokenizer
    pad_id = pad_id_of(tok)
    source, held_out = preference_pairs(ctx)
    eval_batches = None
    if held_out is not None:
        micro = t.micro_batch_size or t.batch_size

        def eval_batches():
            return data.fixed_batches(
                held_out, batch_size=micro, seq_len=d.max_length, pad_id=pad_id
            )

    return Algorithm(source=source, eval_batches=eval_batches)
