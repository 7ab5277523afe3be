"""Chunked log-probs + entropy (the RL losses' path) equal the full-logits maths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.trainer.algorithms import grpo_loss as gl
from posttrain.trainer.models.entropy import (
    chunked_entropy,
    chunked_logprobs_and_entropy,
    entropy_of_logits,
)


def _head_and_data(vocab=37, hidden=16, B=3, T=10, seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(hidden, vocab)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(B, T, hidden)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=(B, T)), jnp.int32)
    return w, h, targets


def _full_logits(w, h):
    return jnp.einsum("bte,ev->btv", h, w)


def _full_logprobs(w, h, targets, temperature):
    logp = jax.nn.log_softmax(_full_logits(w, h) / temperature, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _numpy_entropy(logits, temperature):
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return -(p * np.log(p)).sum(-1)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 30, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_equal_full_logits(chunk_tokens, temperature):
    w, h, targets = _head_and_data()
    (logp, plain), entropy = chunked_logprobs_and_entropy(
        h,
        lambda x: x @ w,
        targets,
        temperatures=(temperature, 1.0),
        entropy_temperature=temperature,
        chunk_tokens=chunk_tokens,
    )
    np.testing.assert_allclose(logp, _full_logprobs(w, h, targets, temperature), atol=1e-5)
    np.testing.assert_allclose(plain, _full_logprobs(w, h, targets, 1.0), atol=1e-5)
    want = _numpy_entropy(_full_logits(w, h), temperature)
    np.testing.assert_allclose(entropy, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        chunked_entropy(h, lambda x: x @ w, temperature=temperature, chunk_tokens=chunk_tokens),
        want,
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("chunk_tokens", [7, None])
def test_entropy_adds_no_gradient(chunk_tokens):
    """A loss that also returns the entropy has the gradients of its log-prob terms alone."""
    w, h, targets = _head_and_data()
    weights = jnp.linspace(0.1, 1.0, targets.size).reshape(targets.shape)

    def with_entropy(w, h):
        (logp,), entropy = chunked_logprobs_and_entropy(
            h,
            lambda x: x @ w,
            targets,
            temperatures=(0.7,),
            entropy_temperature=0.7,
            chunk_tokens=chunk_tokens,
        )
        return jnp.sum(logp * weights) + jnp.sum(entropy)  # the entropy term must not count

    def full(w, h):
        return jnp.sum(_full_logprobs(w, h, targets, 0.7) * weights)

    got = jax.grad(with_entropy, argnums=(0, 1))(w, h)
    want = jax.grad(full, argnums=(0, 1))(w, h)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_entropy_of_logits_matches_the_grpo_helper():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 11)), jnp.float32)
    np.testing.assert_allclose(gl.entropy_from_logits(logits), entropy_of_logits(logits))
    np.testing.assert_allclose(
        entropy_of_logits(logits.reshape(6, 11), 0.5),
        _numpy_entropy(logits.reshape(6, 11), 0.5),
        rtol=1e-5,
    )
