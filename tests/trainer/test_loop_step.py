"""The jitted step and the schedule: accumulation equals one big batch; warm-up then decay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.api.v1alpha1 import TrainingSpec
from posttrain.trainer.algorithms import sft
from posttrain.trainer.data import sft as data
from posttrain.trainer.loop_optim import optimizer, schedule
from posttrain.trainer.loop_step import make_train_step, policy_view
from posttrain.trainer.models import builtin_config, create_model


def test_schedule_warms_up_then_decays_to_min_ratio():
    t = TrainingSpec(steps=100, learning_rate=1e-3, schedule={"warmup_steps": 10, "min_ratio": 0.1})
    lr = schedule(t)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(100)) == pytest.approx(1e-4)
    assert all(float(lr(k)) >= float(lr(k + 1)) for k in range(10, 100))
    linear = schedule(
        t.model_copy(update={"schedule": t.schedule.model_copy(update={"name": "linear"})})
    )
    assert float(linear(55)) == pytest.approx(1e-3 - 0.5 * 0.9e-3)
    ratio = schedule(
        TrainingSpec(steps=200, learning_rate=1.0)
    )  # default warmupRatio 0.03 -> 6 steps
    assert float(ratio(3)) == pytest.approx(0.5)


def test_accumulation_equals_one_big_batch():
    model = create_model(builtin_config("tiny", vocab_size=40), rngs=nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    # rows with different numbers of trained tokens: a plain mean over micro-batches would differ
    examples = [
        data.Example(tuple(rng.integers(3, 40, n)), (False,) * (n - k) + (True,) * k)
        for n, k in ((10, 2), (6, 5), (12, 9), (8, 1), (5, 3), (9, 2), (11, 7), (7, 4))
    ]
    batch = {k: jnp.asarray(v) for k, v in data.collate(examples, 12, 0).items()}
    # SGD: the update is the gradient itself (Adam's first step, ~sign(g), would amplify rounding)
    t = TrainingSpec(steps=10, learning_rate=1.0, max_grad_norm=None, optimizer={"name": "sgd"})
    tx = optimizer(t)
    results = []
    for num_micro in (1, 4):
        step = jax.jit(
            make_train_step(policy_view(graphdef), sft.loss, tx, schedule(t), num_micro=num_micro)
        )
        new, _, metrics = step(params, frozen, tx.init(params), batch, jnp.int32(3))
        results.append((new, metrics))
    (p1, m1), (p4, m4) = results
    assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-6)
    assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(m1["learning_rate"]) == pytest.approx(float(schedule(t)(3)))
