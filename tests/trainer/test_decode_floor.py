"""``benchmarks/decode_floor.py``'s floors run the model's own weights and, for the attention
floor, its own cache write and cached attention: checked on the tiny model, so the benchmark
keeps working as the model changes."""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from posttrain.trainer.models import builtin_config, create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import decode_floor  # noqa: E402


def test_the_floors_run_the_models_weights_and_the_attention_floor_attends():
    model = create_model(
        builtin_config("tiny", vocab_size=64, tie_word_embeddings=False), rngs=nnx.Rngs(0)
    )
    steps, prompt = 5, 3
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, model.config.hidden_size)) * 0.1)
    matmuls, weights = decode_floor.matmul_floor(model, steps)
    attention, _ = decode_floor.matmul_floor(model, steps, prompt + steps + 1)
    layers, head = weights
    assert len(layers) == len(model.model.layers)
    first = model.model.layers[0]
    np.testing.assert_array_equal(layers[0]["k_proj"], first.self_attn.k_proj.kernel[...])
    np.testing.assert_array_equal(layers[0]["down_proj"], first.mlp.down_proj.kernel[...])
    np.testing.assert_array_equal(head, model.lm_head.kernel[...])
    plain, attended = np.asarray(matmuls(x, weights)), np.asarray(attention(x, weights))
    assert np.isfinite(plain).all() and np.isfinite(attended).all()
    assert not np.allclose(plain, attended, atol=1e-4)  # the attention's output is used
