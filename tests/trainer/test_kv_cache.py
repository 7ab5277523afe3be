"""The generation path: KV cache layout, cached_attention, and greedy token selection.

Each check compares the cache path (prefill, then one token per step) with the no-cache forward
the trainer uses, on the cases where the cache path has its own code: left padding longer than a
sliding window, soft-capping, LoRA/QLoRA-wrapped projections, a bfloat16 cache, attention maps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.api.v1alpha1 import LoraSpec, QuantizationSpec
from posttrain.trainer import peft
from posttrain.trainer.models import builtin_config, create_model, load_pretrained
from posttrain.trainer.models.transformer import cached_attention, reference_attention, write_kv
from posttrain.trainer.sampling import generate
from posttrain.trainer.sampling.sampler import first_argmax, sample_token, token_logprob

from .hf_reference import HF_REFERENCE


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


@nnx.jit(static_argnames="layers")
def _forward_probs(model, ids, mask, layers):
    return model(ids, mask, attention_probs_layers=layers)


@nnx.jit(static_argnames="layers")
def _forward_cached(model, ids, mask, cache, layers=()):
    return model(ids, mask, cache=cache, attention_probs_layers=layers)


def _stepwise(model, ids, mask, prefill: int, layers=()):
    """Logits [B, T, V] (and the per-step attention maps of ``layers``) from a prefill of
    ``prefill`` tokens, then one token per step, through the cache."""
    cache = model.init_cache(ids.shape[0], ids.shape[1] + 3)  # spare slots stay masked
    out = _forward_cached(model, ids[:, :prefill], mask[:, :prefill], cache, layers)
    logits, probs = [out[0]], [out[2]["attention_probs"]] if layers else []
    cache = out[1]
    for t in range(prefill, ids.shape[1]):
        out = _forward_cached(model, ids[:, t : t + 1], mask[:, t : t + 1], cache, layers)
        logits.append(out[0])
        cache = out[1]
        if layers:
            probs.append(out[2]["attention_probs"])
    return np.concatenate([np.asarray(x) for x in logits], axis=1), probs


def _left_padded(ids: np.ndarray, pads: int) -> tuple[jax.Array, jax.Array]:
    """Row 0 left-padded by ``pads`` (its last tokens dropped), row 1 unpadded."""
    padded = ids.copy()
    padded[0] = np.concatenate([np.zeros(pads, ids.dtype), ids[0, : ids.shape[1] - pads]])
    mask = np.ones_like(ids, dtype=np.int32)
    mask[0, :pads] = 0
    return jnp.asarray(padded), jnp.asarray(mask)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("logit_cap", [None, 30.0])
def test_cached_attention_is_reference_attention(T, logit_cap):
    """Same outputs and maps as reference_attention on the [B, S, K, D] keys/values it reads."""
    B, S, H, K, D = 2, 11, 6, 3, 8
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.normal(size=s), jnp.float32)
        for s in [(B, T, H, D), (B, S, K, D), (B, S, K, D)]
    )
    mask = jnp.asarray(rng.random((B, T, S)) < 0.7).at[:, :, 0].set(True)
    want, want_probs = reference_attention(q, k, v, mask, 0.3, logit_cap, return_probs=True)
    k_bkds, v_bksd = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    got, probs = cached_attention(q, k_bkds, v_bksd, mask, 0.3, logit_cap, return_probs=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(probs), np.asarray(want_probs), atol=1e-6)
    alone = cached_attention(q, k_bkds, v_bksd, mask, 0.3, logit_cap)
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(got))


def test_write_kv_puts_tokens_at_their_slots():
    B, T, K, D, S = 2, 3, 2, 4, 8
    k = jnp.arange(B * T * K * D, dtype=jnp.float32).reshape(B, T, K, D)
    cache = (jnp.zeros((B, K, D, S)), jnp.zeros((B, K, S, D)))
    keys, values = write_kv(cache, k, -k, jnp.int32(4))
    np.testing.assert_array_equal(np.asarray(keys[..., 4:7]), np.asarray(k.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(
        np.asarray(values[:, :, 4:7]), -np.asarray(k.transpose(0, 2, 1, 3))
    )
    assert not np.asarray(keys[..., :4]).any() and not np.asarray(values[:, :, 7:]).any()


@pytest.mark.parametrize("name", ["gemma3-text", "gemma2-softcap-active", "llama3-gqa"])
def test_left_padded_steps_match_the_full_forward(name):
    """10 pads (more than Gemma's window of 8) on one row; prefill 6, then 14 single steps."""
    model = load_pretrained(HF_REFERENCE / name)
    ids = np.asarray(np.load(HF_REFERENCE / name / "reference.npz")["input_ids"][:2, :20])
    ids, mask = _left_padded(ids, 10)
    full = np.asarray(_forward(model, ids, mask))
    steps, _ = _stepwise(model, ids, mask, prefill=6)
    real = np.asarray(mask, bool)  # padded positions' logits are arbitrary
    np.testing.assert_allclose(steps[real], full[real], atol=1e-4, rtol=1e-4)


def test_attention_maps_through_the_cache_match_the_full_forward():
    """Distillation's maps (return_probs) on the cache path: each step's row of the full map."""
    model = load_pretrained(HF_REFERENCE / "gemma3-text")
    ids = np.asarray(np.load(HF_REFERENCE / "gemma3-text" / "reference.npz")["input_ids"][:2, :12])
    ids, mask = _left_padded(ids, 3)
    layers = (0, 1)
    _, maps = _forward_probs(model, ids, mask, layers)
    _, steps = _stepwise(model, ids, mask, prefill=4, layers=layers)
    for layer in layers:
        full = np.asarray(maps["attention_probs"][layer])  # [B, H, T, T]
        got = np.concatenate([np.asarray(s[layer])[..., :12] for s in steps], axis=2)
        for row in range(2):
            real = np.asarray(mask[row], bool)
            np.testing.assert_allclose(
                got[row][:, real][:, :, real], full[row][:, real][:, :, real], atol=1e-5
            )


def _adapted_model(quantization: QuantizationSpec | None):
    model = create_model(builtin_config("tiny", vocab_size=64), rngs=nnx.Rngs(0))
    peft.apply_peft(model, LoraSpec(rank=4, alpha=8.0), quantization, rngs=nnx.Rngs(1))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):  # lora_b starts at zero
        var.set_value(jax.random.normal(jax.random.key(2), var.get_value().shape) * 0.05)
    return model


