"""Multi-turn rollouts: ``spec.<grpo family>.environment`` (the user's environment class, tools,
the Python sandbox) and the reward sources served from elsewhere (``http``, ``rewardModel``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from posttrain.api.base import MAX_LIST, MAX_STR, FieldValueError, ModelRef, Spec

# "pkg.module:Name" or "/path/file.py:Name"
Ref = Annotated[str, Field(max_length=MAX_STR, pattern=r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$")]


class SandboxSpec(Spec):
    """The sandboxed Python tool (``python``): runs the model's code in a contained child process."""

    enabled: bool = Field(
        True, description="Offer the tool `python(code)` to the model (when the block is given)."
    )
    timeout_seconds: float = Field(5.0, gt=0, le=600, description="Wall-clock limit per call.")
    memory_mb: int = Field(1024, ge=16, le=65536, description="Address-space limit (RLIMIT_AS).")
    max_output_chars: int = Field(
        2000, ge=16, le=1_000_000, description="Longest observation the model gets back."
    )


class EnvironmentSpec(Spec):
    """A multi-turn rollout: the model's turn, the environment's observation (a tool result or a
    user reply), ... until the environment says done or maxTurns model turns."""

    class_: Ref = Field(
        alias="class",
        description=(
            'The environment: "pkg.module:Class" or "/path/file.py:Class", built from one data '
            "row (a dict) per episode; reset() -> the first user message; step(text) -> "
            "(observation or None, reward, done). The episode's reward is the sum of its "
            "turns' rewards (added to the rewards terms, logged as reward/environment)."
        ),
    )
    max_turns: int = Field(
        2, ge=1, le=64, description="Model turns per episode at most (the episode is then cut)."
    )
    max_observation_tokens: int | None = Field(
        None,
        ge=1,
        le=1_048_576,
        description=(
            "Room per turn for what follows a model turn (the chat template's framing, tool "
            "results, the user's reply): each episode's tokens after the prompt then fit in "
            "maxTurns x (maxNewTokens + maxObservationTokens). Unset: an episode has "
            "data.maxLength - data.maxPromptLength tokens after its prompt, shared by its turns "
            "and observations. An episode that runs out of room ends there (truncated)."
        ),
    )
    tools: list[Ref] = Field(
        default_factory=list,
        max_length=MAX_LIST,
        description=(
            'Functions the model may call: "pkg.module:fn" or "/path/file.py:fn", called by '
            "their function name with the call's arguments. A turn that makes tool calls "
            "(Qwen/Hermes <tool_call>, Llama 3.x JSON) gets their results as tool messages and "
            "is not passed to the environment's step."
        ),
    )
    sandbox: SandboxSpec | None = Field(
        None, description="Offer the sandboxed Python tool `python(code)` as well."
    )
    workers: int = Field(
        1, ge=1, le=256, description="Environment steps and tool calls run this many at once."
    )

    def room(self, max_new_tokens: int, max_length: int, max_prompt_length: int) -> int:
        """Tokens after the prompt in every row (turns, observations, padding)."""
        if self.max_observation_tokens is None:
            return max_length - max_prompt_length
        return self.max_turns * (max_new_tokens + self.max_observation_tokens)

    @model_validator(mode="after")
    def _distinct_tools(self) -> EnvironmentSpec:
        seen: dict[str, int] = {}
        if self.sandbox is not None and self.sandbox.enabled:
            seen["python"] = -1
        for i, ref in enumerate(self.tools):
            name = ref.rpartition(":")[2]
            if name in seen:
                other = "sandbox (the python tool)" if seen[name] < 0 else f"tools[{seen[name]}]"
                raise FieldValueError(
                    f"tools[{i}]", f"a tool named {name!r} is already given by {other}"
                )
            seen[name] = i
        return self


class HttpRewardSpec(Spec):
    """A reward served over HTTP: POST {"prompts", "completions", "columns"} -> {"rewards"}."""

    url: Annotated[str, Field(max_length=MAX_STR, pattern=r"^https?://.+")] = Field(
        description="Where to POST (http:// or https://)."
    )
    timeout: float = Field(60.0, gt=0, le=3600, description="Seconds per request.")
    max_concurrency: int = Field(4, ge=1, le=256, description="Requests in flight at most.")
    retries: int = Field(
        3, ge=0, le=20, description="Further attempts for connection errors, timeouts, 429, 5xx."
    )
    chunk_size: int = Field(64, ge=1, le=65536, description="Completions per request.")
    default: float | None = Field(
        None,
        description=(
            "Reward for completions whose request failed or whose reply broke the schema; "
            "unset: such a reply fails the step, naming the reward."
        ),
    )


class RewardModelSpec(Spec):
    """A Hugging Face *ForSequenceClassification reward model with one label, frozen, on the
    trainer's mesh in the job's compute dtype; it scores prompt + completion."""

    path: ModelRef = Field(description="Folder, gs://bucket/dir or hf://org/name.")
    batch_size: int = Field(16, ge=1, le=4096, description="Texts per forward pass.")
    max_length: int = Field(
        2048, ge=8, le=1_048_576, description="Tokens kept per text (the end is kept)."
    )
