"""The jitted optimizer step: gradient accumulation over micro-batches, one update, metrics.

Pure JAX on pytrees: ``params`` (what trains: every Param, or only LoRA adapters), ``frozen``
(everything else, e.g. a quantized base), ``opt_state`` and a global ``batch`` of [B, ...] arrays
sharded over rows. Micro-batch m takes rows m, m + M, m + 2M, ... so every micro-batch spreads over
all devices (a plain reshape would put each micro-batch on a few devices). Gradients, loss and
metrics are averaged over micro-batches, so accumulation equals one big batch when the loss is a
mean over rows (see algorithms/base.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from posttrain.trainer.algorithms.base import LossFn

BATCH_AXES = ("data", "fsdp")  # the batch's rows shard over both data-parallel axes


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def _shard_reader(array: Any) -> Callable[[Any], Any]:
    """The ``data_callback`` of ``jax.make_array_from_callback`` for a host array: index -> slice.

    A function (not a lambda in the caller's loop) so each callback keeps its own ``array``.
    """

    def read(index: Any) -> Any:  # a tuple of slices, one per axis
        return array[index]

    return read


def device_batch(host: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host global batch on the mesh; each process copies only the rows its devices own."""
    out: dict[str, jax.Array] = {}
    for name, array in host.items():
        sharding = batch_sharding(mesh, array.ndim)
        out[name] = jax.make_array_from_callback(array.shape, sharding, _shard_reader(array))
    return out


def split_micro(batch: Mapping[str, jax.Array], num_micro: int) -> dict[str, jax.Array]:
    """[B, ...] -> [M, B / M, ...], micro-batch m = rows m, m + M, ... (strided)."""

    def split(x: jax.Array) -> jax.Array:
        B = x.shape[0]
        return x.reshape(B // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)

    return {k: split(v) for k, v in batch.items()}


def make_train_step(
    graphdef: nnx.GraphDef,
    loss: LossFn,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    *,
    num_micro: int,
) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
    """step(params, frozen, opt_state, batch, step) -> (params, opt_state, metrics); jit it once.

    ``step`` (an int32 scalar, 0 for the first update) only labels the learning rate in the metrics;
    the optimizer counts its own updates in ``opt_state``.
    """

    def loss_of(params, frozen, micro):
        return loss(nnx.merge(graphdef, params, frozen), micro)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def train_step(params, frozen, opt_state, batch, step):
        micro = split_micro(batch, num_micro)

        def accumulate(grads_sum, mb):
            (value, metrics), grads = grad_fn(params, frozen, mb)
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


def make_eval_step(graphdef: nnx.GraphDef, loss: LossFn) -> Callable[..., dict[str, jax.Array]]:
    def evaluate(params, frozen, batch):
        value, metrics = loss(nnx.merge(graphdef, params, frozen), batch)
        return {**metrics, "loss": value}

    return evaluate
