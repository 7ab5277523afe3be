"""GRPO and GSPO-token as pure functions on arrays: advantages, KL estimators, clipped losses.

Symbols follow the papers and map to `spec.grpo`:
  G = numGenerations, beta = beta, eps = epsilon, eps_high = epsilonHigh, mu = numIterations.

- GRPO, DeepSeekMath (Shao et al. 2024, eq. 3), with r_it = pi(o_it) / pi_old(o_it):
    J = 1/G sum_i 1/|o_i| sum_t [ min(r_it A_it, clip(r_it, 1-eps, 1+eps_high) A_it) - beta KL_it ]
- GSPO-token, Group Sequence Policy Optimization (Zheng et al. 2025, eqs. 7-14):
    s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|) = exp(1/|y_i| sum_t log r_it)     (sequence ratio)
    s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)]                                   (same value, token grads)
  and the same clipped objective with s_it in place of r_it. When A_it = A_i and the aggregation
  is sequence-mean its gradient equals sequence-level GSPO's; every token of a sequence is
  clipped (or not) together.

The losses return -J (to minimise) and a dict of scalar metrics. They never run a model: log-probs
come from one shared function called before them. Shapes: B completions (prompts x G), T tokens.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array
Advantage = Literal["group-std", "group-mean"]
Aggregation = Literal["token-mean", "sequence-mean"]
KlEstimator = Literal["k1", "k2", "k3", "k3+"]

# TRL's convention: divide by the group's sample std (ddof 1, torch's default) + 1e-4.
STD_EPS = 1e-4
# verl's clamps on its k3 ("low_var_kl"): the log-ratio before exp (no overflow) and the value
# (one token far from the reference cannot dominate the batch's KL term).
KL_LOG_RATIO_BOUND = 20.0
KL_VALUE_BOUND = 10.0


def group_advantages(rewards_b: Array, group_size: int, mode: Advantage = "group-std") -> Array:
    """Outcome advantages, normalised within each prompt's group of `group_size` completions.

    rewards_b is [B] with B = prompts x G, each prompt's G completions adjacent.
    group-std: (r - mean) / (std + 1e-4) (DeepSeekMath); group-mean: r - mean (Dr. GRPO).
    The std is the sample std (ddof 1) and eps 1e-4, as TRL computes it (verl: ddof 1, eps 1e-6).
    A group whose rewards are all equal gets exactly 0: in float32 its mean can differ from the
    rewards by a rounding step, which the division by 1e-4 would blow up into a spurious signal.
    """
    if rewards_b.ndim != 1 or rewards_b.shape[0] % group_size:
        raise ValueError(
            f"rewards must be [prompts x G] with G={group_size}, got shape {rewards_b.shape}"
        )
    r_pg = rewards_b.reshape(-1, group_size).astype(jnp.float32)
    equal_p1 = r_pg.max(axis=1, keepdims=True) == r_pg.min(axis=1, keepdims=True)
    centred_pg = jnp.where(equal_p1, 0.0, r_pg - r_pg.mean(axis=1, keepdims=True))
    if mode == "group-std":
        centred_pg = centred_pg / (r_pg.std(axis=1, keepdims=True, ddof=1) + STD_EPS)
    elif mode != "group-mean":
        raise ValueError(f"advantage must be group-std or group-mean, got {mode!r}")
    return centred_pg.reshape(-1)


def kl_penalty(logp_bt: Array, ref_logp_bt: Array, estimator: KlEstimator = "k3") -> Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL").

    With x = log pi_ref - log pi:  k1 = -x,  k2 = x^2 / 2,  k3 = exp(x) - x - 1 (unbiased, >= 0;
    DeepSeekMath's choice; with verl's clamps, ``low_var_kl``); k3+ = k3's value (clamped as verl) with k2's gradient (`kl_k3_plus`).
    As loss terms their expected gradients differ: k1's is 0, k2's is grad KL(pi || pi_ref),
    k3's is grad KL(pi_ref || pi).
    """
    x = ref_logp_bt - logp_bt
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "k3":
        # verl's low_var_kl guards: x clamped to [-20, 20], the value to [-10, 10]; equal to
        # exp(x) - x - 1 inside them (expm1 keeps precision for small x).
        return low_var_kl(logp_bt, ref_logp_bt)
    if estimator == "k3+":
        return kl_k3_plus(logp_bt, ref_logp_bt)
    raise ValueError(f"kl estimator must be k1, k2, k3 or k3+, got {estimator!r}")


