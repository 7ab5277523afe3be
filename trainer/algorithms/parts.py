"""Registered parts of the GRPO family: advantage estimators and policy objectives by name.

As verl's ``register_adv_est`` / ``register_policy_loss`` (``core_algos.py``): the family's batch
source and loss (``grpo.py``) look a part up by the name its settings give, so a variant is one
module that registers only what differs (``rloo.py`` its leave-one-out baseline,
``gspo_token.py`` its sequence-level ratio) and settings that hold its defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from posttrain.trainer.algorithms import grpo_loss as gl


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read, all host arrays of one rollout batch (R = prompts x G rows,
    each prompt's G completions adjacent; L = the rows' token positions)."""

    rewards: np.ndarray  # [R] total reward of each completion
    group_size: int  # G
    mask: np.ndarray  # [R, L] 1 on completion tokens (the positions that predict them)
    kl: np.ndarray | None  # [R, L] per-token log pi_old - log pi_ref, when the KL is in the reward
    kl_coef: float  # beta, when the KL is in the reward


@dataclass(frozen=True)
class Estimator:
    fn: Callable[[AdvantageInputs], np.ndarray]  # -> [R] or [R, L] advantages
    kl_in_reward: bool = False  # its algorithm folds beta x KL into the reward, not the loss
    per_token: bool = False  # it gives [R, L] advantages (token-level rewards), not [R]


ADVANTAGES: dict[str, Estimator] = {}
OBJECTIVES: dict[str, Callable[..., tuple]] = {}


def register_advantage(name: str, *, kl_in_reward: bool = False, per_token: bool = False):
    def add(fn: Callable[[AdvantageInputs], np.ndarray]) -> Callable[[AdvantageInputs], np.ndarray]:
        ADVANTAGES[name] = Estimator(fn, kl_in_reward, per_token)
        return fn

    return add


def register_objective(name: str):
    def add(fn: Callable[..., tuple]) -> Callable[..., tuple]:
        OBJECTIVES[name] = fn
        return fn

    return add


def advantage(name: str) -> Estimator:
    if name not in ADVANTAGES:
        raise ValueError(f"advantage {name!r} is not registered; known: {', '.join(ADVANTAGES)}")
    return ADVANTAGES[name]


def objective(name: str) -> Callable[..., tuple]:
    if name not in OBJECTIVES:
        raise ValueError(f"objective {name!r} is not registered; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


# GRPO's own parts; the variants register theirs in their modules.


@register_advantage("group-std")
def group_std(x: AdvantageInputs) -> np.ndarray:
    """(r - mean) / (std + 1e-4) within each prompt's group (DeepSeekMath; TRL's std)."""
    return np.asarray(gl.group_advantages(jnp.asarray(x.rewards, jnp.float32), x.group_size))


@register_advantage("group-mean")
def group_mean(x: AdvantageInputs) -> np.ndarray:
    """r - mean within each prompt's group (Dr. GRPO)."""
    rewards = jnp.asarray(x.rewards, jnp.float32)
    return np.asarray(gl.group_advantages(rewards, x.group_size, "group-mean"))


register_objective("grpo")(gl.grpo_loss)
