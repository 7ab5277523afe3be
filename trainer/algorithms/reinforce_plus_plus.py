"""REINFORCE++ on the GRPO family: token-level KL in the reward, returns whitened over the batch
(``reinforce_plus_plus_loss.py``), registered as the ``batch-std`` estimator. Its settings
(``spec.reinforcePlusPlus``) hold OpenRLHF's defaults; rollouts, batches and the clipped
objective are GRPO's (verl: REINFORCE++ with the PPO-clip actor loss)."""

from __future__ import annotations

import numpy as np

from posttrain.trainer.algorithms import parts
from posttrain.trainer.algorithms import reinforce_plus_plus_loss as rpp
from posttrain.trainer.algorithms.grpo import family


@parts.register_advantage("batch-std", kl_in_reward=True, per_token=True)
def batch_std(x: parts.AdvantageInputs) -> np.ndarray:
    return rpp.advantages(x.rewards, x.kl, x.mask, x.kl_coef).astype(np.float32)


declare, build = family("grpo")
