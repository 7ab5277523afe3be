"""KTO (Ethayarajh et al. 2024; TRL's ``KTOTrainer``) on unpaired rows labelled desirable or not.

The batch source reads rows ``{prompt, completion, label}`` (``trainer/data/unpaired.py``) as
[B, 2, T] batches: index 0 the row, index 1 the row's prompt with another row's completion (TRL's
mismatched pair for the reference point z0). Each batch's reference log-probs are scored once,
outside the gradient, by the frozen reference (``reference=True``: the initial weights, or with
LoRA the base), as DPO's are (``dpo.ReferenceScored``). The loss runs the policy over both
([B, 2, T] -> [2B, T], one forward): z0 is ``kto_reference_point`` of the mismatched pairs (no
gradient; a mean over the micro-batch), the loss ``kto_loss`` of the rows.

Evaluation is on held-out *pairs* (``data.eval``, DPO's format): KTO's implicit reward
``beta (log pi - log pi_ref)`` (summed log-probs) of the chosen and the rejected answer gives
``eval_preference_accuracy`` (strictly greater, as DPO's) and the ``reward_*`` figures under
DPO's and TRL's names; ``eval_loss`` is the KTO loss of the chosen answers as desirable and the
rejected ones as undesirable, with z0 = 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.api.settings.kto import KtoSpec
from posttrain.trainer.algorithms.base import (
    Algorithm,
    Context,
    Declaration,
    Metrics,
    ModelConfigs,
    Models,
)
from posttrain.trainer.algorithms.dpo import (
    ReferenceScored,
    legacy_metrics,
    pair_token_logprobs,
    reference_scorer,
)
from posttrain.trainer.algorithms.preference_loss import (
    kto_loss,
    kto_reference_point,
    kto_weights_balanced,
    preference_metrics,
    sequence_logps,
)
from posttrain.trainer.data import preference, unpaired
from posttrain.trainer.data.text import pad_id_of


def make_loss(beta: float, desirable_weight: float, undesirable_weight: float):
    def loss(models: Models, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        logp = pair_token_logprobs(models.policy, batch)
        policy = sequence_logps(logp, batch["completion_mask"])  # [B, 2], sums as TRL
        reference = batch["reference_logps"]
        weights = batch["row_weights"]
        if "desirable" not in batch:  # held-out pairs: chosen desirable, rejected not
            return pair_evaluation(policy, reference, weights)
        kl = kto_reference_point(policy[:, 1], reference[:, 1], weights)
        return kto_loss(
            policy[:, 0],
            reference[:, 0],
            batch["desirable"],
            weights,
            kl=kl,
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
        )

    def pair_evaluation(
        policy: jax.Array, reference: jax.Array, weights: jax.Array
    ) -> tuple[jax.Array, Metrics]:
        ratios = policy - reference  # [B, 2]
        chosen = desirable_weight * (1.0 - jax.nn.sigmoid(beta * ratios[:, 0]))
        rejected = undesirable_weight * (1.0 - jax.nn.sigmoid(-beta * ratios[:, 1]))
        value = jnp.mean((chosen + rejected) / 2.0 * weights)
        metrics = preference_metrics(policy, beta * ratios, weights)
        return value, {**metrics, **legacy_metrics(metrics)}

    return loss


def columns(spec: Any) -> dict[str, Any]:
    """The step's batch of unpaired rows with their mismatched pairs ([batchSize, 2, maxLength])."""
    R, L = spec.training.batch_size, spec.data.max_length
    return {
        "input_ids": ((R, 2, L), np.int32),
        "attention_mask": ((R, 2, L), np.int32),
        "targets": ((R, 2, L), np.int32),
        "completion_mask": ((R, 2, L), np.float32),
        "row_weights": ((R,), np.float32),
        "desirable": ((R,), np.float32),
        "reference_logps": ((R, 2), np.float32),
    }


def declare(spec: Any, configs: ModelConfigs) -> Declaration:  # noqa: ARG001
    kto = spec.settings
    assert isinstance(kto, KtoSpec)
    return Declaration(
        loss=make_loss(kto.beta, kto.desirable_weight, kto.undesirable_weight),
        columns=columns(spec),
        reference=True,
        sequences_per_row=2,
    )


def build(ctx: Context) -> Algorithm:
    spec = ctx.spec
    d, t = spec.data, spec.training
    kto = spec.settings
    assert isinstance(kto, KtoSpec)
    tok = ctx.tokenizer
    pad_id = pad_id_of(tok)
    micro = t.micro_batch_size or t.batch_size
    train = unpaired.load_examples(d.train, tok, d, label_field=kto.label_field)
    if train.skipped:
        ctx.log(
            f"kto: skipped {len(train.skipped)} bad rows of {d.train}, first: {train.skipped[0]}"
        )
    n_good = sum(e.desirable for e in train.examples)
    n_bad = len(train.examples) - n_good
    ctx.log(
        f"kto: {len(train.examples)} rows from {d.train} ({n_good} desirable, {n_bad} not), "
        f"sequences of {d.max_length} tokens"
    )
    if not kto_weights_balanced(n_good, n_bad, kto.desirable_weight, kto.undesirable_weight):
        ctx.log(
            "kto: desirableWeight x desirable rows / (undesirableWeight x undesirable rows) is "
            "outside [1, 4/3], the KTO paper's advice (sec. 4.2)"
        )
    rows = unpaired.UnpairedSource(
        train.examples,
        batch_size=t.batch_size,
        seq_len=d.max_length,
        pad_id=pad_id,
        seed=t.seed,
        shuffle=d.shuffle,
    )
    score = reference_scorer(ctx, micro, average=False)
    source = ReferenceScored(rows, score)

    eval_batches = None
    if d.eval is not None:
        held_out = preference.load_pairs(d.eval, tok, d).pairs
        scored: list[dict[str, np.ndarray]] = []  # the reference never changes: score once

        def eval_batches():
            if not scored:
                for b in preference.fixed_batches(
                    held_out, batch_size=micro, seq_len=d.max_length, pad_id=pad_id
                ):
                    scored.append({**b, "reference_logps": score(b)})
            return scored

    return Algorithm(source=source, eval_batches=eval_batches)
