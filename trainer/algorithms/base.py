"""The plug-in interface between the one training loop and each algorithm.

An algorithm is a module in ``posttrain.trainer.algorithms`` that exposes ``build(ctx) -> Algorithm``
(see ``registry``). The loop owns everything shared: the model and its trainable/frozen split
(full, LoRA, QLoRA), the optimizer, gradient accumulation, clipping, checkpoints, metrics and
progress. An algorithm brings two things:

- ``loss(model, batch) -> (loss, metrics)``: traced inside the jitted step, once per micro-batch.
  ``batch`` holds this micro-batch's arrays (leading axis = rows). Log-probs come from the shared
  ``token_logprobs``; the maths after it should be a pure function of arrays (``sft_loss``,
  ``grpo_loss``) so it can be tested against numpy. The loop averages ``loss``, its gradients and
  ``metrics`` over the micro-batches of a step, so a micro-batch's loss must be its *mean over
  rows*; token-level normalisation over the whole batch goes into per-token weights the batch
  source computes (see ``sft.py``), which keeps gradient accumulation exactly equal to one big batch.
- ``source``: a ``BatchSource`` giving one global batch per optimizer step as host numpy arrays of
  fixed shape (same on every process; each process places the rows its devices own). Its
  ``state()`` goes into every checkpoint and ``restore(state)`` puts it back on resume, so the data
  order continues exactly. A source that wants several optimisation passes over one batch (GRPO's
  numIterations) simply returns the same batch for that many steps; it may call
  ``ctx.policy_logprobs`` / ``ctx.reference_logprobs`` (outside the gradient) while building it.

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

from posttrain.api.v1alpha1 import PostTrainJob
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


LossFn = Callable[[nnx.Module, Mapping[str, jax.Array]], tuple[jax.Array, Metrics]]


@dataclass
class Algorithm:
    """What an algorithm module's ``build(ctx)`` returns."""

    name: str
    loss: LossFn
    source: BatchSource
    eval_batches: Callable[[], Iterable[Batch]] | None = None
    finish: Callable[[CausalLM], dict[str, float]] | None = None


@dataclass
class Context:
    """What the loop hands an algorithm when building it.

    ``policy_logprobs(batch)`` and ``reference_logprobs(batch)`` run ``token_logprobs`` on the
    current policy and on the frozen reference (the initial weights; with LoRA the base model,
    adapters off) for a host batch with ``input_ids``, ``attention_mask`` and ``targets`` (and
    ``segment_ids`` if it has them); they
    return host float32 [B, T] arrays, outside any gradient. ``model()`` is the current policy as an
    NNX module (for sampling).
    """

    job: PostTrainJob
    tokenizer: Any
    output_dir: str
    process_index: int = 0
    process_count: int = 1
    model: Callable[[], CausalLM] = field(default=lambda: None)  # type: ignore[assignment]
    policy_logprobs: Callable[[Batch], np.ndarray] | None = None
    reference_logprobs: Callable[[Batch], np.ndarray] | None = None
    log: Callable[[str], None] = print

    @property
    def spec(self):
        return self.job.spec

    @property
    def rank0(self) -> bool:
        return self.process_index == 0


__all__ = [
    "Algorithm",
    "Batch",
    "BatchSource",
    "Context",
    "LossFn",
    "Metrics",
    "logprobs_from_logits",
    "token_logprobs",
]
