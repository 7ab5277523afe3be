"""Grouped-query attention for training on XLA:CPU, with its backward pass written out.

The maths is ``reference_attention``'s (same masking constant, softmax in float32); only the
layouts differ. Each kv head's T x G query rows form one [X, D] matrix (X = T * G), so every
matmul is a plain one batched over (batch, kv head), as ``cached_attention`` does for generation.

Why a hand-written VJP: XLA:CPU runs a batched matmul only with the batch axes leading and
copies operands into that layout. Autodiff of ``jax.nn.dot_product_attention`` (and of the
reference einsums) contracts the [B, K, X, S] probabilities over X for the key and value
gradients, so XLA copied the probabilities, the largest tensor of the layer, four times per layer
(docs/performance.md). Here those two gradients are computed transposed, ``dk^T = q^T ds`` and
``dv^T = do^T p`` ([B, K, D, S]), so only the [X, D]-sized operands are transposed. Forward and
backward of one layer of the Tunix-comparison workload took 0.63x the CPU time of
``jax.nn.dot_product_attention``'s on one core (measured in one process, alternating).

Residuals: the probabilities (as autodiff of the XLA path keeps them), q in rows, k, v and the
mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# The masked score of every attention path: finite, so a row with no visible key gets uniform
# (ignored) weights, not NaN.
MASKED = float(jnp.finfo(jnp.float32).min)


def to_rows(x_bthd: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, H, D] -> [B, K, T * G, D]: query head h = kv head h // G, rows ordered (t, g)."""
    B, T, H, D = x_bthd.shape
    grouped = x_bthd.reshape(B, T, kv_heads, H // kv_heads, D).transpose(0, 2, 1, 3, 4)
    return grouped.reshape(B, kv_heads, -1, D)


def from_rows(x_bkxd: jax.Array, tokens: int) -> jax.Array:
    """The inverse of ``to_rows``: [B, K, T * G, D] -> [B, T, H, D]."""
    B, K, X, D = x_bkxd.shape
    grouped = x_bkxd.reshape(B, K, tokens, X // tokens, D).transpose(0, 2, 1, 3, 4)
    return grouped.reshape(B, tokens, -1, D)


def _probs(q_bkxd: jax.Array, k_bskd: jax.Array, mask_bts: jax.Array, scale: float) -> jax.Array:
    B, K, X, _ = q_bkxd.shape
    T = mask_bts.shape[1]
    k_bkds = k_bskd.transpose(0, 2, 3, 1)
    scores = jnp.einsum("bkxd,bkds->bkxs", q_bkxd, k_bkds, preferred_element_type=jnp.float32)
    scores = scores.reshape(B, K, T, X // T, -1) * scale
    scores = jnp.where(mask_bts[:, None, :, None, :], scores, MASKED)
    return jax.nn.softmax(scores, axis=-1).reshape(B, K, X, -1)


def _forward(q_bthd, k_bskd, v_bskd, mask_bts, scale):
    K = k_bskd.shape[2]
    q_bkxd = to_rows(q_bthd, K)
    v_bksd = v_bskd.transpose(0, 2, 1, 3)
    probs = _probs(q_bkxd, k_bskd, mask_bts, scale)
    out = jnp.einsum("bkxs,bksd->bkxd", probs.astype(v_bksd.dtype), v_bksd)
    return from_rows(out, q_bthd.shape[1]), (q_bkxd, k_bskd, v_bksd, probs, mask_bts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def grouped_attention(
    q_bthd: jax.Array,
    k_bskd: jax.Array,
    v_bskd: jax.Array,
    mask_bts: jax.Array,
    scale: float,
) -> jax.Array:
    """Attention output [B, T, H, D] for q [B, T, H, D], k and v [B, S, K, D] and the boolean
    mask [B, T, S] (True = may attend): ``reference_attention`` without soft-capping."""
    return _forward(q_bthd, k_bskd, v_bskd, mask_bts, scale)[0]


def _bwd(scale, residuals, d_out_bthd):
    q_bkxd, k_bskd, v_bksd, probs, mask_bts = residuals
    B, K, X, S = probs.shape
    T = d_out_bthd.shape[1]
    d_out = to_rows(d_out_bthd, K)
    d_probs = jnp.einsum("bkxd,bksd->bkxs", d_out, v_bksd, preferred_element_type=jnp.float32)
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True)) * scale
    # masked scores are a constant: no gradient (a row with no visible key has uniform
    # probabilities, so the softmax backward alone would give its masked keys one)
    d_scores = jnp.where(mask_bts[:, None, :, None, :], d_scores.reshape(B, K, T, X // T, S), 0.0)
    d_scores = d_scores.reshape(B, K, X, S)
    d_scores_c = d_scores.astype(q_bkxd.dtype)
    d_q = jnp.einsum("bkxs,bksd->bkxd", d_scores_c, k_bskd.transpose(0, 2, 1, 3))
    # the key and value gradients come out [B, K, D, S]: contracting X with the probabilities
    # as they are, and transposing only the [X, D] operand
    d_k = jnp.einsum("bkxd,bkxs->bkds", q_bkxd, d_scores_c).transpose(0, 3, 1, 2)
    d_v = jnp.einsum("bkxd,bkxs->bkds", d_out, probs.astype(d_out.dtype)).transpose(0, 3, 1, 2)
    return (
        from_rows(d_q, T).astype(q_bkxd.dtype),
        d_k.astype(k_bskd.dtype),
        d_v.astype(v_bksd.dtype),
        None,
    )


grouped_attention.defvjp(_forward, _bwd)
