"""PostTrainJob, group posttrain.dev, version v1alpha1: the one source of truth for the API.

The CRD's OpenAPI schema is generated from these models (`posttrain crd`), the operator
validates with them and the trainer parses its recipe with them. YAML uses camelCase; Python
uses snake_case. Unknown fields are errors. Defaults live here, each one documented.
This module imports neither JAX nor kopf.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from posttrain.api import accelerators as acc

GROUP = "posttrain.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "PostTrainJob"
PLURAL = "posttrainjobs"

Algorithm = Literal["sft", "ppo", "grpo", "gspo-token", "dapo", "dr-grpo", "dpo", "orpo", "distill"]
ALGORITHMS: tuple[str, ...] = Algorithm.__args__  # type: ignore[attr-defined]

# The spec block each algorithm reads (gspo-token, dapo and dr-grpo share GRPO's block).
ALGORITHM_BLOCK: dict[str, str] = {
    "sft": "sft",
    "ppo": "ppo",
    "grpo": "grpo",
    "gspo-token": "grpo",
    "dapo": "grpo",
    "dr-grpo": "grpo",
    "dpo": "dpo",
    "orpo": "orpo",
    "distill": "distill",
}
# Blocks with required fields: the job is meaningless without them.
REQUIRED_BLOCKS = ("ppo", "grpo", "distill")


class FieldValueError(ValueError):
    """A cross-field check's failure, pinned to the field (YAML name) the user should change."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


# Bounds keep CEL cost estimates finite and stop absurd inputs early.
MAX_STR = 4096
MAX_LIST = 64

Str = Annotated[str, Field(min_length=1, max_length=MAX_STR)]
ModelRef = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_STR,
        pattern=r"^(gs://[^/]+(/.*)?|hf://[^/]+/[^/]+.*|builtin:[a-z0-9-]+|/.*|\./.*|[^:]+)$",
        description=(
            "Where the weights are: a local or mounted path, gs://bucket/dir, hf://org/name, "
            "or builtin:NAME for the small built-in model (local runs and tests)."
        ),
    ),
]


class Spec(BaseModel):
    """Base for every API object: camelCase in YAML, unknown fields forbidden, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )


# ---------------------------------------------------------------------------------------------
# spec.model


LoraTarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS: tuple[LoraTarget, ...] = LoraTarget.__args__  # type: ignore[attr-defined]


class LoraSpec(Spec):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; adapters are scaled by alpha / rank.")
    targets: list[LoraTarget] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        min_length=1,
        max_length=7,
        description="Projections that get adapters (default: every attention and MLP projection).",
    )


class QuantizationSpec(Spec):
    type: Literal["int8", "nf4"] = Field(
        "nf4",
        description="How the frozen base weights are stored: int8 or 4-bit NormalFloat (QLoRA).",
    )
    block_size: int = Field(
        64, ge=16, le=4096, description="Quantization block size along the input axis."
    )


class ModelSpec(Spec):
    base: ModelRef
    tokenizer: ModelRef | None = Field(
        None, description="Where tokenizer.json lives, when not beside the weights in `base`."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "bfloat16",
        description=(
            "Compute dtype: the forward and backward passes run in it. float32 for CPU runs and "
            "parity checks."
        ),
    )
    param_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description=(
            "Dtype of the weights that train and of the optimizer state (master weights); "
            "gradients accumulate in float32 either way. A frozen base under LoRA is stored in "
            "`dtype`, a quantized one stays quantized. bfloat16 saves memory but updates smaller "
            "than the weight's bfloat16 rounding step are lost."
        ),
    )
    lora: LoraSpec | None = Field(
        None, description="Train low-rank adapters instead of all weights."
    )
    quantization: QuantizationSpec | None = Field(
        None, description="Quantize the frozen base (QLoRA). Requires `lora`."
    )

    @model_validator(mode="after")
    def _quantization_needs_lora(self) -> ModelSpec:
        if self.quantization is not None and self.lora is None:
            raise FieldValueError(
                "quantization",
                "quantization needs lora: a quantized base is frozen, so only adapters can train "
                "(add spec.model.lora, e.g. {rank: 16, alpha: 32})",
            )
        return self


# ---------------------------------------------------------------------------------------------
# spec.data


class DataSpec(Spec):
    train: Str = Field(description="Training data: a JSONL or Parquet file (local or gs://).")
    eval: Str | None = Field(None, description="Optional evaluation data, same format as `train`.")
    format: Literal["auto", "jsonl", "parquet"] = Field(
        "auto", description="File format; auto picks by extension (.jsonl/.json, .parquet)."
    )
    prompt_field: Str = Field(
        "prompt", description="Column holding the prompt (prompt-only data for RL)."
    )
    completion_field: Str = Field("completion", description="Column holding the completion (SFT).")
    messages_field: Str = Field(
        "messages", description="Column holding chat messages (SFT, chat template)."
    )
    chosen_field: Str = Field(
        "chosen", description="Column holding the preferred response (DPO, ORPO)."
    )
    rejected_field: Str = Field(
        "rejected", description="Column holding the dispreferred response (DPO, ORPO)."
    )
    max_length: int = Field(
        1024, ge=8, le=1_048_576, description="Tokens per training sequence (prompt + completion)."
    )
    max_prompt_length: int = Field(
        512,
        ge=1,
        le=1_048_576,
        description="Prompt tokens kept; longer prompts are cut from the left.",
    )
    packing: bool = Field(False, description="Pack several short examples into one sequence (SFT).")
    skip_bad_rows: bool = Field(
        False,
        description="Skip malformed rows (counted and logged) instead of failing on the first.",
    )
    shuffle: bool = Field(
        True, description="Shuffle the training data each epoch (seeded by training.seed)."
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataSpec:
        if self.max_prompt_length >= self.max_length:
            raise FieldValueError(
                "maxPromptLength",
                f"maxPromptLength ({self.max_prompt_length}) must be less than maxLength "
                f"({self.max_length}): the completion needs room",
            )
        return self


# ---------------------------------------------------------------------------------------------
# Rewards (GRPO, GSPO-token, PPO)

BuiltinReward = Literal["math-answer", "regex-format", "length-penalty"]


class RewardSpec(Spec):
    """One reward term: a built-in by name, or the user's function, with a weight."""

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
        if (self.builtin is None) == (self.function is None):
            raise ValueError("give exactly one of builtin or function")
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
        assert self.function is not None
        return self.function.rsplit(":", 1)[1]


