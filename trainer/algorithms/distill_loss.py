"""Distillation maths on arrays: the logit, attention-map and feature terms, and the layer map.

Every term is a per-token quantity aggregated like ``sft_loss``: ``mean over rows of
sum_t(term_bt * weight_bt)`` with the batch source's completion-token weights, so with those
weights it is the batch's mean per trained token and gradient accumulation stays exact.
Teacher arrays are constants here (the caller stops their gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy


def weighted_token_mean(term_bt: jax.Array, weights_bt: jax.Array) -> jax.Array:
    """mean over rows of sum_t(term * weight): the aggregation every term shares."""
    return jnp.mean(jnp.sum(term_bt * weights_bt, axis=-1))


def logit_kd_loss(
    student_logits_btv: jax.Array,
    teacher_logits_btv: jax.Array,
    weights_bt: jax.Array,
    *,
    temperature: float,
) -> jax.Array:
    """T^2 * KL(p_teacher^T || p_student^T) per token (Hinton et al., 2015), aggregated.

    The forward KL, teacher first: TRL's GKD with beta = 0 and MiniLLM's "standard KD" baseline.
    The T^2 factor keeps the gradient scale of the soft term independent of T.
    """
    t = jnp.asarray(temperature, jnp.float32)
    log_p_btv = jax.nn.log_softmax(teacher_logits_btv.astype(jnp.float32) / t, axis=-1)
    log_q_btv = jax.nn.log_softmax(student_logits_btv.astype(jnp.float32) / t, axis=-1)
    kl_bt = jnp.sum(jnp.exp(log_p_btv) * (log_p_btv - log_q_btv), axis=-1)
    return t * t * weighted_token_mean(kl_bt, weights_bt)


def attention_kl_loss(
    student_probs_bhts: jax.Array, teacher_probs_bhts: jax.Array, weights_bt: jax.Array
) -> jax.Array:
    """KL(teacher map row || student map row) per query token, mean over heads, aggregated.

    MiniLM's attention transfer (Wang et al., 2020): each query's attention over the keys is a
    distribution; masked keys hold zero probability in both, and 0 * log 0 counts as 0. With
    different head counts both maps are first averaged over heads ([B, 1, T, S]).
    """
    p = teacher_probs_bhts.astype(jnp.float32)
    q = student_probs_bhts.astype(jnp.float32)
    if p.shape[1] != q.shape[1]:
        p, q = jnp.mean(p, axis=1, keepdims=True), jnp.mean(q, axis=1, keepdims=True)
    # The student's probabilities of masked keys underflow to 0: clamp the log, the teacher's 0
    # weight then removes them (and keeps their gradient finite).
    log_q = jnp.log(jnp.maximum(q, jnp.finfo(jnp.float32).tiny))
    kl_bht = jnp.sum(xlogy(p, p) - p * log_q, axis=-1)
    return weighted_token_mean(jnp.mean(kl_bht, axis=1), weights_bt)


def feature_mse_loss(
    projected_bte: jax.Array, teacher_bte: jax.Array, weights_bt: jax.Array
) -> jax.Array:
    """Mean squared error over the hidden size per token (FitNets' hint loss), aggregated."""
    diff = projected_bte.astype(jnp.float32) - teacher_bte.astype(jnp.float32)
    return weighted_token_mean(jnp.mean(diff * diff, axis=-1), weights_bt)


def mix(distill: jax.Array, ce: jax.Array, alpha: float) -> jax.Array:
    """alpha * distillation term + (1 - alpha) * hard-label cross-entropy."""
    return alpha * distill + (1.0 - alpha) * ce


def default_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student layer i -> teacher layer round((i + 1) * Lt / Ls) - 1 (halves round up), so the
    last layers pair up and the others spread evenly; never below layer 0."""
    pairs = []
    for i in range(student_layers):
        nearest = ((i + 1) * teacher_layers * 2 + student_layers) // (2 * student_layers)
        pairs.append((i, max(nearest - 1, 0)))
    return pairs


def check_layer_map(
    pairs: Sequence[Sequence[int]], student_layers: int, teacher_layers: int
) -> list[tuple[int, int]]:
    """The pairs as tuples, or ValueError naming ``spec.distill.layers[k]`` and the bound broken."""
    errors = []
    for k, (s, t) in enumerate(pairs):
        where = f"spec.distill.layers[{k}]"
        if not 0 <= s < student_layers:
            errors.append(
                f"{where}: student layer {s} is out of range for a student with "
                f"{student_layers} layers (0..{student_layers - 1})"
            )
        if not 0 <= t < teacher_layers:
            errors.append(
                f"{where}: teacher layer {t} is out of range for a teacher with "
                f"{teacher_layers} layers (0..{teacher_layers - 1})"
            )
    if errors:
        raise ValueError("; ".join(errors))
    return [(int(s), int(t)) for s, t in pairs]
