"""DPO (Rafailov et al. 2023) and its IPO / hinge / SimPO variants on preference pairs.

The batch source reads pairs (``trainer/data/preference.py``) and adds each pair's reference
log-probs, computed once per batch outside the gradient by the frozen reference (declared with
``reference=True``: a copy of the initial weights, or with LoRA the base with the adapters off,
no copy). With ``precomputeReferenceLogProbs`` (TRL's ``precompute_ref_log_probs``) every
training and held-out pair is scored once in ``build``, before the loop restores a checkpoint,
by the policy's initial weights (which *are* the reference then), and kept per pair; no reference
is declared, so none is held while training, and a resumed run scores the same initial weights
again. ``lossType: simpo`` (TRL's ``CPOTrainer(loss_type="simpo")``) needs no reference at all.
The loss runs the policy over both completions of every pair ([B, 2, T] -> [2B, T], one
forward) and hands sequence log-probs to ``mixed_dpo_loss`` (``preference_loss.py``), with the
chosen answer's NLL when ``rpoAlpha`` is set (RPO, TRL's ``rpo_alpha``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.api.settings.dpo import DpoSpec
from posttrain.trainer.algorithms.base import (
    Algorithm,
    Batch,
    BatchSource,
    Column,
    Context,
    Declaration,
    Metrics,
    ModelConfigs,
    Models,
    token_logprobs,
)
from posttrain.trainer.algorithms.preference_loss import (
    AVERAGED_LOSS_TYPES,
    SIMPO_GAMMA,
    mixed_dpo_loss,
    sequence_logps,
)
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


def make_loss(
    beta: float,
    loss_type: str,
    label_smoothing: float,
    *,
    simpo_gamma: float = SIMPO_GAMMA,
    rpo_alpha: float | None = None,
):
    average = loss_type in AVERAGED_LOSS_TYPES  # TRL: IPO and SimPO compare mean log-probs
    reference_free = loss_type == "simpo"

    def loss(models: Models, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        logp = pair_token_logprobs(models.policy, batch)
        policy = sequence_logps(logp, batch["completion_mask"], average=average)
        reference = jnp.zeros_like(policy) if reference_free else batch["reference_logps"]
        chosen_nll = None
        if rpo_alpha is not None:  # TRL's nll_loss: per chosen token of the step's batch
            chosen_nll = -jnp.sum(logp[:, 0] * batch["nll_weights"], axis=-1)
        value, metrics = mixed_dpo_loss(
            policy,
            reference,
            batch["row_weights"],
            beta=beta,
            loss_types=(loss_type,),
            label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma,
            chosen_nll=chosen_nll,
            rpo_alpha=rpo_alpha,
        )
        return value, {**metrics, **legacy_metrics(metrics)}

    return loss


def legacy_metrics(metrics: Metrics) -> Metrics:
    """DPO's own names for TRL's ``rewards/*`` figures (docs and tests read both)."""
    return {
        "preference_accuracy": metrics["rewards/accuracies"],
        "reward_chosen": metrics["rewards/chosen"],
        "reward_rejected": metrics["rewards/rejected"],
        "reward_margin": metrics["rewards/margins"],
    }


class ReferenceScored:
    """A pair source whose batches carry ``reference_logps`` [B, 2], scored as they are drawn."""

    def __init__(self, source: BatchSource, score: Callable[[Batch], np.ndarray]):
        self.source = source
        self.score = score

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        batch = self.source.next_batch(step)
        return {**batch, "reference_logps": self.score(batch)}

    def state(self) -> dict[str, Any]:
        return self.source.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.source.restore(state)


def reference_scorer(
    ctx: Context, rows: int, average: bool, *, initial_policy: bool = False
) -> Callable[[Batch], np.ndarray]:
    """Batch -> [B, 2] reference sequence log-probs, ``rows`` pairs per forward (the micro-batch
    size, so the reference never needs more memory than a training micro-batch).
    ``initial_policy``: score with the policy itself, valid only before the first update (the
    precomputed reference log-probs)."""
    keys = ("input_ids", "attention_mask", "targets", "completion_mask")

    def forward(models: Models, b: Mapping[str, jax.Array]) -> jax.Array:
        model = models.policy if initial_policy else models.reference
        assert model is not None, "DPO declares reference=True unless it precomputes"
        logp = pair_token_logprobs(model, b)
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


class PrecomputedReference:
    """A pair source whose batches carry ``reference_logps`` [B, 2] looked up in a table scored
    once before training (TRL's ``precompute_ref_log_probs``): the same pair, the same figures."""

    def __init__(self, source: data.PreferenceSource, table: Mapping[data.Pair, np.ndarray]):
        self.source = source
        self.table = table

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        del step
        pairs = self.source.next_pairs()
        batch = self.source.collate(pairs)
        return {**batch, "reference_logps": np.stack([self.table[p] for p in pairs])}

    def state(self) -> dict[str, Any]:
        return self.source.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.source.restore(state)


def score_pairs(
    pairs: list[data.Pair],
    score: Callable[[Batch], np.ndarray],
    *,
    rows: int,
    seq_len: int,
    pad_id: int,
) -> dict[data.Pair, np.ndarray]:
    """Every distinct pair's [2] reference log-probs, ``rows`` pairs per forward."""
    distinct = list(dict.fromkeys(pairs))
    table: dict[data.Pair, np.ndarray] = {}
    for start in range(0, len(distinct), rows):
        chunk = distinct[start : start + rows]
        padded: list[data.Pair | None] = [*chunk, *[None] * (rows - len(chunk))]
        logps = score(data.collate(padded, seq_len, pad_id))
        table.update(zip(chunk, logps[: len(chunk)], strict=True))
    return table


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
    columns = pair_columns(spec)
    if dpo.uses_reference:
        columns["reference_logps"] = ((R, 2), np.float32)
    return Declaration(
        loss=make_loss(
            dpo.beta,
            dpo.loss_type,
            dpo.label_smoothing,
            simpo_gamma=dpo.simpo_gamma,
            rpo_alpha=dpo.rpo_alpha,
        ),
        columns=columns,
        # SimPO is reference-free; precomputed log-probs need none held while training
        reference=dpo.uses_reference and not dpo.precompute_reference_log_probs,
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
    average = dpo.loss_type in AVERAGED_LOSS_TYPES
    pairs, held_out = preference_pairs(ctx)

    def fixed(held: list[data.Pair]) -> list[dict[str, np.ndarray]]:
        return list(data.fixed_batches(held, batch_size=micro, seq_len=d.max_length, pad_id=pad_id))

    eval_batches: Callable[[], Any] | None = None
    if not dpo.uses_reference:  # SimPO
        if held_out is not None:
            held = held_out
            eval_batches = lambda: fixed(held)  # noqa: E731
        return Algorithm(source=pairs, eval_batches=eval_batches)

    if dpo.precompute_reference_log_probs:
        # Now, before the loop restores a checkpoint: the policy holds the initial weights.
        score = reference_scorer(ctx, micro, average, initial_policy=True)
        everything = pairs.cursor.items + (held_out or [])
        table = score_pairs(everything, score, rows=micro, seq_len=d.max_length, pad_id=pad_id)
        ctx.log(
            f"dpo: reference log-probs of {len(table)} distinct pairs precomputed; no reference "
            "model is kept"
        )
        if held_out is not None:
            padding = np.zeros(2, np.float32)
            looked_up = [
                {
                    **b,
                    "reference_logps": np.stack(
                        [table[p] for p in held_out[s : s + micro]]
                        + [padding] * (micro - len(held_out[s : s + micro]))
                    ),
                }
                for s, b in zip(range(0, len(held_out), micro), fixed(held_out), strict=True)
            ]
            eval_batches = lambda: looked_up  # noqa: E731
        return Algorithm(source=PrecomputedReference(pairs, table), eval_batches=eval_batches)

    score = reference_scorer(ctx, micro, average)
    source = ReferenceScored(pairs, score)
    if held_out is not None:
        held = held_out
        scored: list[dict[str, np.ndarray]] = []  # the reference never changes: score once

        def score_once() -> list[dict[str, np.ndarray]]:
            if not scored:
                scored.extend({**b, "reference_logps": score(b)} for b in fixed(held))
            return scored

        eval_batches = score_once
    return Algorithm(source=source, eval_batches=eval_batches)