Rewards = Annotated[list[RewardSpec], Field(min_length=1, max_length=MAX_LIST)]


# ---------------------------------------------------------------------------------------------
# Algorithm blocks


class SftSpec(Spec):
    completion_only_loss: bool = Field(
        True,
        description="Loss on completion (assistant) tokens only; false trains on prompt tokens too.",
    )


Advantage = Literal["group-std", "group-mean"]
LossAggregation = Literal["sequence-mean", "token-mean", "constant-normalizer"]


OVERLONG_REWARD = "overlong"  # the soft overlong penalty's name among the reward terms


class OverlongSpec(Spec):
    """What happens to completions that reach maxNewTokens (DAPO section 3.4)."""

    mode: Literal["none", "filter", "penalty"] = Field(
        "penalty",
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
            "maxNewTokens / 5, the paper's 4096 of 20480."
        ),
    )
    penalty_factor: float = Field(
        1.0, gt=0, description="penalty: the reward at maxNewTokens is -penaltyFactor (verl's)."
    )


class GrpoSpec(Spec):
    """GRPO (DeepSeekMath) and the algorithms that read this block: gspo-token, dapo, dr-grpo.
    Symbols follow the papers. A field left unset takes its algorithm's default (GRPO_DEFAULTS)."""

    num_generations: int = Field(8, ge=2, le=1024, description="G: completions sampled per prompt.")
    beta: float | None = Field(
        None,
        ge=0,
        description=(
            "KL weight to the reference policy; 0 skips the reference. Default: 0.04 for grpo "
            "and gspo-token, 0 for dapo and dr-grpo."
        ),
    )
    epsilon: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "Clip range of the importance ratio (lower side). Default: 0.2 for grpo, dapo and "
            "dr-grpo, 3e-4 for gspo-token (the GSPO paper's: its ratio is a per-token geometric "
            "mean)."
        ),
    )
    epsilon_high: float | None = Field(
        None,
        gt=0,
        lt=10,
        description=(
            "Upper clip range (DAPO's clip-higher). Default: 0.28 for dapo; 4e-4 for gspo-token "
            "when epsilon is unset too (the paper's pair); else epsilon."
        ),
    )
    num_iterations: int = Field(
        1, ge=1, le=64, description="mu: optimisation passes over each batch of rollouts."
    )
    max_new_tokens: int = Field(256, ge=1, le=1_048_576, description="Longest completion.")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(
        None, ge=1, description="Keep only the k most likely tokens when sampling."
    )
    advantage: Advantage | None = Field(
        None,
        description=(
            "group-std: (r - mean) / (std + 1e-4) within each prompt's group (DeepSeekMath); "
            "group-mean: r - mean (Dr. GRPO). Default: group-mean for dr-grpo, else group-std."
        ),
    )
    loss_aggregation: LossAggregation | None = Field(
        None,
        description=(
            "sequence-mean: mean over each completion's tokens, then over completions "
            "(DeepSeekMath); token-mean: mean over all completion tokens of the batch (DAPO); "
            "constant-normalizer: each completion's token sum / maxNewTokens, then the mean over "
            "completions (Dr. GRPO). Default: token-mean for dapo, constant-normalizer for "
            "dr-grpo, else sequence-mean."
        ),
    )
    dynamic_sampling: bool | None = Field(
        None,
        description=(
            "DAPO's dynamic sampling: drop prompts whose G rewards are all equal (no signal) and "
            "sample more prompts until the batch is full, for at most maxSamplingRounds rounds. "
            "Default: true for dapo, else false."
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
    overlong: OverlongSpec | None = Field(
        None,
        description=(
            "Truncated completions: filter or penalty (DAPO). Default: {mode: penalty} for dapo, "
            "else {mode: none}."
        ),
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3",
        description="KL estimator (Schulman): k3 = exp(ref - logp) - (ref - logp) - 1 is unbiased, >= 0.",
    )
    sft_warmup_steps: int = Field(
        0,
        ge=0,
        description=(
            "Steps of supervised fine-tuning on data.completionField before RL starts (a cold "
            "start, counted in training.steps); 0 = none. Needs beta 0: the reference policy is "
            "the model before the warm-up."
        ),
    )
    rewards: Rewards

    @model_validator(mode="after")
    def _overlong_buffer_fits(self) -> GrpoSpec:
        o = self.overlong
        if o is None:
            return self
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
        return self

    def clip_range(self, algorithm: str) -> tuple[float, float]:
        """(epsilon, epsilonHigh) as `algorithm` runs them (see ``resolved``)."""
        settings = self.resolved(algorithm)
        return settings.epsilon, settings.epsilon_high

    def resolved(self, algorithm: str) -> GrpoSettings:
        """This block as `algorithm` runs it: every unset field takes GRPO_DEFAULTS[algorithm]."""
        defaults = GRPO_DEFAULTS[algorithm]
        fill: dict[str, Any] = {
            k: v
            for k, v in defaults.items()
            if k in GrpoSpec.model_fields and getattr(self, k) is None
        }
        if self.epsilon_high is None and "epsilon_high" not in fill:
            # GSPO's (3e-4, 4e-4) is a pair: it holds only when the user set neither bound.
            paired = defaults.get("paired_epsilon_high")
            mine = self.epsilon is not None
            fill["epsilon_high"] = (
                paired if paired and not mine else fill.get("epsilon", self.epsilon)
            )
        overlong = OverlongSpec.model_validate(fill.pop("overlong", None) or self.overlong)
        if overlong.mode == "penalty" and overlong.buffer is None:
            overlong = overlong.model_copy(update={"buffer": max(1, self.max_new_tokens // 5)})
        return GrpoSettings.model_validate({**self.model_dump(), **fill, "overlong": overlong})


# Each algorithm's defaults for the spec.grpo fields left unset: its paper's settings (Dr. GRPO's
# beta 0 is the authors' recipe, `--beta 0` in sail-sg/understand-r1-zero). The one place.
GRPO_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {
        "beta": 0.04,
        "epsilon": 0.2,
        "advantage": "group-std",
        "loss_aggregation": "sequence-mean",
        "dynamic_sampling": False,
        "overlong": {"mode": "none"},
    },
    "dapo": {
        "beta": 0.0,
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "advantage": "group-std",
        "loss_aggregation": "token-mean",
        "dynamic_sampling": True,
        "overlong": {"mode": "penalty"},
    },
    "dr-grpo": {
        "beta": 0.0,
        "epsilon": 0.2,
        "advantage": "group-mean",
        "loss_aggregation": "constant-normalizer",
        "dynamic_sampling": False,
        "overlong": {"mode": "none"},
    },
}
# GSPO-token: the GSPO paper's clip ranges (its ratio is a per-token geometric mean, near 1).
GRPO_DEFAULTS["gspo-token"] = {
    **GRPO_DEFAULTS["grpo"],
    "epsilon": 3e-4,
    "paired_epsilon_high": 4e-4,
}


class GrpoSettings(GrpoSpec):
    """spec.grpo with its algorithm's defaults filled in (``GrpoSpec.resolved``): what runs."""

    beta: float
    epsilon: float
    epsilon_high: float
    advantage: Advantage
    loss_aggregation: LossAggregation
    dynamic_sampling: bool
    overlong: OverlongSpec


class PpoSpec(Spec):
    """PPO (Schulman et al., 2017) with a learned value head and GAE, as in verl / TRL's PPOTrainer.
    Symbols follow the GRPO block where the concept is the same (epsilon, numIterations)."""

    renamed: ClassVar[dict[str, str]] = {"clipRange": "epsilon", "lam": "lambda"}

    rewards: Rewards
    max_new_tokens: int = Field(256, ge=1, le=1_048_576, description="Longest completion.")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(
        None, ge=1, description="Keep only the k most likely tokens when sampling."
    )
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
    sft_warmup_steps: int = Field(
        0,
        ge=0,
        description=(
            "Steps of supervised fine-tuning on data.completionField before RL starts (counted in "
            "training.steps); 0 = none. Needs klCoef 0, as grpo.sftWarmupSteps needs beta 0."
        ),
    )

    @model_validator(mode="after")
    def _warmup_without_reference(self) -> PpoSpec:
        if self.sft_warmup_steps and self.kl_coef:
            raise FieldValueError(
                "klCoef",
                f"klCoef ({self.kl_coef}) must be 0 with sftWarmupSteps ({self.sft_warmup_steps}): "
                "the reference policy is the model before the warm-up; or run SFT as its own job "
                "and start PPO from its export",
            )
        return self


class DpoSpec(Spec):
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="DPO loss variant."
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Conservative DPO label smoothing: the share of pairs taken to be mislabelled "
        "(lossType sigmoid only).",
    )

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self) -> DpoSpec:
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise FieldValueError(
                "labelSmoothing",
                f"labelSmoothing applies to lossType sigmoid (conservative DPO), not "
                f"{self.loss_type}; remove it or use lossType sigmoid",
            )
        return self


class OrpoSpec(Spec):
    lambda_: float = Field(
        0.1, alias="lambda", ge=0, description="Weight of the odds-ratio term (lambda)."
    )


class DistillSpec(Spec):
    teacher: ModelRef = Field(description="The teacher model, same sources as spec.model.base.")
    strategy: Literal["logit", "attention", "feature"] = Field(
        "logit",
        description="logit: KL to the teacher's token distribution; attention: match attention maps; "
        "feature: match projected hidden states.",
    )
    temperature: float = Field(
        2.0, gt=0, le=100, description="Softmax temperature for logit distillation."
    )
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight of the distillation loss; 1 - alpha weights the task (SFT) loss.",
    )
    layers: (
        list[
            Annotated[list[Annotated[int, Field(ge=0, le=4096)]], Field(min_length=2, max_length=2)]
        ]
        | None
    ) = Field(
        None,
        min_length=1,
        max_length=MAX_LIST,
        description="[student, teacher] layer pairs the attention and feature strategies match "
        "(0-based); default: student layer i to teacher layer round((i + 1) * Lt / Ls) - 1.",
    )

    @model_validator(mode="after")
    def _layers_need_a_layer_strategy(self) -> DistillSpec:
        if self.layers is not None and self.strategy == "logit":
            raise FieldValueError(
                "layers",
                "layers pairs are read by strategy attention or feature only; strategy logit "
                "matches the output distributions (remove layers or change strategy)",
            )
        return self


# ---------------------------------------------------------------------------------------------
# spec.training


class OptimizerSpec(Spec):
    name: Literal["adamw", "adafactor", "sgd"] = Field("adamw", description="Optimizer (optax).")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")


class ScheduleSpec(Spec):
    name: Literal["cosine", "linear", "constant"] = Field(
        "cosine",
        description="Decay after warm-up: cosine to minRatio, linear to minRatio, or constant.",
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear warm-up steps; default: warmupRatio of training.steps."
    )
    warmup_ratio: float = Field(
        0.03, ge=0, le=1, description="Warm-up as a fraction of steps, when warmupSteps is unset."
    )
    min_ratio: float = Field(
        0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak."
    )


class CheckpointSpec(Spec):
    dir: Str | None = Field(
        None,
        description="Where checkpoints go (local/PVC path or gs://). Default: OUTPUT/checkpoints.",
    )
    every_steps: int = Field(
        100, ge=1, description="Save every this many steps (and always at the end)."
    )
    keep: int = Field(3, ge=1, le=1000, description="How many recent checkpoints to keep.")
    async_save: bool = Field(
        True, alias="async", description="Write checkpoints in the background."
    )


class MeshSpec(Spec):
    """Device mesh axes. -1 means "all devices left over"; the product must equal the device count."""

    data: int = Field(1, ge=-1, description="Data-parallel axis (replicated params).")
    fsdp: int = Field(-1, ge=-1, description="Fully-sharded data-parallel axis (params sharded).")
    tensor: int = Field(1, ge=-1, description="Tensor-parallel axis.")

    @model_validator(mode="after")
    def _one_inferred(self) -> MeshSpec:
        sizes = (self.data, self.fsdp, self.tensor)
        if sizes.count(-1) > 1:
            raise ValueError("at most one mesh axis may be -1 (inferred)")
        if 0 in sizes:
            raise ValueError("mesh axes must be positive or -1")
        return self


class TrainingSpec(Spec):
    steps: int = Field(ge=1, le=10_000_000, description="Optimizer steps to train.")
    batch_size: int = Field(
        32, ge=1, description="Global batch size (sequences, or prompts for RL) per step."
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="Sequences per forward/backward pass; batchSize / microBatchSize steps are accumulated.",
    )
    learning_rate: float = Field(1e-5, gt=0, le=1, description="Peak learning rate.")
    optimizer: OptimizerSpec = Field(
        default_factory=OptimizerSpec, description="Optimizer settings."
    )
    schedule: ScheduleSpec = Field(
        default_factory=ScheduleSpec, description="Learning-rate schedule."
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip gradients to this global norm; null disables."
    )
    eval_every_steps: int | None = Field(
        None, ge=1, description="Evaluate on data.eval every this many steps."
    )
    log_every_steps: int = Field(1, ge=1, description="Write metrics every this many steps.")
    seed: int = Field(0, ge=0, description="Seed for initialisation, data order and sampling.")
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="Checkpointing (orbax)."
    )
    mesh: MeshSpec = Field(
        default_factory=MeshSpec,
        description="Device mesh; defaults shard parameters over all devices (FSDP).",
    )
    remat: Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = Field(
        "none",
        description="Rematerialisation per decoder layer: none keeps all activations for the "
        "backward pass; full keeps only each layer's input and recomputes the rest; the others "
        "are jax.checkpoint_policies that also keep matmul outputs. Trades compute for memory.",
    )

    @model_validator(mode="after")
    def _accumulation_divides(self) -> TrainingSpec:
        mb = self.micro_batch_size
        if mb is not None and self.batch_size % mb:
            raise FieldValueError(
                "microBatchSize",
                f"batchSize ({self.batch_size}) must be a multiple of microBatchSize ({mb})",
            )
        return self


