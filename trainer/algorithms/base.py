"""The plug-in interface between the one training loop (and ``posttrain plan``) and an algorithm.

An algorithm is its settings (``posttrain/api/settings/<name>.py``), a module here and one
registry line (``posttrain/api/algorithms.py``). The module has two functions:

- ``declare(spec, configs) -> Declaration``: what it needs, as data, before anything is built:
  its ``loss`` (a pure function of the models and a micro-batch), the step's batch ``columns``
  (name -> (shape, dtype) of the global batch its source writes), ``heads`` (trainable modules
  it owns: PPO's critic, distillation's projection, built by a ``HeadBuilder`` so ``plan`` can
  build them abstractly), ``reference`` (a frozen initial policy; with LoRA the base with
  adapters off, no copy), ``teacher`` (a second frozen model), ``learning_rates`` per head and
  the ``rollout`` it samples. ``trainer/setup.py`` reads it to build the run, for real or under
  ``eval_shape`` for ``plan``; nothing reads an algorithm's name.
- ``build(ctx) -> Algorithm``: the run-time parts that need data: the batch ``source``, optional
  ``eval_batches`` and a ``finish`` report. ``ctx.weights`` is a typed handle on the live train
  state (``policy()``, ``forward(fn)``), for sampling and no-gradient passes.

The loss: ``loss(models, batch) -> (loss, metrics)`` is traced inside the jitted step once per
micro-batch. ``models`` (``Models``) holds the policy, the heads and the frozen models merged from
the step's pytrees; ``batch`` holds this micro-batch's arrays (leading axis = rows). One forward
(``models.policy(..., return_hidden=True)`` when a head needs hidden states), then the maths is a
pure function of arrays (``sft_loss``, ``grpo_loss``, ...) tested against numpy. The loop averages
``loss``, its gradients and ``metrics`` over the micro-batches of a step, so a micro-batch's loss
must be its *mean over rows*; token-level normalisation over the whole batch goes into per-token
weights the batch source computes (see ``sft.py``), which keeps gradient accumulation exactly
equal to one big batch. A row may hold a group (DPO's [B, 2, T] pairs), so what must stay
together is never split across micro-batches.

The source: a ``BatchSource`` gives one global batch per optimizer step as host numpy arrays with
the declared columns (same keys and dtypes every step; each dimension at most the declared one,
which is the job's worst case that ``plan`` compiles), plus ``metric/...`` columns of one float32
per row that the loss averages into metrics. Its ``state()`` goes into every checkpoint and
``restore(state)`` puts it back on resume, so the data order continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posttrain.api.v1alpha1 import ModelSpec, PostTrainJob
from posttrain.trainer.models.logprobs import chunked_logprobs
from posttrain.trainer.models.shared_prefix import rollout_hidden

if TYPE_CHECKING:
    from posttrain.trainer.models import CausalLM

Batch = Mapping[str, np.ndarray]  # host arrays, leading axis = rows of the global batch
Metrics = dict[str, jax.Array]


def token_logprobs(
    model: nnx.Module,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    targets: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    temperature: float = 1.0,
    completion_width: int | None = None,
    prompt_group: int = 1,
) -> jax.Array:
    """log p(targets[b, t] | input_ids[b, :t+1]) as float32 [B, T]: the one log-prob function.

    ``targets`` is usually ``input_ids`` shifted left by one (the next token); positions whose
    target does not matter are masked by the caller. ``segment_ids`` (packed rows, see the model)
    restrict the context to the token's own example. Computed as ``logit[target] - logsumexp``
    over chunks of tokens from the final hidden states (``models/logprobs.py``), so no [B, T, V]
    float32 logits array is materialised for large batches or vocabularies. With
    ``completion_width`` (rollout rows) only the positions that predict the row's last that many
    tokens run the LM head; the others are 0 (``logprobs.scored_window``). ``prompt_group``
    (rollout rows in runs of that many completions of one prompt, no ``segment_ids``): each
    run's prompt runs through the model once (``models/shared_prefix.py``).
    """
    if prompt_group > 1 and segment_ids is None:
        hidden = rollout_hidden(
            model,
            input_ids,
            attention_mask,
            completion_width=completion_width,
            prompt_group=prompt_group,
        )
    else:
        hidden, _ = model.hidden_states(input_ids, attention_mask, segment_ids=segment_ids)  # type: ignore[attr-defined]
    return chunked_logprobs(
        hidden,
        model.logits,  # type: ignore[attr-defined]
        targets,
        temperature=temperature,
        completion_width=completion_width,
    )


def logprobs_from_logits(
    logits_btv: jax.Array, targets: jax.Array, *, temperature: float = 1.0
) -> jax.Array:
    """``token_logprobs`` from logits already computed ([B, T, V]), e.g. to share one forward."""
    logits_btv = logits_btv.astype(jnp.float32)
    if temperature != 1.0:
        logits_btv = logits_btv / temperature
    picked_bt = jnp.take_along_axis(logits_btv, targets[..., None].astype(jnp.int32), axis=-1)[
        ..., 0
    ]
    return picked_bt - jax.nn.logsumexp(logits_btv, axis=-1)


@runtime_checkable
class BatchSource(Protocol):
    def next_batch(self, step: int) -> Batch:
        """The global batch for optimizer step ``step`` (0-based); fixed shapes every call."""
        ...

    def state(self) -> dict[str, Any]:
        """JSON-serialisable position, saved in each checkpoint."""
        ...

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a saved ``state()``."""
        ...


