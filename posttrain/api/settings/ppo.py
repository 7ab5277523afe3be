"""``spec.ppo``: PPO with a learned critic and GAE."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.api.base import FieldValueError
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

    # verl's and TRL's extras (issue #26); defaults from verl unless said
    use_kl_loss: bool = Field(
        False,
        description="KL to the reference as a loss term (verl's actor.use_kl_loss); set klCoef: "
        "0 to take the KL out of the rewards, as verl's use_kl_in_reward: false.",
    )
    kl_loss_coef: float = Field(
        0.001, ge=0, description="Weight of the KL loss term (verl's actor.kl_loss_coef)."
    )
    kl_loss_type: Literal["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"] = Field(
        "low_var_kl", description="KL estimate of the loss term (verl's actor.kl_loss_type)."
    )
    target_kl: float | None = Field(
        None,
        gt=0,
        description="Adaptive KL controller (Ziegler et al. 2019; verl's algorithm.kl_ctrl.type "
        "adaptive): the reward's KL coefficient starts at klCoef and moves towards this KL per "
        "token; unset: a fixed klCoef.",
    )
    kl_horizon: int = Field(
        10000,
        ge=1,
        description="The adaptive controller's horizon in sequences (verl's kl_ctrl.horizon).",
    )
    critic_warmup_steps: int = Field(
        0,
        ge=0,
        description="The first optimizer steps of RL train the critic only: the policy gets no "
        "gradient (verl's trainer.critic_warmup).",
    )
    missing_eos_penalty: float | None = Field(
        None,
        ge=0,
        description="Subtracted from the reward of a completion with no EOS (TRL's "
        "missing_eos_penalty); unset: none.",
    )
    clip_ratio_c: float | None = Field(
        3.0,
        gt=1,
        description="Dual-clip PPO's bound on negative-advantage tokens (Ye et al. 2020; verl's "
        "actor.clip_ratio_c, default 3); null: the plain clipped surrogate.",
    )
    whiten_rewards: bool = Field(
        False,
        description="Scale the per-token rewards to unit variance over the rollout batch before "
        "GAE, their mean kept (TRL's whiten_rewards, default false).",
    )

    @model_validator(mode="after")
    def _adaptive_needs_a_start(self) -> PpoSpec:
        if self.target_kl is not None and self.kl_coef == 0:
            raise FieldValueError(
                "targetKl",
                "the adaptive KL controller scales klCoef, which is 0; set klCoef > 0 "
                "(its starting value) or remove targetKl",
            )
        if self.use_kl_loss and self.sft_warmup_steps:
            raise FieldValueError(
                "useKlLoss",
                "the KL loss pulls the policy back towards the model before sftWarmupSteps; "
                "run SFT as its own job, or remove useKlLoss",
            )
        return self

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0 or self.use_kl_loss

    kl_field: ClassVar[str] = "klCoef"