# ---------------------------------------------------------------------------------------------
# spec.resources and scheduling


class ResourcesSpec(Spec):
    accelerator: acc.Accelerator = Field(description="Where the job runs.")
    topology: Annotated[str, Field(max_length=32, pattern=r"^\d+x\d+(x\d+)?$")] | None = Field(
        None,
        description="TPU slice topology, e.g. 2x4 (v5e/v6e) or 2x2x2 (v4/v5p). TPUs only; required there.",
    )
    slices: int = Field(1, ge=1, le=64, description="TPU slices (multislice over DCN). TPUs only.")
    nodes: int = Field(1, ge=1, le=1024, description="Nodes (pods) for GPU and CPU jobs.")
    gpus_per_node: int | None = Field(
        None, ge=1, le=16, description="GPUs per node (default: 8). GPUs only."
    )
    chips_per_host: int | None = Field(
        None,
        ge=1,
        le=8,
        description="TPU chips per host (pod). Default: all of a single-host slice on one host "
        "(v5e/v6e 1x1, 2x2, 2x4), else 4. A v5e/v6e 2x4 may set 4: two 4-chip hosts. TPUs only.",
    )
    cpu: Annotated[str, Field(max_length=32, pattern=r"^[0-9.]+m?$")] | None = Field(
        None, description="CPU request per pod (Kubernetes quantity)."
    )
    memory: Annotated[str, Field(max_length=32, pattern=r"^[0-9.]+([KMGTPE]i?)?$")] | None = Field(
        None, description="Memory request per pod (Kubernetes quantity)."
    )

    @model_validator(mode="after")
    def _shape_fits_accelerator(self) -> ResourcesSpec:
        a = self.accelerator
        if acc.is_tpu(a):
            if self.topology is None:
                gen = acc.TPU_GENERATIONS[a]
                raise FieldValueError(
                    "topology", f"topology is required for {a}; valid: {', '.join(gen.topologies)}"
                )
            try:
                acc.tpu_slice_shape(a, self.topology)
            except ValueError as err:
                raise FieldValueError("topology", str(err)) from None
            try:
                acc.tpu_slice_shape(a, self.topology, self.chips_per_host)
            except ValueError as err:
                raise FieldValueError("chipsPerHost", str(err)) from None
            if self.nodes != 1:
                raise FieldValueError(
                    "nodes", "nodes is for GPU and CPU jobs; a TPU job's hosts follow from topology"
                )
            if self.gpus_per_node is not None:
                raise FieldValueError("gpusPerNode", f"gpusPerNode is for GPUs, not {a}")
        else:
            if self.topology is not None:
                raise FieldValueError(
                    "topology",
                    f"topology is for TPUs, not {a}; use nodes (and gpusPerNode for GPUs)",
                )
            if self.slices != 1:
                raise FieldValueError("slices", f"slices is for TPUs, not {a}; use nodes")
            if self.chips_per_host is not None:
                raise FieldValueError("chipsPerHost", f"chipsPerHost is for TPUs, not {a}")
            if acc.is_gpu(a):
                limit = acc.GPU_TYPES[a][1]
                if self.gpus_per_node is not None and self.gpus_per_node > limit:
                    raise FieldValueError(
                        "gpusPerNode",
                        f"gpusPerNode {self.gpus_per_node} exceeds {limit}, the most a {a} node has",
                    )
            elif self.gpus_per_node is not None:
                raise FieldValueError("gpusPerNode", "gpusPerNode is for GPUs, not cpu")
        return self

    @property
    def gpus(self) -> int:
        return self.gpus_per_node or 8


