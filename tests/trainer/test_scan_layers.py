"""Decoder layers under ``lax.scan`` (``spec.training.scanLayers``): the program really scans
(one ``scan`` in the jaxpr, no per-layer copies of the layer), gives the unrolled model's logits
and gradients (remat none/full, LoRA and QLoRA adapters, Gemma's alternating sliding/global
layers with per-type RoPE), and falls back to the unrolled layers where one body cannot serve:
per-layer attention-map or hidden taps (distillation) and the KV-cache path (generation)."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.api.v1alpha1 import LoraSpec, QuantizationSpec
from posttrain.trainer import peft
from posttrain.trainer.models import (
    builtin_config,
    create_model,
    load_pretrained,
    set_remat,
    set_scan_layers,
)

from .hf_reference import HF_REFERENCE

TOL = dict(atol=2e-5, rtol=2e-5)


def scans(fn, *args) -> int:
    """How many ``scan`` primitives the traced program has (nested ones included)."""

    def count(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == "scan"
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += count(sub)
        return n

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def batch(vocab: int, rows: int = 2, length: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, vocab, (rows, length)), jnp.int32)
    mask = np.ones((rows, length), np.int32)
    mask[1, :5] = 0  # left padding on one row
    return ids, jnp.asarray(mask)


def logits_and_grads(model, ids, mask):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(ids, mask)
        return jnp.mean(jax.nn.logsumexp(logits, -1) * mask), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def assert_same(a, b):
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), **TOL)
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


def tiny(lora=None, quantization=None):
    model = create_model(builtin_config("tiny", vocab_size=64), rngs=nnx.Rngs(0))
    peft.apply_peft(model, lora, quantization, rngs=nnx.Rngs(1))
    if lora is not None:  # non-zero B, so the adapters change the outputs and get gradients
        for path, var in nnx.iter_graph(model):
            if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_b":
                var[...] = 0.05 * jnp.ones_like(var[...])
    return model


@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable"])
@pytest.mark.parametrize(
    "peft_kind",
    [None, "lora", "qlora"],
)
def test_scanned_equals_unrolled_logits_and_gradients(remat, peft_kind):
    lora = LoraSpec(rank=4, alpha=8) if peft_kind else None
    quantization = QuantizationSpec(type="int8", block_size=16) if peft_kind == "qlora" else None
    model = tiny(lora, quantization)
    ids, mask = batch(64)
    set_remat(model, remat)
    unrolled = logits_and_grads(model, ids, mask)
    assert scans(lambda: model(ids, mask)) == 0
    set_scan_layers(model, True)
    assert scans(lambda: model(ids, mask)) == 1
    assert_same(logits_and_grads(model, ids, mask), unrolled)


@pytest.mark.parametrize("name", ["gemma3-text", "gemma2-softcap", "qwen3-qknorm"])
def test_mixed_sliding_and_global_layers_scan(name):
    """Gemma 3 alternates sliding (local RoPE base) and global layers: one scanned body takes
    each layer's type and frequencies as arrays."""
    model = load_pretrained(HF_REFERENCE / name)
    types = set(model.config.layer_types)
    ids, mask = batch(model.config.vocab_size, length=20)  # longer than the window of 8
    unrolled = logits_and_grads(model, ids, mask)
    set_scan_layers(model, True)
    assert scans(lambda: model(ids, mask)) == 1, types
    assert_same(logits_and_grads(model, ids, mask), unrolled)


def test_taps_and_the_kv_cache_fall_back_to_unrolled_layers():
    model = tiny()
    ids, mask = batch(64)
    reference = model(ids, mask, attention_probs_layers=(1,), layer_hidden=(0,))
    cache = model.init_cache(2, 32)
    ref_cached, _ = model(ids, mask, cache=cache)
    set_scan_layers(model, True)
    tapped = model(ids, mask, attention_probs_layers=(1,), layer_hidden=(0,))
    assert scans(lambda: model(ids, mask, layer_hidden=(0,))) == 0
    assert scans(lambda: model(ids, mask, cache=cache)) == 0
    for x, y in zip(jax.tree.leaves(tapped), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)
    cached, _ = model(ids, mask, cache=cache)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(ref_cached), **TOL)
