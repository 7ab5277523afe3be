"""PPO's maths against numpy references written from the papers' equations (GAE: Schulman et al.
2016, eqs. 11-16; the clipped losses: Schulman et al. 2017, eq. 7, and TRL / verl's value clip)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.trainer.algorithms import ppo_loss as pl
from posttrain.trainer.algorithms.ppo import mini_batch_order

B, T = 5, 12


@pytest.fixture
def data():
    """Rows laid out like rollouts: a prompt, then one contiguous run of completion positions of
    varying length (one row empty), then padding."""
    rng = np.random.default_rng(0)
    mask = np.zeros((B, T), np.float32)
    for b, (start, length) in enumerate([(3, 6), (2, 9), (4, 1), (5, 0), (3, 8)]):
        mask[b, start : start + length] = 1
    return {
        "mask": mask,
        "rewards": rng.normal(size=(B, T)).astype(np.float32),
        "values": rng.normal(size=(B, T)).astype(np.float32),
        "old_values": rng.normal(size=(B, T)).astype(np.float32),
        "returns": rng.normal(size=(B, T)).astype(np.float32) * 2,
        "logp": rng.normal(-2, 0.3, size=(B, T)).astype(np.float32),
        "old_logp": rng.normal(-2, 0.3, size=(B, T)).astype(np.float32),
        "adv": rng.normal(size=(B, T)).astype(np.float32),
    }


def gae_reference(rewards, values, mask, gamma, lam):
    """A_t = sum_l (gamma lambda)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V_n = 0,
    over each row's completion positions (the explicit sum, not the recursion)."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[b])
        r, v = rewards[b, idx].astype(np.float64), values[b, idx].astype(np.float64)
        v_next = np.append(v[1:], 0.0)
        delta = r + gamma * v_next - v
        for k in range(len(idx)):
            adv[b, idx[k]] = sum((gamma * lam) ** j * delta[k + j] for j in range(len(idx) - k))
    returns = (adv + values * mask) * mask
    return adv, returns


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_explicit_sum(data, gamma, lam):
    adv, returns = pl.gae(data["rewards"], data["values"], data["mask"], gamma, lam)
    want_adv, want_returns = gae_reference(
        data["rewards"], data["values"], data["mask"], gamma, lam
    )
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, want_returns, rtol=1e-5, atol=1e-5)


def test_gae_with_lambda_one_and_gamma_one_is_return_minus_value(data):
    # Monte-Carlo: A_t = sum_{k>=t} r_k - V_t.
    mask = data["mask"]
    adv, returns = pl.gae(data["rewards"], data["values"], mask, 1.0, 1.0)
    reward_to_go = np.flip(np.cumsum(np.flip(data["rewards"] * mask, 1), 1), 1) * mask
    np.testing.assert_allclose(returns, reward_to_go, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv, reward_to_go - data["values"] * mask, rtol=1e-5, atol=1e-5)


def test_token_rewards_put_the_score_on_the_last_token(data):
    mask = data["mask"]
    scores = np.array([1.0, -2.0, 0.5, 3.0, 0.0], np.float32)
    kl = data["rewards"]  # any per-token values
    got = np.asarray(pl.token_rewards(jnp.asarray(scores), kl, mask, 0.1))
    want = -0.1 * kl * mask
    for b in range(B):
        idx = np.flatnonzero(mask[b])
        if len(idx):
            want[b, idx[-1]] += scores[b]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.all(got[3] == 0)  # an empty completion gets nothing