class Toleration(Spec):
    key: Annotated[str, Field(max_length=316)] | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: Annotated[str, Field(max_length=MAX_STR)] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class SchedulingSpec(Spec):
    queue_name: Annotated[str, Field(max_length=253)] | None = Field(
        None, description="Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label."
    )
    priority_class_name: Annotated[str, Field(max_length=253)] | None = Field(
        None, description="Pod priority class."
    )
    node_selector: dict[str, Annotated[str, Field(max_length=MAX_STR)]] = Field(
        default_factory=dict,
        max_length=MAX_LIST,
        description="Extra node selector, merged with the accelerator's.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=MAX_LIST, description="Extra tolerations."
    )


class SecretKeyRef(Spec):
    name: Annotated[str, Field(min_length=1, max_length=253)]
    key: Annotated[str, Field(min_length=1, max_length=253)]


class EnvValueFrom(Spec):
    secret_key_ref: SecretKeyRef


class EnvVar(Spec):
    name: Annotated[
        str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    ]
    value: Annotated[str, Field(max_length=MAX_STR)] | None = None
    value_from: EnvValueFrom | None = None

    @model_validator(mode="after")
    def _one_value(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise FieldValueError("valueFrom", "give value or valueFrom, not both")
        return self


# A cluster job needs a lasting place for its outputs: spec.output.dir, or beside its
# checkpoints. Said by the CRD's CEL rule, `posttrain validate` and the operator alike.
OUTPUT_BESIDE_CHECKPOINTS = "-output"
OUTPUT_DIR_REQUIRED = (
    "required in a cluster, or training.checkpoint.dir (outputs then go beside it, to "
    f"<checkpoint.dir>{OUTPUT_BESIDE_CHECKPOINTS}): a pod's own disk is gone when it ends, so "
    "metrics and the exported model need a lasting place (gs://bucket/dir or a mounted volume path)"
)


class OutputSpec(Spec):
    dir: Str | None = Field(
        None,
        description="Where metrics and the exported model go (local/PVC path or gs://). "
        "`posttrain run --output` overrides it. In a cluster: this, or "
        "`<training.checkpoint.dir>-output` when only that is set; one of the two is required.",
    )
    export: bool = Field(
        True,
        description="Export the trained model (LoRA merged) to DIR/final in Hugging Face format.",
    )
    export_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description=(
            "Dtype of the exported weights, cast from the float32 master weights. Default: the "
            "base checkpoint's dtype (float32 for builtin models)."
        ),
    )


