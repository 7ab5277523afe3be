"""Projections run on tokens flattened to [N, d_in] (``models.transformer.project``): same maths,
and on XLA:CPU weight gradients that need no transposed copy of an activation."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.api.v1alpha1 import LoraSpec, QuantizationSpec
from posttrain.trainer import peft
from posttrain.trainer.models import ModelConfig, create_model
from posttrain.trainer.models.transformer import project

B, T, E, F = 2, 48, 32, 80  # distinct sizes, so an array's shape says what it holds
CONFIG = ModelConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=E,
    intermediate_size=F,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_word_embeddings=False,
)


def _model(kind: str, dtype):
    model = create_model(CONFIG, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32)
    if kind != "full":
        quant = QuantizationSpec(type="int8", block_size=16) if kind == "qlora" else None
        peft.apply_peft(model, LoraSpec(rank=4, alpha=8), quant, rngs=nnx.Rngs(1))
        # B starts at zero; a nonzero B makes every adapter gradient nonzero.
        for _, module in nnx.iter_modules(model):
            if isinstance(module, peft.Adapted):
                b = module.lora.lora_b
                b.set_value(jax.random.normal(jax.random.key(2), b.shape, b.dtype) * 0.1)
    return model


def _trainable(kind: str):
    return nnx.Param if kind == "full" else nnx.LoRAParam


@pytest.mark.parametrize("kind", ["full", "lora", "qlora"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["q_proj", "down_proj"])
def test_flat_projection_equals_the_plain_call_in_values_gradients_and_dtypes(kind, dtype, name):
    model = _model(kind, dtype)
    layer = model.model.layers[0]
    proj = getattr(layer.self_attn if name == "q_proj" else layer.mlp, name)
    d_in = E if name == "q_proj" else F
    x = jax.random.normal(jax.random.key(3), (B, T, d_in)).astype(dtype)
    graphdef, params, rest = nnx.split(proj, _trainable(kind), ...)

    def loss(call, params, x):
        y = call(nnx.merge(graphdef, params, rest), x)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    def plain(p, x):
        return p(x)

    (v_flat, y_flat), g_flat = jax.value_and_grad(
        lambda p, x: loss(project, p, x), argnums=(0, 1), has_aux=True
    )(params, x)
    (v_ref, y_ref), g_ref = jax.value_and_grad(
        lambda p, x: loss(plain, p, x), argnums=(0, 1), has_aux=True
    )(params, x)
    assert y_flat.shape == y_ref.shape and y_flat.dtype == y_ref.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.float32(v_flat), np.float32(v_ref), **tol)
    leaves_flat, leaves_ref = jax.tree.leaves(g_flat), jax.tree.leaves(g_ref)
    assert len(leaves_flat) == len(leaves_ref) >= 2
    for a, b in zip(leaves_flat, leaves_ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.any(np.asarray(b, np.float32) != 0)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's layout choice")
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_layer_gradients_on_cpu_transpose_no_token_axis_activation(kind):
    """On [B, T, d] inputs XLA:CPU copied each activation and gradient to [d, B*T] before the
    weight-gradient dot (a quarter of the SFT step); on flat tokens no [d, B*T] array exists."""
    model = _model(kind, jnp.float32)
    layer = model.model.layers[0]
    graphdef, params, rest = nnx.split(layer, _trainable(kind), ...)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))

    def loss(params, x):
        out, _ = nnx.merge(graphdef, params, rest)(jnp.sin(x), positions, mask, None)
        return jnp.sum(out**2)

    x = jnp.ones((B, T, E), jnp.float32)
    hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    transposed = sorted(set(re.findall(rf"f32\[(\d+),{B * T}\]", hlo)))
    assert transposed == [], f"[d, B*T] arrays for d in {transposed}"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's layout choice")
@pytest.mark.parametrize("tied", [False, True])
def test_full_logits_gradient_on_cpu_transposes_no_token_axis_array(tied):
    """The LM head (untied, or the tied embedding's ``attend``) also runs on flat tokens: losses
    on full [B, T, V] logits (GRPO, distillation) need no [V, B*T] copy of their gradient."""
    config = dataclasses.replace(CONFIG, tie_word_embeddings=tied)
    graphdef, state = nnx.split(create_model(config, rngs=nnx.Rngs(0)))
    ids = jnp.ones((B, T), jnp.int32)

    def loss(state):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(ids)))

    hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
    transposed = sorted(set(re.findall(rf"f32\[(\d+),{B * T}\]", hlo)))
    assert transposed == [], f"[d, B*T] arrays for d in {transposed}"
