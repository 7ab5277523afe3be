"""GRPO / GSPO-token losses and advantages against numpy references written from the papers.

References: DeepSeekMath (Shao et al. 2024) eq. 3 and its outcome-supervision advantages;
Group Sequence Policy Optimization (Zheng et al. 2025) eqs. 5-7 (GSPO) and 13-14 (GSPO-token).
The references loop over completions and tokens the way the formulas read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.trainer.algorithms import grpo_loss as gl
from posttrain.trainer.models.entropy import entropy_of_logits

# ------------------------------------------------------------------ numpy references


def np_advantages(rewards, G, mode):
    out = []
    for start in range(0, len(rewards), G):
        group = np.asarray(rewards[start : start + G], dtype=np.float64)
        for r in group:
            a = r - group.mean()
            if mode == "group-std":
                a = a / (group.std(ddof=1) + 1e-4)  # TRL: torch's sample std
            out.append(a)
    return np.array(out)


def np_kl(logp, ref, est):
    x = ref - logp  # log(pi_ref / pi)
    if est == "k3+":  # verl's low_var_kl value: log-ratio clamped to [-20, 20], value to [-10, 10]
        x = np.clip(x, -20, 20)
        return np.clip(np.exp(x) - x - 1, -10, 10)
    return {"k1": -x, "k2": 0.5 * x * x, "k3": np.exp(x) - x - 1}[est]


def np_grpo(logp, old, ref, adv, mask, eps, eps_high, beta, est, agg, ratio_fn=None):
    """-J of DeepSeekMath eq. 3; ratio_fn(i, t) overrides r_it (for GSPO)."""
    B, T = logp.shape
    per_seq, tok_sum, tok_n = [], 0.0, 0
    for i in range(B):
        terms = []
        for t in range(T):
            if not mask[i, t]:
                continue
            r = ratio_fn(i, t) if ratio_fn else np.exp(logp[i, t] - old[i, t])
            a = adv[i]
            obj = min(r * a, np.clip(r, 1 - eps, 1 + eps_high) * a)
            if beta:
                obj -= beta * np_kl(logp[i, t], ref[i, t], est)
            terms.append(-obj)
        if terms:
            per_seq.append(np.mean(terms))
            tok_sum += np.sum(terms)
            tok_n += len(terms)
    if agg == "token-mean":
        return tok_sum / max(tok_n, 1)
    return np.mean(per_seq) if per_seq else 0.0


def np_seq_ratio(logp, old, mask, i):
    n = mask[i].sum()
    return np.exp(((logp[i] - old[i]) * mask[i]).sum() / n)


def np_gspo_sequence(logp, old, adv, mask, eps, eps_high):
    """GSPO eq. 5 (sequence level): -1/G sum_i min(s_i A_i, clip(s_i) A_i)."""
    vals = []
    for i in range(logp.shape[0]):
        s = np_seq_ratio(logp, old, mask, i)
        vals.append(-min(s * adv[i], np.clip(s, 1 - eps, 1 + eps_high) * adv[i]))
    return np.mean(vals)


def np_gspo_sequence_grad(logp, old, adv, mask, eps, eps_high):
    """d(GSPO eq. 5)/d logp_it = -1/G A_i s_i / |y_i| where unclipped, else 0 (eq. 7)."""
    B = logp.shape[0]
    g = np.zeros_like(logp)
    for i in range(B):
        s = np_seq_ratio(logp, old, mask, i)
        unclipped = s * adv[i] <= np.clip(s, 1 - eps, 1 + eps_high) * adv[i]
        if unclipped:
            g[i] = -adv[i] * s / mask[i].sum() * mask[i] / B
    return g


def batch(seed=0, B=6, T=7, spread=0.3):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 0.95, (B, T))).astype(np.float32)
    old = (logp + rng.normal(0, spread, (B, T))).astype(np.float32)
    ref = (logp + rng.normal(0, spread, (B, T))).astype(np.float32)
    adv = rng.normal(0, 1, B).astype(np.float32)
    lengths = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    return logp, old, ref, adv, mask


# ------------------------------------------------------------------ advantages


@pytest.mark.parametrize("mode", ["group-std", "group-mean"])
def test_group_advantages_match_reference(mode):
    rewards = np.array([1.0, 0.0, 0.5, 2.0, -1.0, 3.0, 0.0, 0.0], dtype=np.float32)
    got = gl.group_advantages(jnp.asarray(rewards), 4, mode)
    np.testing.assert_allclose(got, np_advantages(rewards, 4, mode), rtol=1e-5, atol=1e-6)


def test_equal_rewards_in_a_group_give_zero_advantages_not_nan():
    rewards = jnp.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    adv = gl.group_advantages(rewards, 3, "group-std")
    assert np.all(np.isfinite(adv))
    np.testing.assert_array_equal(adv[:3], 0.0)
    assert adv[3] < 0 < adv[4]


@pytest.mark.parametrize("mode", ["group-std", "group-mean"])
@pytest.mark.parametrize("value", [0.1, 0.3, 0.7, 1 / 3])
def test_equal_non_representable_rewards_give_exactly_zero(mode, value):
    # float32 means of 0.1 x 8 differ from 0.1 by a rounding step; / (std + 1e-4) would amplify it.
    adv = gl.group_advantages(jnp.full(8, value, jnp.float32), 8, mode)
    np.testing.assert_array_equal(adv, 0.0)


def test_group_advantages_reject_ragged_groups():
    with pytest.raises(ValueError, match="G=4"):
        gl.group_advantages(jnp.zeros(6), 4)


# ------------------------------------------------------------------ KL estimators


@pytest.mark.parametrize("est", ["k1", "k2", "k3", "k3+"])
def test_kl_estimators_match_reference(est):
    logp, _, ref, _, _ = batch()
    np.testing.assert_allclose(
        gl.kl_penalty(logp, ref, est),
        np_kl(logp.astype(np.float64), ref.astype(np.float64), est),
        rtol=1e-5,
        atol=1e-7,
    )


def test_kl_estimators_are_unbiased_or_low_variance_as_schulman_says():
    # Samples x ~ p = N(0,1), q = N(0.1,1): true KL(p||q) = 0.005. k1 and k3 are unbiased.
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 400_000)
    logp = -0.5 * x**2
    logq = -0.5 * (x - 0.1) ** 2
    for est in ("k1", "k3"):
        assert abs(float(np.mean(gl.kl_penalty(logp, logq, est))) - 0.005) < 5e-4
    assert float(np.min(gl.kl_penalty(logp, logq, "k3"))) >= 0


def test_low_var_kl_clamps_as_verl():
    logp = jnp.asarray([0.0, 0.0, 0.0, -1.0, -3.0], jnp.float32)
    ref = jnp.asarray([25.0, -30.0, 2.0, -1.2, -2.5], jnp.float32)
    got = np.asarray(gl.low_var_kl(logp, ref))
    np.testing.assert_allclose(got, np_kl(np.asarray(logp), np.asarray(ref), "k3+"), rtol=1e-5)
    assert got[0] == 10.0 and got[1] == 10.0  # e^20 - 21 and e^-20 + 19, clamped to 10
    np.testing.assert_allclose(got[2:], gl.kl_penalty(logp, ref, "k3")[2:], rtol=1e-6)


def test_k3_plus_has_k3s_value_and_k2s_gradient():
    logp, _, ref, _, _ = batch(seed=2)
    np.testing.assert_array_equal(gl.kl_k3_plus(logp, ref), gl.low_var_kl(logp, ref))
    np.testing.assert_array_equal(gl.kl_penalty(logp, ref, "k3+"), gl.kl_k3_plus(logp, ref))
    for wrt in (0, 1):  # per-token gradients, with respect to the policy's and the reference's
        plus = jax.grad(lambda a, b: gl.kl_k3_plus(a, b).sum(), argnums=wrt)(logp, ref)
        k2 = jax.grad(lambda a, b: gl.kl_penalty(a, b, "k2").sum(), argnums=wrt)(logp, ref)
        np.testing.assert_allclose(plus, k2, rtol=1e-6)


@pytest.mark.parametrize("est", ["k1", "k2", "k3", "k3+"])
def test_expected_gradient_of_each_estimator_as_a_loss_term(est):
    """E_{a ~ pi}[grad est(a)], exact over a 6-action softmax policy: k1's is 0 (a k1 penalty
    does nothing in expectation), k2's and k3+'s are grad KL(pi || ref), k3's grad KL(ref || pi)."""
    rng = np.random.default_rng(5)
    theta = jnp.asarray(rng.normal(size=6), jnp.float32)
    log_ref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=6), jnp.float32))

    def expected_penalty(t):  # samples weighted by pi, the weights not differentiated
        logp = jax.nn.log_softmax(t)
        return jnp.sum(jax.lax.stop_gradient(jnp.exp(logp)) * gl.kl_penalty(logp, log_ref, est))

    def kl(t, reverse):
        logp = jax.nn.log_softmax(t)
        if reverse:  # KL(ref || pi)
            return jnp.sum(jnp.exp(log_ref) * (log_ref - logp))
        return jnp.sum(jnp.exp(logp) * (logp - log_ref))  # KL(pi || ref)

    got = np.asarray(jax.grad(expected_penalty)(theta))
    if est == "k1":
        np.testing.assert_allclose(got, 0.0, atol=1e-6)
        return
    want = np.asarray(jax.grad(kl)(theta, est == "k3"))
    assert np.abs(want).max() > 0.05
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ GRPO