# ---------------------------------------------------------------------------------------------
# The job


class PostTrainJobSpec(Spec):
    algorithm: Algorithm = Field(description="Which post-training algorithm runs.")
    model: ModelSpec = Field(
        description="The model to train: base weights, tokenizer, dtype, LoRA, QLoRA."
    )
    data: DataSpec = Field(description="Training and evaluation data and how it becomes sequences.")
    sft: SftSpec | None = Field(None, description="SFT settings (optional; defaults apply).")
    ppo: PpoSpec | None = Field(None, description="PPO settings; required by algorithm ppo.")
    grpo: GrpoSpec | None = Field(
        None, description="GRPO settings; also read by gspo-token, dapo and dr-grpo."
    )
    dpo: DpoSpec | None = Field(None, description="DPO settings (optional; defaults apply).")
    orpo: OrpoSpec | None = Field(None, description="ORPO settings (optional; defaults apply).")
    distill: DistillSpec | None = Field(
        None, description="Distillation settings; required by algorithm distill."
    )
    training: TrainingSpec = Field(
        description="Steps, batch, optimizer, schedule, checkpoints, mesh."
    )
    resources: ResourcesSpec = Field(description="Accelerator type and shape.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where results go.")
    image: Annotated[str, Field(max_length=MAX_STR)] | None = Field(
        None, description="Trainer image; default: the operator's image for this accelerator."
    )
    suspend: bool = Field(
        False,
        description="Suspend the job (pods are removed; resuming continues from the last checkpoint).",
    )
    max_restarts: int = Field(
        3, ge=0, le=1000, description="Whole-job restarts after a pod fails (JobSet failurePolicy)."
    )
    scheduling: SchedulingSpec = Field(
        default_factory=SchedulingSpec, description="Queueing, priority and placement."
    )
    service_account_name: Annotated[str, Field(max_length=253)] | None = Field(
        None, description="Service account for the trainer pods (default: posttrain-trainer)."
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=MAX_LIST, description="Extra environment for the trainer."
    )

    @model_validator(mode="after")
    def _blocks_match_algorithm(self) -> PostTrainJobSpec:
        wanted = ALGORITHM_BLOCK[self.algorithm]
        given = [b for b in set(ALGORITHM_BLOCK.values()) if getattr(self, b) is not None]
        stray = sorted(b for b in given if b != wanted)
        if stray:
            raise FieldValueError(
                stray[0],
                f"{', '.join(stray)} given but algorithm is {self.algorithm}, which reads only "
                f"spec.{wanted}",
            )
        if wanted in REQUIRED_BLOCKS and getattr(self, wanted) is None:
            raise FieldValueError(wanted, f"algorithm {self.algorithm} needs spec.{wanted}")
        return self

    @model_validator(mode="after")
    def _grpo_settings_agree(self) -> PostTrainJobSpec:
        g = self.grpo_settings
        if g is None:
            return self
        if g.sft_warmup_steps and g.beta:
            unset = (
                "" if self.grpo and self.grpo.beta is not None else f"{self.algorithm}'s default "
            )
            raise FieldValueError(
                "grpo.beta",
                f"{unset}beta ({g.beta}) must be 0 with sftWarmupSteps ({g.sft_warmup_steps}): the "
                "reference policy is the model before the warm-up, so the KL term would pull RL "
                "back towards it; set beta: 0, or run SFT as its own job and start RL from its export",
            )
        if g.overlong.mode == "penalty":
            for i, reward in enumerate(g.rewards):
                if reward.display_name == OVERLONG_REWARD:
                    raise FieldValueError(
                        f"grpo.rewards[{i}].name",
                        f"{OVERLONG_REWARD!r} names the overlong penalty in the metrics "
                        "(reward/overlong); give this reward another name",
                    )
        return self

    @property
    def grpo_settings(self) -> GrpoSettings | None:
        """spec.grpo with the algorithm's defaults filled in; None for algorithms without it."""
        if self.grpo is None or ALGORITHM_BLOCK[self.algorithm] != "grpo":
            return None
        return self.grpo.resolved(self.algorithm)

    @property
    def block(self) -> BaseModel | None:
        """The settings block the chosen algorithm reads (defaults filled for optional blocks)."""
        name = ALGORITHM_BLOCK[self.algorithm]
        value = getattr(self, name)
        if value is None:
            return {"sft": SftSpec, "dpo": DpoSpec, "orpo": OrpoSpec}[name]()
        return value


