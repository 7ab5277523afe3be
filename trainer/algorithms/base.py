"""The plug-in interface between the one training loop and each algorithm.

An algorithm is a module in ``posttrain.trainer.algorithms`` that exposes ``build(ctx) -> Algorithm``
(see ``registry``). The loop owns everything shared: the model and its trainable/frozen split
(full, LoRA, QLoRA), the optimizer, gradient accumulation, clipping, checkpoints, metrics and
progress. ``build`` runs *before* the split, so the ``Algorithm`` it returns can declare:

- ``heads``: trainable modules the algorithm owns (PPO's value head, distillation's projection),
  built on ``ctx.config`` with ``ctx.rngs``. They train in every mode (also under LoRA/QLoRA), are
  checkpointed with the policy, and are not exported.
- ``reference``: keep a frozen copy of the initial policy (with LoRA: the base with adapters off,
  no copy of the weights). ``teacher``: a second frozen model, loaded like ``spec.model.base``.
  Nothing is kept unless declared, so e.g. GRPO with beta 0 or ORPO holds no reference.
- ``learning_rates``: a peak learning rate per head (e.g. the critic's), with the run's schedule.

and brings:

- ``loss(models, batch) -> (loss, metrics)``: traced inside the jitted step, once per micro-batch.
  ``models`` (``Models``) holds the policy, the heads and the frozen models as NNX modules merged
  from the step's pytrees; ``batch`` holds this micro-batch's arrays (leading axis = rows). One
  forward (``models.policy(..., return_hidden=True)`` when a head needs the hidden states), then
  the maths is a pure function of arrays (``sft_loss``, ``grpo_loss``, ...) tested against numpy.
  The loop averages ``loss``, its gradients and ``metrics`` over the micro-batches of a step, so a
  micro-batch's loss must be its *mean over rows*; token-level normalisation over the whole batch
  goes into per-token weights the batch source computes (see ``sft.py``), which keeps gradient
  accumulation exactly equal to one big batch. A row may hold a group (DPO's [B, 2, T] pairs), so
  what must stay together is never split across micro-batches.
- ``source``: a ``BatchSource`` giving one global batch per optimizer step as host numpy arrays of
  fixed shape (same on every process; each process places the rows its devices own). Its
  ``state()`` goes into every checkpoint and ``restore(state)`` puts it back on resume, so the data
  order continues exactly. A source that wants several optimisation passes over one batch (GRPO's
  numIterations) simply returns the same batch for that many steps. While building a batch it may
  run any forward on the current weights outside the gradient with ``ctx.forward(fn)(batch)``
  (old/reference log-probs, PPO's values), or the shortcuts ``ctx.policy_logprobs`` /
  ``ctx.reference_logprobs``.

Optional: ``eval_batches()`` (held-out batches for ``loss``, averaged and logged as ``eval_*``) and
``finish(model) -> metrics`` (a final report, e.g. task accuracy; printed and logged).
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
) -> jax.Array:
    """log p(targets[b, t] | input_ids[b, :t+1]) as float32 [B, T]: the one log-prob function.

    ``targets`` is usually ``input_ids`` shifted left by one (the next token); positions whose
    target does not matter are masked by the caller. ``segment_ids`` (packed rows, see the model)
    restrict the context to the token's own example. Computed as ``logit[target] - logsumexp``
    over chunks of tokens from the final hidden states (``models/logprobs.py``), so no [B, T, V]
    float32 logits array is materialised for large batches or vocabularies.
    """
    hidden, _ = model.hidden_states(input_ids, attention_mask, segment_ids=segment_ids)  # type: ignore[attr-defined]
    return chunked_logprobs(hidden, model.logits, targets, temperature=temperature)  # type: ignore[attr-defined]


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


@dataclass
class Algorithm:
    """What an algorithm module's ``build(ctx)`` returns (see the module docstring)."""

    name: str
    loss: LossFn
    source: BatchSource
    eval_batches: Callable[[], Iterable[Batch]] | None = None
    finish: Callable[[CausalLM], dict[str, float]] | None = None
    heads: Mapping[str, nnx.Module] = field(default_factory=dict)
    reference: bool = False
    teacher: ModelSpec | None = None
    learning_rates: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.learning_rates) - set(self.heads)
        if unknown:
            raise ValueError(f"learning_rates for unknown heads {sorted(unknown)}")


@dataclass
class Context:
    """What the loop hands an algorithm when building it.

    ``config`` is the policy's model config and ``rngs`` a seeded source for the algorithm's
    heads. The hooks below may be called only after ``build`` returned (the loop wires them to the
    live weights): ``forward(fn)`` jit-compiles ``fn(models, batch)`` once and returns a function
    of a host batch that runs it on the current weights outside any gradient and returns host
    numpy arrays (the whole batch on every process). ``policy_logprobs(batch)`` and
    ``reference_logprobs(batch)`` are that for ``token_logprobs`` of a batch with ``input_ids``,
    ``attention_mask`` and ``targets`` (and ``segment_ids`` if it has them) at ``temperature``;
    ``model()`` is the current policy as an NNX module (for sampling).
    """

    job: PostTrainJob
    tokenizer: Any
    output_dir: str
    config: Any = None  # ModelConfig of the policy
    rngs: nnx.Rngs = field(default_factory=lambda: nnx.Rngs(0))
    process_index: int = 0
    process_count: int = 1
    model: Callable[[], CausalLM] = field(default=lambda: None)  # type: ignore[assignment]
    forward: Callable[[ForwardFn], Callable[[Batch], Any]] | None = None
    log: Callable[[str], None] = print

    @property
    def spec(self):
        return self.job.spec

    @property
    def rank0(self) -> bool:
        return self.process_index == 0

    def policy_logprobs(self, batch: Batch, temperature: float = 1.0) -> np.ndarray:
        return self._logprobs(batch, temperature, reference=False)

    def reference_logprobs(self, batch: Batch, temperature: float = 1.0) -> np.ndarray:
        return self._logprobs(batch, temperature, reference=True)

    def _logprobs(self, batch: Batch, temperature: float, *, reference: bool) -> np.ndarray:
        if self.forward is None:
            raise RuntimeError("the loop has not wired ctx.forward yet (call it after build)")
        key = (temperature, reference)
        cache = self.__dict__.setdefault("_logprob_fns", {})
        if key not in cache:
            cache[key] = self.forward(_logprob_fn(temperature, reference))
        keys = ("input_ids", "attention_mask", "targets", "segment_ids")
        return np.asarray(cache[key]({k: batch[k] for k in keys if k in batch}), np.float32)


def _logprob_fn(temperature: float, reference: bool) -> ForwardFn:
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
        )

    return fn


__all__ = [
    "Algorithm",
    "Batch",
    "BatchSource",
    "Context",
    "ForwardFn",
    "LossFn",
    "Metrics",
    "Models",
    "logprobs_from_logits",
    "token_logprobs",
]