@pytest.mark.parametrize("agg", ["token-mean", "sequence-mean"])
@pytest.mark.parametrize("est", ["k1", "k2", "k3", "k3+"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_grpo_loss_matches_reference(agg, est, eps_high):
    logp, old, ref, adv, mask = batch(seed=1)
    loss, metrics = gl.grpo_loss(
        logp, old, ref, adv, mask, eps=0.2, eps_high=eps_high, beta=0.04,
        kl_estimator=est, aggregation=agg,
    )  # fmt: skip
    want = np_grpo(logp, old, ref, adv, mask, 0.2, eps_high or 0.2, 0.04, est, agg)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    n = mask.sum()
    np.testing.assert_allclose(metrics["kl"], (np_kl(logp, ref, est) * mask).sum() / n, rtol=1e-5)


def test_aggregations_differ_when_lengths_differ():
    logp, old, ref, adv, mask = batch(seed=2)
    a, _ = gl.grpo_loss(logp, old, ref, adv, mask, aggregation="token-mean")
    b, _ = gl.grpo_loss(logp, old, ref, adv, mask, aggregation="sequence-mean")
    assert abs(float(a) - float(b)) > 1e-4


def test_clip_fraction_counts_tokens_whose_gradient_is_cut():
    # One token far above 1 + eps with positive advantage, one far below 1 - eps with negative.
    logp = jnp.log(jnp.array([[0.5, 0.5], [0.5, 0.5]]))
    old = jnp.log(jnp.array([[0.25, 0.5], [0.5, 0.9]]))  # ratios 2.0, 1.0 / 1.0, 0.56
    adv = jnp.array([1.0, -1.0])
    mask = jnp.ones((2, 2))
    _, m = gl.grpo_loss(logp, old, None, adv, mask, eps=0.2, beta=0.0)
    assert float(m["clip_fraction"]) == pytest.approx(0.5)
    assert float(m["clip_fraction_high"]) == pytest.approx(0.25)
    assert float(m["clip_fraction_low"]) == pytest.approx(0.25)
    grad = jax.grad(lambda lp: gl.grpo_loss(lp, old, None, adv, mask, beta=0.0)[0])(logp)
    assert float(grad[0, 0]) == 0.0 and float(grad[1, 1]) == 0.0
    assert float(grad[0, 1]) != 0.0 and float(grad[1, 0]) != 0.0


def test_grpo_gradient_matches_reference_gradient():
    # d(-J)/d logp_it = -(r A unclipped ? r A : 0) + beta (1 - exp(ref - logp)) for k3, / |o_i| / G.
    logp, old, ref, adv, mask = batch(seed=3)
    beta, eps = 0.04, 0.2
    g = jax.grad(lambda lp: gl.grpo_loss(lp, old, ref, adv, mask, eps=eps, beta=beta)[0])(logp)
    r = np.exp(logp - old)
    a = adv[:, None]
    active = (r * a) <= (np.clip(r, 1 - eps, 1 + eps) * a)
    want = -(r * a) * active + beta * (1 - np.exp(ref - logp))
    want = want * mask / mask.sum(1, keepdims=True) / logp.shape[0]
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)


def test_beta_zero_skips_the_reference():
    logp, old, ref, adv, mask = batch(seed=4)
    with_none, m = gl.grpo_loss(logp, old, None, adv, mask, beta=0.0)
    with_ref, _ = gl.grpo_loss(logp, old, ref, adv, mask, beta=0.0)
    assert "kl" not in m
    np.testing.assert_allclose(with_none, with_ref)
    with pytest.raises(ValueError, match="ref_logp"):
        gl.grpo_loss(logp, old, None, adv, mask, beta=0.1)


def test_fully_masked_rows_change_nothing_and_give_no_nan():
    logp, old, ref, adv, mask = batch(seed=5)
    pad = lambda x, v: np.concatenate([x, np.full((2,) + x.shape[1:], v, x.dtype)])  # noqa: E731
    base, _ = gl.grpo_loss(logp, old, ref, adv, mask)
    for agg in ("token-mean", "sequence-mean"):
        want, _ = gl.grpo_loss(logp, old, ref, adv, mask, aggregation=agg)
        got, _ = gl.grpo_loss(
            pad(logp, -50.0), pad(old, 3.0), pad(ref, 7.0), pad(adv, 9.0), pad(mask, 0.0),
            aggregation=agg,
        )  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-6)
    empty, m = gl.grpo_loss(logp, old, ref, adv, np.zeros_like(mask))
    assert float(empty) == 0.0 and all(np.isfinite(float(v)) for v in m.values())
    assert np.isfinite(float(base))


