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


def _numpy_sampling_logprob(logits, token, temperature, top_k, top_p):
    """log-prob of `token` under softmax(logits / T) restricted to top-k then top-p, renormalised."""
    s = logits.astype(np.float64) / temperature
    if top_k is not None:
        s = np.where(s >= np.sort(s)[-top_k], s, -np.inf)
    if top_p is not None:
        probs = np.exp(s - s.max())
        probs /= probs.sum()
        order = np.argsort(-s, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]  # mass of strictly better tokens
        keep = np.zeros_like(s, bool)
        keep[order[before < top_p]] = True
        s = np.where(keep, s, -np.inf)
    kept = s[np.isfinite(s)]
    return s[token] - (kept.max() + np.log(np.exp(kept - kept.max()).sum()))


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, None, None), (0.7, 10, None), (1.3, None, 0.8), (0.6, 20, 0.9)],
)
def test_sampling_logprobs_are_those_of_the_filtered_distribution(temperature, top_k, top_p):
    """TRL's correction: log-softmax over the kept tokens of logits / T, not of the raw logits."""
    logits = np.random.default_rng(3).normal(size=(6, 50)).astype(np.float32) * 2
    for seed in range(3):
        token, raw, sampled = sampler.sample_token_and_logprobs(
            jnp.asarray(logits),
            jax.random.key(seed),
            temperature,
            1.0 if top_p is None else top_p,
            greedy=False,
            top_k=top_k,
            use_top_p=top_p is not None,
        )
        token = np.asarray(token)
        want = [
            _numpy_sampling_logprob(logits[r], token[r], temperature, top_k, top_p)
            for r in range(6)
        ]
        assert np.isfinite(want).all()  # sampled tokens are among the kept ones
        np.testing.assert_allclose(np.asarray(sampled), want, atol=1e-5)
        raw_want = [_numpy_sampling_logprob(logits[r], token[r], 1.0, None, None) for r in range(6)]
        np.testing.assert_allclose(np.asarray(raw), raw_want, atol=1e-5)


def test_generate_returns_the_sampling_distributions_logprobs(llama):
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    out = generate(llama, prompts, max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    for row, prompt in enumerate(prompts):
        seq = np.array([prompt + np.asarray(out.tokens[row]).tolist()])
        logits = np.asarray(nnx.jit(lambda m, x: m(x))(llama, jnp.asarray(seq)))[0]
        n = len(prompt)
        want = [
            _numpy_sampling_logprob(logits[n - 1 + i], seq[0, n + i], 0.8, 20, 0.9)
            for i in range(6)
        ]
        np.testing.assert_allclose(np.asarray(out.sampling_logprobs[row]), want, atol=1e-4)
    greedy = generate(llama, prompts, max_new_tokens=6)  # greedy: the raw distribution's
    np.testing.assert_array_equal(np.asarray(greedy.sampling_logprobs), np.asarray(greedy.logprobs))


def test_chunked_generation_gives_the_same_tokens(tiny):
    """A row's draws come from the seed and its global row index: chunks and batch make no odds."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 64, size=int(n)).tolist() for n in rng.integers(2, 9, size=5)]
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=4)
    whole = generate(tiny, prompts, **kwargs)
    for chunk_rows in (1, 2, 4):
        chunked = generate(tiny, prompts, **kwargs, chunk_rows=chunk_rows)
        np.testing.assert_array_equal(np.asarray(chunked.tokens), np.asarray(whole.tokens))
        np.testing.assert_allclose(
            np.asarray(chunked.sampling_logprobs), np.asarray(whole.sampling_logprobs), atol=1e-5
        )
    first = generate(tiny, prompts[:2], **kwargs)  # rows 0 and 1 alone: the same draws
    np.testing.assert_array_equal(np.asarray(first.tokens), np.asarray(whole.tokens)[:2])


def test_every_eos_id_stops_and_config_lists_generation_eos_ids(tmp_path):
    import json
    import shutil

    from posttrain.trainer.models import ModelConfig
    from posttrain.trainer.sampling import stop_token_ids

    for name in ("config.json", "model.safetensors"):
        shutil.copy(HF_REFERENCE / "llama3-gqa" / name, tmp_path / name)
    assert ModelConfig.from_json_file(str(tmp_path / "config.json")).generation_eos_token_id is None
    greedy = np.load(HF_REFERENCE / "llama3-gqa" / "reference.npz")["greedy_ids"][0]
    # Two of the greedy tokens as the generation config's extra EOS ids (Llama 3 instruct style).
    stops = [int(greedy[5]), int(greedy[2])]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [*stops, 7]}))
    model = load_pretrained(tmp_path)
    config_eos = model.config.eos_token_id
    assert model.config.eos_token_ids == stop_token_ids([*stops, 7], config_eos)
    assert model.config == ModelConfig.from_json_file(
        str(HF_REFERENCE / "llama3-gqa" / "config.json")
    )
    ref = np.load(HF_REFERENCE / "llama3-gqa" / "reference.npz")
    out = generate(model, ref["prompt_ids"], 12, eos_id=model.config.eos_token_ids)
    first = int(np.argmax(np.isin(greedy, stops)))  # the earliest of either id
    assert first <= 2 and out.lengths.tolist() == [first + 1]
    assert stop_token_ids(1, [2, 1], None, np.int64(3)) == (1, 2, 3)


def test_runs_of_one_prompt_are_prefilled_once(tiny):
    """GRPO's G samples of a prompt: prefilled once per run (``prompt_group``), with the tokens
    and log-probs of prefilling every row, in a program that does less work; rows that are not
    runs of one prompt are refused."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, 64, size=int(n)).tolist() for n in (3, 7, 5)]
    rows = [p for p in prompts for _ in range(4)]  # 3 prompts x G = 4
    kwargs = dict(max_new_tokens=9, temperature=1.0, top_k=30, seed=11)
    every_row = generate(tiny, rows, **kwargs)
    grouped = generate(tiny, rows, **kwargs, prompt_group=4)
    tokens = np.asarray(every_row.tokens)
    assert len({tuple(t) for t in tokens[:4]}) > 1  # a run's rows draw their own tokens
    np.testing.assert_array_equal(np.asarray(grouped.tokens), tokens)
    np.testing.assert_array_equal(np.asarray(grouped.mask), np.asarray(every_row.mask))
    for field in ("logprobs", "sampling_logprobs"):
        np.testing.assert_allclose(
            np.asarray(getattr(grouped, field)), np.asarray(getattr(every_row, field)), atol=1e-5
        )
    with pytest.raises(ValueError, match="not runs of 4 copies of one prompt; prompt_group=1"):
        generate(tiny, prompts * 4, **kwargs, prompt_group=4)
    # The compiled rollout does fewer FLOPs: the prefill runs on 3 rows instead of 12.
    graphdef, state = nnx.split(tiny)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    shardings = jax.tree.map(lambda x: x.sharding, state)

    def flops(group):
        lowered = sampler.lower_generate(
            graphdef, state, shardings, mesh, 12, 64, 8, prompt_group=group
        )
        return lowered.compile().cost_analysis()["flops"]

    assert flops(4) < 0.8 * flops(1)
    assert sampler.prefill_group(4, 12, 12, 12, 1) == 4
    assert sampler.prefill_group(4, 12, 12, 4, 1) == 1  # chunked rows: every row prefilled
    assert sampler.prefill_group(4, 12, 12, 12, 2) == 1  # 3 runs do not split over 2 devices
