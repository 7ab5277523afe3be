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


def test_entropy_of_logits_matches_numpy():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 11)), jnp.float32)
    np.testing.assert_allclose(entropy_of_logits(logits), _numpy_entropy(logits, 1.0), rtol=1e-5)
    np.testing.assert_allclose(
        entropy_of_logits(logits.reshape(6, 11), 0.5),
        _numpy_entropy(logits.reshape(6, 11), 0.5),
        rtol=1e-5,
    )


def _grpo_batch(vocab=64, B=4, T=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, vocab, size=(B, T)), jnp.int32)
    completion = np.zeros((B, T), np.float32)
    completion[:, 5:-1] = 1.0
    return {
        "input_ids": ids,
        "attention_mask": jnp.ones((B, T), jnp.int32),
        "targets": jnp.roll(ids, -1, axis=1),
        "completion_mask": jnp.asarray(completion),
        "advantages": jnp.asarray(rng.normal(size=B), jnp.float32),
        "tokens_per_row": jnp.full((B,), completion.sum() / B, jnp.float32),
        "old_logp": jnp.asarray(rng.normal(size=(B, T)) * 0.1 - 4.0, jnp.float32),
    }


@pytest.mark.parametrize("chunk_tokens", [1, 4, None])
def test_completion_width_runs_the_head_on_the_completion_positions_only(chunk_tokens):
    """With ``completion_width`` W the log-probs and entropy of the positions predicting a row's
    last W tokens equal the full maths, the others are 0, and the head sees B * W tokens."""
    from posttrain.trainer.models.logprobs import chunked_logprobs, scored_window

    w, h, targets = _head_and_data(B=3, T=10)
    rows_seen: dict[str, list[int]] = {"full": [], "window": []}

    def head_of(call):
        def head(x):
            rows_seen[call].append(x.shape[0])
            return x @ w

        return head

    width = 4
    window = scored_window(10, width)
    assert (window.start, window.stop) == (5, 9)  # verl's logits[:, -W - 1 : -1]
    (logp,), entropy = chunked_logprobs_and_entropy(
        h,
        head_of("full"),
        targets,
        temperatures=(0.7,),
        entropy_temperature=0.7,
        chunk_tokens=chunk_tokens,
    )
    (logp_w,), entropy_w = chunked_logprobs_and_entropy(
        h,
        head_of("window"),
        targets,
        temperatures=(0.7,),
        entropy_temperature=0.7,
        chunk_tokens=chunk_tokens,
        completion_width=width,
    )
    plain_w = chunked_logprobs(
        h, head_of("window"), targets, chunk_tokens=chunk_tokens, completion_width=width
    )
    assert logp_w.shape == entropy_w.shape == plain_w.shape == (3, 10)
    np.testing.assert_allclose(logp_w[:, window], logp[:, window], atol=1e-6)
    np.testing.assert_allclose(entropy_w[:, window], entropy[:, window], atol=1e-6)
    np.testing.assert_allclose(
        plain_w[:, window], _full_logprobs(w, h, targets, 1.0)[:, window], atol=1e-5
    )
    outside = np.ones(10, bool)
    outside[window] = False
    for x in (logp_w, entropy_w, plain_w):
        assert not np.asarray(x)[:, outside].any()
    # The head's widest input: every token (3 x 10) without the window, 3 x 4 with it.
    chunk = chunk_tokens or 30
    assert max(rows_seen["full"]) == min(30, chunk)
    assert max(rows_seen["window"]) == min(12, chunk)
    assert scored_window(10, None) == scored_window(10, 9) == slice(0, 10)  # no prompt: all


@pytest.mark.parametrize(("chunk_tokens", "completion_width"), [(7, None), (None, None), (4, 6)])
def test_grpo_loss_value_gradients_and_entropy_equal_the_full_logits_loss(
    monkeypatch, chunk_tokens, completion_width
):
    """The GRPO loss through the chunked path equals the same loss on materialised logits."""
    from flax import nnx

    from posttrain.api.settings.grpo import GrpoSpec
    from posttrain.trainer.algorithms import grpo
    from posttrain.trainer.algorithms.base import Models, logprobs_from_logits
    from posttrain.trainer.models import builtin_config, create_model
    from posttrain.trainer.models import entropy as entropy_module

    if chunk_tokens is not None:
        monkeypatch.setattr(entropy_module, "chunk_tokens_for", lambda vocab: chunk_tokens)
    g = GrpoSpec.model_validate(
        {"temperature": 0.7, "beta": 0.0, "rewards": [{"builtin": "regex-format", "pattern": "x"}]}
    )
    model = create_model(builtin_config("tiny", vocab_size=64), rngs=nnx.Rngs(0))
    batch = _grpo_batch()
    graphdef, params = nnx.split(model)

    def chunked(params):
        loss = grpo.make_loss(g, "grpo", completion_width=completion_width)
        return loss(Models(policy=nnx.merge(graphdef, params)), batch)

    def full(params):
        logits = nnx.merge(graphdef, params)(batch["input_ids"], batch["attention_mask"])
        logp = logprobs_from_logits(logits, batch["targets"], temperature=g.temperature)
        eps, eps_high = g.epsilon, g.clip_high
        aggregation, denominator = grpo.aggregation_args(
            g.loss_aggregation, 4, batch["tokens_per_row"], g.max_new_tokens
        )
        value, _ = gl.grpo_loss(
            logp,
            batch["old_logp"],
            None,
            batch["advantages"],
            batch["completion_mask"],
            eps=eps,
            eps_high=eps_high,
            beta=g.beta,
            aggregation=aggregation,
            num_tokens=denominator,
        )
        mask = batch["completion_mask"]
        entropy = entropy_of_logits(logits / g.temperature)
        return value, (entropy * mask).sum() / mask.sum()

    (value, metrics), grads = jax.value_and_grad(chunked, has_aux=True)(params)
    (want, want_entropy), want_grads = jax.value_and_grad(full, has_aux=True)(params)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["entropy"], want_entropy, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)