def low_var_kl(logp_bt: Array, ref_logp_bt: Array) -> Array:
    """verl's ``low_var_kl`` (k3) with its clamps: x = clip(log pi_ref - log pi, -20, 20),
    value clip(e^x - x - 1, -10, 10). Equal to k3 wherever |x| <= 20 and k3 <= 10."""
    x = jnp.clip(ref_logp_bt - logp_bt, -KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
    return jnp.clip(jnp.expm1(x) - x, -KL_VALUE_BOUND, KL_VALUE_BOUND)


def kl_k3_plus(logp_bt: Array, ref_logp_bt: Array) -> Array:
    """verl's ``k3+`` (``low_var_kl+``): the value of (clamped) k3, the gradient of k2.

    Straight-through: k2 - sg[k2] + sg[k3]. As a loss term on samples of pi, k3's expected
    gradient is that of KL(pi_ref || pi), k2's that of KL(pi || pi_ref), the divergence the
    penalty is meant to minimise; k3+ logs k3's unbiased, non-negative value and follows k2's
    gradient, (log pi - log pi_ref) grad log pi per token (not clamped).
    """
    k2 = 0.5 * jnp.square(logp_bt - ref_logp_bt)
    return k2 - jax.lax.stop_gradient(k2) + jax.lax.stop_gradient(low_var_kl(logp_bt, ref_logp_bt))


def aggregate(
    values_bt: Array, mask_bt: Array, mode: Aggregation, num_tokens: Array | None = None
) -> Array:
    """Mean of per-token values over completion tokens.

    sequence-mean: mean over each completion's tokens, then over completions (the papers' 1/G sum
    1/|o_i| sum_t); token-mean: one mean over every token of the batch (DAPO), so long completions
    weigh more. Fully masked rows (padding) contribute nothing and are not counted.
    num_tokens: token-mean's denominator when this is one micro-batch of a larger batch (the
    batch's completion tokens x this micro-batch's share of rows); default: the mask's own count.
    """
    mask_bt = mask_bt.astype(values_bt.dtype)
    summed_b = (values_bt * mask_bt).sum(axis=1)
    lengths_b = mask_bt.sum(axis=1)
    if mode == "token-mean":
        denominator = lengths_b.sum() if num_tokens is None else num_tokens
        return summed_b.sum() / jnp.maximum(denominator, 1.0)
    if mode == "sequence-mean":
        rows = (lengths_b > 0).astype(values_bt.dtype)
        per_seq_b = summed_b / jnp.maximum(lengths_b, 1.0)
        return (per_seq_b * rows).sum() / jnp.maximum(rows.sum(), 1.0)
    raise ValueError(f"loss aggregation must be token-mean or sequence-mean, got {mode!r}")


def sequence_log_ratio(logp_bt: Array, old_logp_bt: Array, mask_bt: Array) -> Array:
    """GSPO's length-normalised log importance ratio: log s_i = 1/|y_i| sum_t (logp - old_logp)."""
    mask_bt = mask_bt.astype(logp_bt.dtype)
    lengths_b = jnp.maximum(mask_bt.sum(axis=1), 1.0)
    return ((logp_bt - old_logp_bt) * mask_bt).sum(axis=1) / lengths_b


def gspo_token_ratio(logp_bt: Array, old_logp_bt: Array, mask_bt: Array) -> Array:
    """s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)]: value s_i, gradient s_i * grad log pi(y_it)."""
    log_s_b = sequence_log_ratio(logp_bt, old_logp_bt, mask_bt)
    return jnp.exp(
        jax.lax.stop_gradient(log_s_b)[:, None] + logp_bt - jax.lax.stop_gradient(logp_bt)
    )


def _clipped_loss(
    ratio_bt: Array,
    logp_bt: Array,
    ref_logp_bt: Array | None,
    adv: Array,
    mask_bt: Array,
    *,
    eps: float,
    eps_high: float | None,
    beta: float,
    kl_estimator: KlEstimator,
    aggregation: Aggregation,
    num_tokens: Array | None,
    log_ratio_bt: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """-J for a given importance ratio: the part GRPO and GSPO-token share. ``log_ratio_bt``:
    the per-token log pi / pi_old, for the ``approx_kl`` metric (mean 1/2 (log r)^2, PPO's)."""
    eps_high = eps if eps_high is None else eps_high
    adv_bt = jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, ratio_bt.shape)
    unclipped_bt = ratio_bt * adv_bt
    clipped_bt = jnp.clip(ratio_bt, 1.0 - eps, 1.0 + eps_high) * adv_bt
    surrogate_bt = jnp.minimum(unclipped_bt, clipped_bt)
    per_token_bt = -surrogate_bt
    mask_f = mask_bt.astype(ratio_bt.dtype)
    n_tokens = jnp.maximum(mask_f.sum(), 1.0)

    def token_mean(x_bt: Array) -> Array:
        return jax.lax.stop_gradient((x_bt * mask_f).sum() / n_tokens)

    metrics: dict[str, Array] = {}
    if beta != 0.0:
        if ref_logp_bt is None:
            raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probs)")
        kl_bt = kl_penalty(logp_bt, ref_logp_bt, kl_estimator)
        per_token_bt = per_token_bt + beta * kl_bt
        metrics["kl"] = token_mean(kl_bt)
    # A token is clipped when the clipped branch wins the min, i.e. its gradient is zero.
    clipped = (clipped_bt < unclipped_bt).astype(ratio_bt.dtype)
    metrics["clip_fraction"] = token_mean(clipped)
    metrics["clip_fraction_low"] = token_mean(clipped * (ratio_bt < 1.0 - eps))
    metrics["clip_fraction_high"] = token_mean(clipped * (ratio_bt > 1.0 + eps_high))
    metrics["ratio_mean"] = token_mean(ratio_bt)
    if log_ratio_bt is not None:
        metrics["approx_kl"] = token_mean(0.5 * jnp.square(log_ratio_bt))
    loss = aggregate(per_token_bt, mask_bt, aggregation, num_tokens)
    metrics["policy_loss"] = jax.lax.stop_gradient(
        aggregate(-surrogate_bt, mask_bt, aggregation, num_tokens)
    )
    return loss, metrics


