"""``spec.rloo``: RLOO, REINFORCE Leave-One-Out (Ahmadian et al., 2024), as TRL's RLOOTrainer:
each completion's baseline is the mean reward of the prompt's other k - 1 completions, and the
KL to the reference is subtracted from the reward (beta 0.05, 2 completions per prompt)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.api.settings.grpo import GrpoSpec


class RlooSpec(GrpoSpec):
    num_generations: int = Field(
        2, ge=2, le=1024, description="k: completions sampled per prompt (TRL's default 2)."
    )
    beta: float = Field(
        0.05,
        ge=0,
        description="KL weight to the reference, in the reward: r - beta x sum_t (log pi_old - "
        "log pi_ref) before the baseline (TRL's); 0 keeps no reference.",
    )
    advantage: Literal["leave-one-out"] = Field(  # type: ignore[assignment]
        "leave-one-out", description="r_i - the mean of the prompt's other k - 1 rewards."
    )
