"""PPO's extras against numpy: verl's dual clip, KL loss and adaptive KL controller, critic
warm-up; TRL's missing-EOS penalty and reward whitening."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.trainer.algorithms import ppo_loss as pl

B, T = 4, 10


@pytest.fixture
def data():
    rng = np.random.default_rng(5)
    mask = np.zeros((B, T), np.float32)
    for b, (start, length) in enumerate([(2, 6), (1, 9), (3, 2), (4, 0)]):
        mask[b, start : start + length] = 1
    old_logp = rng.normal(-2, 0.3, size=(B, T)).astype(np.float32)
    # log-ratios up to +-2.5: ratios from 0.08 to 12, so the dual clip (c = 3) bites
    logp = (old_logp + rng.uniform(-2.5, 2.5, size=(B, T))).astype(np.float32)
    return {
        "mask": mask,
        "logp": logp,
        "old_logp": old_logp,
        "ref_logp": (logp + rng.normal(0, 0.5, size=(B, T))).astype(np.float32),
        "adv": rng.normal(size=(B, T)).astype(np.float32),
    }


def dual_clip_reference(logp, old_logp, adv, mask, eps, eps_high, c):
    """Ye et al. 2020, eq. 5 (signs for a loss): L = max(-r A, -clip(r, 1-eps, 1+eps_h) A), and
    for A < 0, min(L, -c A); the mean over completion tokens."""
    r = np.exp(logp.astype(np.float64) - old_logp)
    ppo = np.maximum(-r * adv, -np.clip(r, 1 - eps, 1 + eps_high) * adv)
    loss = np.where(adv < 0, np.minimum(ppo, -c * adv), ppo)
    dual = (adv < 0) & (ppo > -c * adv)
    return (loss * mask).sum() / mask.sum(), (dual * mask).sum() / mask.sum()


@pytest.mark.parametrize("eps,eps_high,c", [(0.2, None, 3.0), (0.2, 0.28, 3.0), (0.1, 0.1, 1.5)])
def test_dual_clip_matches_the_paper(data, eps, eps_high, c):
    d = data
    loss, metrics = pl.dual_clip_policy_loss(
        jnp.asarray(d["logp"]), jnp.asarray(d["old_logp"]), jnp.asarray(d["adv"]),
        jnp.asarray(d["mask"]), eps=eps, eps_high=eps_high, clip_ratio_c=c,
    )  # fmt: skip
    want, want_dual = dual_clip_reference(
        d["logp"], d["old_logp"], d["adv"], d["mask"], eps, eps if eps_high is None else eps_high, c
    )
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["clip_fraction_dual"]), want_dual, rtol=1e-6)
    assert want_dual > 0  # the data reaches the dual clip


def test_dual_clip_only_bounds_negative_advantages(data):
    """With c = infinity it is the plain clipped loss; with c = 3 the loss is smaller, and tokens
    past the bound get no gradient."""
    d = data
    args = [jnp.asarray(d[k]) for k in ("logp", "old_logp", "adv", "mask")]
    plain, _ = pl.policy_loss(*args, eps=0.2, eps_high=None)
    unbounded, _ = pl.dual_clip_policy_loss(*args, clip_ratio_c=np.inf)
    bounded, _ = pl.dual_clip_policy_loss(*args)
    np.testing.assert_allclose(float(unbounded), float(plain), rtol=1e-5)
    assert float(bounded) < float(plain)
    grad = jax.grad(lambda lp: pl.dual_clip_policy_loss(lp, *args[1:])[0])(args[0])
    ratio = np.exp(d["logp"] - d["old_logp"])
    past_bound = (d["adv"] < 0) & (ratio > 3.0) & (d["mask"] > 0)
    assert past_bound.any()
    assert not np.any(np.asarray(grad)[past_bound])


def kl_reference(logp, ref_logp, kind):
    """verl's kl_penalty, from Schulman's "Approximating KL divergence"."""
    log_r = logp.astype(np.float64) - ref_logp
    if kind in ("kl", "k1"):
        return log_r
    if kind == "abs":
        return np.abs(log_r)
    if kind in ("mse", "k2"):
        return 0.5 * log_r**2
    return np.clip(np.exp(-log_r) + log_r - 1, -10, 10)


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"])
def test_kl_loss_matches_verls_estimators(data, kind):
    d = data
    got = pl.kl_loss(
        jnp.asarray(d["logp"]), jnp.asarray(d["ref_logp"]), jnp.asarray(d["mask"]),
        kl_loss_type=kind,
    )  # fmt: skip
    want = (kl_reference(d["logp"], d["ref_logp"], kind) * d["mask"]).sum() / d["mask"].sum()
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_low_var_kl_is_clamped_and_the_default():
    logp, ref, mask = jnp.asarray([[0.0, -30.0]]), jnp.asarray([[-5.0, 0.0]]), jnp.ones((1, 2))
    got = pl.kl_loss(logp, ref, mask)  # the second token's exp(30) - 31 is ~1e13, clamped to 10
    np.testing.assert_allclose(float(got), (np.exp(-5.0) + 5.0 - 1.0 + 10.0) / 2, rtol=1e-5)
    assert (pl.KL_LOSS_TYPE, pl.KL_LOSS_COEF, pl.DUAL_CLIP_C) == ("low_var_kl", 0.001, 3.0)
    with pytest.raises(ValueError, match="kl_loss_type"):
        pl.kl_loss(logp, ref, mask, kl_loss_type="k4")


def test_adaptive_kl_controller_follows_ziegler():
    ctrl = pl.AdaptiveKLController(value=0.2, target_kl=6.0, horizon=10000)
    value = 0.2
    for kl, n in [(12.0, 256), (6.3, 256), (1.0, 512), (6.0, 64)]:
        value *= 1 + np.clip(kl / 6.0 - 1, -0.2, 0.2) * n / 10000
        ctrl = ctrl.update(kl, n)
        np.testing.assert_allclose(ctrl.value, value, rtol=1e-12)
    up = pl.AdaptiveKLController(value=0.1).update(1.0, 100)
    down = pl.AdaptiveKLController(value=0.1).update(0.01, 100)
    assert up.value > 0.1 > down.value  # KL above target raises the coefficient
    assert pl.AdaptiveKLController.from_state(ctrl.state()) == ctrl
    assert pl.AdaptiveKLController() == pl.AdaptiveKLController(0.001, 0.1, 10000)  # verl


def test_policy_loss_is_off_during_the_critic_warm_up():
    assert [bool(pl.policy_loss_on(s, 3)) for s in range(5)] == [False, False, False, True, True]
    assert bool(pl.policy_loss_on(0, 0))
    on = jax.jit(lambda s: pl.policy_loss_on(s, 2))
    assert [bool(on(s)) for s in range(4)] == [False, False, True, True]


def test_missing_eos_penalty_hits_completions_without_eos():
    eos = 2
    ids = jnp.asarray([[5, 6, 2, 0], [5, 6, 7, 8], [2, 9, 9, 9], [5, 2, 0, 0]])
    mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 0, 0]])
    scores = jnp.asarray([1.0, 1.0, 0.5, 0.0])
    got = pl.missing_eos_penalty(scores, ids, mask, eos, 1.0)
    # row 2's EOS is outside its completion (a prompt token), row 3's is cut off by the mask
    np.testing.assert_allclose(np.asarray(got), [1.0, 0.0, -0.5, -1.0])
    assert pl.missing_eos_penalty(scores, ids, mask, eos, None) is scores


def test_whiten_rewards_keeps_the_mean_and_scales_the_spread(data):
    rng = np.random.default_rng(9)
    rewards = (rng.normal(size=(B, T)) * 3 + 2).astype(np.float32)
    mask = data["mask"]
    got = np.asarray(pl.whiten_rewards(jnp.asarray(rewards), jnp.asarray(mask)), np.float64)
    x = rewards[mask > 0].astype(np.float64)
    want = (x - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8) + x.mean()  # TRL's masked_whiten
    np.testing.assert_allclose(got[mask > 0], want, rtol=1e-5)
    assert not np.any(got[mask == 0])
    np.testing.assert_allclose(got[mask > 0].mean(), x.mean(), rtol=1e-5)
    np.testing.assert_allclose(got[mask > 0].std(ddof=1), 1.0, rtol=1e-4)
