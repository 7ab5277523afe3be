"""Token log-probabilities and the policy's entropy from final hidden states, chunk by chunk.

The RL losses need, from one forward, the targets' log-probs at the sampling temperature (the
ratio), at temperature 1 (the SFT warm-up rows) and the entropy of the sampling distribution (a
logged metric). Computing all three from full logits would materialise [B, T, V] float32 arrays
(for Qwen2.5's 152k vocabulary and 256 x 768 tokens, 112 GiB); here each chunk of tokens computes
its logits once ([chunk, V] float32, sized like ``chunked_logprobs``'s chunks) and derives every
quantity from them, and the backward pass recomputes the chunk's logits (``jax.checkpoint``).

The entropy is a metric: it is computed on ``stop_gradient`` logits, so it never changes the
gradient of a loss that also returns it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from posttrain.trainer.models.logprobs import (
    chunk_tokens_for,
    full_width,
    map_token_chunks,
    picked_logprobs,
    scored_window,
    vocab_of,
)

Head = Callable[[jax.Array], jax.Array]  # hidden [N, E] -> logits [N, V]


def entropy_of_logits(logits_nv: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Entropy (nats) of softmax(logits / temperature) per row, float32 [N]; no gradient."""
    logits_nv = jax.lax.stop_gradient(logits_nv.astype(jnp.float32))
    if temperature != 1.0:
        logits_nv = logits_nv / temperature
    logp_nv = jax.nn.log_softmax(logits_nv, axis=-1)
    return -(jnp.exp(logp_nv) * logp_nv).sum(axis=-1)


def chunked_logprobs_and_entropy(
    hidden_bte: jax.Array,
    head: Head,
    targets_bt: jax.Array,
    *,
    temperatures: Sequence[float],
    entropy_temperature: float,
    chunk_tokens: int | None = None,
    completion_width: int | None = None,
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """(log p(targets) at each of ``temperatures``, entropy at ``entropy_temperature``), each
    float32 [B, T], from final hidden states [B, T, E] with one LM-head pass per chunk of tokens.

    ``head`` maps hidden [N, E] to logits [N, V]. ``chunk_tokens`` defaults to
    ``chunk_tokens_for(V)``; when the B * T tokens fit in one chunk, the logits are computed once
    for the whole batch, as the unchunked maths would. Only the log-probs carry gradients. With
    ``completion_width`` only the positions of ``scored_window`` run the head; the others are 0.
    """
    T = hidden_bte.shape[1]
    window = scored_window(T, completion_width)
    hidden_bwe, targets_bw = hidden_bte[:, window], targets_bt[:, window]
    B, W, E = hidden_bwe.shape
    temperatures = tuple(temperatures)

    def stats(h_ne: jax.Array, t_n: jax.Array) -> tuple[jax.Array, ...]:
        logits_nv = head(h_ne)
        logps = tuple(picked_logprobs(logits_nv, t_n, temp) for temp in temperatures)
        return (*logps, entropy_of_logits(logits_nv, entropy_temperature))

    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for(vocab_of(head, hidden_bte))
    outputs = map_token_chunks(
        stats, hidden_bwe.reshape(B * W, E), targets_bw.reshape(B * W), chunk_tokens
    )
    *logps, entropy = (full_width(o.reshape(B, W), window, T) for o in outputs)
    return tuple(logps), entropy


def chunked_entropy(
    hidden_bte: jax.Array,
    head: Head,
    *,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> jax.Array:
    """Entropy of softmax(head(hidden) / temperature) per token, float32 [B, T], chunk by chunk."""
    targets_bt = jnp.zeros(hidden_bte.shape[:2], jnp.int32)  # unused: no log-prob is asked for
    _, entropy = chunked_logprobs_and_entropy(
        hidden_bte,
        head,
        targets_bt,
        temperatures=(),
        entropy_temperature=temperature,
        chunk_tokens=chunk_tokens,
    )
    return entropy
