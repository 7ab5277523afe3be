"""DPO (sigmoid, conservative, IPO, hinge) and ORPO against numpy written from the papers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.trainer.algorithms.preference_loss import (
    dpo_loss,
    log1mexp,
    orpo_loss,
    sequence_logps,
)

RNG = np.random.default_rng(0)
B = 6


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sample_logps():
    policy = RNG.normal(-20.0, 4.0, (B, 2))
    reference = policy + RNG.normal(0.0, 1.5, (B, 2))
    return policy.astype(np.float32), reference.astype(np.float32)


def dpo_reference(policy, reference, *, beta, loss_type, eps):
    """Rafailov et al. 2023 eq. 7 (cDPO: Mitchell 2023), IPO: Azar et al. 2023 eq. 17, SLiC hinge."""
    chosen_reward = beta * (policy[:, 0] - reference[:, 0])
    rejected_reward = beta * (policy[:, 1] - reference[:, 1])
    h = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    if loss_type == "sigmoid":
        losses = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = np.maximum(0.0, 1 - beta * h)
    return losses.mean(), {
        "preference_accuracy": np.mean(chosen_reward > rejected_reward),
        "reward_chosen": chosen_reward.mean(),
        "reward_rejected": rejected_reward.mean(),
        "reward_margin": (chosen_reward - rejected_reward).mean(),
    }


@pytest.mark.parametrize(
    "loss_type,beta,eps",
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.3, 0.0), ("hinge", 0.2, 0.0)],
)
def test_dpo_matches_the_papers(loss_type, beta, eps):
    policy, reference = sample_logps()
    loss, metrics = dpo_loss(
        jnp.asarray(policy),
        jnp.asarray(reference),
        jnp.ones(B),
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
    )
    want, want_metrics = dpo_reference(policy, reference, beta=beta, loss_type=loss_type, eps=eps)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    for k, v in want_metrics.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_dpo_gradient_is_the_papers():
    """Rafailov et al. 2023, sec. 4: the gradient on log pi(y_w) is -beta * s(r_l - r_w), on
    log pi(y_l) its opposite (per pair, divided by B for the mean)."""
    policy, reference = sample_logps()
    beta = 0.4
    grad = jax.grad(lambda p: dpo_loss(p, jnp.asarray(reference), jnp.ones(B), beta=beta)[0])(
        jnp.asarray(policy)
    )
    r = beta * (policy - reference)
    weight = 1 / (1 + np.exp(-(r[:, 1] - r[:, 0])))  # s(r_l - r_w)
    np.testing.assert_allclose(np.asarray(grad[:, 0]), -beta * weight / B, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad[:, 1]), beta * weight / B, rtol=1e-5)


def test_padding_rows_weigh_nothing():
    """Row weights scaled by B / real pairs: the mean over rows is the mean over real pairs."""
    policy, reference = sample_logps()
    real = 4
    weights = np.array([B / real] * real + [0.0] * (B - real), np.float32)
    padded = policy.copy()
    padded[real:] = 1e3  # whatever padding rows hold must not matter
    for loss_type in ("sigmoid", "ipo", "hinge"):
        loss, metrics = dpo_loss(
            jnp.asarray(padded), jnp.asarray(reference), jnp.asarray(weights), beta=0.1,
            loss_type=loss_type,
        )  # fmt: skip
        want, want_metrics = dpo_reference(
            policy[:real], reference[:real], beta=0.1, loss_type=loss_type, eps=0.0
        )
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
        np.testing.assert_allclose(
            float(metrics["preference_accuracy"]), want_metrics["preference_accuracy"]
        )


def test_sequence_logps_sum_or_mean_over_the_completion():
    logp = RNG.normal(-1.0, 0.5, (B, 2, 7)).astype(np.float32)
    mask = (RNG.random((B, 2, 7)) < 0.6).astype(np.float32)
    mask[0, 0] = 0.0  # an empty completion: mean 0, not NaN
    np.testing.assert_allclose(
        np.asarray(sequence_logps(logp, mask)), (logp * mask).sum(-1), rtol=1e-6
    )
    means = np.asarray(sequence_logps(logp, mask, average=True))
    want = (logp * mask).sum(-1) / np.maximum(mask.sum(-1), 1)
    np.testing.assert_allclose(means, want, rtol=1e-6)


def test_log1mexp_is_accurate_over_the_range():
    x = -np.logspace(-7, 2, 200)
    want = np.log(-np.expm1(x))  # float64
    got = np.asarray(log1mexp(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12)
    # naive float32 log(1 - exp(x)) loses it near 0 (the reason for log1mexp)
    naive = np.log(1 - np.exp(np.float32(-1e-7)))
    assert not np.isclose(naive, np.log(-np.expm1(-1e-7)), rtol=1e-2)


def orpo_reference(mean_logps, nll, lam):
    """Hong et al. 2024, eq. 4-7: odds(y|x) = P / (1 - P), with P the (length-normalised)
    likelihood; L = L_SFT - lambda * log s(log odds_w / odds_l)."""
    p = np.exp(mean_logps.astype(np.float64))
    odds = p / (1 - p)
    log_or = np.log(odds[:, 0] / odds[:, 1])
    loss = nll.mean() - lam * log_sigmoid(log_or).mean()
    return loss, {
        "nll": nll.mean(),
        "log_odds_ratio": log_or.mean(),
        "preference_accuracy": np.mean(odds[:, 0] > odds[:, 1]),
        "reward_chosen": lam * mean_logps[:, 0].mean(),
        "reward_margin": lam * (mean_logps[:, 0] - mean_logps[:, 1]).mean(),
    }


def test_orpo_matches_the_paper():
    mean_logps = RNG.uniform(-4.0, -0.05, (B, 2)).astype(np.float32)
    nll = RNG.uniform(0.5, 3.0, B).astype(np.float32)
    loss, metrics = orpo_loss(jnp.asarray(mean_logps), jnp.asarray(nll), jnp.ones(B), lam=0.25)
    want, want_metrics = orpo_reference(mean_logps, nll, 0.25)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    for k, v in want_metrics.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-4, atol=1e-6, err_msg=k)


def test_orpo_stays_finite_at_the_extremes():
    """Mean log-probs of 0 (certain), -1e-9 and -80: loss and gradients finite."""
    mean_logps = jnp.asarray([[0.0, -80.0], [-1e-9, -1e-9], [-80.0, 0.0]], jnp.float32)
    nll = jnp.ones(3)

    def f(m):
        return orpo_loss(m, nll, jnp.ones(3), lam=1.0)[0]

    value, grad = jax.value_and_grad(f)(mean_logps)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    # the certain-and-impossible pair is all but perfectly ordered; the reverse one is not
    _, metrics = orpo_loss(mean_logps, nll, jnp.ones(3), lam=1.0)
    assert float(metrics["preference_accuracy"]) == pytest.approx(1 / 3)
