"""Sampler/learner mismatch: importance weights, rejection masks and metrics, as pure functions.

The sampler (KV cache, its own dtypes and kernels) and the training forward compute slightly
different distributions, so the tokens were drawn from pi_sampler, not from the learner's
pi_old the PPO/GRPO ratio assumes. With the sampler's log-probs of each token
(``Generation.sampling_logprobs``) and the learner's (``logp_old``, recomputed by the training
forward) of the same tokens, verl's rollout correction and TRL's vLLM importance sampling
reweight or drop what the learner would not have sampled:

- token-level truncated importance sampling (TIS; verl ``rollout_is: token``, TRL
  ``vllm_importance_sampling_mode: token_truncate``):
      w_t = min(exp(clip(logp_old_t - logp_sampler_t, -20, 20)), C),   C = 2
  multiplying each token's policy-gradient loss (not the KL term), as a constant;
- sequence-level rejection (verl ``rollout_rs: sequence`` or ``geometric``): a completion is
  dropped from the loss mask when its ratio is outside [lower, upper] (lower = 1 / upper by
  default). ``sequence`` takes the product of its token ratios, exp(sum_t log r_t) (verl's
  ``rollout_rs: sequence``); ``geometric`` their geometric mean, exp(mean_t log r_t) (verl's
  ``rollout_rs: geometric``, whose thresholds are tight, e.g. 1.001);
- the mismatch metrics verl logs: ``mismatch_kl`` (k1) and ``mismatch_k3_kl`` (k3) estimates of
  KL(pi_sampler || pi_learner) over completion tokens, and ``rollout_probs_diff_*``
  (|p_sampler - p_learner| per token).

Wired through the RL settings' ``rolloutCorrection`` block (``grpo.correct`` applies the weights
and mask to a rollout batch); ``mismatch_metrics`` is logged on every RL step.
Shapes: B completions, T tokens; ``mask`` 1 on completion tokens.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array
RejectionLevel = Literal["token", "sequence", "geometric"]

# verl's rollout_is_threshold default, and TRL's vllm_importance_sampling_cap in the releases
# that introduced TIS (later TRL releases raised it to 3 with vllm_importance_sampling_mode).
ROLLOUT_IS_THRESHOLD = 2.0
# verl's SAFETY_BOUND: log-ratios are clipped to [-20, 20] before exp, so no ratio overflows.
SAFETY_BOUND = 20.0


def log_ratio(logp_learner_bt: Array, logp_sampler_bt: Array, mask_bt: Array) -> Array:
    """log pi_learner / pi_sampler per token, 0 off the mask; no gradient (a correction constant)."""
    diff = (logp_learner_bt - logp_sampler_bt) * mask_bt.astype(logp_learner_bt.dtype)
    return jax.lax.stop_gradient(diff)


def token_is_weights(
    logp_learner_bt: Array,
    logp_sampler_bt: Array,
    mask_bt: Array,
    threshold: float = ROLLOUT_IS_THRESHOLD,
) -> Array:
    """TIS: w_t = min(pi_learner / pi_sampler, threshold) per token, 0 off the mask.

    Only the top is truncated (a token the learner finds likelier than the sampler did is not
    up-weighted past C); small ratios stay, so the weights only ever shrink a token's gradient.
    """
    x = jnp.clip(log_ratio(logp_learner_bt, logp_sampler_bt, mask_bt), -SAFETY_BOUND, SAFETY_BOUND)
    return jnp.minimum(jnp.exp(x), threshold) * mask_bt.astype(x.dtype)


def sequence_log_ratio(
    logp_learner_bt: Array,
    logp_sampler_bt: Array,
    mask_bt: Array,
    level: Literal["sequence", "geometric"] = "sequence",
) -> Array:
    """[B] log of a completion's ratio: sum_t log r_t (product) or mean_t log r_t (geometric
    mean), clipped to [-20, 20] as verl does."""
    x = log_ratio(logp_learner_bt, logp_sampler_bt, mask_bt)
    summed = x.sum(axis=1)
    if level == "geometric":
        summed = summed / jnp.maximum(mask_bt.astype(x.dtype).sum(axis=1), 1.0)
    elif level != "sequence":
        raise ValueError(f"sequence ratio level must be sequence or geometric, got {level!r}")
    return jnp.clip(summed, -SAFETY_BOUND, SAFETY_BOUND)


def rejection_mask(
    logp_learner_bt: Array,
    logp_sampler_bt: Array,
    mask_bt: Array,
    level: RejectionLevel = "sequence",
    upper: float = ROLLOUT_IS_THRESHOLD,
    lower: float | None = None,
    veto_threshold: float | None = None,
) -> Array:
    """The loss mask with rejected tokens or completions set to 0 (verl's ``rollout_rs``).

    Kept when lower <= ratio <= upper (lower defaults to 1 / upper), compared in log space so
    that huge or tiny products do not overflow. level ``token`` rejects single tokens,
    ``sequence`` and ``geometric`` whole completions (see the module docstring). veto_threshold
    (verl's ``rollout_token_veto_threshold``): also drop a completion with any token whose ratio is
    below it. Returns the mask's dtype; padding stays 0.
    """
    lower = 1.0 / upper if lower is None else lower
    if not 0 < lower <= upper:
        raise ValueError(f"rejection bounds must satisfy 0 < lower <= upper, got {lower}, {upper}")
    lo, hi = jnp.log(lower), jnp.log(upper)
    mask = mask_bt.astype(bool)
    if level == "token":
        x = log_ratio(logp_learner_bt, logp_sampler_bt, mask_bt)
        keep = (x >= lo) & (x <= hi)
    else:
        x_b = sequence_log_ratio(logp_learner_bt, logp_sampler_bt, mask_bt, level)
        keep = ((x_b >= lo) & (x_b <= hi))[:, None]
    if veto_threshold is not None:
        x = log_ratio(logp_learner_bt, logp_sampler_bt, mask_bt)
        vetoed_b = jnp.any(mask & (x < jnp.log(veto_threshold)), axis=1)
        keep = keep & ~vetoed_b[:, None]
    return (mask & keep).astype(mask_bt.dtype)


def _masked_mean(x: Array, mask: Array) -> Array:
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def mismatch_metrics(
    logp_learner_bt: Array,
    logp_sampler_bt: Array,
    mask_bt: Array,
    threshold: float = ROLLOUT_IS_THRESHOLD,
) -> dict[str, Array]:
    """How far the sampler is from the learner, over completion tokens (verl's names).

    With r = log pi_learner - log pi_sampler on tokens drawn from pi_sampler:
    mismatch_kl = mean(-r) and mismatch_k3_kl = mean(e^r - r - 1) both estimate
    KL(pi_sampler || pi_learner) (k3: unbiased, >= 0, lower variance); rollout_probs_diff_* are
    the mean, max and std (ddof 1) of |p_sampler - p_learner| per token; rollout_is_* describe
    the TIS weights at ``threshold`` (eff_sample_size = 1 / mean(w_normalised^2), in (0, 1]).
    """
    mask = mask_bt.astype(jnp.float32)
    r = jnp.clip(log_ratio(logp_learner_bt, logp_sampler_bt, mask_bt), -SAFETY_BOUND, SAFETY_BOUND)
    p_learner = jnp.exp(jax.lax.stop_gradient(logp_learner_bt))
    p_sampler = jnp.exp(jax.lax.stop_gradient(logp_sampler_bt))
    diff = jnp.abs(p_sampler - p_learner)
    n = jnp.maximum(mask.sum(), 1.0)
    diff_mean = _masked_mean(diff, mask)
    diff_var = ((diff - diff_mean) ** 2 * mask).sum() / jnp.maximum(n - 1.0, 1.0)
    w = token_is_weights(logp_learner_bt, logp_sampler_bt, mask_bt, threshold)
    w_mean = _masked_mean(w, mask)
    w_normalised = w / jnp.maximum(w_mean, 1e-8)
    return {
        "mismatch_kl": _masked_mean(-r, mask),
        "mismatch_k3_kl": _masked_mean(jnp.expm1(r) - r, mask),
        "rollout_probs_diff_mean": diff_mean,
        "rollout_probs_diff_max": jnp.max(jnp.where(mask > 0, diff, 0.0)),
        "rollout_probs_diff_std": jnp.sqrt(diff_var),
        "rollout_is_mean": w_mean,
        "rollout_is_ratio_fraction_high": _masked_mean((jnp.exp(r) > threshold) * 1.0, mask),
        "rollout_is_eff_sample_size": 1.0 / jnp.maximum(_masked_mean(w_normalised**2, mask), 1e-8),
    }
