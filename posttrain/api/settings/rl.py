"""What the RL algorithms share: rewards, sampling, the SFT warm-up (one type, reused)."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.api.base import MAX_LIST, MAX_STR, FieldValueError, Spec, Str
from posttrain.api.settings.environment import HttpRewardSpec, RewardModelSpec

BuiltinReward = Literal["math-answer", "regex-format", "length-penalty"]


class RewardSpec(Spec):
    """One reward term, with a weight: a built-in by name, the user's function, an HTTP reward
    service or a reward model (exactly one of builtin, function, http, rewardModel)."""

    builtin: BuiltinReward | None = Field(None, description="A built-in reward.")
    function: (
        Annotated[str, Field(max_length=MAX_STR, pattern=r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$")] | None
    ) = Field(
        None,
        description=(
            'The user\'s reward: "module.path:name" or "/path/file.py:name", called as '
            "fn(prompts, completions, **columns) -> list[float]."
        ),
    )
    http: HttpRewardSpec | None = Field(
        None,
        description=(
            'A reward service: POST {"prompts", "completions", "columns"} to url, reply '
            '{"rewards": [float, ...]}, one per completion.'
        ),
    )
    reward_model: RewardModelSpec | None = Field(
        None,
        description="A Hugging Face sequence-classification reward model scoring prompt + completion.",
    )
    name: Annotated[str, Field(max_length=63, pattern=r"^[A-Za-z0-9_.-]+$")] | None = Field(
        None, description="Name used in metrics (default: the builtin or function name)."
    )
    weight: float = Field(1.0, description="Weight of this term in the summed reward.")
    answer_field: Str = Field("answer", description="math-answer: column with the expected answer.")
    pattern: Annotated[str, Field(max_length=MAX_STR)] | None = Field(
        None,
        description="regex-format: the regular expression a completion must match (re.search).",
    )
    target_length: int = Field(
        128,
        ge=1,
        description="length-penalty: completions longer than this many characters lose reward.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        sources = {
            "builtin": self.builtin,
            "function": self.function,
            "http": self.http,
            "rewardModel": self.reward_model,
        }
        given = [k for k, v in sources.items() if v is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of builtin, function, http or rewardModel"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.builtin == "regex-format":
            if self.pattern is None:
                raise FieldValueError("pattern", "builtin regex-format needs pattern")
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise FieldValueError(
                    "pattern", f"pattern is not a valid regular expression: {err}"
                ) from err
        return self

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.builtin:
            return self.builtin
        if self.http is not None:
            return "http"
        if self.reward_model is not None:
            return "reward-model"
        assert self.function is not None
        return self.function.rsplit(":", 1)[1]


Rewards = Annotated[list[RewardSpec], Field(min_length=1, max_length=MAX_LIST)]


class RolloutCorrectionSpec(Spec):
    """Sampler/learner mismatch correction (verl's rollout correction, TRL's vLLM importance
    sampling): the sampler's log-probs of each token against the learner's (pi_old)."""

    importance_sampling: Literal["none", "token"] = Field(
        "none",
        description=(
            "token: truncated importance sampling (TIS; verl rollout_is: token, TRL "
            "vllm_importance_sampling_correction): each token's policy-gradient loss is weighted "
            "by min(pi_old / pi_sampler, importanceSamplingThreshold); none: off."
        ),
    )
    importance_sampling_threshold: float = Field(
        2.0,
        gt=0,
        le=1e6,
        description="C, the cap on TIS weights (verl's rollout_is_threshold, default 2).",
    )
    rejection: Literal["none", "token", "sequence", "geometric"] = Field(
        "none",
        description=(
            "Rejection (verl's rollout_rs): drop from the loss the tokens (token) or completions "
            "whose ratio pi_old / pi_sampler is outside [rejectionThresholdLower, "
            "rejectionThreshold]; sequence: the product of the token ratios, geometric: their "
            "geometric mean; none: off."
        ),
    )
    rejection_threshold: float = Field(
        2.0,
        ge=1,
        le=1e6,
        description="Upper bound of the kept ratio (verl's rollout_rs_threshold, default 2).",
    )
    rejection_threshold_lower: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Lower bound of the kept ratio; default 1 / rejectionThreshold.",
    )
    veto_threshold: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "With rejection: also drop a completion with any token ratio below this "
            "(verl's rollout_token_veto_threshold); default: no veto."
        ),
    )

    @property
    def enabled(self) -> bool:
        return self.importance_sampling != "none" or self.rejection != "none"

    @model_validator(mode="after")
    def _rejection_fields_need_rejection(self) -> RolloutCorrectionSpec:
        stray = {
            "rejectionThresholdLower": self.rejection_threshold_lower is not None,
            "vetoThreshold": self.veto_threshold is not None,
        }
        for field, given in stray.items():
            if given and self.rejection == "none":
                raise FieldValueError(
                    field, f"{field} is read with rejection token, sequence or geometric, not none"
                )
        return self


class RolloutSpec(Spec):
    """Sampling, rewards and the SFT warm-up: the fields every RL algorithm's block starts with."""

    rewards: Rewards
    max_new_tokens: int = Field(256, ge=1, le=1_048_576, description="Longest completion.")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(
        None, ge=1, description="Keep only the k most likely tokens when sampling."
    )
    rollout_correction: RolloutCorrectionSpec = Field(
        default_factory=RolloutCorrectionSpec,
        description=(
            "Sampler/learner mismatch correction (truncated importance sampling, rejection); off "
            "by default. The mismatch metrics (mismatch_kl, mismatch_k3_kl) are logged always."
        ),
    )
    generation_batch_size: int | None = Field(
        None,
        ge=1,
        le=1_048_576,
        description=(
            "Rows (completions) the sampler generates at a time, in one compiled program (TRL's "
            "generation_batch_size): the KV cache holds this many rows, split over the mesh's "
            "data x fsdp devices, of which it must be a multiple; unset: the whole rollout batch."
        ),
    )
    log_completions_every_steps: int | None = Field(
        None,
        ge=1,
        description=(
            "Write sampled completions (prompt, completion, reward; up to 16 of a rollout batch) "
            "to DIR/samples.jsonl and TensorBoard text at the first rollout batch of every this "
            "many steps; unset: none."
        ),
    )
    sft_warmup_steps: int = Field(
        0,
        ge=0,
        description=(
            "Steps of supervised fine-tuning on data.completionField before RL starts (a cold "
            "start, counted in training.steps); 0 = none. Needs the KL weight at 0: the reference "
            "policy is the model before the warm-up."
        ),
    )

    # The field that weights the KL to the reference (beta, klCoef): refused with a warm-up.
    kl_field: ClassVar[str] = "beta"

    @model_validator(mode="after")
    def _warmup_without_reference(self) -> RolloutSpec:
        kl = getattr(self, _snake(self.kl_field), 0.0)
        if self.sft_warmup_steps and kl:
            raise FieldValueError(
                self.kl_field,
                f"{self.kl_field} ({kl}) must be 0 with sftWarmupSteps ({self.sft_warmup_steps}): "
                "the reference policy is the model before the warm-up, so the KL term would pull "
                f"RL back towards it; set {self.kl_field}: 0, or run SFT as its own job and start "
                "RL from its export",
            )
        return self


def _snake(camel: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)