def test_whiten_is_zero_mean_unit_variance_over_the_mask(data):
    mask, x = data["mask"], data["adv"] * 3 + 1
    got = np.asarray(pl.whiten(x, mask))
    sel = x[mask > 0].astype(np.float64)
    want = (sel - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(got[mask > 0], want, rtol=1e-5, atol=1e-5)
    assert np.all(got[mask == 0] == 0)


def test_explained_variance(data):
    mask, v, r = data["mask"], data["values"], data["returns"]
    sel = mask > 0
    want = 1 - np.var(r[sel] - v[sel], ddof=1) / np.var(r[sel], ddof=1)
    assert float(pl.explained_variance(v, r, mask)) == pytest.approx(want, rel=1e-5)
    assert float(pl.explained_variance(r, r, mask)) == pytest.approx(1.0)


@pytest.mark.parametrize("eps, eps_high", [(0.2, None), (0.1, 0.3)])
def test_policy_loss_matches_numpy(data, eps, eps_high):
    mask, adv = data["mask"], data["adv"]
    logp, old = data["logp"], data["old_logp"]
    loss, m = pl.policy_loss(logp, old, adv, mask, eps=eps, eps_high=eps_high)
    hi = eps if eps_high is None else eps_high
    ratio = np.exp(logp.astype(np.float64) - old)
    surrogate = np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + hi) * adv)
    sel = mask > 0
    assert float(loss) == pytest.approx(-surrogate[sel].mean(), rel=1e-5)
    clipped = np.clip(ratio, 1 - eps, 1 + hi) * adv < ratio * adv
    assert float(m["clip_fraction"]) == pytest.approx(clipped[sel].mean(), abs=1e-6)
    assert 0 < float(m["clip_fraction"]) < 1  # the data exercises both branches
    log_ratio = np.log(ratio)
    assert float(m["approx_kl"]) == pytest.approx(0.5 * (log_ratio[sel] ** 2).mean(), rel=1e-5)


def test_value_loss_matches_numpy_and_clips_the_gradient(data):
    mask, v, old, ret = data["mask"], data["values"], data["old_values"], data["returns"]
    c = 0.2
    loss, m = pl.value_loss(v, old, ret, mask, clip_range=c)
    clipped = np.clip(v, old - c, old + c)
    per_token = np.maximum((v - ret) ** 2, (clipped - ret) ** 2)
    sel = mask > 0
    assert float(loss) == pytest.approx(0.5 * per_token[sel].mean(), rel=1e-5)
    chose_clipped = (clipped - ret) ** 2 > (v - ret) ** 2
    assert float(m["value_clip_fraction"]) == pytest.approx(chose_clipped[sel].mean(), abs=1e-6)
    # Where the clipped term wins and V is outside the clip range, the gradient is zero.
    grad = np.asarray(jax.grad(lambda x: pl.value_loss(x, old, ret, mask, clip_range=c)[0])(v))
    outside = chose_clipped & (np.abs(v - old) > c) & sel
    assert outside.any()
    assert np.all(grad[outside] == 0)
    free = ~chose_clipped & sel
    np.testing.assert_allclose(grad[free], (v - ret)[free] / sel.sum(), rtol=1e-4, atol=1e-7)


def test_ppo_loss_is_policy_plus_weighted_value_loss(data):
    d = data
    args = (d["logp"], d["old_logp"], d["values"], d["old_values"], d["adv"], d["returns"])
    total, m = pl.ppo_loss(*args, d["mask"], value_coef=0.3)
    pg, _ = pl.policy_loss(d["logp"], d["old_logp"], d["adv"], d["mask"], eps=0.2, eps_high=None)
    vf, _ = pl.value_loss(d["values"], d["old_values"], d["returns"], d["mask"], clip_range=0.2)
    assert float(total) == pytest.approx(float(pg) + 0.3 * float(vf), rel=1e-6)
    assert {"policy_loss", "value_loss", "clip_fraction", "approx_kl"} <= set(m)


def test_micro_batches_average_to_the_whole_batch(data):
    # The loop averages micro-batch losses; with num_tokens = (batch tokens / rows) x micro rows,
    # that equals the whole batch's token-mean.
    d = data
    args = ("logp", "old_logp", "values", "old_values", "adv", "returns", "mask")
    whole, _ = pl.ppo_loss(*(d[k] for k in args))
    per_row = d["mask"].sum() / B
    parts = [
        pl.ppo_loss(*(d[k][rows] for k in args), num_tokens=per_row * len(rows))[0]
        for rows in (np.array([0, 2, 4]), np.array([1, 3]))
    ]
    weighted = (
        3 * float(parts[0]) + 2 * float(parts[1])
    ) / B  # equal-size micro-batches in the loop
    assert weighted == pytest.approx(float(whole), rel=1e-5)


def test_mini_batch_order_is_a_fresh_permutation_per_epoch():
    a, b = mini_batch_order(8, 0, 3, 0), mini_batch_order(8, 0, 3, 1)
    assert sorted(a) == sorted(b) == list(range(8))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, mini_batch_order(8, 0, 3, 0))
