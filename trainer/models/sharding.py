"""Logical axis names -> mesh axes: the one table, a mesh builder, and model sharding.

Every parameter carries ``logical_axes`` metadata naming its dimensions by meaning (``embed``,
``mlp``, ``heads``, ...). ``LOGICAL_AXIS_RULES`` maps each meaning to mesh axes; swapping that
table is how a different strategy (pure FSDP, pure tensor parallel) is chosen.

We use our own metadata key rather than flax's ``out_sharding``: with flax's eager sharding (on by
default) a Param annotated with ``out_sharding`` cannot be created without a mesh in scope, which
would break every unsharded local run, optimizer and LoRA wrapper built from these params.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Meaning -> mesh axis (or axes, or None for replicated). Parameters shard over fsdp (embed) and
# tensor (heads, mlp, vocab); activations' batch over data and fsdp.
LOGICAL_AXIS_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",  # q_proj out / o_proj in: heads * head_dim, heads-major
    "kv_heads": "tensor",  # k_proj / v_proj out: kv_heads * head_dim
    "head_dim": None,
    "norm": None,
}


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all); one size may be -1 (the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"{len(devices)} devices do not divide into data={data} fsdp={fsdp} tensor={tensor}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices, have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh | AbstractMesh,
    rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """PartitionSpec for a tensor whose dims are named ``axes``.

    A mesh axis that is absent from the mesh, of size 1, already used by an earlier dimension, or
    that does not divide the dimension is dropped (that dimension is then replicated over it).
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, dim in zip(axes, shape, strict=True):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        target = rules.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        chosen: list[str] = []
        for ax in mesh_axes:
            size = mesh.shape.get(ax, 1)
            if size == 1 or ax in used or dim % (size * math.prod(mesh.shape[a] for a in chosen)):
                continue
            chosen.append(ax)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def param_shardings(
    model: nnx.Module,
    mesh: Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_AXIS_RULES,
) -> nnx.State:
    """An ``nnx.State`` of NamedShardings, one per Param, from its ``logical_axes`` metadata."""
    state = nnx.state(model, nnx.Param)

    def to_sharding(var: nnx.Variable) -> nnx.Variable:
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            spec = PartitionSpec()
        else:
            spec = logical_to_spec(axes, var.shape, mesh, rules)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(
    model: nnx.Module,
    mesh: Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_AXIS_RULES,
) -> nnx.Module:
    """Move every Param of ``model`` onto ``mesh`` per ``rules`` (in place); returns the model."""
    shardings = param_shardings(model, mesh, rules)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(state, shardings))
    return model
