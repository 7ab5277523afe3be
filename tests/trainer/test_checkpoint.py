"""Checkpoints: a half-written one is never resumed from; restore lands on the live shardings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.api.v1alpha1 import CheckpointSpec
from posttrain.trainer.checkpoint import Checkpointer


def test_half_written_checkpoint_is_ignored(tmp_path):
    spec = CheckpointSpec(every_steps=1, keep=3, async_save=True)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), spec)
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "count": jnp.int32(7)}
    ckpt.save(2, state, {"step": 2, "data": {"epoch": 0, "index": 16}})
    ckpt.close()
    # What a crash in the middle of saving step 4 leaves: orbax's temporary folder, never renamed.
    partial = tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-1732600000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 64)

    again = Checkpointer(str(tmp_path / "ckpt"), spec)
    assert again.latest_step() == 2
    like = jax.tree.map(jnp.zeros_like, state)
    restored, meta = again.restore(again.latest_step(), like)
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    assert int(restored["count"]) == 7
    assert restored["params"]["w"].sharding == like["params"]["w"].sharding
    assert meta == {"step": 2, "data": {"epoch": 0, "index": 16}}
    again.close()


def test_keep_limits_the_checkpoints_kept(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), CheckpointSpec(keep=2, async_save=False))
    for step in (1, 2, 3):
        ckpt.save(step, {"x": jnp.float32(step)}, {"step": step, "data": {}})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    ckpt.close()
