"""Distillation maths on arrays: the logit, attention-map and feature terms, the layer map, and
GKD's generalised JSD computed from hidden states over chunks of tokens.

Every term is a per-token quantity aggregated like ``sft_loss``: ``mean over rows of
sum_t(term_bt * weight_bt)`` with the batch source's completion-token weights, so with those
weights it is the batch's mean per trained token and gradient accumulation stays exact.
Teacher arrays are constants here (the caller stops their gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy

from posttrain.trainer.models.logprobs import chunk_tokens_for, map_row_chunks, vocab_of

Head = Callable[[jax.Array], jax.Array]  # hidden [N, E] -> logits [N, V]


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


# ------------------------------------------------------------------------------ GKD's JSD


GKD_BETA = 0.5  # TRL's GKDConfig defaults
GKD_TEMPERATURE = 0.9


def generalized_jsd(
    student_logits_nv: jax.Array,
    teacher_logits_nv: jax.Array,
    *,
    beta: float = GKD_BETA,
    temperature: float = 1.0,
) -> jax.Array:
    """Generalised JSD per row, float32 [N] (GKD, Agarwal et al. 2024; TRL's
    ``generalized_jsd_loss``): with p = softmax(teacher / T), q = softmax(student / T) and the
    mixture m = beta p + (1 - beta) q, JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m).

    beta = 0 gives the forward KL(p || q), beta = 1 the reverse KL(q || p), computed directly as
    TRL does (the mixture form vanishes there; JSD_beta / beta and JSD_beta / (1 - beta) tend to
    them). No T^2 factor, as TRL.
    """
    log_q = jax.nn.log_softmax(student_logits_nv.astype(jnp.float32) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits_nv.astype(jnp.float32) / temperature, axis=-1)

    def kl(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
        return jnp.sum(jnp.exp(log_a) * (log_a - log_b), axis=-1)

    if beta == 0.0:
        return kl(log_p, log_q)
    if beta == 1.0:
        return kl(log_q, log_p)
    log_m = jnp.logaddexp(log_p + jnp.log(beta), log_q + jnp.log1p(-beta))
    return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)


def chunked_generalized_jsd(
    student_hidden_bte: jax.Array,
    student_head: Head,
    teacher_hidden_bts: jax.Array,
    teacher_head: Head,
    *,
    beta: float = GKD_BETA,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> jax.Array:
    """``generalized_jsd`` per token, float32 [B, T], from both models' final hidden states and
    LM heads (hidden [N, E] -> logits [N, V]), a chunk of tokens at a time: the student's and the
    teacher's [chunk, V] float32 logits exist only inside their chunk's step and are recomputed
    in the backward pass, never [B, T, V]. The teacher is a constant (its gradient is stopped).

    ``chunk_tokens`` defaults to half of ``chunk_tokens_for(V)``: two logits arrays per chunk.
    """
    B, T, E = student_hidden_bte.shape
    if chunk_tokens is None:
        chunk_tokens = max(1, chunk_tokens_for(vocab_of(student_head, student_hidden_bte)) // 2)

    def one_chunk(student_ne: jax.Array, teacher_ns: jax.Array) -> tuple[jax.Array]:
        teacher_logits = jax.lax.stop_gradient(teacher_head(teacher_ns))
        return (
            generalized_jsd(
                student_head(student_ne), teacher_logits, beta=beta, temperature=temperature
            ),
        )

    (jsd_n,) = map_row_chunks(
        one_chunk,
        (
            student_hidden_bte.reshape(B * T, E),
            jax.lax.stop_gradient(teacher_hidden_bts).reshape(B * T, -1),
        ),
        chunk_tokens,
    )
    return jsd_n.reshape(B, T)


def gkd_loss(
    student_hidden_bte: jax.Array,
    student_head: Head,
    teacher_hidden_bts: jax.Array,
    teacher_head: Head,
    weights_bt: jax.Array,
    *,
    beta: float = GKD_BETA,
    temperature: float = GKD_TEMPERATURE,
    chunk_tokens: int | None = None,
) -> jax.Array:
    """The generalised JSD aggregated like every term here (mean per trained token with the
    batch source's weights; TRL's ``batchmean`` over the completion tokens)."""
    jsd_bt = chunked_generalized_jsd(
        student_hidden_bte,
        student_head,
        teacher_hidden_bts,
        teacher_head,
        beta=beta,
        temperature=temperature,
        chunk_tokens=chunk_tokens,
    )
    return weighted_token_mean(jsd_bt, weights_bt)


GKD_LMBDA = 0.5  # TRL's GKDConfig.lmbda: the share of steps trained on the student's own samples


def on_policy_step(seed: int, step: int, lmbda: float = GKD_LMBDA) -> bool:
    """Whether step ``step`` trains on sequences the student samples (GKD's on-policy fraction
    lambda; TRL draws ``random.random() <= lmbda`` per step). Drawn from (seed, step), so a
    resumed run makes the same choices."""
    return bool(np.random.default_rng([seed, step]).random() < lmbda)