@pytest.mark.parametrize("quantization", [None, QuantizationSpec(type="nf4", block_size=16)])
def test_greedy_generation_of_a_lora_model_is_its_full_forward_argmax(quantization):
    """LoRA and QLoRA projections (peft.Adapted over nnx.Linear / QuantizedLinear) in generate."""
    model = _adapted_model(quantization)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    out = generate(model, prompts, max_new_tokens=6)
    for row, prompt in enumerate(prompts):
        seq = jnp.asarray([prompt + np.asarray(out.tokens[row]).tolist()])
        logits = np.asarray(_forward(model, seq, jnp.ones_like(seq)))[0]
        want = logits[len(prompt) - 1 : -1].argmax(-1)
        np.testing.assert_array_equal(np.asarray(out.tokens[row]), want)
        logp = jax.nn.log_softmax(logits[len(prompt) - 1 : -1], axis=-1)
        np.testing.assert_allclose(
            np.asarray(out.logprobs[row]), logp[np.arange(6), want], atol=1e-5
        )


def test_bfloat16_cache_stays_close_to_the_full_forward():
    model = load_pretrained(HF_REFERENCE / "llama3-gqa", dtype=jnp.bfloat16)
    assert model.init_cache(1, 4).keys[0].dtype == jnp.bfloat16
    ids = np.asarray(np.load(HF_REFERENCE / "llama3-gqa" / "reference.npz")["input_ids"][:2, :16])
    ids, mask = _left_padded(ids, 4)
    full = np.asarray(_forward(model, ids, mask))
    steps, _ = _stepwise(model, ids, mask, prefill=5)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(steps[real], full[real], atol=0.1, rtol=0.05)


