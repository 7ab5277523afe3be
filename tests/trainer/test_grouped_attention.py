"""``grouped_attention`` (the CPU training kernel with its backward written out) against
``reference_attention``'s maths and autodiff: outputs and the gradients of q, k and v."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.trainer.models import builtin_config, create_model, set_attention
from posttrain.trainer.models.grouped_attention import from_rows, grouped_attention, to_rows
from posttrain.trainer.models.transformer import attention_masks, reference_attention

T = 24


def _inputs(H, K, dtype=jnp.float32, B=3, D=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, K, D)), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, K, D)), dtype)
    # a cotangent that weighs every output element differently
    w = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    return q, k, v, w


def _mask(window=None, packed=False):
    key_mask = np.ones((3, T), np.int32)
    key_mask[0, :7] = 0  # left padding: queries 0..6 see no real key at all
    key_mask[1, -5:] = 0  # right padding
    segments = None
    if packed:
        segments = np.ones((3, T), np.int32)
        segments[2, 10:] = 2
    full, sliding = attention_masks(
        jnp.arange(T),
        jnp.asarray(key_mask),
        window,
        None if segments is None else jnp.asarray(segments),
    )
    return full if window is None else sliding


def test_rows_round_trip_and_group_heads_by_kv_head():
    x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)  # H=4, K=2, G=2
    rows = to_rows(x, 2)
    assert rows.shape == (2, 2, 6, 5)
    # row (t, g) of kv head k is query head k * G + g at token t
    np.testing.assert_array_equal(rows[1, 1, 2 * 2 + 1], x[1, 2, 3])
    np.testing.assert_array_equal(from_rows(rows, 3), x)


@pytest.mark.parametrize(
    "heads, window, packed",
    [
        ((4, 2), None, False),  # grouped-query, causal + padding
        ((4, 4), 5, False),  # multi-head, sliding window
        ((6, 1), None, True),  # multi-query, packed segments
    ],
)
def test_outputs_and_gradients_equal_the_reference(heads, window, packed):
    H, K = heads
    q, k, v, w = _inputs(H, K)
    mask = _mask(window, packed)

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), (0, 1, 2)))

    got_loss, got = loss(lambda q, k, v: grouped_attention(q, k, v, mask, 0.3))(q, k, v)
    want_loss, want = loss(lambda q, k, v: reference_attention(q, k, v, mask, 0.3, None))(q, k, v)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for name, a, b in zip("qkv", got, want, strict=True):
        assert float(jnp.max(jnp.abs(b))) > 0.1, name  # the comparison is not of zeros
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=name)


def test_bfloat16_keeps_dtypes_and_matches_the_reference():
    q, k, v, w = _inputs(4, 2, jnp.bfloat16)
    mask = _mask()

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w), (0, 1, 2))

    out = grouped_attention(q, k, v, mask, 0.3)
    assert out.dtype == jnp.bfloat16
    want = reference_attention(q, k, v, mask, 0.3, None)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=2e-2)
    got_g = grads(lambda q, k, v: grouped_attention(q, k, v, mask, 0.3))(q, k, v)
    want_g = grads(lambda q, k, v: reference_attention(q, k, v, mask, 0.3, None))(q, k, v)
    for a, b in zip(got_g, want_g, strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=6e-2)


def test_a_model_trains_the_same_with_either_kernel():
    """The loss and every parameter gradient of a whole model, grouped against reference."""
    config = builtin_config("tiny")
    ids = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 16)))
    mask = jnp.ones((2, 16), jnp.int32).at[0, :3].set(0)

    def loss_and_grads(implementation):
        model = create_model(config, rngs=nnx.Rngs(0))
        set_attention(model, implementation)

        def loss(m):
            logits = m(ids, attention_mask=mask)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)

        return nnx.value_and_grad(loss)(model)

    got_loss, got = loss_and_grads("grouped")
    want_loss, want = loss_and_grads("reference")
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
