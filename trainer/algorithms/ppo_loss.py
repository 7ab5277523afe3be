"""PPO as pure functions on arrays: KL-shaped rewards, GAE, whitening, the clipped losses.

PPO (Schulman et al. 2017) for language models as in TRL's PPOTrainer and verl (symbols map to
`spec.ppo`: gamma, lambda, epsilon / epsilonHigh, valueClipRange, valueCoef, klCoef). A completion
is an episode whose actions are its tokens; the state before token t is the prompt and tokens < t.

- Rewards (Ziegler et al. 2019, TRL / verl): every completion token pays -klCoef * KL_t with
  KL_t = log pi_old(y_t) - log pi_ref(y_t) (the k1 estimate on the sampled token), and the last
  token also receives the sequence's reward.
- GAE (Schulman et al. 2016): delta_t = r_t + gamma V(s_{t+1}) - V(s_t), A_t = sum_l
  (gamma lambda)^l delta_{t+l}, with V = 0 after the last token; returns R_t = A_t + V(s_t).
- Advantages are whitened over all completion tokens of the rollout batch (TRL, verl).
- Policy loss: -min(r A, clip(r, 1-eps, 1+eps_high) A), r = pi / pi_old, token-mean.
- Value loss: 1/2 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), token-mean.

Also built, and selectable in ``spec.ppo`` (wired in ``trainer/algorithms/ppo.py``): verl's dual
clip, KL as a loss term and adaptive KL controller, critic warm-up; TRL's missing-EOS penalty and
reward whitening (end of this file).

Shapes: [B, T] with a mask that is 1 on the positions whose target is a completion token (one
contiguous run per row); positions outside it are ignored everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp

from posttrain.trainer.algorithms import grpo_loss as gl

Array = jax.Array

WHITEN_EPS = 1e-8  # verl's and TRL's masked_whiten


def masked_mean(x_bt: Array, mask_bt: Array) -> Array:
    mask_bt = mask_bt.astype(x_bt.dtype)
    return (x_bt * mask_bt).sum() / jnp.maximum(mask_bt.sum(), 1.0)


def masked_var(x_bt: Array, mask_bt: Array) -> Array:
    """Unbiased (Bessel-corrected) variance over the masked entries, as verl and TRL compute it."""
    mask_bt = mask_bt.astype(x_bt.dtype)
    n = mask_bt.sum()
    centred_bt = (x_bt - masked_mean(x_bt, mask_bt)) * mask_bt
    return (centred_bt**2).sum() / jnp.maximum(n - 1.0, 1.0)


def whiten(x_bt: Array, mask_bt: Array, *, shift_mean: bool = True) -> Array:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries; 0 outside the mask.

    ``shift_mean=False`` adds the mean back (scale only), as TRL's ``masked_whiten`` does for
    ``whiten_rewards``: the rewards keep their sign on average, only their spread is normalised.
    """
    mean = masked_mean(x_bt, mask_bt)
    white_bt = (x_bt - mean) * jax.lax.rsqrt(masked_var(x_bt, mask_bt) + WHITEN_EPS)
    if not shift_mean:
        white_bt = white_bt + mean
    return white_bt * mask_bt.astype(x_bt.dtype)


def token_rewards(scores_b: Array, kl_bt: Array, mask_bt: Array, kl_coef: float) -> Array:
    """r_t = -klCoef * KL_t on every completion token, plus the sequence's score on its last one."""
    mask_bt = mask_bt.astype(jnp.float32)
    # The last completion token: in the mask, with the next position outside it.
    after_bt = jnp.concatenate([mask_bt[:, 1:], jnp.zeros_like(mask_bt[:, :1])], axis=1)
    last_bt = mask_bt * (1.0 - after_bt)
    return (-kl_coef * kl_bt + scores_b[:, None] * last_bt) * mask_bt


def gae(
    rewards_bt: Array, values_bt: Array, mask_bt: Array, gamma: float, lam: float
) -> tuple[Array, Array]:
    """(advantages, returns) by Generalised Advantage Estimation, 0 outside the mask.

    One reverse scan over time: positions outside the mask pass the running value and advantage
    through unchanged, so the value after a completion's last token is 0 (the episode ends).
    """
    mask_bt = mask_bt.astype(jnp.float32)
    values_bt = values_bt * mask_bt

    def back(carry, x):
        next_value_b, next_adv_b = carry
        r_b, v_b, m_b = x
        delta_b = r_b + gamma * next_value_b - v_b
        adv_b = delta_b + gamma * lam * next_adv_b
        keep = m_b > 0
        carry = (jnp.where(keep, v_b, next_value_b), jnp.where(keep, adv_b, next_adv_b))
        return carry, adv_b * m_b

    zeros_b = jnp.zeros(rewards_bt.shape[0], jnp.float32)
    _, adv_tb = jax.lax.scan(
        back, (zeros_b, zeros_b), (rewards_bt.T, values_bt.T, mask_bt.T), reverse=True
    )
    adv_bt = adv_tb.T
    return adv_bt, (adv_bt + values_bt) * mask_bt


