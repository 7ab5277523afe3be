"""RLOO on the GRPO family: the leave-one-out baseline (``rloo_loss.py``), registered as the
``leave-one-out`` estimator, with the KL in the reward. Its settings (``spec.rloo``) hold TRL's
defaults; the rollouts, batches and the clipped objective are GRPO's (with one pass per rollout
batch the ratio is 1, so the step is REINFORCE with the baseline, as TRL implements RLOO)."""

from __future__ import annotations

import numpy as np

from posttrain.trainer.algorithms import parts, rloo_loss
from posttrain.trainer.algorithms.grpo import family


@parts.register_advantage("leave-one-out", kl_in_reward=True)
def leave_one_out(x: parts.AdvantageInputs) -> np.ndarray:
    rewards = rloo_loss.kl_shaped_rewards(x.rewards, x.kl, x.mask, x.kl_coef)
    return rloo_loss.leave_one_out_advantages(rewards, x.group_size).astype(np.float32)


declare, build = family("grpo")
