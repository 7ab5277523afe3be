"""SimPO, the DPO loss-type mix with RPO's NLL term, and KTO against numpy from the papers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.trainer.algorithms.preference_loss import (
    SIMPO_BETA,
    SIMPO_GAMMA,
    kto_loss,
    kto_reference_point,
    kto_weights_balanced,
    mixed_dpo_loss,
    preference_metrics,
    simpo_loss,
    uses_mean_logps,
)

RNG = np.random.default_rng(7)
B = 8


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def sample_pairs():
    policy = RNG.normal(-20.0, 4.0, (B, 2)).astype(np.float32)
    reference = (policy + RNG.normal(0.0, 1.5, (B, 2))).astype(np.float32)
    return policy, reference


def trl_pair_metrics(logps, rewards):
    return {
        "logps/chosen": logps[:, 0].mean(),
        "logps/rejected": logps[:, 1].mean(),
        "rewards/chosen": rewards[:, 0].mean(),
        "rewards/rejected": rewards[:, 1].mean(),
        "rewards/margins": (rewards[:, 0] - rewards[:, 1]).mean(),
        "rewards/accuracies": np.mean(rewards[:, 0] > rewards[:, 1]),
    }


def assert_metrics(metrics, want):
    for k, v in want.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------------------------------- SimPO


def simpo_reference(mean_logps, *, beta, gamma, eps):
    """Meng et al. 2024, eq. 6: -log s(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma);
    eps: TRL's label smoothing, -(1 - eps) log s(z) - eps log s(-z)."""
    z = beta * mean_logps[:, 0] - beta * mean_logps[:, 1] - gamma
    losses = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    return losses.mean(), trl_pair_metrics(mean_logps, beta * mean_logps)


@pytest.mark.parametrize("beta,gamma,eps", [(SIMPO_BETA, SIMPO_GAMMA, 0.0), (2.5, 1.4, 0.1)])
def test_simpo_matches_the_paper(beta, gamma, eps):
    mean_logps = RNG.normal(-1.5, 0.6, (B, 2)).astype(np.float32)
    loss, metrics = simpo_loss(
        jnp.asarray(mean_logps), jnp.ones(B), beta=beta, gamma=gamma, label_smoothing=eps
    )
    want, want_metrics = simpo_reference(mean_logps, beta=beta, gamma=gamma, eps=eps)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert_metrics(metrics, want_metrics)


def test_simpo_defaults_are_the_papers_beta_and_trls_gamma():
    assert (SIMPO_BETA, SIMPO_GAMMA) == (2.0, 0.5)
    # the margin gamma matters: a pair the policy ranks right by less than gamma / beta still pays
    mean_logps = jnp.asarray([[-1.0, -1.1]])
    loss_0, _ = simpo_loss(mean_logps, jnp.ones(1), gamma=0.0)
    loss_1, _ = simpo_loss(mean_logps, jnp.ones(1))
    assert float(loss_1) > float(loss_0)
    np.testing.assert_allclose(float(loss_1), -log_sigmoid(2.0 * 0.1 - 0.5), rtol=1e-5)


def test_simpo_gradient_is_the_papers():
    """d loss / d mean log pi(y_w) = -beta s(-z) per pair (over B for the mean)."""
    mean_logps = RNG.normal(-1.5, 0.6, (B, 2)).astype(np.float32)
    grad = jax.grad(lambda x: simpo_loss(x, jnp.ones(B))[0])(jnp.asarray(mean_logps))
    z = SIMPO_BETA * (mean_logps[:, 0] - mean_logps[:, 1]) - SIMPO_GAMMA
    np.testing.assert_allclose(grad[:, 0], -SIMPO_BETA * sigmoid(-z) / B, rtol=1e-5)
    np.testing.assert_allclose(grad[:, 1], SIMPO_BETA * sigmoid(-z) / B, rtol=1e-5)


def test_mean_logps_when_ipo_or_simpo_is_listed():
    assert not uses_mean_logps(("sigmoid",))
    assert not uses_mean_logps(("sigmoid", "sft"))
    assert uses_mean_logps(("sigmoid", "ipo"))
    assert uses_mean_logps(("simpo",))


# ------------------------------------------------------------------- the loss mix and RPO's NLL


def dpo_terms(policy, reference, beta):
    h = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    return {
        "sigmoid": -log_sigmoid(beta * h).mean(),
        "ipo": ((h - 1 / (2 * beta)) ** 2).mean(),
        "hinge": np.maximum(0.0, 1 - beta * h).mean(),
    }


