"""Distillation maths against numpy references written from the papers' equations, and the
layer map (default and validated pairs)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.trainer.algorithms import distill_loss as dl

rng = np.random.default_rng(0)
B, T, V = 3, 5, 11


def weights(b=B, t=T) -> np.ndarray:
    """Completion-token weights as the SFT source makes them: mask * B / (masked tokens)."""
    mask = (rng.random((b, t)) < 0.7).astype(np.float64)
    mask[0, 0] = 1.0
    return mask * b / mask.sum()


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def causal_maps(b: int, h: int, t: int) -> np.ndarray:
    """Attention rows over keys s <= query t, exact zeros elsewhere (as masked keys get)."""
    scores = rng.normal(size=(b, h, t, t)) * 2
    causal = np.tril(np.ones((t, t), bool))
    scores = np.where(causal, scores, -np.inf)
    return softmax(scores)


def per_token_mean(term_bt: np.ndarray, w_bt: np.ndarray) -> float:
    return float(np.mean(np.sum(term_bt * w_bt, axis=-1)))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_logit_kd_is_t2_times_forward_kl(temperature):
    s, t, w = rng.normal(size=(B, T, V)) * 3, rng.normal(size=(B, T, V)) * 3, weights()
    p, q = softmax(t / temperature), softmax(s / temperature)  # teacher p, student q
    kl_bt = np.sum(p * (np.log(p) - np.log(q)), axis=-1)  # KL(p || q), Hinton's soft targets
    want = temperature**2 * per_token_mean(kl_bt, w)
    got = dl.logit_kd_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), temperature=temperature)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    same = dl.logit_kd_loss(jnp.asarray(t), jnp.asarray(t), jnp.asarray(w), temperature=temperature)
    assert abs(float(same)) < 1e-6


def test_attention_kl_per_head_over_valid_keys():
    s, t, w = causal_maps(B, 4, T), causal_maps(B, 4, T), weights()
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(t > 0, t * (np.log(t) - np.log(s)), 0.0).sum(-1)  # [B, H, T]
    want = per_token_mean(kl.mean(axis=1), w)
    got = dl.attention_kl_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert abs(float(dl.attention_kl_loss(jnp.asarray(t), jnp.asarray(t), jnp.asarray(w)))) < 1e-6


def test_attention_kl_with_other_head_counts_compares_head_averages():
    s, t, w = causal_maps(B, 2, T), causal_maps(B, 6, T), weights()
    s_avg, t_avg = s.mean(axis=1), t.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(t_avg > 0, t_avg * (np.log(t_avg) - np.log(s_avg)), 0.0).sum(-1)
    got = dl.attention_kl_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w))
    np.testing.assert_allclose(float(got), per_token_mean(kl, w), rtol=1e-5)


def test_attention_kl_gradient_is_finite_on_masked_keys():
    import jax

    s, t, w = causal_maps(1, 2, T), causal_maps(1, 2, T), weights(1)
    grad = jax.grad(dl.attention_kl_loss)(jnp.asarray(s, jnp.float32), jnp.asarray(t), w)
    assert np.isfinite(np.asarray(grad)).all()


def test_feature_mse_per_token():
    p, t, w = rng.normal(size=(B, T, 8)), rng.normal(size=(B, T, 8)), weights()
    want = per_token_mean(((p - t) ** 2).mean(-1), w)
    got = dl.feature_mse_loss(jnp.asarray(p), jnp.asarray(t), jnp.asarray(w))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_mix():
    assert float(dl.mix(jnp.float32(2.0), jnp.float32(4.0), 0.25)) == pytest.approx(3.5)


@pytest.mark.parametrize("ls, lt", [(2, 4), (4, 6), (3, 3), (1, 2), (4, 1), (6, 4), (5, 24)])
def test_default_layer_map(ls, lt):
    want = [(i, max(int(np.floor((i + 1) * lt / ls + 0.5)) - 1, 0)) for i in range(ls)]
    pairs = dl.default_layer_map(ls, lt)
    assert pairs == want
    assert pairs[-1] == (ls - 1, lt - 1)  # the last layers always pair up


def test_default_layer_map_examples():
    assert dl.default_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert dl.default_layer_map(4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]


def test_layer_map_errors_name_the_field():
    assert dl.check_layer_map([[0, 3], [1, 0]], 2, 4) == [(0, 3), (1, 0)]
    with pytest.raises(ValueError) as err:
        dl.check_layer_map([[0, 1], [2, 4]], 2, 4)
    msg = str(err.value)
    assert (
        "spec.distill.layers[1]: student layer 2 is out of range for a student with 2 layers" in msg
    )
    assert (
        "spec.distill.layers[1]: teacher layer 4 is out of range for a teacher with 4 layers" in msg
    )
    assert "layers[0]" not in msg