def grpo_loss(
    logp: Array,
    old_logp: Array,
    ref_logp: Array | None,
    adv: Array,
    mask: Array,
    *,
    eps: float = 0.2,
    eps_high: float | None = None,
    beta: float = 0.04,
    kl_estimator: KlEstimator = "k3",
    aggregation: Aggregation = "sequence-mean",
    num_tokens: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """GRPO's loss -J (DeepSeekMath eq. 3) with a per-token ratio r_it = exp(logp - old_logp).

    logp, old_logp, ref_logp, mask: [B, T] (log-probs of the sampled tokens; mask 1 on completion
    tokens). adv: [B] (one per completion) or [B, T]. ref_logp may be None when beta == 0.
    num_tokens: see `aggregate` (token-mean over micro-batches).
    """
    # verl's guard: the log-ratio clamped to [-20, 20] before exp, so no ratio overflows.
    log_ratio = jnp.clip(logp - old_logp, -KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
    ratio_bt = jnp.exp(log_ratio)
    return _clipped_loss(
        ratio_bt,
        logp,
        ref_logp,
        adv,
        mask,
        eps=eps,
        eps_high=eps_high,
        beta=beta,
        kl_estimator=kl_estimator,
        aggregation=aggregation,
        num_tokens=num_tokens,
        log_ratio_bt=log_ratio,
    )


def gspo_token_loss(
    logp: Array,
    old_logp: Array,
    ref_logp: Array | None,
    adv: Array,
    mask: Array,
    *,
    eps: float = 0.2,
    eps_high: float | None = None,
    beta: float = 0.0,
    kl_estimator: KlEstimator = "k3",
    aggregation: Aggregation = "sequence-mean",
    num_tokens: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """GSPO-token's loss (GSPO paper eq. 13): GRPO's objective with s_it in place of r_it.

    Same arguments as `grpo_loss`. The paper's clip ranges are far smaller than GRPO's
    (3e-4 / 4e-4, `GrpoSpec.clip_range`'s defaults for gspo-token) because s_i is a per-token
    geometric mean. Its gradient equals the paper's under sequence-mean aggregation only.
    """
    ratio_bt = gspo_token_ratio(logp, old_logp, mask)
    log_ratio = jnp.clip(logp - old_logp, -KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
    return _clipped_loss(
        ratio_bt,
        logp,
        ref_logp,
        adv,
        mask,
        eps=eps,
        eps_high=eps_high,
        beta=beta,
        kl_estimator=kl_estimator,
        aggregation=aggregation,
        num_tokens=num_tokens,
        log_ratio_bt=log_ratio,
    )
