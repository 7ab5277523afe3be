"""Knowledge distillation from a frozen teacher on SFT-style rows (``spec.distill``).

The teacher is declared on the ``Algorithm`` (``teacher=ModelSpec(...)``): the loop loads it like
``spec.model.base``, frozen, on the same mesh, and the loss runs its forward inside the jitted
step, so teacher logits never leave the device. Data, eval batches and the final exact-match
report are SFT's (``sft.supervised``); distillation covers the completion tokens.

Strategies (the maths is in ``distill_loss.py``), each mixed with the hard-label cross-entropy
as ``alpha * distill_loss + (1 - alpha) * ce_loss``:

- ``logit``: T^2 * KL(teacher || student) of the temperature-softened next-token distributions.
- ``attention``: KL(teacher || student) of each query's attention over the keys, on mapped layer
  pairs; head-averaged maps when the head counts differ. Only those layers compute explicit
  probabilities (the model's ``attention_probs_layers``).
- ``feature``: MSE between the teacher's layer outputs and the student's, projected to the
  teacher's hidden size by a learned float32 linear map per pair (the ``projection`` head: it
  trains in every mode, is checkpointed, and is not exported with the student).

Layer pairs: ``spec.distill.layers`` or ``default_layer_map``. Metrics: ``distill_loss``,
``ce_loss``, ``teacher_ce_loss`` (the teacher's own cross-entropy on the same tokens: the level
the student approaches) and ``loss``; the same as ``eval_*`` on ``spec.data.eval``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from posttrain.api.settings.distill import DistillSpec
from posttrain.api.v1alpha1 import ModelSpec
from posttrain.trainer.algorithms import distill_loss as dl
from posttrain.trainer.algorithms.base import (
    Algorithm,
    Context,
    Declaration,
    HeadBuilder,
    LossFn,
    Metrics,
    ModelConfigs,
    Models,
    logprobs_from_logits,
)
from posttrain.trainer.algorithms.sft import columns as sft_columns
from posttrain.trainer.algorithms.sft import sft_loss, supervised

BUILTIN = "builtin:"


class Projections(nnx.Module):
    """Student hidden size -> teacher hidden size, one float32 linear map per layer pair."""

    def __init__(self, pairs: int, student_hidden: int, teacher_hidden: int, *, rngs: nnx.Rngs):
        self.maps = nnx.List(
            [
                nnx.Linear(
                    student_hidden,
                    teacher_hidden,
                    dtype=jnp.float32,
                    param_dtype=jnp.float32,
                    rngs=rngs,
                )
                for _ in range(pairs)
            ]
        )

    def __call__(self, pair: int, hidden_bte: jax.Array) -> jax.Array:
        return self.maps[pair](hidden_bte.astype(jnp.float32))


def forward(
    model: Any,
    batch: Mapping[str, jax.Array],
    *,
    attention_layers: tuple[int, ...] = (),
    hidden_layers: tuple[int, ...] = (),
) -> tuple[jax.Array, dict[str, dict[int, jax.Array]]]:
    """(logits [B, T, V], {"attention_probs": {layer: ...}, "layer_hidden": {layer: ...}})."""
    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        segment_ids=batch.get("segment_ids"),  # only packed batches have them
        attention_probs_layers=attention_layers,
        layer_hidden=hidden_layers,
    )
    if attention_layers or hidden_layers:
        return out
    return out, {"attention_probs": {}, "layer_hidden": {}}


def make_loss(
    strategy: str, pairs: list[tuple[int, int]], *, temperature: float, alpha: float
) -> LossFn:
    """The traced loss for ``strategy`` over layer ``pairs`` ([(student, teacher), ...])."""
    student_layers = tuple(sorted({s for s, _ in pairs}))
    teacher_layers = tuple(sorted({t for _, t in pairs}))
    taps = {
        "logit": ({}, {}),
        "attention": (
            {"attention_layers": student_layers},
            {"attention_layers": teacher_layers},
        ),
        "feature": ({"hidden_layers": student_layers}, {"hidden_layers": teacher_layers}),
    }[strategy]

    def loss(models: Models, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        assert models.teacher is not None, "distill declares a teacher; the loop must load it"
        weights_bt, targets = batch["loss_weights"], batch["targets"]
        logits, student = forward(models.policy, batch, **taps[0])
        t_logits, teacher = jax.lax.stop_gradient(forward(models.teacher, batch, **taps[1]))
        ce, metrics = sft_loss(logprobs_from_logits(logits, targets), weights_bt)
        teacher_ce, _ = sft_loss(logprobs_from_logits(t_logits, targets), weights_bt)
        if strategy == "logit":
            distill = dl.logit_kd_loss(logits, t_logits, weights_bt, temperature=temperature)
        elif strategy == "attention":
            s_maps, t_maps = student["attention_probs"], teacher["attention_probs"]
            distill = jnp.mean(
                jnp.stack(
                    [dl.attention_kl_loss(s_maps[s], t_maps[t], weights_bt) for s, t in pairs]
                )
            )
        else:
            project = models.heads["projection"]
            s_hidden, t_hidden = student["layer_hidden"], teacher["layer_hidden"]
            distill = jnp.mean(
                jnp.stack(
                    [
                        dl.feature_mse_loss(project(k, s_hidden[s]), t_hidden[t], weights_bt)
                        for k, (s, t) in enumerate(pairs)
                    ]
                )
            )
        total = dl.mix(distill, ce, alpha)
        return total, {
            **metrics,
            "distill_loss": distill,
            "ce_loss": ce,
            "teacher_ce_loss": teacher_ce,
        }

    return loss


def check_vocabularies(student: Any, teacher: Any) -> None:
    if student.vocab_size != teacher.vocab_size:
        raise ValueError(
            f"spec.distill.teacher: the teacher's vocabulary has {teacher.vocab_size:,} tokens, the "
            f"student's (spec.model.base) {student.vocab_size:,}; distillation compares them token "
            "by token, so both must use the same tokenizer and vocabulary size"
        )


def layer_pairs(d: DistillSpec, student: Any, teacher: Any) -> list[tuple[int, int]]:
    if d.layers is None:
        return dl.default_layer_map(student.num_layers, teacher.num_layers)
    return dl.check_layer_map(d.layers, student.num_layers, teacher.num_layers)


def declare(spec: Any, configs: ModelConfigs) -> Declaration:
    d = spec.settings
    assert isinstance(d, DistillSpec)
    student, teacher = configs.policy, configs.of(d.teacher)
    check_vocabularies(student, teacher)
    pairs = layer_pairs(d, student, teacher)

    def heads(build: HeadBuilder) -> dict[str, nnx.Module]:
        if d.strategy != "feature":
            return {}
        return {
            "projection": Projections(
                len(pairs), student.hidden_size, teacher.hidden_size, rngs=build.rngs
            )
        }

    return Declaration(
        loss=make_loss(d.strategy, pairs, temperature=d.temperature, alpha=d.alpha),
        columns=sft_columns(spec),
        heads=heads,
        # Frozen: stored in the compute dtype (no float32 master copy needed).
        teacher=ModelSpec(base=d.teacher, dtype=spec.model.dtype, param_dtype=spec.model.dtype),
    )


def build(ctx: Context) -> Algorithm:
    d = ctx.spec.settings
    assert isinstance(d, DistillSpec)
    ctx.log(
        f"distill: {d.strategy} from {d.teacher} into {ctx.config.num_layers} layers, hidden "
        f"{ctx.config.hidden_size}"
        + (f", temperature {d.temperature}" if d.strategy == "logit" else "")
        + f", alpha {d.alpha}"
    )
    return supervised(ctx, "distill", completion_only=True)
