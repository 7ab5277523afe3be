"""``spec.ppo``: PPO with a learned critic and GAE."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from posttrain.api.settings.rl import RolloutSpec


class PpoSpec(RolloutSpec):
    """PPO (Schulman et al., 2017) with a learned value head and GAE, as in verl / TRL's PPOTrainer.
    Symbols follow the GRPO block where the concept is the same (epsilon, numIterations)."""

    renamed: ClassVar[dict[str, str]] = {"clipRange": "epsilon", "lam": "lambda"}

    num_iterations: int = Field(
        4, ge=1, le=64, description="PPO epochs over each batch of rollouts."
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lambda_: float = Field(0.95, alias="lambda", ge=0, le=1, description="GAE lambda.")
    epsilon: float = Field(
        0.2, gt=0, lt=1, description="Clip range of the policy ratio (lower side)."
    )
    epsilon_high: float | None = Field(
        None, gt=0, lt=10, description="Upper clip range of the policy ratio; default: epsilon."
    )
    value_clip_range: float = Field(0.2, gt=0, description="Value function clip.")
    value_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    kl_coef: float = Field(
        0.05,
        ge=0,
        description="Per-token KL penalty to the reference, folded into rewards; 0 keeps no reference.",
    )
    critic: Literal["value-head", "separate"] = Field(
        "value-head",
        description=(
            "value-head: a linear value head on the policy's trunk (one shared forward); "
            "separate: a copy of model.base with a value head, trained in full in every mode."
        ),
    )
    num_mini_batches: int = Field(
        1,
        ge=1,
        le=1024,
        description=(
            "Mini-batches per rollout batch: each rollout batch has training.batchSize x "
            "numMiniBatches completions and gives numIterations x numMiniBatches optimizer steps."
        ),
    )
    value_learning_rate: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Peak learning rate of the critic; default: training.learningRate.",
    )

    kl_field: ClassVar[str] = "klCoef"
