"""RLOO's advantage as a pure function (Ahmadian et al., 2024, eq. 7; TRL's RLOOTrainer).

With k completions of a prompt and rewards r_1..r_k, completion i's baseline is the mean of the
others: b_i = (sum_j r_j - r_i) / (k - 1), and A_i = r_i - b_i. TRL subtracts the KL to the
reference from the reward first, as a sequence sum of log pi_old - log pi_ref (k1), and leaves
the advantages unnormalised (``normalize_advantages=False``); both are followed here.
"""

from __future__ import annotations

import numpy as np


def kl_shaped_rewards(
    rewards_r: np.ndarray, kl_rt: np.ndarray | None, mask_rt: np.ndarray, beta: float
) -> np.ndarray:
    """r - beta x sum_t kl_t over each completion's tokens (the reward TRL's RLOO optimises)."""
    rewards = np.asarray(rewards_r, np.float64)
    if kl_rt is None or beta == 0.0:
        return rewards
    return rewards - beta * (np.asarray(kl_rt, np.float64) * mask_rt).sum(axis=1)


def leave_one_out_advantages(rewards_r: np.ndarray, k: int) -> np.ndarray:
    """A_i = r_i - mean of the other k - 1 rewards of its prompt; rows grouped k by k."""
    if k < 2 or rewards_r.shape[0] % k:
        raise ValueError(f"RLOO needs k >= 2 completions per prompt in rows of k, got k={k}")
    r_pk = np.asarray(rewards_r, np.float64).reshape(-1, k)
    baseline_pk = (r_pk.sum(axis=1, keepdims=True) - r_pk) / (k - 1)
    return (r_pk - baseline_pk).reshape(-1)