def test_on_policy_grpo_loss_is_minus_mean_advantage_with_zero_kl_at_ref():
    logp, _, _, adv, mask = batch(seed=6)
    loss, m = gl.grpo_loss(logp, logp, logp, adv, mask, beta=0.5)
    assert float(m["kl"]) == pytest.approx(0.0, abs=1e-7)
    assert float(loss) == pytest.approx(-float(np.mean(adv)), rel=1e-5)


# ------------------------------------------------------------------ GSPO-token


@pytest.mark.parametrize("agg", ["token-mean", "sequence-mean"])
def test_gspo_token_loss_matches_reference(agg):
    logp, old, ref, adv, mask = batch(seed=7, spread=0.05)
    loss, _ = gl.gspo_token_loss(
        logp, old, ref, adv, mask, eps=0.02, eps_high=0.03, beta=0.04, aggregation=agg
    )
    want = np_grpo(
        logp, old, ref, adv, mask, 0.02, 0.03, 0.04, "k3", agg,
        ratio_fn=lambda i, t: np_seq_ratio(logp, old, mask, i),
    )  # fmt: skip
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [0.99, 0.02])  # never clipped / some sequences clipped
def test_gspo_token_gradient_equals_sequence_level_gspo(eps):
    # The paper (eq. 14 vs eq. 7): with A_it = A_i, GSPO-token's gradient is GSPO's.
    logp, old, _, adv, mask = batch(seed=8, spread=0.05)
    loss_fn = lambda lp: gl.gspo_token_loss(lp, old, None, adv, mask, eps=eps, beta=0.0)[0]  # noqa: E731
    loss, g = jax.value_and_grad(loss_fn)(jnp.asarray(logp))
    np.testing.assert_allclose(loss, np_gspo_sequence(logp, old, adv, mask, eps, eps), rtol=1e-5)
    want = np_gspo_sequence_grad(logp, old, adv, mask, eps, eps)
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)
    if eps < 0.1:  # the case is meant to clip some sequences, all of their tokens together
        clipped_rows = [i for i in range(len(adv)) if not want[i].any()]
        assert 0 < len(clipped_rows) < len(adv)


