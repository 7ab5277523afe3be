"""DPO (Rafailov et al. 2023) and its IPO / hinge variants on preference pairs.

The batch source reads pairs (``trainer/data/preference.py``) and adds each pair's reference
log-probs, computed once per batch outside the gradient by the frozen reference (declared with
``reference=True``: a copy of the initial weights, or with LoRA the base with the adapters off,
no copy). The loss runs the policy over both completions of every pair ([B, 2, T] -> [2B, T],
one forward) and hands sequence log-probs to ``dpo_loss`` (``preference_loss.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from posttrain.api.settings.dpo import DpoSpec
from posttrain.trainer.algorithms.base import (
    Algorithm,
    Batch,
    Column,
    Context,
    Declaration,
    Metrics,
    ModelConfigs,
    Models,
    token_logprobs,
)
from posttrain.trainer.algorithms.preference_loss import dpo_loss, sequence_logps
from posttrain.trainer.data import preference as data
from posttrain.trainer.data.text import pad_id_of


def pair_token_logprobs(model: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """[B, 2, T] log-probs of each pair's targets under ``model`` (both completions in one call)."""
    B, _, T = batch["input_ids"].shape

    def rows(x: jax.Array) -> jax.Array:
        return x.reshape(2 * B, T)

    logp = token_logprobs(
        model, rows(batch["input_ids"]), rows(batch["attention_mask"]), rows(batch["targets"])
    )
    return logp.reshape(B, 2, T)


def make_loss(beta: float, loss_type: str, label_smoothing: float):
    average = loss_type == "ipo"  # TRL: IPO compares mean per-token log-probs

    def loss(models: Models, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        logp = pair_token_logprobs(models.policy, batch)
        policy = sequence_logps(logp, batch["completion_mask"], average=average)
        return dpo_loss(
            policy,
            batch["reference_logps"],
            batch["row_weights"],
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
        )

    return loss


class ReferenceScored:
    """A pair source whose batches carry ``reference_logps`` [B, 2], scored as they are drawn."""

    def __init__(self, source: data.PreferenceSource, score: Callable[[Batch], np.ndarray]):
        self.source = source
        self.score = score

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        batch = self.source.next_batch(step)
        return {**batch, "reference_logps": self.score(batch)}

    def state(self) -> dict[str, Any]:
        return self.source.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.source.restore(state)


def reference_scorer(ctx: Context, rows: int, average: bool) -> Callable[[Batch], np.ndarray]:
    """Batch -> [B, 2] reference sequence log-probs, ``rows`` pairs per forward (the micro-batch
    size, so the reference never needs more memory than a training micro-batch)."""
    keys = ("input_ids", "attention_mask", "targets", "completion_mask")

    def forward(models: Models, b: Mapping[str, jax.Array]) -> jax.Array:
        assert models.reference is not None, "DPO declares reference=True"
        logp = pair_token_logprobs(models.reference, b)
        return sequence_logps(logp, b["completion_mask"], average=average)

    run: Callable[[Batch], Any] | None = None

    def score(batch: Batch) -> np.ndarray:
        nonlocal run
        if run is None:
            assert ctx.forward is not None, "the loop wires ctx.forward after build"
            run = ctx.forward(forward)
        total = batch["input_ids"].shape[0]
        parts = [
            np.asarray(run({k: batch[k][i : i + rows] for k in keys}), np.float32)
            for i in range(0, total, rows)
        ]
        return np.concatenate(parts, axis=0)

    return score


def preference_pairs(ctx: Context) -> tuple[data.PreferenceSource, list[data.Pair] | None]:
    """The training pairs as a batch source and the held-out pairs (None without data.eval),
    shared by DPO and ORPO; bad rows skipped are logged."""
    spec = ctx.spec
    d, t, name = spec.data, spec.training, spec.algorithm
    tok = ctx.tokenizer
    train = data.load_pairs(d.train, tok, d)
    if train.skipped:
        ctx.log(
            f"{name}: skipped {len(train.skipped)} bad rows of {d.train}, first: {train.skipped[0]}"
        )
    ctx.log(
        f"{name}: {len(train.pairs)} preference pairs from {d.train}, sequences of "
        f"{d.max_length} tokens"
    )
    source = data.PreferenceSource(
        train.pairs,
        batch_size=t.batch_size,
        seq_len=d.max_length,
        pad_id=pad_id_of(tok),
        seed=t.seed,
        shuffle=d.shuffle,
    )
    held_out = data.load_pairs(d.eval, tok, d).pairs if d.eval is not None else None
    return source, held_out


def pair_columns(spec: Any) -> dict[str, Column]:
    """The step's batch of preference pairs (``data/preference.py``): [batchSize, 2, maxLength]."""
    R, L = spec.training.batch_size, spec.data.max_length
    return {
        "input_ids": ((R, 2, L), np.int32),
        "attention_mask": ((R, 2, L), np.int32),
        "targets": ((R, 2, L), np.int32),
        "completion_mask": ((R, 2, L), np.float32),
        "nll_weights": ((R, L), np.float32),
        "row_weights": ((R,), np.float32),
    }


def declare(spec: Any, configs: ModelConfigs) -> Declaration:  # noqa: ARG001
    dpo = spec.settings
    assert isinstance(dpo, DpoSpec)
    R = spec.training.batch_size
    return Declaration(
        loss=make_loss(dpo.beta, dpo.loss_type, dpo.label_smoothing),
        columns={**pair_columns(spec), "reference_logps": ((R, 2), np.float32)},
        reference=True,
        sequences_per_row=2,
    )


def build(ctx: Context) -> Algorithm:
    spec = ctx.spec
    d, t = spec.data, spec.training
    dpo = spec.settings
    assert isinstance(dpo, DpoSpec)
    tok = ctx.tokenizer
    pad_id = pad_id_of(tok)
    micro = t.micro_batch_size or t.batch_size
    average = dpo.loss_type == "ipo"
    score = reference_scorer(ctx, micro, average)

    pairs, held_out = preference_pairs(ctx)
    source = ReferenceScored(pairs, score)

    eval_batches = None
    if held_out is not None:
        scored: list[dict[str, np.ndarray]] = []  # the reference never changes: score once

        def eval_batches():
            if not scored:
                for b in data.fixed_batches(
                    held_out, batch_size=micro, seq_len=d.max_length, pad_id=pad_id
                ):
                    scored.append({**b, "reference_logps": score(b)})
            return scored

    return Algorithm(source=source, eval_batches=eval_batches)
