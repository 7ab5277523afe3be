"""GKD's generalised JSD, chunked over tokens from hidden states, against numpy on full logits
(values and gradients), and a compiled check that no [B, T, V] float32 array is ever built."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.trainer.algorithms import distill_loss as dl

B, T, E, S, V = 2, 7, 8, 12, 37  # S: the teacher's hidden size


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def jsd_reference(student_logits, teacher_logits, beta, temperature):
    """Agarwal et al. 2024 (GKD), eq. 1 and its beta = 0 / 1 ends, float64: p teacher, q
    student, m = beta p + (1 - beta) q, JSD = beta KL(p||m) + (1 - beta) KL(q||m)."""
    log_q = log_softmax(np.asarray(student_logits, np.float64) / temperature)
    log_p = log_softmax(np.asarray(teacher_logits, np.float64) / temperature)
    p, q = np.exp(log_p), np.exp(log_q)
    if beta == 0.0:
        return (p * (log_p - log_q)).sum(-1)
    if beta == 1.0:
        return (q * (log_q - log_p)).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (log_p - np.log(m))).sum(-1) + (1 - beta) * (q * (log_q - np.log(m))).sum(-1)


def problem(seed=0):
    rng = np.random.default_rng(seed)
    w_s = rng.normal(size=(E, V)) * 0.7
    w_t = rng.normal(size=(S, V)) * 0.7
    h_s = rng.normal(size=(B, T, E))
    h_t = rng.normal(size=(B, T, S))
    mask = (rng.random((B, T)) < 0.7).astype(np.float64)
    weights = mask * B / mask.sum()
    return w_s, w_t, h_s, h_t, weights


def f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.9])
@pytest.mark.parametrize("chunk_tokens", [1, 5, None])
def test_chunked_jsd_equals_the_full_vocabulary_reference(beta, temperature, chunk_tokens):
    w_s, w_t, h_s, h_t, weights = problem()
    ws, wt, hs, ht = f32(w_s, w_t, h_s, h_t)
    got = dl.chunked_generalized_jsd(
        hs,
        lambda x: x @ ws,
        ht,
        lambda x: x @ wt,
        beta=beta,
        temperature=temperature,
        chunk_tokens=chunk_tokens,
    )
    want = jsd_reference(h_s @ w_s, h_t @ w_t, beta, temperature)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=1e-6)
    loss = dl.gkd_loss(
        hs, lambda x: x @ ws, ht, lambda x: x @ wt, jnp.asarray(weights, jnp.float32),
        beta=beta, temperature=temperature, chunk_tokens=chunk_tokens,
    )  # fmt: skip
    np.testing.assert_allclose(
        float(loss), np.mean(np.sum(want * weights, -1)), rtol=2e-4, atol=1e-7
    )


def test_beta_ends_are_forward_and_reverse_kl_and_the_mixture_tends_to_them():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(6, V)), rng.normal(size=(6, V))
    forward = jsd_reference(s, t, 0.0, 1.0)  # KL(teacher || student)
    reverse = jsd_reference(s, t, 1.0, 1.0)
    assert not np.allclose(forward, reverse, rtol=0.05)  # the two ends are different losses
    small = 1e-3
    got_0 = np.asarray(dl.generalized_jsd(*f32(s, t), beta=small), np.float64) / small
    got_1 = np.asarray(dl.generalized_jsd(*f32(s, t), beta=1 - small), np.float64) / small
    np.testing.assert_allclose(got_0, forward, rtol=0.02)
    np.testing.assert_allclose(got_1, reverse, rtol=0.02)


def numeric_logit_grad(student_logits, teacher_logits, weights_n, beta, temperature, h=1e-6):
    """d sum_n(w_n JSD_n) / d student logits by central differences, float64."""
    grad = np.zeros_like(student_logits)
    for idx in np.ndindex(*student_logits.shape):
        up, down = student_logits.copy(), student_logits.copy()
        up[idx] += h
        down[idx] -= h
        f_up = (jsd_reference(up, teacher_logits, beta, temperature) * weights_n).sum()
        f_down = (jsd_reference(down, teacher_logits, beta, temperature) * weights_n).sum()
        grad[idx] = (f_up - f_down) / (2 * h)
    return grad


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk_tokens", [3, None])
def test_gradients_equal_the_numpy_reference(beta, chunk_tokens):
    """Student head and hidden gradients (chain rule from numeric logit gradients); the teacher
    gets none."""
    w_s, w_t, h_s, h_t, weights = problem(2)
    temperature = 0.9
    g_logits = numeric_logit_grad(
        (h_s @ w_s).reshape(B * T, V),
        (h_t @ w_t).reshape(B * T, V),
        weights.reshape(-1) / B,  # the mean over rows of the weighted sum
        beta,
        temperature,
    )
    want_w = h_s.reshape(B * T, E).T @ g_logits
    want_h = (g_logits @ w_s.T).reshape(B, T, E)

    def loss(w_s, h_s, w_t, h_t):
        return dl.gkd_loss(
            h_s, lambda x: x @ w_s, h_t, lambda x: x @ w_t, jnp.asarray(weights, jnp.float32),
            beta=beta, temperature=temperature, chunk_tokens=chunk_tokens,
        )  # fmt: skip

    g_w, g_h, g_wt, g_ht = jax.grad(loss, argnums=(0, 1, 2, 3))(*f32(w_s, h_s, w_t, h_t))
    np.testing.assert_allclose(np.asarray(g_w), want_w, rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(np.asarray(g_h), want_h, rtol=2e-3, atol=2e-5)
    assert not np.any(np.asarray(g_wt)) and not np.any(np.asarray(g_ht))


def vocab_arrays(hlo: str, vocab: int) -> list[int]:
    """Element counts of every float32 array in ``hlo`` with a dimension of size ``vocab``."""
    counts = []
    for dims in re.findall(r"f32\[([\d,]+)\]", hlo):
        shape = [int(d) for d in dims.split(",")]
        if vocab in shape:
            counts.append(int(np.prod(shape)))
    return counts


def test_the_compiled_loss_holds_one_chunk_of_logits_at_a_time():
    """Value and gradient of the loss on a large vocabulary: no float32 array over the
    vocabulary is larger than one chunk's logits ([chunk, V]); the unchunked loss has them."""
    b, t, e, s, vocab, chunk = 2, 64, 8, 4, 8192, 16
    rng = np.random.default_rng(3)
    w_s, h_s = f32(rng.normal(size=(e, vocab)), rng.normal(size=(b, t, e)))
    w_t, h_t = f32(rng.normal(size=(s, vocab)), rng.normal(size=(b, t, s)))
    weights = jnp.full((b, t), 1.0 / t, jnp.float32)

    def compiled(chunk_tokens):
        def loss(w_s, h_s, w_t, h_t):  # the teacher as arguments: no constant folding
            return dl.gkd_loss(
                h_s, lambda x: x @ w_s, h_t, lambda x: x @ w_t, weights, beta=0.5,
                chunk_tokens=chunk_tokens,
            )  # fmt: skip

        grad = jax.value_and_grad(loss, argnums=(0, 1))
        return jax.jit(grad).lower(w_s, h_s, w_t, h_t).compile()

    chunked = compiled(chunk)
    sizes = vocab_arrays(chunked.as_text(), vocab)
    assert sizes and max(sizes) <= chunk * vocab, sorted(set(sizes))
    whole = compiled(b * t)  # one chunk of every token: the [B * T, V] logits exist
    assert max(vocab_arrays(whole.as_text(), vocab)) >= b * t * vocab
    memory = chunked.memory_analysis()
    if memory is not None:  # the backend reports it (XLA:CPU does)
        assert memory.temp_size_in_bytes < b * t * vocab * 4


def test_on_policy_steps_are_a_seeded_lambda_share():
    draws = [dl.on_policy_step(3, s, 0.3) for s in range(2000)]
    assert abs(np.mean(draws) - 0.3) < 0.04
    assert draws[:50] == [dl.on_policy_step(3, s, 0.3) for s in range(50)]  # resumable
    assert draws != [dl.on_policy_step(4, s, 0.3) for s in range(2000)]
    assert not any(dl.on_policy_step(3, s, 0.0) for s in range(100))
    assert all(dl.on_policy_step(3, s, 1.0) for s in range(100))