def test_loss_types_mix_with_weights_and_rpo_alpha():
    """TRL: loss = sum_k w_k loss_k (+ rpo_alpha * NLL); "sft" is the NLL as a listed term."""
    policy, reference = sample_pairs()
    nll = RNG.uniform(0.5, 3.0, B).astype(np.float32)
    beta = 0.2
    terms = dpo_terms(policy, reference, beta)
    loss, metrics = mixed_dpo_loss(
        jnp.asarray(policy),
        jnp.asarray(reference),
        jnp.ones(B),
        beta=beta,
        loss_types=("sigmoid", "hinge", "sft"),
        loss_weights=(0.8, 0.3, 0.5),
        chosen_nll=jnp.asarray(nll),
        rpo_alpha=1.0,
    )
    want = 0.8 * terms["sigmoid"] + 0.3 * terms["hinge"] + 0.5 * nll.mean() + 1.0 * nll.mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss/hinge"]), terms["hinge"], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["nll_loss"]), nll.mean(), rtol=1e-5)
    assert_metrics(metrics, trl_pair_metrics(policy, beta * (policy - reference)))


def test_weights_default_to_one_and_rpo_is_off_by_default():
    policy, reference = sample_pairs()
    terms = dpo_terms(policy, reference, 0.1)
    loss, metrics = mixed_dpo_loss(
        jnp.asarray(policy), jnp.asarray(reference), jnp.ones(B), beta=0.1,
        loss_types=("sigmoid", "ipo"),
    )  # fmt: skip
    np.testing.assert_allclose(float(loss), terms["sigmoid"] + terms["ipo"], rtol=1e-5)
    assert "nll_loss" not in metrics


def test_rpo_gradient_adds_alpha_times_the_nll_gradient():
    policy, reference = sample_pairs()
    nll = jnp.asarray(RNG.uniform(0.5, 3.0, B).astype(np.float32))

    def grad_nll(alpha):
        return jax.grad(
            lambda n: mixed_dpo_loss(
                jnp.asarray(policy), jnp.asarray(reference), jnp.ones(B), beta=0.1,
                chosen_nll=n, rpo_alpha=alpha,
            )[0]
        )(nll)  # fmt: skip

    np.testing.assert_allclose(np.asarray(grad_nll(0.7)), np.full(B, 0.7 / B), rtol=1e-6)


def test_the_mix_refuses_what_it_cannot_compute():
    p = jnp.zeros((B, 2))
    with pytest.raises(ValueError, match="need chosen_nll"):
        mixed_dpo_loss(p, p, jnp.ones(B), beta=0.1, loss_types=("sigmoid", "sft"))
    with pytest.raises(ValueError, match="2 entries for 1 loss types"):
        mixed_dpo_loss(p, p, jnp.ones(B), beta=0.1, loss_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="lossType: 'robust'"):
        mixed_dpo_loss(p, p, jnp.ones(B), beta=0.1, loss_types=("robust",))


def test_preference_metrics_ignore_padding_rows():
    policy, reference = sample_pairs()
    real = 5
    weights = np.array([B / real] * real + [0.0] * (B - real), np.float32)
    rewards = 0.1 * (policy - reference)
    padded = rewards.copy()
    padded[real:] = [1e3, -1e3]  # would count as accurate pairs if padding leaked in
    metrics = preference_metrics(jnp.asarray(policy), jnp.asarray(padded), jnp.asarray(weights))
    want = trl_pair_metrics(policy[:real], rewards[:real])
    for k in ("rewards/chosen", "rewards/margins", "rewards/accuracies"):
        np.testing.assert_allclose(float(metrics[k]), want[k], rtol=1e-5, err_msg=k)


# ------------------------------------------------------------------------------------------ KTO


def kto_reference(policy, reference, desirable, kl_policy, kl_reference, *, beta, wd, wu):
    """Ethayarajh et al. 2024, eq. 8, with z0 estimated as TRL does (mean over mismatched pairs,
    clamped at 0): v = lambda_D s(beta (r - z0)) or lambda_U s(beta (z0 - r)); L = lambda_y - v."""
    z0 = max((kl_policy - kl_reference).mean(), 0.0)
    r = policy - reference
    v = np.where(desirable, wd * sigmoid(beta * (r - z0)), wu * sigmoid(beta * (z0 - r)))
    lam = np.where(desirable, wd, wu)
    rewards = beta * r
    good, bad = desirable, ~desirable
    return (
        (lam - v).mean(),
        z0,
        {
            "kl": z0,
            "logps/chosen": policy[good].mean(),
            "logps/rejected": policy[bad].mean(),
            "rewards/chosen": rewards[good].mean(),
            "rewards/rejected": rewards[bad].mean(),
            "rewards/margins": rewards[good].mean() - rewards[bad].mean(),
            "count/chosen": good.sum(),
            "count/rejected": bad.sum(),
        },
    )


