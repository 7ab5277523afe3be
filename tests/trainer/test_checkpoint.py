"""Checkpoints: a half-written one is never resumed from; restore lands on the live shardings."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.api.v1alpha1 import CheckpointSpec
from posttrain.trainer.checkpoint import Checkpointer

CRASH_DURING_SAVE = """
import os, sys, time
import jax.numpy as jnp
from posttrain.api.v1alpha1 import CheckpointSpec
from posttrain.trainer.checkpoint import Checkpointer

ckpt = Checkpointer(sys.argv[1], CheckpointSpec(every_steps=1, keep=3, async_save=True))
state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "count": jnp.int32(7)}
ckpt.save(2, state, {"step": 2, "data": {"epoch": 0, "index": 16}})
ckpt.wait()
big = {"params": {"w": jnp.ones((2, 3))}, "count": jnp.int32(8), "pad": jnp.ones((64, 2**20))}
ckpt.save(4, big, {"step": 4, "data": {"epoch": 0, "index": 32}})
while not any(name.startswith("4") for name in os.listdir(sys.argv[1])):  # the write has begun
    time.sleep(0.001)
os._exit(1)  # a crash (or SIGKILL) while the 256 MB write of step 4 is still under way
"""


def test_half_written_checkpoint_is_ignored(tmp_path):
    spec = CheckpointSpec(every_steps=1, keep=3, async_save=True)
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "count": jnp.int32(7)}
    proc = subprocess.run(
        [sys.executable, "-P", "-c", CRASH_DURING_SAVE, str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    # Step 4 left something on disk (orbax's temporary folder, whatever orbax names it) ...
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("4")]

    # ... which is never resumed from: the latest finished step is 2, and it restores.
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