class ObjectMeta(BaseModel):
    """The part of Kubernetes metadata we read; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow")
    name: (
        Annotated[
            str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
        ]
        | None
    ) = None
    namespace: str | None = None


Phase = Literal["Pending", "Queued", "Provisioning", "Running", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]


class Condition(Spec):
    type: Annotated[str, Field(max_length=316)]
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[str, Field(max_length=1024)] | None = None
    message: Annotated[str, Field(max_length=32768)] | None = None
    last_transition_time: Annotated[str, Field(max_length=64)] | None = None
    observed_generation: int | None = None


class Progress(Spec):
    step: int = Field(0, ge=0)
    total_steps: int = Field(0, ge=0)
    metrics: dict[str, float] = Field(default_factory=dict, max_length=MAX_LIST)
    updated_at: Annotated[str, Field(max_length=64)] | None = None
    last_checkpoint_step: int | None = Field(
        None, ge=0, description="Step of the last checkpoint the trainer saved."
    )
    eta_seconds: int | None = Field(
        None, ge=0, description="Estimated seconds to the last step, at this run's pace so far."
    )


class Summary(Spec):
    """Short strings for `kubectl get` columns (JSONPath cannot format)."""

    model: Annotated[str, Field(max_length=256)] | None = None
    accelerator: Annotated[str, Field(max_length=64)] | None = None
    progress: Annotated[str, Field(max_length=64)] | None = None
    eta: Annotated[str, Field(max_length=64)] | None = None


class PostTrainJobStatus(Spec):
    phase: Phase | None = None
    conditions: list[Condition] = Field(default_factory=list, max_length=MAX_LIST)
    progress: Progress | None = None
    summary: Summary | None = None
    job_set_name: Annotated[str, Field(max_length=253)] | None = None
    restarts: int = Field(0, ge=0)
    readmissions: int = Field(
        0,
        ge=0,
        description="Times Kueue evicted the job back to its queue (preemption, ...) to admit it "
        "again; counted apart from restarts.",
    )
    start_time: Annotated[str, Field(max_length=64)] | None = None
    completion_time: Annotated[str, Field(max_length=64)] | None = None
    observed_generation: int | None = None


class PostTrainJob(Spec):
    api_version: Literal["posttrain.dev/v1alpha1"] = Field(
        "posttrain.dev/v1alpha1", alias="apiVersion"
    )
    kind: Literal["PostTrainJob"] = "PostTrainJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: PostTrainJobSpec
    status: PostTrainJobStatus | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> PostTrainJob:
        return cls.model_validate(manifest)

    def to_manifest(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---------------------------------------------------------------------------------------------
# Display helpers (pure): what `kubectl get posttrainjobs` shows.


def display_model(base: str) -> str:
    """`hf://Qwen/Qwen2.5-1.5B-Instruct` -> `Qwen2.5-1.5B-Instruct`; paths -> last component."""
    return base.rstrip("/").rsplit("/", 1)[-1].removeprefix("builtin:")


def display_accelerator(resources: ResourcesSpec) -> str:
    """`tpu-v5e` 2x4 -> `tpu-v5e-8` (chips, like GKE's slice names); GPUs -> `nvidia-h100x16`."""
    a = resources.accelerator
    if acc.is_tpu(a):
        assert resources.topology is not None
        name = f"{a}-{acc.topology_chips(resources.topology)}"
        return name if resources.slices == 1 else f"{resources.slices}x{name}"
    if acc.is_gpu(a):
        return f"{a}x{resources.gpus * resources.nodes}"
    return a if resources.nodes == 1 else f"{a}x{resources.nodes}"


def display_progress(step: int, total: int) -> str:
    """The PROGRESS column: a percentage of the steps, rounded down (100% only at the end)."""
    return f"{100 * step // total if total else 0}%"


def display_eta(seconds: float) -> str:
    """The ETA column: `45s`, `12m`, `3h05m`, `2d04h`."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
