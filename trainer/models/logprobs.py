"""Token log-probabilities from final hidden states without a [B, T, V] float32 logits array.

``log p(target) = logit[target] - logsumexp(logits)``, computed over chunks of tokens: each chunk's
logits ([chunk, V] float32) exist only inside that chunk's step, and the backward pass recomputes
them (``jax.checkpoint``) instead of keeping every chunk's logits alive until the gradient. The
peak extra memory is one chunk's logits, not the whole batch's: for Qwen2.5's 152k vocabulary and
256 x 768 tokens that is the difference between 112 GiB and ``CHUNK_BYTES``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

CHUNK_BYTES = 64 * 2**20  # float32 logits of one chunk; a whole batch that fits runs unchunked


def scored_window(length: int, completion_width: int | None) -> slice:
    """The positions of a [prompt | completion] row whose targets can be completion tokens.

    A rollout row ends with its ``completion_width`` completion tokens; they are the targets of
    positions ``length - width - 1 .. length - 2`` (verl takes the same ``logits[:, -W - 1 : -1]``).
    Only those need the LM head: the prompt's positions are masked out of every RL loss. ``None``
    (or a width that leaves no prompt) keeps every position."""
    if completion_width is None or completion_width + 1 >= length:
        return slice(0, length)
    return slice(length - completion_width - 1, length - 1)


def full_width(x_bw: jax.Array, window: slice, length: int) -> jax.Array:
    """Per-position values on ``window`` -> [B, length], 0 at the positions outside it."""
    start, stop, _ = window.indices(length)
    return jnp.pad(x_bw, ((0, 0), (start, length - stop)))


def chunk_tokens_for(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's float32 logits take at most ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * vocab))


def picked_logprobs(
    logits_nv: jax.Array, targets_n: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """log_softmax(logits / temperature)[target] for each row, float32 [N] (the reference maths)."""
    logits_nv = logits_nv.astype(jnp.float32)
    if temperature != 1.0:
        logits_nv = logits_nv / temperature
    picked = jnp.take_along_axis(logits_nv, targets_n[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits_nv, axis=-1)


def vocab_of(head: Callable[[jax.Array], jax.Array], hidden_bte: jax.Array) -> int:
    """The vocabulary size of ``head``'s logits, from its shapes alone (no compute)."""
    probe = jax.ShapeDtypeStruct((1, hidden_bte.shape[-1]), hidden_bte.dtype)
    return int(jax.eval_shape(head, probe).shape[-1])


def chunked_logprobs(
    hidden_bte: jax.Array,
    head: Callable[[jax.Array], jax.Array],
    targets_bt: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    completion_width: int | None = None,
) -> jax.Array:
    """log p(targets[b, t]) as float32 [B, T] from final hidden states [B, T, E].

    ``head`` maps hidden [N, E] to logits [N, V] (the model's LM head with its soft-capping).
    ``chunk_tokens`` defaults to ``chunk_tokens_for(V)``; when the B * T tokens fit in one chunk
    the logits are computed once, as the unchunked maths would. With ``completion_width`` only
    the positions of ``scored_window`` run the head; the others are 0.
    """
    T = hidden_bte.shape[1]
    window = scored_window(T, completion_width)
    hidden_bwe, targets_bw = hidden_bte[:, window], targets_bt[:, window]
    B, W, E = hidden_bwe.shape
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for(vocab_of(head, hidden_bte))
    (logp_n,) = map_token_chunks(
        lambda h_ne, t_n: (picked_logprobs(head(h_ne), t_n, temperature),),
        hidden_bwe.reshape(B * W, E),
        targets_bw.reshape(B * W),
        chunk_tokens,
    )
    return full_width(logp_n.reshape(B, W), window, T)


def map_token_chunks(
    fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, ...]],
    hidden_ne: jax.Array,
    targets_n: jax.Array,
    chunk_tokens: int,
) -> tuple[jax.Array, ...]:
    """``fn(hidden [c, E], targets [c])`` -> per-token outputs ([c] each), over chunks of at most
    ``chunk_tokens`` tokens; returns them for all N tokens ([N] each). All N in one chunk: ``fn``
    runs once on the whole batch. Otherwise a loop over chunks whose backward pass recomputes each
    chunk (``jax.checkpoint``), so only one chunk's logits are ever alive."""
    n, E = hidden_ne.shape
    if n <= chunk_tokens:
        return fn(hidden_ne, targets_n)
    chunks = -(-n // chunk_tokens)
    pad = chunks * chunk_tokens - n
    hidden_cce = jnp.pad(hidden_ne, ((0, pad), (0, 0))).reshape(chunks, chunk_tokens, E)
    targets_cc = jnp.pad(targets_n, (0, pad)).reshape(chunks, chunk_tokens)
    one_chunk = jax.checkpoint(lambda args: fn(*args))  # keep the chunk's inputs, not its logits
    outputs_cc = jax.lax.map(one_chunk, (hidden_cce, targets_cc))
    return tuple(o.reshape(-1)[:n] for o in outputs_cc)


def map_row_chunks(
    fn: Callable[..., tuple[jax.Array, ...]],
    inputs: tuple[jax.Array, ...],
    chunk_tokens: int,
) -> tuple[jax.Array, ...]:
    """``map_token_chunks`` for any number of per-token inputs (each [N, ...]), e.g. a student's
    and a teacher's hidden states of different widths: ``fn(*chunk_inputs)`` -> per-token
    outputs ([c] each), over chunks of at most ``chunk_tokens`` tokens, each chunk recomputed in
    the backward pass so only one chunk's logits are ever alive."""
    n = inputs[0].shape[0]
    if n <= chunk_tokens:
        return fn(*inputs)
    chunks = -(-n // chunk_tokens)
    pad = chunks * chunk_tokens - n

    def split(x: jax.Array) -> jax.Array:
        padded = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
        return padded.reshape(chunks, chunk_tokens, *x.shape[1:])

    one_chunk = jax.checkpoint(lambda args: fn(*args))  # keep the chunk's inputs, not its logits
    outputs = jax.lax.map(one_chunk, tuple(split(x) for x in inputs))
    return tuple(o.reshape(-1)[:n] for o in outputs)
