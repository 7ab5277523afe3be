"""The fast paths equal the reference maths: fused attention, chunked log-probs, rematerialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.trainer.models import (
    REMAT_POLICIES,
    builtin_config,
    create_model,
    load_pretrained,
    set_attention,
    set_remat,
)
from posttrain.trainer.models.logprobs import chunked_logprobs, picked_logprobs

from .hf_reference import HF_REFERENCE, MODEL_FIXTURES

TOL = dict(atol=1e-4, rtol=1e-4)  # as test_models.py


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_reference_attention_matches_hugging_face_and_the_fused_path(name):
    """The plain-XLA reference stays tested against HF; the default path must equal it."""
    ref = np.load(HF_REFERENCE / name / "reference.npz")
    model = load_pretrained(HF_REFERENCE / name)
    ids, mask = jnp.asarray(ref["padded_input_ids"]), jnp.asarray(ref["padded_attention_mask"])
    fused = np.asarray(_forward(model, ids, mask))
    set_attention(model, "reference")
    reference = np.asarray(_forward(model, ids, mask))
    valid = ref["padded_attention_mask"].astype(bool)
    np.testing.assert_allclose(reference[valid], ref["padded_logits"][valid], **TOL)
    np.testing.assert_allclose(fused[valid], reference[valid], atol=1e-5, rtol=1e-5)


def _head_and_data(vocab=37, hidden=16, B=3, T=10, seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(hidden, vocab)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(B, T, hidden)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=(B, T)), jnp.int32)
    return w, h, targets


@pytest.mark.parametrize("chunk_tokens", [1, 7, 30, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_full_logits_with_gradients(chunk_tokens, temperature):
    w, h, targets = _head_and_data()

    def full(w, h):
        logits = jnp.einsum("bte,ev->btv", h, w)
        return jax.nn.log_softmax(logits / temperature, axis=-1), logits

    def chunked(w, h):
        return chunked_logprobs(
            h, lambda x: x @ w, targets, temperature=temperature, chunk_tokens=chunk_tokens
        )

    expected = jnp.take_along_axis(full(w, h)[0], targets[..., None], axis=-1)[..., 0]
    got = chunked(w, h)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)

    weights = jnp.linspace(0.1, 1.0, targets.size).reshape(targets.shape)

    def loss_full(w, h):
        logp = jnp.take_along_axis(full(w, h)[0], targets[..., None], axis=-1)[..., 0]
        return jnp.sum(logp * weights)

    g_full = jax.grad(loss_full, argnums=(0, 1))(w, h)
    g_chunk = jax.grad(lambda w, h: jnp.sum(chunked(w, h) * weights), argnums=(0, 1))(w, h)
    for a, b in zip(g_chunk, g_full, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_picked_logprobs_is_log_softmax_at_the_target():
    logits = jnp.asarray([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    got = picked_logprobs(logits, jnp.asarray([2, 1]))
    want = np.log(np.exp([3.0, 0.0]) / np.asarray([np.exp([1.0, 2.0, 3.0]).sum(), 3.0]))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policies_keep_loss_and_gradients(policy):
    model = create_model(builtin_config("tiny", vocab_size=64), rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, size=(2, 12)), jnp.int32)

    def value_and_grad(model):
        # As the trainer does: merge the model inside the gradient, inside a micro-batch scan.
        graphdef, params = nnx.split(model)

        def loss(params):
            logits = nnx.merge(graphdef, params)(ids)
            return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(axis=-1))

        def micro(carry, _):
            return carry, jax.value_and_grad(loss)(params)

        return jax.jit(lambda: jax.lax.scan(micro, 0, None, length=1)[1])()

    value, grads = value_and_grad(model)
    set_remat(model, policy)
    value_r, grads_r = value_and_grad(model)
    np.testing.assert_allclose(np.asarray(value_r), np.asarray(value), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_unknown_remat_policy_and_attention_are_named():
    model = create_model(builtin_config("tiny", vocab_size=64), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="checkpoint_dots.*known: none, full"):
        set_remat(model, "checkpoint_dots")
    with pytest.raises(
        ValueError, match="flash.*known: auto, xla, cudnn, splash, grouped, reference"
    ):
        set_attention(model, "flash")


def test_the_api_offers_exactly_the_model_remat_policies():
    from typing import get_args

    from posttrain.api.v1alpha1 import TrainingSpec

    assert get_args(TrainingSpec.model_fields["remat"].annotation) == REMAT_POLICIES