def test_first_argmax_is_jnp_argmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    logits[1, [3, 17, 40]] = 9.0  # ties: the first wins
    logits[2, 7] = np.nan  # NaN: argmax picks the first NaN
    logits[3, [9, 30]] = np.nan
    logits[4] = -np.inf
    got = first_argmax(jnp.asarray(logits))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(logits, axis=-1)))
    assert got.dtype == jnp.int32


def test_token_logprob_is_log_softmax_at_the_token():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 33)) * 5, jnp.float32)
    tokens = jnp.asarray([0, 5, 32, 17], jnp.int32)
    want = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, None], -1)[:, 0]
    np.testing.assert_allclose(
        np.asarray(token_logprob(logits, tokens)), np.asarray(want), atol=1e-6
    )


def test_sampled_tokens_are_jax_categorical_draws():
    """The sampler's Gumbel-max draw is jax.random.categorical's, key for key."""
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(5, 40)), jnp.float32)
    for seed in range(4):
        key = jax.random.key(seed)
        token, _ = sample_token(logits, key, 1.0, 1.0, greedy=False, top_k=None, use_top_p=False)
        np.testing.assert_array_equal(
            np.asarray(token), np.asarray(jax.random.categorical(key, logits, axis=-1))
        )


def test_prefill_through_the_fused_kernel_on_accelerators(monkeypatch):
    """On GPU/TPU a prompt's prefill reads the cache through fused_attention (XLA's kernel here,
    for float32): same logits as the full forward, and decode steps still use cached_attention."""
    from posttrain.trainer.models import transformer

    model = load_pretrained(HF_REFERENCE / "llama3-gqa")
    layer = model.model.layers[0].self_attn
    monkeypatch.setattr(transformer.jax, "default_backend", lambda: "gpu")
    q = jnp.zeros((2, 5, layer.num_heads, layer.head_dim))
    assert layer._prefill_kernel(q, 16, False) == "xla"
    assert layer._prefill_kernel(q[:, :1], 16, False) is None
    assert layer._prefill_kernel(q, 16, True) is None
    traced_shapes = []
    fused = transformer.fused_attention

    def spy(q, k, *args):
        traced_shapes.append((q.shape[1], k.shape[1]))
        return fused(q, k, *args)

    ids = np.asarray(np.load(HF_REFERENCE / "llama3-gqa" / "reference.npz")["input_ids"][:2, :13])
    ids, mask = _left_padded(ids, 3)
    full = np.asarray(_forward(model, ids, mask))
    monkeypatch.setattr(transformer, "fused_attention", spy)
    steps, _ = _stepwise(model, ids, mask, prefill=7)
    assert set(traced_shapes) == {(7, 16)}  # the prefill only, over the whole cache
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(steps[real], full[real], atol=1e-4, rtol=1e-4)


def test_new_weights_reuse_the_compiled_generate():
    """The RL loop updates the policy in place and generates every step: no recompilation."""
    from posttrain.trainer.sampling import sampler

    model = create_model(builtin_config("tiny", vocab_size=64), rngs=nnx.Rngs(0))
    before = generate(model, [[1, 2, 3]], max_new_tokens=4)
    compiled = sampler._generate_jit._cache_size()
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p * 1.5, params))
    after = generate(model, [[1, 2, 3]], max_new_tokens=4)
    assert sampler._generate_jit._cache_size() == compiled
    assert not np.allclose(np.asarray(before.logprobs), np.asarray(after.logprobs))
