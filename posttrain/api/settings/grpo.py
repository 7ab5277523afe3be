"""``spec.grpo``: GRPO (DeepSeekMath, Shao et al., 2024). Its variants (``dapo.py``,
``dr_grpo.py``, ``gspo_token.py``, ``rloo.py``, ``reinforce_plus_plus.py``) subclass this type and
change only their defaults, so each block shows the values its algorithm runs."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.api.base import MAX_LIST, FieldValueError, Spec
from posttrain.api.settings.environment import EnvironmentSpec
from posttrain.api.settings.rl import RewardSpec, RolloutSpec

# Advantage estimators and loss aggregations the trainer registers (trainer/algorithms/parts.py).
Advantage = Literal["group-std", "group-mean"]
LossAggregation = Literal["sequence-mean", "token-mean", "constant-normalizer"]
KlEstimator = Literal["k1", "k2", "k3", "k3+"]

OVERLONG_REWARD = "overlong"  # the soft overlong penalty's name among the reward terms
ENVIRONMENT_REWARD = "environment"  # the environment's episode reward among the reward terms


class OverlongSpec(Spec):
    """What happens to completions that reach maxNewTokens (DAPO section 3.4)."""

    mode: Literal["none", "filter", "penalty"] = Field(
        "none",
        description=(
            "none: truncated completions train like any other; filter: a completion cut at "
            "maxNewTokens (no EOS) carries no loss (DAPO's overlong filtering, TRL's "
            "mask_truncated_completions); penalty: DAPO's soft overlong punishment, a reward that "
            "falls linearly from 0 to -penaltyFactor over the last `buffer` tokens before "
            "maxNewTokens (logged as reward/overlong)."
        ),
    )
    buffer: int | None = Field(
        None,
        ge=1,
        description=(
            "penalty: length of the soft-penalty interval in tokens (DAPO's L_cache). Default: "
            "maxNewTokens / 5, the paper's 4096 of 20480 (filled in when the job is read)."
        ),
    )
    penalty_factor: float = Field(
        1.0, gt=0, description="penalty: the reward at maxNewTokens is -penaltyFactor (verl's)."
    )


class GrpoSpec(RolloutSpec):
    """GRPO's settings. Symbols follow the papers."""

    block_required: ClassVar[bool] = True  # rewards or an environment: the block must be written

    # With an environment its steps give rewards, so the list may be empty (checked below).
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        max_length=MAX_LIST,
        description=(
            "Reward terms, summed with their weights (at least one, unless an environment "
            "gives the rewards)."
        ),
    )
    num_generations: int = Field(8, ge=2, le=1024, description="G: completions sampled per prompt.")
    beta: float = Field(
        0.04, ge=0, description="KL weight to the reference policy; 0 keeps no reference."
    )
    epsilon: float = Field(
        0.2, gt=0, lt=1, description="Clip range of the importance ratio (lower side)."
    )
    epsilon_high: float | None = Field(
        None,
        gt=0,
        lt=10,
        description="Upper clip range (DAPO's clip-higher); unset: the same as epsilon.",
    )
    num_iterations: int = Field(
        1, ge=1, le=64, description="mu: optimisation passes over each batch of rollouts."
    )
    num_mini_batches: int = Field(
        1,
        ge=1,
        le=1024,
        description=(
            "Optimizer steps per pass over a rollout batch (verl's train batch / "
            "ppo_mini_batch_size): a rollout batch holds training.batchSize x numMiniBatches "
            "prompts x G completions, each step trains on batchSize x G of them (a seeded "
            "permutation per pass, as PPO), so a rollout batch gives numIterations x "
            "numMiniBatches steps."
        ),
    )
    advantage: Advantage = Field(
        "group-std",
        description=(
            "group-std: (r - mean) / (std + 1e-4) within each prompt's group (DeepSeekMath); "
            "group-mean: r - mean (Dr. GRPO)."
        ),
    )
    loss_aggregation: LossAggregation = Field(
        "sequence-mean",
        description=(
            "sequence-mean: mean over each completion's tokens, then over completions "
            "(DeepSeekMath); token-mean: mean over all completion tokens of the batch (DAPO); "
            "constant-normalizer: each completion's token sum / maxNewTokens, then the mean over "
            "completions (Dr. GRPO)."
        ),
    )
    dynamic_sampling: bool = Field(
        False,
        description=(
            "DAPO's dynamic sampling: drop prompts whose G rewards are all equal (no signal) and "
            "sample more prompts until the batch is full, for at most maxSamplingRounds rounds."
        ),
    )
    max_sampling_rounds: int = Field(
        10,
        ge=1,
        le=1000,
        description=(
            "dynamicSampling: rollout rounds (of batchSize prompts each) per step at most; if the "
            "batch is still short, it is filled with equal-reward groups (advantage 0) and the run "
            "says so (verl's max_num_gen_batches)."
        ),
    )
    overlong: OverlongSpec = Field(
        default_factory=OverlongSpec,
        description="Truncated completions: none, filter or penalty (DAPO).",
    )
    environment: EnvironmentSpec | None = Field(
        None,
        description=(
            "Multi-turn rollouts: the model's turns alternate with the environment's "
            "observations (tool results, user replies); observation tokens stay in the sequence "
            "but carry no loss, ratio or KL. See docs/rl.md."
        ),
    )
    kl_estimator: KlEstimator = Field(
        "k3",
        description=(
            "KL estimator of the beta term (Schulman), x = log pi_ref - log pi: k2 = x^2 / 2 "
            "(its gradient minimises KL(pi || pi_ref)); k3 = exp(x) - x - 1 (unbiased, >= 0; its "
            "gradient minimises KL(pi_ref || pi)); k3+ = k3's value with k2's gradient (verl's "
            "low_var_kl+). k1 is refused: as a loss term its expected gradient is 0."
        ),
    )

    share_prompt_forward: bool = Field(
        True,
        description=(
            "Run each prompt once through the model for its G completions, in the reference and "
            "old-policy log-prob passes and in the update, the completions attending to the "
            "prompt's keys and values (the same maths as G copies; Prefix Grouper): the decoder "
            "layers see B/G prompts + B completions instead of B of both. It applies where the "
            "rows come as whole groups: no environment, numMiniBatches 1, no sftWarmupSteps; the "
            "update also needs remat none and unscanned layers (micro-batches are reordered to "
            "hold whole groups), and no pass applies it where the training attention is splash "
            "(TPUs), whose kernel keeps the scores out of memory. false: every completion runs "
            "its own copy of the prompt."
        ),
    )

    def _check_environment(self) -> None:
        for i, reward in enumerate(self.rewards):
            if reward.display_name == ENVIRONMENT_REWARD:
                raise FieldValueError(
                    f"rewards[{i}].name",
                    f"{ENVIRONMENT_REWARD!r} names the environment's reward in the metrics "
                    "(reward/environment); give this reward another name",
                )

    @property
    def clip_high(self) -> float:
        """The upper clip range as it runs: epsilonHigh, else epsilon."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @model_validator(mode="after")
    def _consistent(self) -> GrpoSpec:
        if self.kl_estimator == "k1":
            raise FieldValueError(
                "klEstimator",
                "klEstimator k1 is refused as a loss term: the expected gradient of log pi - "
                "log pi_ref on samples of pi is 0, so the penalty would only add noise; allowed: "
                "k2 (gradient of KL(pi || pi_ref)), k3 (unbiased value, gradient of "
                "KL(pi_ref || pi)) or k3+ (k3's value, k2's gradient)",
            )
        if self.clip_high < self.epsilon:
            raise FieldValueError(
                "epsilonHigh",
                f"epsilonHigh ({self.clip_high:g}) must be at least epsilon ({self.epsilon:g}): "
                "it bounds the ratio above 1 + epsilonHigh; set both",
            )
        if not self.rewards and self.environment is None:
            raise FieldValueError(
                "rewards",
                "List should have at least 1 item: give a reward, or an environment whose steps "
                "give the rewards",
            )
        if self.environment is not None:
            self._check_environment()
        o = self.overlong
        # Checked by value, not by "was it written": a manifest written back lists every default.
        stray = {"buffer": o.buffer is not None, "penaltyFactor": o.penalty_factor != 1.0}
        for field, given in stray.items():
            if given and o.mode != "penalty":
                raise FieldValueError(
                    f"overlong.{field}", f"overlong.{field} is for mode penalty, not {o.mode}"
                )
        if o.buffer is not None and o.buffer > self.max_new_tokens:
            raise FieldValueError(
                "overlong.buffer",
                f"overlong.buffer ({o.buffer}) must be at most maxNewTokens ({self.max_new_tokens}): "
                "the penalty interval ends at maxNewTokens",
            )
        if o.mode == "penalty":
            for i, reward in enumerate(self.rewards):
                if reward.display_name == OVERLONG_REWARD:
                    raise FieldValueError(
                        f"rewards[{i}].name",
                        f"{OVERLONG_REWARD!r} names the overlong penalty in the metrics "
                        "(reward/overlong); give this reward another name",
                    )
            if o.buffer is None:  # the default depends on maxNewTokens: written into the spec
                filled = o.model_copy(update={"buffer": max(1, self.max_new_tokens // 5)})
                object.__setattr__(self, "overlong", filled)
        return self