@dataclass(frozen=True)
class Models:
    """What the loss sees: NNX modules merged from the step's pytrees (inside the trace).

    ``policy`` trains (all of it, or its LoRA adapters); ``heads`` are the algorithm's own
    trainable modules by name; ``reference`` (the initial policy) and ``teacher`` are frozen and
    present only when the algorithm declared them.
    """

    policy: CausalLM
    heads: Mapping[str, nnx.Module] = field(default_factory=dict)
    reference: CausalLM | None = None
    teacher: CausalLM | None = None


LossFn = Callable[[Models, Mapping[str, jax.Array]], tuple[jax.Array, Metrics]]
ForwardFn = Callable[[Models, Mapping[str, jax.Array]], Any]  # -> a pytree of arrays


Column = tuple[tuple[int, ...], Any]  # (shape, dtype) of a global batch column


@dataclass(frozen=True)
class RolloutShape:
    """What an RL algorithm samples per rollout batch: rows of ``prompt_len`` prompt tokens."""

    rows: int
    prompt_len: int
    sampling: Any  # rollout.SamplingSettings


@dataclass(frozen=True)
class HeadBuilder:
    """What an algorithm's ``heads`` get: the policy's config, seeded rngs, and ``model(spec)``,
    which builds a model as the run does (loaded weights for real, abstract for ``plan``)."""

    config: Any  # ModelConfig of the policy
    rngs: nnx.Rngs
    model: Callable[[ModelSpec], Any]


@dataclass(frozen=True)
class ModelConfigs:
    """The policy's ModelConfig, and ``of(ref)`` for another model's (a teacher's), read from
    config.json (or the built-in size) before any weights load."""

    policy: Any
    of: Callable[[str], Any]


@dataclass(frozen=True)
class Declaration:
    """What an algorithm needs, declared before anything is built (see the module docstring)."""

    loss: LossFn
    columns: Mapping[str, Column]
    heads: Callable[[HeadBuilder], Mapping[str, nnx.Module]] | None = None
    reference: bool = False
    teacher: ModelSpec | None = None
    learning_rates: Mapping[str, float] = field(default_factory=dict)
    rollout: RolloutShape | None = None
    sequences_per_row: int = 1  # DPO's pairs: 2 sequences of columns' last axis per row
    # Optimizer updates [start, end) that leave the policy's parameters alone while the heads
    # train (PPO's critic warm-up; ``loop_optim.idle_between``).
    policy_idle_steps: tuple[int, int] | None = None


@dataclass
class Algorithm:
    """What an algorithm module's ``build(ctx)`` returns: the parts that need data."""

    source: BatchSource
    eval_batches: Callable[[], Iterable[Batch]] | None = None
    finish: Callable[[CausalLM], dict[str, float]] | None = None
    # Held-out metrics that are not a loss (RL's greedy reward on data.eval), every
    # training.evalEverySteps steps: name -> value, logged as they are.
    evaluate: Callable[[], dict[str, float]] | None = None


class Weights(Protocol):
    """The live train state, as algorithms may read it (``trainer/setup.py``'s ``LiveWeights``)."""

    def policy(self) -> CausalLM:
        """The current policy as an NNX module (for sampling)."""
        ...

    def forward(self, fn: ForwardFn) -> Callable[[Batch], Any]:
        """``fn(models, batch)`` jitted once, run on the current weights outside any gradient;
        returns host numpy arrays (the whole batch on every process)."""
        ...