def test_gspo_token_equals_grpo_on_policy_and_differs_off_policy():
    logp, old, _, adv, mask = batch(seed=9, spread=0.5)
    kw = dict(eps=0.2, beta=0.0)
    grad = lambda f, o: jax.grad(lambda lp: f(lp, o, None, adv, mask, **kw)[0])(jnp.asarray(logp))  # noqa: E731
    # First pass over fresh rollouts (pi = pi_old): both ratios are 1, the gradients coincide.
    np.testing.assert_allclose(
        grad(gl.gspo_token_loss, logp), grad(gl.grpo_loss, logp), rtol=1e-5, atol=1e-7
    )
    # Later passes (numIterations > 1): token-level clipping zeroes single tokens in GRPO, while
    # GSPO-token clips whole sequences and weighs every token by the one sequence ratio.
    g_grpo, g_gspo = grad(gl.grpo_loss, old), grad(gl.gspo_token_loss, old)
    assert np.abs(np.asarray(g_grpo) - np.asarray(g_gspo)).max() > 1e-3
    for i in range(len(adv)):
        row = np.asarray(g_gspo[i])[mask[i] > 0]
        assert np.all(row == 0) or np.all(row != 0)  # a sequence is clipped as a whole
    grpo_rows_partly_clipped = [
        i
        for i in range(len(adv))
        if 0 < (np.asarray(g_grpo[i])[mask[i] > 0] == 0).sum() < mask[i].sum()
    ]
    assert grpo_rows_partly_clipped


def test_entropy_of_logits():
    uniform = jnp.zeros((2, 3, 8))
    np.testing.assert_allclose(entropy_of_logits(uniform), np.log(8), rtol=1e-6)
    peaked = jnp.array([[[100.0, 0, 0, 0]]])
    assert float(entropy_of_logits(peaked)[0, 0]) < 1e-6


@pytest.mark.parametrize("loss_fn", [gl.grpo_loss, gl.gspo_token_loss])
@pytest.mark.parametrize("agg", ["token-mean", "sequence-mean"])
def test_mean_of_micro_batch_losses_equals_the_whole_batch(loss_fn, agg):
    # The loop averages micro-batch losses; token-mean needs the whole batch's token count.
    logp, old, ref, adv, mask = batch(seed=10, B=8)
    whole, _ = loss_fn(logp, old, ref, adv, mask, aggregation=agg)
    halves = []
    for rows in (slice(0, 4), slice(4, 8)):
        num_tokens = jnp.asarray(mask.sum() * 4 / 8) if agg == "token-mean" else None
        part, _ = loss_fn(
            logp[rows], old[rows], ref[rows], adv[rows], mask[rows],
            aggregation=agg, num_tokens=num_tokens,
        )  # fmt: skip
        halves.append(float(part))
    np.testing.assert_allclose(np.mean(halves), whole, rtol=1e-5)
