"""REINFORCE++'s advantages as pure functions (Hu, 2025; OpenRLHF, and verl's
``compute_reinforce_plus_plus_outcome_advantage``).

Token rewards: the sequence's reward on its last completion token, minus beta x the per-token KL
(log pi_old - log pi_ref, k1, as verl's ``apply_kl_penalty``). Returns: the rewards to go,
G_t = sum_{s >= t} gamma^(s - t) r_s (gamma 1). Advantages: the returns whitened over every
completion token of the global batch (mean and unbiased variance over the masked tokens, as verl's
``masked_whiten``), zero off the mask.
"""

from __future__ import annotations

import numpy as np

WHITEN_EPS = 1e-8  # verl's masked_whiten


def token_rewards(
    rewards_r: np.ndarray, kl_rt: np.ndarray | None, mask_rt: np.ndarray, beta: float
) -> np.ndarray:
    mask = np.asarray(mask_rt, np.float64)
    out = np.zeros_like(mask)
    rows = np.nonzero(mask.sum(axis=1) > 0)[0]
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # last completion position
    out[rows, last[rows]] = np.asarray(rewards_r, np.float64)[rows]
    if kl_rt is not None and beta:
        out = out - beta * np.asarray(kl_rt, np.float64) * mask
    return out


def rewards_to_go(
    token_rewards_rt: np.ndarray, mask_rt: np.ndarray, gamma: float = 1.0
) -> np.ndarray:
    returns = np.zeros_like(token_rewards_rt, dtype=np.float64)
    running = np.zeros(token_rewards_rt.shape[0])
    for t in reversed(range(token_rewards_rt.shape[1])):
        running = token_rewards_rt[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask_rt[:, t]  # nothing flows back across the prompt's positions
    return returns


def batch_whiten(values_rt: np.ndarray, mask_rt: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask_rt, np.float64)
    n = mask.sum()
    mean = (values_rt * mask).sum() / max(n, 1.0)
    var = (((values_rt - mean) ** 2) * mask).sum() / max(n - 1.0, 1.0)  # unbiased, as verl
    return (values_rt - mean) / np.sqrt(var + WHITEN_EPS) * mask


def advantages(
    rewards_r: np.ndarray,
    kl_rt: np.ndarray | None,
    mask_rt: np.ndarray,
    beta: float,
    gamma: float = 1.0,
) -> np.ndarray:
    returns = rewards_to_go(token_rewards(rewards_r, kl_rt, mask_rt, beta), mask_rt, gamma)
    return batch_whiten(returns, mask_rt)
