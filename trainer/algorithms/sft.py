"""Supervised fine-tuning: next-token cross-entropy on completion tokens.

``sft_loss`` is the maths on arrays; ``build`` wires the data (``trainer/data/sft.py``) and, when
``spec.data.eval`` has prompt/completion rows, a final exact-match accuracy by greedy generation
on those prompts with the shared sampler (for the shipped arithmetic task: the task accuracy).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.api.settings.sft import SftSpec
from posttrain.trainer.algorithms.base import (
    Algorithm,
    Column,
    Context,
    Declaration,
    Metrics,
    ModelConfigs,
    Models,
    token_logprobs,
)
from posttrain.trainer.data import sft as data
from posttrain.trainer.data.readers import BadRow, read_rows
from posttrain.trainer.data.text import pad_id_of
from posttrain.trainer.sampling import generate

if TYPE_CHECKING:
    from posttrain.trainer.models import CausalLM

MAX_ACCURACY_PROMPTS = 256


def sft_loss(logp_bt: jax.Array, weights_bt: jax.Array) -> tuple[jax.Array, Metrics]:
    """Mean over rows of sum_t(-logp * weight); with the source's weights, the batch's mean NLL per
    trained token. Returns (loss, {"loss_tokens": trained tokens / row})."""
    loss = -jnp.mean(jnp.sum(logp_bt * weights_bt, axis=-1))
    return loss, {
        "trained_tokens_per_row": jnp.mean(jnp.sum(weights_bt > 0, axis=-1).astype(jnp.float32))
    }


def loss(models: Models, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
    logp = token_logprobs(
        models.policy,
        batch["input_ids"],
        batch["attention_mask"],
        batch["targets"],
        segment_ids=batch.get("segment_ids"),  # only packed batches have them
    )
    return sft_loss(logp, batch["loss_weights"])


def columns(spec: Any) -> dict[str, Column]:
    """The step's batch of SFT-style rows (``data/sft.py``'s ``collate``): batchSize x maxLength."""
    R, L = spec.training.batch_size, spec.data.max_length
    out: dict[str, Column] = {
        "input_ids": ((R, L), np.int32),
        "attention_mask": ((R, L), np.int32),
        "targets": ((R, L), np.int32),
        "loss_weights": ((R, L), np.float32),
    }
    if spec.data.packing:
        out["segment_ids"] = ((R, L), np.int32)
    return out


def declare(spec: Any, configs: ModelConfigs) -> Declaration:  # noqa: ARG001
    return Declaration(loss=loss, columns=columns(spec))


def build(ctx: Context) -> Algorithm:
    settings = ctx.spec.settings
    assert isinstance(settings, SftSpec)
    return supervised(ctx, "sft", completion_only=settings.completion_only_loss)


def supervised(ctx: Context, name: str, *, completion_only: bool) -> Algorithm:
    """SFT's data, eval batches and exact-match report under ``name``, with ``sft_loss``; other
    algorithms on SFT-style rows (distillation) replace the loss and add what they need."""
    spec = ctx.spec
    d, t = spec.data, spec.training
    tok = ctx.tokenizer
    pad_id = pad_id_of(tok)
    train = data.load_examples(d.train, tok, d, completion_only=completion_only)
    if train.skipped:
        ctx.log(
            f"{name}: skipped {len(train.skipped)} bad rows of {d.train}, first: {train.skipped[0]}"
        )
    source = data.SftSource(
        train.examples,
        batch_size=t.batch_size,
        seq_len=d.max_length,
        pad_id=pad_id,
        seed=t.seed,
        shuffle=d.shuffle,
        packing=d.packing,
    )
    ctx.log(
        f"{name}: {len(train.examples)} examples from {d.train}, sequences of {d.max_length} tokens"
    )

    eval_batches = finish = None
    if d.eval is not None:
        held_out = data.load_examples(d.eval, tok, d, completion_only=completion_only).examples
        micro = t.micro_batch_size or t.batch_size

        def eval_batches():
            return data.fixed_batches(
                held_out, batch_size=micro, seq_len=d.max_length, pad_id=pad_id
            )

        pairs = _prompt_answers(d.eval, d)
        if pairs:

            def finish(model: CausalLM) -> dict[str, Any]:
                bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
                prompts = [bos + tok.encode(p) for p, _ in pairs]
                longest = max(len(tok.encode(a)) for _, a in pairs) + 1
                gen = generate(
                    model, prompts, longest, temperature=0.0, eos_id=tok.eos_token_id, pad_id=pad_id
                )
                tokens, mask = np.asarray(gen.tokens), np.asarray(gen.mask)
                # decode skips special tokens, so the EOS that ends an answer is not part of it
                texts = [tok.decode(tokens[i][mask[i]].tolist()) for i in range(len(prompts))]
                hits = [txt.strip() == a.strip() for txt, (_, a) in zip(texts, pairs, strict=True)]
                for (p, a), txt in list(zip(pairs, texts, strict=True))[:3]:
                    ctx.log(f"  {p!r} -> {txt!r} (expected {a!r})")
                return {
                    "eval_exact_match": float(np.mean(hits)),
                    "eval_exact_match_count": float(len(hits)),
                }

    return Algorithm(source=source, eval_batches=eval_batches, finish=finish)


def _prompt_answers(path: str, d: Any) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of the eval file's prompt/completion rows (up to a cap)."""
    pairs = []
    for row in read_rows(path, d.format):
        value = row.value
        if isinstance(value, BadRow):
            continue
        p, c = value.get(d.prompt_field), value.get(d.completion_field)
        if isinstance(p, str) and isinstance(c, str):
            pairs.append((p, c))
        if len(pairs) >= MAX_ACCURACY_PROMPTS:
            break
    return pairs
