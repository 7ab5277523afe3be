"""Generation: HF greedy parity, padding invariance, bucketing, EOS, log-probs, sampling filters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.trainer.models import builtin_config, create_model, load_pretrained
from posttrain.trainer.sampling import bucket, filter_top_k, filter_top_p, generate, sampler

from .hf_reference import HF_REFERENCE, MODEL_FIXTURES


@pytest.fixture(scope="module")
def llama():
    return load_pretrained(HF_REFERENCE / "llama3-gqa")


@pytest.fixture(scope="module")
def tiny():
    return create_model(builtin_config("tiny", vocab_size=64), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_greedy_matches_hugging_face(name):
    ref = np.load(HF_REFERENCE / name / "reference.npz")
    out = generate(load_pretrained(HF_REFERENCE / name), ref["prompt_ids"], max_new_tokens=12)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref["greedy_ids"])
    assert np.asarray(out.mask).all() and out.lengths.tolist() == [12]


def test_left_padded_batch_equals_each_prompt_alone(llama):
    ids = np.load(HF_REFERENCE / "llama3-gqa" / "reference.npz")["input_ids"]
    prompts = [ids[0, :4].tolist(), ids[1, :11].tolist(), ids[0, 5:12].tolist()]
    batched = generate(llama, prompts, max_new_tokens=10)
    for row, prompt in enumerate(prompts):
        alone = generate(llama, [prompt], max_new_tokens=10)
        np.testing.assert_array_equal(np.asarray(batched.tokens[row]), np.asarray(alone.tokens[0]))
        np.testing.assert_allclose(
            np.asarray(batched.logprobs[row]), np.asarray(alone.logprobs[0]), atol=1e-5
        )


def test_prompt_lengths_within_a_bucket_compile_once(tiny):
    generate(tiny, [[1, 2, 3]], max_new_tokens=5)
    compiled = sampler._generate_jit._cache_size()
    for length in (5, 9, 16):
        generate(tiny, [list(range(1, length + 1))], max_new_tokens=5)
    generate(tiny, [[1, 2]], max_new_tokens=7)  # new tokens bucket too
    assert sampler._generate_jit._cache_size() == compiled
    generate(tiny, [list(range(1, 18))], max_new_tokens=5)  # 17 > 16: next bucket
    assert sampler._generate_jit._cache_size() == compiled + 1


def test_bucket_sizes():
    assert [bucket(n, 16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


def test_rows_stop_after_eos(llama):
    ref = np.load(HF_REFERENCE / "llama3-gqa" / "reference.npz")
    greedy = ref["greedy_ids"][0]
    eos = int(greedy[3])
    first = int(np.argmax(greedy == eos))  # first occurrence of that id, at index <= 3
    out = generate(llama, ref["prompt_ids"], max_new_tokens=12, eos_id=[999, eos], pad_id=0)
    tokens, mask, logprobs = (np.asarray(a)[0] for a in (out.tokens, out.mask, out.logprobs))
    np.testing.assert_array_equal(tokens[: first + 1], greedy[: first + 1])
    assert mask.tolist() == [True] * (first + 1) + [False] * (11 - first)
    assert out.lengths.tolist() == [first + 1]
    assert (tokens[first + 1 :] == 0).all() and (logprobs[first + 1 :] == 0).all()


def test_logprobs_are_the_models_temperature_one_logprobs(llama):
    """Sampled with temperature/top-k/top-p, logprobs are log_softmax of the raw logits (what training computes)."""
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    out = generate(llama, prompts, max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    for row, prompt in enumerate(prompts):
        seq = np.array([prompt + np.asarray(out.tokens[row]).tolist()])
        logp = jax.nn.log_softmax(nnx.jit(lambda m, x: m(x))(llama, jnp.asarray(seq)), axis=-1)[0]
        n = len(prompt)
        want = [float(logp[n - 1 + i, seq[0, n + i]]) for i in range(6)]
        np.testing.assert_allclose(np.asarray(out.logprobs[row]), want, atol=1e-5)


def test_sampling_is_seeded_and_top_k_one_is_greedy(tiny):
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(tiny, prompts, max_new_tokens=16, temperature=1.0, seed=1)
    b = generate(tiny, prompts, max_new_tokens=16, temperature=1.0, seed=1)
    c = generate(tiny, prompts, max_new_tokens=16, temperature=1.0, seed=2)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    greedy = generate(tiny, prompts, max_new_tokens=16)
    top1 = generate(tiny, prompts, max_new_tokens=16, temperature=1.0, top_k=1, seed=5)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), np.asarray(top1.tokens))


def test_filters_match_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32)
    for k in (1, 7, 50):
        got = np.asarray(filter_top_k(jnp.asarray(logits), k))
        kth = np.sort(logits, axis=-1)[:, -k][:, None]
        np.testing.assert_array_equal(np.isfinite(got), logits >= kth)
    for p in (0.05, 0.5, 0.95):
        got = np.isfinite(np.asarray(filter_top_p(jnp.asarray(logits), p)))
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for row in range(4):
            order = np.argsort(-probs[row])
            n_keep = int(
                np.searchsorted(np.cumsum(probs[row][order]), p) + 1
            )  # smallest set reaching p
            want = np.zeros(50, bool)
            want[order[:n_keep]] = True
            np.testing.assert_array_equal(got[row], want)


def test_right_padded_prompts_are_refused(tiny):
    with pytest.raises(ValueError, match="left-padded"):
        generate(tiny, np.array([[1, 2, 0]]), 4, prompt_mask=np.array([[1, 1, 0]]))


def test_generation_sees_qwix_lora():
    """qwix intercepts __call__ only; generation must go through it (non-zero adapters change tokens)."""
    import qwix

    model = create_model(builtin_config("tiny", vocab_size=64), rngs=nnx.Rngs(0))
    prompt = list(range(1, 9))
    provider = qwix.LoraProvider(module_path=r".*(q_proj|v_proj|down_proj)", rank=4, alpha=8.0)
    lora = qwix.apply_lora_to_model(model, provider, jnp.asarray([prompt]), rngs=nnx.Rngs(1))
    for _, var in nnx.to_flat_state(nnx.state(lora, nnx.LoRAParam)):
        var.set_value(jnp.full_like(var.get_value(), 0.3))
    out = generate(lora, [prompt], max_new_tokens=4)
    seq = jnp.asarray([prompt + np.asarray(out.tokens[0]).tolist()])
    logp = jax.nn.log_softmax(nnx.jit(lambda m, x: m(x))(lora, seq), axis=-1)[0]
    want = [float(logp[7 + i, seq[0, 8 + i]]) for i in range(4)]
    np.testing.assert_allclose(np.asarray(out.logprobs[0]), want, atol=1e-5)
