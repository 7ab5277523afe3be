"""``spec.reinforcePlusPlus``: REINFORCE++ (Hu, 2025), as OpenRLHF and verl have it: a token-level
KL penalty in the reward (beta 0.01, OpenRLHF's init_kl_coef), returns summed to each token
(gamma 1) and whitened over the whole batch; no critic, no per-prompt groups needed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.api.settings.grpo import GrpoSpec


class ReinforcePlusPlusSpec(GrpoSpec):
    num_generations: int = Field(
        1, ge=1, le=1024, description="Completions sampled per prompt (OpenRLHF's default 1)."
    )
    beta: float = Field(
        0.01,
        ge=0,
        description="Token-level KL weight in the reward: r_t = -beta x (log pi_old - log pi_ref) "
        "on every token, plus the reward on the last; 0 keeps no reference.",
    )
    advantage: Literal["batch-std"] = Field(  # type: ignore[assignment]
        "batch-std",
        description="Returns (the rewards to go) whitened over every completion token of the batch.",
    )
    loss_aggregation: Literal["sequence-mean", "token-mean", "constant-normalizer"] = Field(
        "token-mean",
        description="Mean over all completion tokens of the batch (verl's token-mean).",
    )