def sample_unpaired(kl_shift):
    policy = RNG.normal(-20.0, 4.0, B).astype(np.float32)
    reference = (policy + RNG.normal(0.0, 2.0, B)).astype(np.float32)
    desirable = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
    kl_policy = RNG.normal(-25.0, 3.0, B).astype(np.float32)
    kl_reference = (kl_policy - kl_shift + RNG.normal(0.0, 0.5, B)).astype(np.float32)
    return policy, reference, desirable, kl_policy, kl_reference


@pytest.mark.parametrize(
    "kl_shift,beta,wd,wu", [(2.0, 0.1, 1.0, 1.0), (2.0, 0.5, 1.0, 1.33), (-3.0, 0.1, 1.0, 1.0)]
)
def test_kto_matches_the_paper(kl_shift, beta, wd, wu):
    policy, reference, desirable, kl_policy, kl_reference = sample_unpaired(kl_shift)
    z0 = kto_reference_point(jnp.asarray(kl_policy), jnp.asarray(kl_reference), jnp.ones(B))
    loss, metrics = kto_loss(
        jnp.asarray(policy), jnp.asarray(reference), jnp.asarray(desirable), jnp.ones(B),
        kl=z0, beta=beta, desirable_weight=wd, undesirable_weight=wu,
    )  # fmt: skip
    want, want_z0, want_metrics = kto_reference(
        policy, reference, desirable, kl_policy, kl_reference, beta=beta, wd=wd, wu=wu
    )
    np.testing.assert_allclose(float(z0), want_z0, rtol=1e-5, atol=1e-6)
    if kl_shift < 0:
        assert float(z0) == 0.0  # a negative estimate is clamped
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert_metrics(metrics, want_metrics)


def test_kto_reference_point_has_no_gradient_and_ignores_padding():
    _, _, _, kl_policy, kl_reference = sample_unpaired(2.0)
    weights = np.array([1.0] * 6 + [0.0] * 2, np.float32)
    padded = kl_policy.copy()
    padded[6:] = 1e4
    z0 = kto_reference_point(jnp.asarray(padded), jnp.asarray(kl_reference), jnp.asarray(weights))
    np.testing.assert_allclose(float(z0), (kl_policy - kl_reference)[:6].mean(), rtol=1e-5)
    grad = jax.grad(lambda p: kto_reference_point(p, jnp.asarray(kl_reference), jnp.ones(B)))(
        jnp.asarray(kl_policy)
    )
    assert not np.any(np.asarray(grad))


def test_kto_gradient_is_the_papers():
    """d/d log pi(y): -lambda_D beta s(z)(1 - s(z)) with z = beta (r - z0) when desirable,
    +lambda_U beta s(z)(1 - s(z)) with z = beta (z0 - r) otherwise (over B for the mean)."""
    policy, reference, desirable, _, _ = sample_unpaired(2.0)
    beta, wd, wu, z0 = 0.3, 1.0, 1.5, 0.8
    grad = jax.grad(
        lambda p: kto_loss(
            p, jnp.asarray(reference), jnp.asarray(desirable), jnp.ones(B), kl=jnp.asarray(z0),
            beta=beta, desirable_weight=wd, undesirable_weight=wu,
        )[0]
    )(jnp.asarray(policy))  # fmt: skip
    r = policy - reference
    z = np.where(desirable, beta * (r - z0), beta * (z0 - r))
    slope = beta * sigmoid(z) * (1 - sigmoid(z))
    want = np.where(desirable, -wd * slope, wu * slope) / B
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4)


def test_kto_padding_rows_weigh_nothing():
    policy, reference, desirable, kl_policy, kl_reference = sample_unpaired(2.0)
    real = 6
    weights = np.array([B / real] * real + [0.0] * (B - real), np.float32)
    padded = policy.copy()
    padded[real:] = 1e3
    z0 = jnp.asarray(0.5)
    loss, metrics = kto_loss(
        jnp.asarray(padded), jnp.asarray(reference), jnp.asarray(desirable),
        jnp.asarray(weights), kl=z0,
    )  # fmt: skip
    want, _, _ = kto_reference(
        policy[:real], reference[:real], desirable[:real], np.zeros(1), np.full(1, -0.5),
        beta=0.1, wd=1.0, wu=1.0,
    )  # fmt: skip
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["count/chosen"]) == desirable[:real].sum()
    np.testing.assert_allclose(
        float(metrics["logps/chosen"]), policy[:real][desirable[:real]].mean(), rtol=1e-5
    )


def test_kto_weight_balance_is_the_papers_range():
    assert kto_weights_balanced(100, 100)  # balanced data, TRL's default weights
    assert kto_weights_balanced(100, 100, 1.33, 1.0)
    assert not kto_weights_balanced(100, 100, 1.4, 1.0)
    assert not kto_weights_balanced(10, 100)  # few desirable rows: raise their weight
    assert kto_weights_balanced(10, 100, 10.0, 1.0)
    assert kto_weights_balanced(100, 80)  # 1.25
    assert not kto_weights_balanced(100, 70)  # 1.43
