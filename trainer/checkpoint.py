"""Checkpoints with orbax: trainable params, optimizer state, and the loop's JSON state.

A checkpoint at step N holds what resuming needs to take step N + 1 exactly as an uninterrupted
run would: ``state`` = {params (what trains), opt_state} restored into abstract targets carrying
the live shardings, and ``meta`` = {step, data position, ...} as JSON. Frozen weights (a LoRA base,
a quantized QLoRA base) are not saved; they are rebuilt from ``spec.model.base``.

Orbax writes each step into a temporary folder and renames it (or writes a commit marker on
object stores) only once every host has finished, and ``latest_step`` ignores anything not
finalised, so a half-written checkpoint is never resumed from. Saves are asynchronous when
``spec.training.checkpoint.async`` is set: the step returns while the write continues.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from posttrain.api.v1alpha1 import CheckpointSpec
from posttrain.trainer import storage


def checkpoint_dir(spec: CheckpointSpec, output_dir: str) -> str:
    path = spec.dir or storage.join(output_dir, "checkpoints")
    return path if storage.is_gcs(path) else os.path.abspath(path)


class Checkpointer:
    def __init__(self, directory: str, spec: CheckpointSpec):
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=spec.keep,
            enable_async_checkpointing=spec.async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self, step: int, state: Any, meta: dict[str, Any], arrays: dict[str, Any] | None = None
    ) -> None:
        """Every process calls this; orbax coordinates who writes what. ``arrays``: host arrays
        of the batch source (a rollout batch still being trained on), saved as the ``rollout``
        item, arrays in the checkpoint rather than JSON lists."""
        items: dict[str, Any] = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave(meta),
        }
        if arrays:
            items["rollout"] = ocp.args.StandardSave(arrays)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restore into the shapes, dtypes and shardings of ``like`` (a live or abstract pytree)."""
        abstract = jax.tree.map(_abstract, like)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored["state"], dict(restored["meta"])

    def restore_meta(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore_arrays(self, step: int) -> dict[str, Any] | None:
        """The ``arrays`` saved with step ``step`` (host numpy arrays), or None if it has none."""
        items = self._manager.item_metadata(step)  # names the saved items (values may be None)
        if items is None or "rollout" not in items.keys():
            return None
        restored = self._manager.restore(
            step, args=ocp.args.Composite(rollout=ocp.args.StandardRestore())
        )
        return dict(restored["rollout"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