@dataclass
class Context:
    """What ``build`` gets: the job, the tokenizer, where outputs go, the policy's config, the
    handle on the live weights and a logger (rank 0 only). ``policy_logprobs(batch)`` and
    ``reference_logprobs(batch)`` run ``token_logprobs`` on a batch with ``input_ids``,
    ``attention_mask`` and ``targets`` (and ``segment_ids`` if it has them) at ``temperature``."""

    job: PostTrainJob
    tokenizer: Any
    output_dir: str
    config: Any = None  # ModelConfig of the policy
    weights: Weights | None = None
    process_index: int = 0
    process_count: int = 1
    log: Callable[[str], None] = print
    # Rows of one training micro-batch: no-gradient passes (old and reference log-probs, PPO's
    # values) run this many rows at a time, so none holds more activations than a training one.
    micro_rows: int | None = None

    @property
    def spec(self):
        return self.job.spec

    @property
    def rank0(self) -> bool:
        return self.process_index == 0

    def model(self) -> CausalLM:
        return self._weights().policy()

    def forward(self, fn: ForwardFn) -> Callable[[Batch], Any]:
        """``fn`` on the live weights outside the gradient, ``micro_rows`` rows at a time."""
        whole = self._weights().forward(fn)
        return lambda batch: in_micro_batches(whole, batch, self.micro_rows)

    def _weights(self) -> Weights:
        if self.weights is None:
            raise RuntimeError("this Context has no weights (a test's, or plan's)")
        return self.weights

    def policy_logprobs(
        self,
        batch: Batch,
        temperature: float = 1.0,
        completion_width: int | None = None,
        prompt_group: int = 1,
    ) -> np.ndarray:
        return self._logprobs(batch, temperature, completion_width, prompt_group, reference=False)

    def reference_logprobs(
        self,
        batch: Batch,
        temperature: float = 1.0,
        completion_width: int | None = None,
        prompt_group: int = 1,
    ) -> np.ndarray:
        return self._logprobs(batch, temperature, completion_width, prompt_group, reference=True)

    def pass_prompt_group(self, rows: int, group: int) -> int:
        """``group`` if the no-gradient passes' chunks of ``micro_rows`` rows hold whole runs of
        ``group`` rows of a ``rows``-row batch (``in_micro_batches`` pads a short last chunk with
        copies of one row, which would break a run), else 1."""
        chunk = rows if self.micro_rows is None else min(self.micro_rows, rows)
        return group if group > 1 and chunk % group == 0 and rows % chunk == 0 else 1

    def _logprobs(
        self,
        batch: Batch,
        temperature: float,
        completion_width: int | None,
        prompt_group: int,
        *,
        reference: bool,
    ) -> np.ndarray:
        rows = len(batch["input_ids"])
        group = self.pass_prompt_group(rows, prompt_group)
        key = (temperature, completion_width, group, reference)
        cache = self.__dict__.setdefault("_logprob_fns", {})
        if key not in cache:
            cache[key] = self.forward(_logprob_fn(temperature, completion_width, group, reference))
        keys = ("input_ids", "attention_mask", "targets", "segment_ids")
        return np.asarray(cache[key]({k: batch[k] for k in keys if k in batch}), np.float32)


def in_micro_batches(call: Callable[[Batch], Any], batch: Batch, rows: int | None) -> Any:
    """``call(batch)`` (host arrays in, a pytree of host arrays with leading axis = rows out) run
    ``rows`` rows at a time and concatenated. A short last chunk is padded with copies of its last
    row (dropped again), so every call has one shape and compiles once."""
    total = len(next(iter(batch.values())))
    if rows is None or rows >= total:
        return call(batch)
    parts = []
    for start in range(0, total, rows):
        end = min(start + rows, total)
        take = np.minimum(np.arange(start, start + rows), end - 1)
        out = call({k: np.asarray(v)[take] for k, v in batch.items()})
        parts.append(jax.tree.map(lambda x, n=end - start: np.asarray(x)[:n], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def _logprob_fn(
    temperature: float, completion_width: int | None, prompt_group: int, reference: bool
) -> ForwardFn:
    def fn(models: Models, b: Mapping[str, jax.Array]) -> jax.Array:
        model = models.reference if reference else models.policy
        if model is None:
            raise ValueError("reference log-probs need an algorithm that declares reference=True")
        return token_logprobs(
            model,
            b["input_ids"],
            b["attention_mask"],
            b["targets"],
            segment_ids=b.get("segment_ids"),
            temperature=temperature,
            completion_width=completion_width,
            prompt_group=prompt_group,
        )

    fn.__name__ = "reference_logprobs" if reference else "policy_logprobs"
    return fn


__all__ = [
    "Algorithm",
    "Column",
    "Declaration",
    "HeadBuilder",
    "ModelConfigs",
    "RolloutShape",
    "Weights",
    "Batch",
    "BatchSource",
    "Context",
    "ForwardFn",
    "LossFn",
    "Metrics",
    "Models",
    "in_micro_batches",
    "logprobs_from_logits",
    "token_logprobs",
]
