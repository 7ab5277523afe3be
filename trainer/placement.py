"""The one place that puts arrays on the mesh: model variables by their logical axes, batches by
rows over the data-parallel axes, stray single-device leaves replicated, results gathered back.

The trainer and ``posttrain plan`` both use it, so the shardings plan compiles with are the ones
the loop runs with.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")  # the batch's rows shard over both data-parallel axes


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def mesh_in_scope(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """``fn`` traced with ``mesh`` in scope, for ``jax.jit(mesh_in_scope(fn, mesh))``: splash
    attention then runs per shard under ``shard_map`` (``attention_kernels.current_mesh``)
    instead of being gathered onto every device. Set inside the trace (``jax.set_mesh`` is not
    allowed there), so the jitted function's cache does not depend on its caller's context."""
    if mesh.size <= 1:
        return fn

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """A model variable's sharding: by its ``logical_axes`` where it has them, else replicated."""
    from posttrain.trainer.models import logical_to_spec

    axes = var.get_metadata().get("logical_axes")
    return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh) if axes else PartitionSpec())


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def place_model(model: nnx.Module, mesh: Mesh) -> None:
    """Put every variable of ``model`` on the mesh (in place); each process copies its shards."""
    state = nnx.state(model)

    def put(var: nnx.Variable) -> nnx.Variable:
        sharding = variable_sharding(var, mesh)
        value = var.get_value()
        if value.sharding == sharding:
            return var
        return var.replace(jax.make_array_from_callback(var.shape, sharding, _reader(value)))

    nnx.update(model, jax.tree.map(put, state, is_leaf=_is_var))


def with_shardings(state: Any, mesh: Mesh) -> Any:
    """Abstract state (``nnx.eval_shape``) -> the same tree of ShapeDtypeStructs carrying the
    shardings ``place_model`` would give the real arrays (what ``plan`` compiles with)."""

    def one(var: Any) -> Any:
        if not _is_var(var):
            return jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=replicated(mesh))
        value = var.get_value()
        sharding = variable_sharding(var, mesh)
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

    return jax.tree.map(one, state, is_leaf=_is_var)


def opt_state_shardings(opt_state: Any, params: Any, mesh: Mesh) -> Any:
    """The sharding of every optimizer-state leaf: a leaf whose path ends with a parameter's path
    (AdamW's ``mu``/``nu`` mirror the parameter tree) takes that parameter's sharding, the rest
    (step counts) are replicated. Matched by path, not shape: a square ``q_proj`` and ``o_proj``
    share a shape but not a sharding."""
    by_path = {tuple(path): x.sharding for path, x in jax.tree_util.tree_leaves_with_path(params)}
    longest = max((len(p) for p in by_path), default=0)

    def one(path: Any, x: Any) -> Any:
        path = tuple(path)
        for n in range(min(longest, len(path)), 0, -1):
            if path[-n:] in by_path:
                return by_path[path[-n:]]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, opt_state)


def like_params(opt_state: Any, params: Any, mesh: Mesh) -> Any:
    """Abstract optimizer state (``jax.eval_shape`` of ``tx.init``) with the shardings the real
    one has (``opt_state_shardings``)."""
    shardings = opt_state_shardings(opt_state, params, mesh)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_state, shardings
    )


def init_opt_state(tx: Any, params: Any, mesh: Mesh) -> Any:
    """``tx.init(params)`` on the mesh, every leaf committed to the sharding the train step
    returns it with (``opt_state_shardings``). Left to ``jax.jit`` alone, the moments came back
    uncommitted on one device, so the step's second call saw other input shardings than its first
    and compiled the whole train step again."""
    abstract = jax.eval_shape(tx.init, params)
    shardings = opt_state_shardings(abstract, params, mesh)
    return jax.jit(tx.init, out_shardings=shardings)(params)


def device_batch(host: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host global batch on the mesh; each process copies only the rows its devices own."""
    return {
        name: jax.make_array_from_callback(
            array.shape, batch_sharding(mesh, array.ndim), _reader(array)
        )
        for name, array in host.items()
    }


def abstract_batch(
    columns: Mapping[str, tuple[tuple[int, ...], Any]], mesh: Mesh
) -> dict[str, jax.ShapeDtypeStruct]:
    """``device_batch``'s result for a batch of these (shape, dtype) columns, without data."""
    return {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
        for name, (shape, dtype) in columns.items()
    }


def gather(x: jax.Array) -> np.ndarray:
    """The whole array on this host, also when it is sharded over several processes."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _reader(array: Any) -> Callable[[Any], Any]:
    """The ``data_callback`` of ``jax.make_array_from_callback``: index -> that slice.

    A function (not a lambda in the caller's loop) so each callback keeps its own ``array``."""

    def read(index: Any) -> Any:  # a tuple of slices, one per axis
        return np.asarray(array[index])

    return read
