"""The maths of preference optimisation (DPO and its variants, ORPO) on arrays; no model here.

The pair losses take per-pair arrays with a trailing axis of 2 (0 = chosen, 1 = rejected), so a
pair never comes apart (KTO takes [B] unpaired rows and a [B] label), and ``row_weights`` [B] (1 for a real pair, 0 for padding; the batch
source scales them so that "mean over rows" is the mean over real pairs). Each loss returns
``(loss, metrics)`` with the loss a mean over rows, as the loop's gradient accumulation needs.

Choices follow TRL (``DPOTrainer.dpo_loss``, ``ORPOTrainer.odds_ratio_loss``):

- a sequence's log-prob is the *sum* of its completion tokens' log-probs, except for IPO, whose
  log-probs are the *mean* per token (``sequence_logps(average=True)``), as TRL does;
- DPO's implicit reward is ``beta * (log pi(y|x) - log pi_ref(y|x))``, and a pair counts as
  "preferred" when the chosen reward is strictly greater than the rejected one;
- ORPO's odds use the mean per-token log-prob of each completion, and its reward figures are
  ``lambda * mean log-prob`` (TRL's ``beta`` is our ``lambda``);
- SimPO as TRL's ``CPOTrainer(loss_type="simpo")``, the loss-type mix and RPO as
  ``DPOConfig.loss_type`` / ``loss_weights`` / ``rpo_alpha``, KTO as ``KTOTrainer``; those return
  TRL's metric names (``rewards/accuracies``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from posttrain.trainer.algorithms.base import Metrics

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")
# Loss types that compare mean per-token log-probs: TRL averages every sequence's log-prob when
# one of them is in the list (IPO in DPOTrainer, SimPO in CPOTrainer).
AVERAGED_LOSS_TYPES = ("ipo", "simpo")
NLL_LOSS_TYPE = "sft"  # TRL's name for the chosen answer's NLL as an entry of ``loss_type``

SIMPO_BETA = 2.0  # the SimPO paper's and TRL's recommended beta (CPOConfig's own default is 0.1)
SIMPO_GAMMA = 0.5  # TRL's CPOConfig.simpo_gamma


def sequence_logps(token_logps: jax.Array, mask: jax.Array, *, average: bool = False) -> jax.Array:
    """[..., T] token log-probs and completion mask -> [...] the sum (or mean) over the mask."""
    total = jnp.sum(token_logps * mask, axis=-1)
    if average:
        total = total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return total


def _weighted_mean(x: jax.Array, row_weights: jax.Array) -> jax.Array:
    return jnp.mean(x * row_weights)


def dpo_losses(
    logits: jax.Array,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    simpo_gamma: float = SIMPO_GAMMA,
) -> jax.Array:
    """Per-pair DPO loss of ``logits`` = (log pi_c - log pi_r) - (log ref_c - log ref_r).

    sigmoid (Rafailov et al. 2023, eq. 7; with label smoothing eps, the conservative DPO of
    Mitchell 2023): -(1 - eps) log s(beta h) - eps log s(-beta h).
    ipo (Azar et al. 2023, eq. 17): (h - 1 / (2 beta))^2.
    hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta h).
    simpo (Meng et al. 2024, eq. 6; TRL's CPOTrainer): the sigmoid loss of beta h - gamma, with
    h from mean per-token log-probs and no reference (pass reference log-probs of 0).
    """
    if loss_type in ("sigmoid", "simpo"):
        margin = beta * logits - (simpo_gamma if loss_type == "simpo" else 0.0)
        return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(
            margin
        ) - label_smoothing * jax.nn.log_sigmoid(-margin)
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


# ------------------------------------------------------------- TRL's metrics, mixes, SimPO, KTO


def preference_metrics(
    policy_logps: jax.Array, rewards: jax.Array, row_weights: jax.Array
) -> Metrics:
    """TRL's metric names for pairs: ``policy_logps`` and ``rewards`` are [B, 2] (chosen,
    rejected); a pair is accurate when its chosen reward is strictly greater (TRL's ``>``)."""
    logps, rewards = jax.lax.stop_gradient(policy_logps), jax.lax.stop_gradient(rewards)
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    return {
        "logps/chosen": _weighted_mean(logps[:, 0], row_weights),
        "logps/rejected": _weighted_mean(logps[:, 1], row_weights),
        "rewards/chosen": _weighted_mean(chosen, row_weights),
        "rewards/rejected": _weighted_mean(rejected, row_weights),
        "rewards/margins": _weighted_mean(chosen - rejected, row_weights),
        "rewards/accuracies": _weighted_mean((chosen > rejected).astype(jnp.float32), row_weights),
    }


def uses_mean_logps(loss_types: Sequence[str]) -> bool:
    """Whether the sequence log-probs must be per-token means (``sequence_logps(average=...)``)
    for this list of loss types: TRL averages all of them as soon as IPO (or SimPO) is in it."""
    return any(t in AVERAGED_LOSS_TYPES for t in loss_types)


def mixed_dpo_loss(
    policy_logps: jax.Array,
    reference_logps: jax.Array,
    row_weights: jax.Array,
    *,
    beta: float,
    loss_types: Sequence[str] = ("sigmoid",),
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = SIMPO_GAMMA,
    chosen_nll: jax.Array | None = None,
    rpo_alpha: float | None = None,
) -> tuple[jax.Array, Metrics]:
    """sum_k w_k loss_k + rpo_alpha * NLL(chosen): TRL's ``loss_type`` list with ``loss_weights``
    (default 1 each) and ``rpo_alpha`` (RPO, Pang et al. 2024; off when None).

    ``loss_types`` are ``LOSS_TYPES`` or ``"sft"`` (TRL's name for the NLL term). ``chosen_nll``
    [B] is each row's chosen-answer NLL, weighted so that its mean over rows is the batch's NLL per
    chosen token (the batch source's ``nll_weights``), as TRL's ``nll_loss``; it is needed when
    ``"sft"`` is listed or ``rpo_alpha`` is set. For SimPO pass reference log-probs of 0: its
    rewards are then TRL's ``beta * mean log-prob``.
    """
    if not loss_types:
        raise ValueError("loss_types: give at least one loss type")
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError(
            f"loss_weights has {len(weights)} entries for {len(loss_types)} loss types"
        )
    wants_nll = NLL_LOSS_TYPE in loss_types or rpo_alpha is not None
    if wants_nll and chosen_nll is None:
        raise ValueError("the 'sft' loss type and rpo_alpha need chosen_nll")
    ratios = policy_logps - reference_logps  # [B, 2]: log pi / pi_ref per completion
    logits = ratios[:, 0] - ratios[:, 1]
    nll = jnp.mean(chosen_nll) if chosen_nll is not None else jnp.zeros(())
    loss = jnp.zeros(())
    metrics: Metrics = {}
    for loss_type, weight in zip(loss_types, weights, strict=True):
        if loss_type == NLL_LOSS_TYPE:
            term = nll
        else:
            per_pair = dpo_losses(
                logits,
                beta=beta,
                loss_type=loss_type,
                label_smoothing=label_smoothing,
                simpo_gamma=simpo_gamma,
            )
            term = _weighted_mean(per_pair, row_weights)
        loss = loss + weight * term
        if len(loss_types) > 1:
            metrics[f"loss/{loss_type}"] = jax.lax.stop_gradient(term)
    if rpo_alpha is not None:
        loss = loss + rpo_alpha * nll
    if wants_nll:
        metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    return loss, {**metrics, **preference_metrics(policy_logps, beta * ratios, row_weights)}


def simpo_loss(
    mean_logps: jax.Array,
    row_weights: jax.Array,
    *,
    beta: float = SIMPO_BETA,
    gamma: float = SIMPO_GAMMA,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """SimPO (Meng et al. 2024): -log s(beta (mean log pi(y_c) - mean log pi(y_r)) - gamma),
    label-smoothed as TRL's CPOTrainer does; ``mean_logps`` [B, 2] are mean per-token log-probs.
    No reference model: the reward is beta * mean log-prob (TRL)."""
    return mixed_dpo_loss(
        mean_logps,
        jnp.zeros_like(mean_logps),
        row_weights,
        beta=beta,
        loss_types=("simpo",),
        label_smoothing=label_smoothing,
        simpo_gamma=gamma,
    )


KTO_BETA = 0.1  # TRL's KTOConfig defaults
KTO_DESIRABLE_WEIGHT = 1.0
KTO_UNDESIRABLE_WEIGHT = 1.0


def kto_weights_balanced(
    n_desirable: int,
    n_undesirable: int,
    desirable_weight: float = KTO_DESIRABLE_WEIGHT,
    undesirable_weight: float = KTO_UNDESIRABLE_WEIGHT,
) -> bool:
    """The KTO paper's advice (sec. 4.2, eq. 9), which TRL's KTOTrainer warns about:
    lambda_D n_D / (lambda_U n_U) should lie in [1, 4/3]."""
    ratio = desirable_weight * n_desirable / max(undesirable_weight * n_undesirable, 1e-12)
    return 1.0 <= ratio <= 4.0 / 3.0


def kto_reference_point(
    policy_kl_logps: jax.Array, reference_kl_logps: jax.Array, row_weights: jax.Array
) -> jax.Array:
    """KTO's z0 (Ethayarajh et al. 2024, eq. 8), as TRL's KTOTrainer estimates it: the mean over
    the batch's mismatched (prompt, other row's completion) pairs of log pi - log pi_ref, clamped
    at 0 and without gradient (TRL scores these pairs under no_grad). [B] sequence log-probs of
    the mismatched pairs; padding rows (weight 0) do not count."""
    diff = jax.lax.stop_gradient(policy_kl_logps - reference_kl_logps)
    mean = jnp.sum(diff * row_weights) / jnp.maximum(jnp.sum(row_weights), 1e-12)
    return jnp.maximum(mean, 0.0)


def kto_loss(
    policy_logps: jax.Array,
    reference_logps: jax.Array,
    desirable: jax.Array,
    row_weights: jax.Array,
    *,
    kl: jax.Array,
    beta: float = KTO_BETA,
    desirable_weight: float = KTO_DESIRABLE_WEIGHT,
    undesirable_weight: float = KTO_UNDESIRABLE_WEIGHT,
) -> tuple[jax.Array, Metrics]:
    """KTO (Ethayarajh et al. 2024, eq. 8; TRL's ``kto_loss``) over B unpaired rows.

    r = log pi(y|x) - log pi_ref(y|x) (summed over the completion), z0 = ``kl``
    (``kto_reference_point``). A desirable row (``desirable`` 1) costs
    lambda_D (1 - s(beta (r - z0))), an undesirable one lambda_U (1 - s(beta (z0 - r))); the
    loss is the mean over rows. Metrics are TRL's, means over each label's real rows.
    """
    ratios = policy_logps - reference_logps
    good = desirable.astype(jnp.float32)
    chosen_losses = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (ratios - kl)))
    rejected_losses = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - ratios)))
    losses = good * chosen_losses + (1.0 - good) * rejected_losses
    rewards = beta * jax.lax.stop_gradient(ratios)
    logps = jax.lax.stop_gradient(policy_logps)
    real = (row_weights > 0).astype(jnp.float32)
    n_good, n_bad = jnp.sum(real * good), jnp.sum(real * (1.0 - good))

    def mean_over(x: jax.Array, which: jax.Array, n: jax.Array) -> jax.Array:
        return jnp.sum(x * which * real) / jnp.maximum(n, 1.0)

    reward_chosen = mean_over(rewards, good, n_good)
    reward_rejected = mean_over(rewards, 1.0 - good, n_bad)
    return _weighted_mean(losses, row_weights), {
        "kl": jax.lax.stop_gradient(kl),
        "logps/chosen": mean_over(logps, good, n_good),
        "logps/rejected": mean_over(logps, 1.0 - good, n_bad),
        "rewards/chosen": reward_chosen,
        "rewards/rejected": reward_rejected,
        "rewards/margins": reward_chosen - reward_rejected,
        "count/chosen": n_good,
        "count/rejected": n_bad,
    }
