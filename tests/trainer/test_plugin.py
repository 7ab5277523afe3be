"""The algorithm plug-in: heads train in every mode, parameter groups get their own learning
rate, the reference under LoRA is the base (no copy), and frozen models reach the loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.api.v1alpha1 import ModelSpec, TrainingSpec
from posttrain.trainer.algorithms.base import Models
from posttrain.trainer.loop import build_model, load_tokenizer, split_trainable
from posttrain.trainer.loop_optim import optimizer, param_labels
from posttrain.trainer.loop_step import Trainee, make_train_step, trainee_view
from posttrain.trainer.models import make_mesh

LORA = {"rank": 4, "alpha": 8}


def tiny(**kw):
    spec = ModelSpec(base="builtin:tiny", dtype="float32", **kw)
    tok = load_tokenizer(spec)
    return spec, tok, build_model(spec, tok, make_mesh(), seed=0)


def value_head(model) -> nnx.Module:
    return nnx.Linear(model.config.hidden_size, 1, rngs=nnx.Rngs(7))


def paths(state) -> list[str]:
    return ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)]


@pytest.mark.parametrize("lora", [None, LORA])
def test_heads_train_in_every_mode(lora):
    spec, _, model = tiny(lora=lora)
    graphdef, params, frozen = split_trainable(Trainee(model, {"value": value_head(model)}), lora)
    trained = paths(params)
    assert "heads/value/kernel" in trained and "heads/value/bias" in trained
    if lora is None:
        assert "policy/model/layers/0/self_attn/q_proj/kernel" in trained
    else:  # the base stays frozen; adapters and the head train
        base_kernel = "policy/model/layers/0/self_attn/q_proj/base/kernel"
        assert base_kernel not in trained and base_kernel in paths(frozen)
        assert any("lora_a" in p for p in trained)
        assert all("lora" in p or p.startswith("heads/") for p in trained)


def test_head_learning_rate_is_its_own_group():
    _, _, model = tiny()
    _, params, _ = split_trainable(Trainee(model, {"value": value_head(model)}), None)
    labels = {p: v.get_value() for p, v in nnx.to_flat_state(param_labels(params, {"value": 0.5}))}
    assert {labels[p] for p in labels if p[0] == "heads"} == {"heads/value"}
    assert {labels[p] for p in labels if p[0] == "policy"} == {"policy"}
    # SGD: the update is -lr * grad, so each group's rate shows in its update
    t = TrainingSpec(
        steps=10,
        learning_rate=0.01,
        max_grad_norm=None,
        optimizer={"name": "sgd"},
        schedule={"name": "constant", "warmupSteps": 0},
    )
    tx = optimizer(t, {"value": 0.5})
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = dict(nnx.to_flat_state(updates))
    np.testing.assert_allclose(flat[("heads", "value", "kernel")][...], -0.5)
    np.testing.assert_allclose(
        flat[("policy", "model", "layers", 0, "mlp", "up_proj", "kernel")][...], -0.01
    )


def test_unknown_head_rate_is_refused():
    """A declaration's learning rate for a head the trainee does not have: refused when the
    optimizer state is built (``setup.build_run``), for real and under ``eval_shape`` alike."""
    _, _, model = tiny()
    _, params, _ = split_trainable(Trainee(model, {"value": value_head(model)}), None)
    tx = optimizer(TrainingSpec(steps=1), {"value": 1e-4, "critic": 1e-5})
    with pytest.raises(ValueError, match=r"unknown heads \['critic'\]; the heads: \['value'\]"):
        jax.eval_shape(tx.init, params)
    optimizer(TrainingSpec(steps=1), {"value": 1e-4}).init(params)  # its own heads: fine


def test_reference_under_lora_is_the_base_and_frozen_models_reach_the_loss():
    spec, tok, model = tiny(lora=LORA)
    _, _, teacher = tiny()
    graphdef, params, frozen = split_trainable(Trainee(model, {}), spec.lora)
    t_graphdef, t_state = nnx.split(teacher)
    extras = {"reference": jax.tree.map(jnp.zeros_like, params["policy"]), "teacher": t_state}
    view = trainee_view(graphdef, t_graphdef)
    ids = jnp.asarray([[tok.bos_token_id, *tok.encode("12+7=19")]])
    # Train the adapters a little so policy and reference differ.
    bumped = jax.tree.map(lambda x: x + 0.05, params)
    models = view(bumped, frozen, extras)
    base = view(jax.tree.map(jnp.zeros_like, params), frozen, {}).policy
    np.testing.assert_array_equal(models.reference(ids), base(ids))
    assert not np.allclose(models.policy(ids), models.reference(ids))
    np.testing.assert_array_equal(models.teacher(ids), teacher(ids))

    # The step hands the frozen models to the loss; gradients reach the policy only.
    def loss(m: Models, batch):
        gap = m.policy(batch["ids"]) - jax.lax.stop_gradient(m.teacher(batch["ids"]))
        return jnp.mean(gap**2), {"ref_mean": jnp.mean(m.reference(batch["ids"]))}

    t = TrainingSpec(steps=2, learning_rate=1e-2, optimizer={"name": "sgd"})
    tx = optimizer(t)
    step = jax.jit(make_train_step(view, loss, tx, lambda _: 0.0, num_micro=1))
    new, _, metrics = step(bumped, frozen, tx.init(bumped), {"ids": ids}, jnp.int32(0), extras)
    assert float(metrics["ref_mean"]) == pytest.approx(float(jnp.mean(base(ids))), rel=1e-5)
    moved = [
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(bumped), strict=True)
    ]
    assert max(moved) > 0
