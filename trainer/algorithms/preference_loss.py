"""The maths of preference optimisation (DPO and its variants, ORPO) on arrays; no model here.

Every function takes per-pair arrays with a trailing axis of 2 (0 = chosen, 1 = rejected), so a
pair never comes apart, and ``row_weights`` [B] (1 for a real pair, 0 for padding; the batch
source scales them so that "mean over rows" is the mean over real pairs). Each loss returns
``(loss, metrics)`` with the loss a mean over rows, as the loop's gradient accumulation needs.

Choices follow TRL (``DPOTrainer.dpo_loss``, ``ORPOTrainer.odds_ratio_loss``):

- a sequence's log-prob is the *sum* of its completion tokens' log-probs, except for IPO, whose
  log-probs are the *mean* per token (``sequence_logps(average=True)``), as TRL does;
- DPO's implicit reward is ``beta * (log pi(y|x) - log pi_ref(y|x))``, and a pair counts as
  "preferred" when the chosen reward is strictly greater than the rejected one;
- ORPO's odds use the mean per-token log-prob of each completion, and its reward figures are
  ``lambda * mean log-prob`` (TRL's ``beta`` is our ``lambda``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from posttrain.trainer.algorithms.base import Metrics

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_logps(token_logps: jax.Array, mask: jax.Array, *, average: bool = False) -> jax.Array:
    """[..., T] token log-probs and completion mask -> [...] the sum (or mean) over the mask."""
    total = jnp.sum(token_logps * mask, axis=-1)
    if average:
        total = total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return total


def _weighted_mean(x: jax.Array, row_weights: jax.Array) -> jax.Array:
    return jnp.mean(x * row_weights)


def dpo_losses(
    logits: jax.Array, *, beta: float, loss_type: str, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-pair DPO loss of ``logits`` = (log pi_c - log pi_r) - (log ref_c - log ref_r).

    sigmoid (Rafailov et al. 2023, eq. 7; with label smoothing eps, the conservative DPO of
    Mitchell 2023): -(1 - eps) log s(beta h) - eps log s(-beta h).
    ipo (Azar et al. 2023, eq. 17): (h - 1 / (2 beta))^2.
    hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta h).
    """
    if loss_type == "sigmoid":
        return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(
            beta * logits
        ) - label_smoothing * jax.nn.log_sigmoid(-beta * logits)
    if loss_type == "ipo":
        return (logits - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * logits)
    raise ValueError(f"spec.dpo.lossType: {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")


def dpo_loss(
    policy_logps: jax.Array,
    reference_logps: jax.Array,
    row_weights: jax.Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """DPO over pairs: ``policy_logps`` and ``reference_logps`` are [B, 2] sequence log-probs."""
    ratios = policy_logps - reference_logps  # [B, 2]: log pi / pi_ref per completion
    logits = ratios[:, 0] - ratios[:, 1]
    losses = dpo_losses(logits, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    rewards = beta * jax.lax.stop_gradient(ratios)
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    return _weighted_mean(losses, row_weights), {
        "preference_accuracy": _weighted_mean((chosen > rejected).astype(jnp.float32), row_weights),
        "reward_chosen": _weighted_mean(chosen, row_weights),
        "reward_rejected": _weighted_mean(rejected, row_weights),
        "reward_margin": _weighted_mean(chosen - rejected, row_weights),
    }


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) far from it."""
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


# A completion whose mean log-prob rounds to 0 (probability 1) has infinite odds; keep it finite.
MAX_MEAN_LOGP = -1e-6


def orpo_loss(
    mean_logps: jax.Array,
    nll: jax.Array,
    row_weights: jax.Array,
    *,
    lam: float,
) -> tuple[jax.Array, Metrics]:
    """ORPO (Hong et al. 2024, eq. 6-7): NLL of the chosen completion - lambda * log s(log OR).

    ``mean_logps`` [B, 2] are each completion's mean per-token log-prob, ``nll`` [B] the chosen
    completions' NLL per row (already weighted so that its mean over rows is the batch's NLL per
    chosen token). log odds(y) = log p - log(1 - p) with p = exp(mean log-prob); the log odds
    ratio is log odds(chosen) - log odds(rejected).
    """
    logp = jnp.minimum(mean_logps, MAX_MEAN_LOGP)
    log_odds = logp - log1mexp(logp)  # [B, 2]
    ratio = log_odds[:, 0] - log_odds[:, 1]
    odds_term = jax.nn.log_sigmoid(ratio)
    nll_mean = jnp.mean(nll)
    loss = nll_mean - lam * _weighted_mean(odds_term, row_weights)
    rewards = lam * jax.lax.stop_gradient(mean_logps)
    return loss, {
        "nll": nll_mean,
        "log_odds_ratio": _weighted_mean(jax.lax.stop_gradient(ratio), row_weights),
        "odds_ratio_loss": -_weighted_mean(jax.lax.stop_gradient(odds_term), row_weights),
        "preference_accuracy": _weighted_mean((ratio > 0).astype(jnp.float32), row_weights),
        "reward_chosen": _weighted_mean(rewards[:, 0], row_weights),
        "reward_rejected": _weighted_mean(rewards[:, 1], row_weights),
        "reward_margin": _weighted_mean(rewards[:, 0] - rewards[:, 1], row_weights),
    }
