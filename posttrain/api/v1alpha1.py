"""PostTrainJob, group posttrain.dev, version v1alpha1: the one source of truth for the API.

The CRD's OpenAPI schema is generated from these models (`posttrain crd`), the operator
validates with them and the trainer parses its recipe with them. YAML uses camelCase; Python
uses snake_case. Unknown fields are errors. Defaults live here, each one documented.
This module imports neither JAX nor kopf.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from posttrain.api import accelerators as acc
from posttrain.api.algorithms import ALGORITHMS, REGISTRY
from posttrain.api.base import MAX_LIST, MAX_STR, FieldValueError, ModelRef, Spec, Str
from posttrain.api.settings.rl import RolloutCorrectionSpec, RolloutSpec

GROUP = "posttrain.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "PostTrainJob"
PLURAL = "posttrainjobs"

# spec.algorithm: the registered names (posttrain/api/algorithms.py), an enum in the schema.
if TYPE_CHECKING:
    Algorithm = str
else:
    Algorithm = Literal[ALGORITHMS]


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
    scan_layers: bool = Field(
        False,
        description="Run the decoder layers of the training step as one lax.scan over their "
        "stacked weights: XLA compiles one layer instead of all of them (faster compiles), and "
        "remat acts inside the scan. Use it with remat: without remat the scanned step kept more "
        "temporaries than the unrolled one in XLA's memory analysis (docs/performance.md). "
        "Checkpoints and LoRA/QLoRA are the same either way. Generation, and forwards that read "
        "per-layer attention maps or hidden states (distillation), run the layers unrolled.",
    )

    attention: Literal["auto", "xla", "cudnn", "splash", "grouped", "reference"] = Field(
        "auto",
        description="Attention kernel of the training and scoring forwards. auto: Pallas splash "
        "attention on TPUs (per shard on multi-chip meshes) where the sequence length is a "
        "multiple of 128, cuDNN's fused kernel on GPUs for bf16/fp16, grouped_attention on CPUs, "
        "else XLA's. splash forces splash where it can run (on a CPU in Pallas interpret mode, "
        "for tests; never on a GPU), else as auto; reference is the plain-XLA maths. "
        "Generation's cached attention is the same whatever this says.",
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

    @property
    def hosts(self) -> int:
        """Pods (JAX processes) these resources make: TPU hosts over every slice, else nodes."""
        if acc.is_tpu(self.accelerator):
            assert self.topology is not None
            shape = acc.tpu_slice_shape(self.accelerator, self.topology, self.chips_per_host)
            return shape.hosts * self.slices
        return self.nodes


class RolloutRoleSpec(Spec):
    """Where an RL job's rollouts run. sync: on the trainer's devices, taking turns with training.
    async: on rollout workers of their own (a role of the same JobSet, admitted with the trainer as
    one Kueue Workload) that sample all the time with the newest weights they hold; the trainer
    trains on their trajectories at most maxPolicyLag policy versions old."""

    mode: Literal["sync", "async"] = Field(
        "sync",
        description="sync: generation and training take turns on the same devices (the default). "
        "async: rollout workers generate while the trainer trains.",
    )
    max_policy_lag: int | None = Field(
        None,
        ge=0,
        le=64,
        description="How many policy versions (optimizer steps) a trajectory may trail the "
        "weights it is first trained on; 0 waits for every update. Default 1. With mode async "
        "only; rollout correction (TIS) is on by default when it is above 0.",
    )
    replicas: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Rollout workers, each one host (pod). Default 1. With mode async only.",
    )
    resources: ResourcesSpec | None = Field(
        None,
        description="Each rollout worker's accelerator and topology (one host); default: the same "
        "as spec.resources. With mode async only.",
    )

    @model_validator(mode="after")
    def _async_fields_need_async(self) -> RolloutRoleSpec:
        if self.mode == "sync":
            for name, field in (
                ("max_policy_lag", "maxPolicyLag"),
                ("replicas", "replicas"),
                ("resources", "resources"),
            ):
                if getattr(self, name) is not None:
                    raise FieldValueError(
                        field,
                        f"{field} is read with mode: async; with mode sync the rollouts run on "
                        "the trainer's devices between its steps",
                    )
        if self.resources is not None and self.resources.hosts != 1:
            raise FieldValueError(
                "resources",
                f"a rollout worker is one host, these resources make {self.resources.hosts}; "
                "choose a single-host shape and add workers with replicas",
            )
        return self

    @property
    def is_async(self) -> bool:
        return self.mode == "async"

    @property
    def lag(self) -> int:
        """The policy lag allowed: 0 in sync mode, maxPolicyLag (default 1) in async."""
        if not self.is_async:
            return 0
        return 1 if self.max_policy_lag is None else self.max_policy_lag

    @property
    def workers(self) -> int:
        return (self.replicas or 1) if self.is_async else 0


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


class JobSpecBase(Spec):
    """The job spec's fields every algorithm has; ``PostTrainJobSpec`` adds one optional block per
    registered algorithm (``spec.<block>``, see ``posttrain/api/algorithms.py``)."""

    algorithm: Algorithm = Field(description="Which post-training algorithm runs.")
    model: ModelSpec = Field(
        description="The model to train: base weights, tokenizer, dtype, LoRA, QLoRA."
    )
    data: DataSpec = Field(description="Training and evaluation data and how it becomes sequences.")
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
    rollout: RolloutRoleSpec | None = Field(
        None,
        description="RL algorithms: sync rollouts on the trainer's devices (default), or async "
        "rollout workers of their own (mode, maxPolicyLag, replicas, resources).",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_blocks(cls, data: Any) -> Any:
        """Before v0.2 dapo, dr-grpo and gspo-token read spec.grpo, whose defaults were filled
        late per algorithm. Each now has its own block with its own defaults: say what to write."""
        if not isinstance(data, dict) or "grpo" not in data:
            return data
        algorithm = data.get("algorithm")
        if algorithm in REGISTRY and algorithm != "grpo":
            block = REGISTRY[algorithm].block
            raise FieldValueError(
                "grpo",
                f"algorithm {algorithm} reads spec.{block}, with {algorithm}'s own defaults; "
                f"rename the block `grpo:` to `{block}:` (its fields are the same)",
            )
        return data

    @model_validator(mode="after")
    def _blocks_match_algorithm(self) -> JobSpecBase:
        wanted = REGISTRY[self.algorithm]
        stray = sorted(
            e.block for e in REGISTRY.values() if e is not wanted and getattr(self, e.field, None)
        )
        if stray:
            raise FieldValueError(
                stray[0],
                f"{', '.join(stray)} given but algorithm is {self.algorithm}, which reads only "
                f"spec.{wanted.block}",
            )
        if wanted.required and getattr(self, wanted.field) is None:
            raise FieldValueError(
                wanted.block, f"algorithm {self.algorithm} needs spec.{wanted.block}"
            )
        return self

    @model_validator(mode="after")
    def _rollout_role_fits(self) -> JobSpecBase:
        """spec.rollout only for algorithms with rollouts; async only where it is built; with a
        lag above 0, rollout correction (TIS, verl's default for async) unless the block sets it."""
        if self.rollout is None:
            return self
        settings = self.settings
        if not isinstance(settings, RolloutSpec):
            rl = sorted(e.name for e in REGISTRY.values() if issubclass(e.settings, RolloutSpec))
            raise FieldValueError(
                "rollout",
                f"spec.rollout is for the algorithms with rollouts ({', '.join(rl)}); "
                f"{self.algorithm} has none",
            )
        if not self.rollout.is_async:
            return self
        block = f"spec.{REGISTRY[self.algorithm].block}"
        if getattr(settings, "dynamic_sampling", False):
            raise FieldValueError(
                "rollout.mode",
                f"async rollouts are not built with dynamic sampling yet (its rounds depend on "
                f"the rewards of the ones before); set {block}.dynamicSampling: false, or mode: sync",
            )
        if getattr(settings, "environment", None) is not None:
            raise FieldValueError(
                "rollout.mode",
                f"async rollouts are not built for multi-turn episodes ({block}.environment) "
                "yet; use mode: sync",
            )
        if self.resources.hosts != 1:
            raise FieldValueError(
                "rollout.mode",
                f"an async job's trainer is one host for now; spec.resources makes "
                f"{self.resources.hosts}: choose a single-host shape, or mode: sync",
            )
        if self.rollout.lag > 0 and "rollout_correction" not in settings.model_fields_set:
            corrected = settings.model_copy(
                update={"rollout_correction": RolloutCorrectionSpec(importance_sampling="token")}
            )
            object.__setattr__(self, REGISTRY[self.algorithm].field, corrected)
        return self

    @property
    def rollout_role(self) -> RolloutRoleSpec:
        """``spec.rollout``, or sync's defaults when absent."""
        return self.rollout or RolloutRoleSpec()

    @property
    def settings(self) -> Spec:
        """The chosen algorithm's settings: its block, or its defaults when the block is optional
        and absent."""
        entry = REGISTRY[self.algorithm]
        value = getattr(self, entry.field)
        return entry.settings() if value is None else value

    @property
    def block(self) -> Spec:
        """The same as ``settings`` (the name older callers use)."""
        return self.settings


def _job_spec_type() -> type[JobSpecBase]:
    blocks: dict[str, Any] = {
        e.field: (
            e.settings | None,
            Field(
                None,
                description=f"{e.summary} (spec.algorithm {e.name}); "
                + ("required by it." if e.required else "optional, defaults apply."),
            ),
        )
        for e in REGISTRY.values()
    }
    model = create_model("PostTrainJobSpec", __base__=JobSpecBase, **blocks)
    model.__doc__ = "What a PostTrainJob runs: the algorithm, its block, model, data, training."
    return model


if TYPE_CHECKING:
    PostTrainJobSpec = JobSpecBase
else:
    PostTrainJobSpec = _job_spec_type()


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


class RolloutStatus(Spec):
    """An async RL job's rollout role as the trainer last reported it (`kubectl get` columns)."""

    policy_version: int | None = Field(
        None, ge=0, description="The newest policy version (optimizer step) the trainer published."
    )
    staleness_mean: float | None = Field(
        None,
        ge=0,
        description="Mean policy versions the trajectories trained on trailed the weights, so far.",
    )
    weight_sync_seconds: float | None = Field(
        None, ge=0, description="Seconds the last weight transfer to a rollout worker took."
    )
    tokens_per_second: float | None = Field(
        None, ge=0, description="Completion tokens the rollout workers generated per second."
    )
    workers: int | None = Field(
        None, ge=0, description="Rollout workers that reported in the last minute."
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
    rollout: RolloutStatus | None = None
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