def explained_variance(values_bt: Array, returns_bt: Array, mask_bt: Array) -> Array:
    """1 - Var[R - V] / Var[R] over completion tokens: 1 = perfect critic, <= 0 = no better than
    a constant (Stable-Baselines3 / verl's vf_explained_var)."""
    var_returns = masked_var(returns_bt, mask_bt)
    return 1.0 - masked_var(returns_bt - values_bt, mask_bt) / jnp.maximum(var_returns, 1e-12)


def policy_loss(
    logp_bt: Array,
    old_logp_bt: Array,
    adv_bt: Array,
    mask_bt: Array,
    *,
    eps: float,
    eps_high: float | None,
    num_tokens: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The clipped surrogate -min(r A, clip(r) A), token-mean: GRPO's clipped loss with per-token
    advantages and no KL term (PPO's KL is in the rewards). Adds approx_kl = mean 1/2 (log r)^2
    (TRL's estimate of KL(pi_old || pi))."""
    loss, metrics = gl.grpo_loss(
        logp_bt,
        old_logp_bt,
        None,
        adv_bt,
        mask_bt,
        eps=eps,
        eps_high=eps_high,
        beta=0.0,
        aggregation="token-mean",
        num_tokens=num_tokens,
    )
    log_ratio_bt = jax.lax.stop_gradient(logp_bt - old_logp_bt)
    metrics["approx_kl"] = masked_mean(0.5 * log_ratio_bt**2, mask_bt)
    return loss, metrics


def value_loss(
    values_bt: Array,
    old_values_bt: Array,
    returns_bt: Array,
    mask_bt: Array,
    *,
    clip_range: float,
    num_tokens: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """1/2 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), token-mean (TRL, verl)."""
    clipped_bt = jnp.clip(values_bt, old_values_bt - clip_range, old_values_bt + clip_range)
    unclipped_loss_bt = (values_bt - returns_bt) ** 2
    clipped_loss_bt = (clipped_bt - returns_bt) ** 2
    loss = 0.5 * gl.aggregate(
        jnp.maximum(unclipped_loss_bt, clipped_loss_bt), mask_bt, "token-mean", num_tokens
    )
    clipped = jax.lax.stop_gradient((clipped_loss_bt > unclipped_loss_bt).astype(jnp.float32))
    return loss, {
        "value_loss": jax.lax.stop_gradient(loss),
        "value_clip_fraction": masked_mean(clipped, mask_bt),
    }


def ppo_loss(
    logp_bt: Array,
    old_logp_bt: Array,
    values_bt: Array,
    old_values_bt: Array,
    adv_bt: Array,
    returns_bt: Array,
    mask_bt: Array,
    *,
    eps: float = 0.2,
    eps_high: float | None = None,
    value_clip_range: float = 0.2,
    value_coef: float = 0.1,
    num_tokens: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """policy_loss + valueCoef * value_loss, and both parts' metrics."""
    pg, metrics = policy_loss(
        logp_bt, old_logp_bt, adv_bt, mask_bt, eps=eps, eps_high=eps_high, num_tokens=num_tokens
    )
    vf, value_metrics = value_loss(
        values_bt,
        old_values_bt,
        returns_bt,
        mask_bt,
        clip_range=value_clip_range,
        num_tokens=num_tokens,
    )
    return pg + value_coef * vf, {**metrics, **value_metrics}


# ------------------------------------------- verl's and TRL's extras: dual clip, KL loss, ...

DUAL_CLIP_C = 3.0  # verl's actor.clip_ratio_c
KL_LOSS_COEF = 0.001  # verl's actor.kl_loss_coef
KL_LOSS_TYPE = "low_var_kl"  # verl's actor.kl_loss_type
LOG_RATIO_CLAMP = 20.0  # verl clamps log-ratios to +-20 before exp
LOW_VAR_KL_CLAMP = 10.0  # and its low_var_kl estimate to +-10


def dual_clip_policy_loss(
    logp_bt: Array,
    old_logp_bt: Array,
    adv_bt: Array,
    mask_bt: Array,
    *,
    eps: float = 0.2,
    eps_high: float | None = None,
    clip_ratio_c: float = DUAL_CLIP_C,
    num_tokens: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Dual-clip PPO (Ye et al. 2020; verl's ``compute_policy_loss``), token-mean.

    The clipped surrogate L = max(-r A, -clip(r, 1-eps, 1+eps_high) A); where A < 0 it is further
    bounded by -c A (c > 1), so a token whose ratio has run far above 1 + eps on a negative
    advantage cannot contribute an unbounded loss. TRL has no dual clip.
    """
    eps_high = eps if eps_high is None else eps_high
    log_ratio_bt = jnp.clip(logp_bt - old_logp_bt, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio_bt = jnp.exp(log_ratio_bt)
    unclipped_bt = -adv_bt * ratio_bt
    clipped_bt = -adv_bt * jnp.clip(ratio_bt, 1.0 - eps, 1.0 + eps_high)
    ppo_bt = jnp.maximum(unclipped_bt, clipped_bt)
    dual_bt = jnp.minimum(ppo_bt, -adv_bt * clip_ratio_c)
    loss_bt = jnp.where(adv_bt < 0, dual_bt, ppo_bt)
    loss = gl.aggregate(loss_bt, mask_bt, "token-mean", num_tokens)
    sg = jax.lax.stop_gradient
    negative = (adv_bt < 0).astype(jnp.float32)
    return loss, {
        "policy_loss": sg(loss),
        "clip_fraction": masked_mean(sg(clipped_bt > unclipped_bt).astype(jnp.float32), mask_bt),
        "clip_fraction_dual": masked_mean(
            sg(ppo_bt > -adv_bt * clip_ratio_c).astype(jnp.float32) * negative, mask_bt
        ),
        "approx_kl": masked_mean(sg(0.5 * log_ratio_bt**2), mask_bt),
    }


def kl_loss(
    logp_bt: Array,
    ref_logp_bt: Array,
    mask_bt: Array,
    *,
    kl_loss_type: str = KL_LOSS_TYPE,
    num_tokens: Array | None = None,
) -> Array:
    """KL(pi || pi_ref) as a loss term, token-mean (verl's ``use_kl_loss``: the policy loss adds
    ``kl_loss_coef`` times this; the rewards then carry no KL). ``kl_loss_type`` as verl:
    ``kl`` / ``k1`` log r, ``abs`` |log r|, ``mse`` / ``k2`` 1/2 (log r)^2, ``low_var_kl`` / ``k3``
    exp(-log r) + log r - 1 clamped to +-10, with log r = log pi - log pi_ref."""
    if kl_loss_type in ("kl", "k1"):
        kl_bt = gl.kl_penalty(logp_bt, ref_logp_bt, "k1")
    elif kl_loss_type == "abs":
        kl_bt = jnp.abs(logp_bt - ref_logp_bt)
    elif kl_loss_type in ("mse", "k2"):
        kl_bt = gl.kl_penalty(logp_bt, ref_logp_bt, "k2")
    elif kl_loss_type in ("low_var_kl", "k3"):
        log_ratio_bt = jnp.clip(ref_logp_bt - logp_bt, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl_bt = jnp.clip(
            jnp.expm1(log_ratio_bt) - log_ratio_bt, -LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP
        )
    else:
        raise ValueError(
            f"kl_loss_type must be kl, k1, abs, mse, k2, low_var_kl or k3, got {kl_loss_type!r}"
        )
    return gl.aggregate(kl_bt, mask_bt, "token-mean", num_tokens)


@dataclass(frozen=True)
class AdaptiveKLController:
    """The KL coefficient adapted towards a target KL (Ziegler et al. 2019, sec. 2.2; verl's
    ``AdaptiveKLController``, defaults from verl's ``algorithm.kl_ctrl``): after a batch of
    ``n_steps`` sequences whose KL was ``current_kl``,
    coef *= 1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon.
    Immutable: ``update`` returns the next controller; ``state`` / ``from_state`` checkpoint it."""

    value: float = 0.001
    target_kl: float = 0.1
    horizon: int = 10000

    def update(self, current_kl: float, n_steps: int) -> AdaptiveKLController:
        error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)
        return replace(self, value=self.value * (1.0 + error * n_steps / self.horizon))

    def state(self) -> dict[str, float]:
        return {"value": self.value, "target_kl": self.target_kl, "horizon": self.horizon}

    @classmethod
    def from_state(cls, state: Mapping[str, float]) -> AdaptiveKLController:
        return cls(float(state["value"]), float(state["target_kl"]), int(state["horizon"]))


def policy_loss_on(step: Array | int, critic_warmup_steps: int) -> Array:
    """Whether the policy trains at optimizer step ``step`` (0-based): the first
    ``critic_warmup_steps`` steps train the critic alone (verl's ``trainer.critic_warmup``; verl
    compares with its 1-based step, so its warm-up is one step shorter). Traceable under jit."""
    return jnp.asarray(step) >= critic_warmup_steps


def missing_eos_penalty(
    scores_b: Array, completion_ids_bt: Array, mask_bt: Array, eos_id: int, penalty: float | None
) -> Array:
    """TRL's ``missing_eos_penalty``: subtract ``penalty`` from the score of every completion
    with no EOS among its tokens (cut at maxNewTokens); None leaves the scores as they are."""
    if penalty is None:
        return scores_b
    has_eos_b = jnp.any((completion_ids_bt == eos_id) & (mask_bt > 0), axis=1)
    return jnp.where(has_eos_b, scores_b, scores_b - penalty)


def whiten_rewards(rewards_bt: Array, mask_bt: Array) -> Array:
    """TRL's ``whiten_rewards``: the per-token rewards scaled to unit variance over the rollout
    batch's completion tokens, their mean kept (``masked_whiten(shift_mean=False)``), before GAE."""
    return whiten(rewards_bt, mask_bt, shift_mean=False)
