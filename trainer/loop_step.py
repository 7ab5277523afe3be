"""The jitted optimizer step: gradient accumulation over micro-batches, one update, metrics.

Pure JAX on pytrees: ``params`` (what trains: every Param, or only LoRA adapters, plus the
algorithm's heads), ``frozen`` (everything else, e.g. a quantized base), ``extras`` (frozen models
the algorithm declared: reference, teacher), ``opt_state`` and a global ``batch`` of [B, ...]
arrays sharded over rows. A ``view(params, frozen, extras) -> Models`` turns the pytrees into the
modules the loss sees; gradients flow to ``params`` only. Micro-batch m takes rows m, m + M, m + 2M, ... so every micro-batch spreads over
all devices (a plain reshape would put each micro-batch on a few devices). Gradients, loss and
metrics are averaged over micro-batches, so accumulation equals one big batch when the loss is a
mean over rows (see algorithms/base.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from posttrain.trainer.algorithms.base import LossFn, Models
from posttrain.trainer.placement import BATCH_AXES, batch_sharding, device_batch  # noqa: F401


def split_micro(batch: Mapping[str, jax.Array], num_micro: int) -> dict[str, jax.Array]:
    """[B, ...] -> [M, B / M, ...], micro-batch m = rows m, m + M, ... (strided)."""

    def split(x: jax.Array) -> jax.Array:
        B = x.shape[0]
        return x.reshape(B // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)

    return {k: split(v) for k, v in batch.items()}


def contiguous_micro_order(rows: int, num_micro: int) -> np.ndarray:
    """The row order under which ``split_micro``'s micro-batch m holds the m-th contiguous block
    of ``rows / num_micro`` rows (``order[j M + m] = m rows / M + j``): whole runs of rows (GRPO's
    groups) stay together while each micro-batch still spreads over every device."""
    per = rows // num_micro
    return np.arange(rows).reshape(num_micro, per).T.reshape(-1)


View = Callable[[Any, Any, Any], Models]  # (params, frozen, extras) -> Models


class Trainee(nnx.Module):
    """The root the loop splits: the policy and the algorithm's heads (paths ``policy/...`` and
    ``heads/<name>/...``), so one trainable filter, one optimizer and one checkpoint cover both."""

    def __init__(self, policy: nnx.Module, heads: Mapping[str, nnx.Module]):
        self.policy = policy
        self.heads = nnx.Dict(dict(heads))


def trainee_view(graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef | None = None) -> View:
    """The view of a split ``Trainee``. ``extras`` may hold ``reference`` (the ``policy`` part of
    the params, e.g. zeroed adapters: the base) and ``teacher`` (the full state of its own graph)."""

    def view(params: Any, frozen: Any, extras: Any) -> Models:
        extras = extras or {}
        trainee = nnx.merge(graphdef, params, frozen)
        reference = teacher = None
        if "reference" in extras:
            # The heads' leaves only complete the graph: the reference is the policy alone.
            ref_params = nnx.State({**dict(params.items()), "policy": extras["reference"]})
            reference = nnx.merge(graphdef, ref_params, frozen).policy
        if "teacher" in extras:
            assert teacher_graphdef is not None, "a teacher state needs the teacher's graphdef"
            teacher = nnx.merge(teacher_graphdef, extras["teacher"])
        return Models(
            policy=trainee.policy, heads=dict(trainee.heads), reference=reference, teacher=teacher
        )

    return view


def policy_view(graphdef: nnx.GraphDef) -> View:
    """The view of a bare policy split into (params, frozen): no heads, no frozen models."""

    def view(params: Any, frozen: Any, extras: Any) -> Models:  # noqa: ARG001
        return Models(policy=nnx.merge(graphdef, params, frozen))

    return view


def make_train_step(
    view: View,
    loss: LossFn,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    *,
    num_micro: int,
) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
    """step(params, frozen, opt_state, batch, step, extras=None) -> (params, opt_state, metrics).

    Jit it once. ``step`` (an int32 scalar, 0 for the first update) only labels the learning rate
    in the metrics; the optimizer counts its own updates in ``opt_state``. Gradients are summed in
    the dtype of ``params`` (float32 master weights), then averaged over micro-batches.
    """

    def loss_of(params, frozen, extras, micro):
        return loss(view(params, frozen, extras), micro)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def train_step(params, frozen, opt_state, batch, step, extras=None):
        micro = split_micro(batch, num_micro)

        def accumulate(grads_sum, mb):
            (value, metrics), grads = grad_fn(params, frozen, extras, mb)
            grads_sum = jax.tree.map(lambda s, g: s + g.astype(s.dtype), grads_sum, grads)
            return grads_sum, (value, metrics)

        # Accumulate in float32 whatever the params' dtype; the update gets the params' dtype.
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
        grads, (values, metrics) = jax.lax.scan(accumulate, zeros, micro)
        grads = jax.tree.map(lambda g, p: (g / num_micro).astype(p.dtype), grads, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        out = {k: jnp.mean(v) for k, v in metrics.items()}
        out["loss"] = jnp.mean(values)
        out["grad_norm"] = optax.tree.norm(grads)
        out["learning_rate"] = jnp.asarray(lr_schedule(step), jnp.float32)
        return params, opt_state, out

    return train_step


def make_eval_step(view: View, loss: LossFn) -> Callable[..., dict[str, jax.Array]]:
    def evaluate(params, frozen, batch, extras=None):
        value, metrics = loss(view(params, frozen, extras), batch)
        return {**metrics, "loss": value}

    return evaluate
