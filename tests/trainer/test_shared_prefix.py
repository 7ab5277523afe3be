"""The shared prompt forward (``models/shared_prefix.py``, ``sharePromptForward``): each run of G
rollout rows computes its prompt once, and gets the hidden states, log-probs, losses and gradients
of G separate copies."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.api.settings.grpo import GrpoSpec
from posttrain.api.v1alpha1 import TrainingSpec
from posttrain.trainer.algorithms import grpo, rollout
from posttrain.trainer.algorithms.base import Context, Models, token_logprobs
from posttrain.trainer.models import builtin_config, create_model, load_pretrained
from posttrain.trainer.models.shared_prefix import shared_prefix_hidden
from posttrain.trainer.tasks.chars import CharTokenizer
from tests.trainer.test_grpo_parts import declared_loss

G, P, N = 4, 8, 6  # completions per prompt, prompt width, completion width


def group_rows(tok, rng, prompts=3):
    """``prompts`` x G rollout rows: left-padded prompts of different lengths, each G times,
    completions cut at an EOS at different places (right padding after it)."""
    texts = [[tok.bos_token_id, *tok.encode(f"{7 * i + 3}+{i}=")] for i in range(prompts)]
    rows = [t for t in texts for _ in range(G)]
    completions = rng.integers(5, 60, (len(rows), N))
    completions[np.arange(len(rows)), rng.integers(1, N, len(rows))] = tok.eos_token_id
    valid = rollout.cut_at_eos(completions, np.ones_like(completions), tok.eos_token_id)
    batch = rollout.rollout_arrays(rows, completions, valid, P, tok.pad_token_id)
    batch["advantages"] = rng.normal(size=len(rows)).astype(np.float32)
    batch["tokens_per_row"] = np.full(len(rows), batch["completion_mask"].sum() / len(rows), np.float32)  # fmt: skip
    return batch


@pytest.fixture(scope="module")
def tiny():
    tok = CharTokenizer()
    return tok, create_model(builtin_config("tiny", vocab_size=tok.vocab_size))


def loss_and_grads(loss, model, batch):
    """(loss, metrics, gradient leaves) of a declared loss, jitted: op by op, the backward pass
    of even the tiny model takes tens of seconds."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, batch):
        def of(params):
            return loss(Models(policy=nnx.merge(graphdef, params)), batch)

        return jax.value_and_grad(of, has_aux=True)(params)

    (value, metrics), grads = run(params, batch)
    return float(value), metrics, jax.tree.leaves(grads)


def _hidden_pair(model, batch):
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    graphdef, params = nnx.split(model)

    @jax.jit
    def both(params, ids, mask):
        model = nnx.merge(graphdef, params)
        plain, _ = model.hidden_states(ids, mask)
        return plain, shared_prefix_hidden(model, ids, mask, prefix_len=P, group=G)

    plain, shared = both(params, ids, mask)
    real = np.asarray(batch["attention_mask"], bool)  # padding positions' outputs are unused
    return np.asarray(plain)[real], np.asarray(shared)[real]


def test_shared_prompt_hidden_states_equal_the_plain_forward(tiny):
    tok, model = tiny
    plain, shared = _hidden_pair(model, group_rows(tok, np.random.default_rng(0)))
    np.testing.assert_allclose(shared, plain, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gemma2-softcap-active", "gemma3-text"])
def test_shared_prompt_forward_on_sliding_window_and_softcapped_models(name):
    # Gemma 2/3: sliding-window layers, attention soft-capping (2), the cached path's masks.
    tok = CharTokenizer()
    model = load_pretrained(f"tests/fixtures/hf-reference/{name}")
    batch = group_rows(tok, np.random.default_rng(1))
    batch["input_ids"] = batch["input_ids"] % model.config.vocab_size
    plain, shared = _hidden_pair(model, batch)
    np.testing.assert_allclose(shared, plain, atol=2e-4, rtol=1e-4)


@pytest.fixture
def reported_gpu(monkeypatch):
    """The backend reported as "gpu" for the kernel choices; programs traced meanwhile are
    dropped afterwards, so no later test reuses one built with the GPU's kernels."""
    from posttrain.trainer.models import attention_kernels, transformer

    monkeypatch.setattr(attention_kernels, "current_backend", lambda: "gpu")
    monkeypatch.setattr(transformer, "current_backend", lambda: "gpu")
    yield
    jax.clear_caches()


def test_the_gpu_path_attends_through_the_fused_kernel_with_the_same_results(
    tiny, monkeypatch, reported_gpu
):
    """On a GPU the shared prompt's prefill and the completions' attention through the cache go
    through ``fused_attention`` (cuDNN for 16-bit activations, XLA's kernel for float32), not
    ``cached_attention``. Here XLA's kernel, which runs on the CPU, stands in for the GPU's: the
    backend is reported as "gpu", and the hidden states and the GRPO gradients must still be the
    plain forward's."""
    from posttrain.trainer.models import transformer

    tok, model = tiny
    kernels: list[str] = []
    fused = transformer.fused_attention

    def counted(*args):
        kernels.append(args[-1])
        return fused(*args)

    monkeypatch.setattr(transformer, "fused_attention", counted)
    host = group_rows(tok, np.random.default_rng(5))
    plain, shared = _hidden_pair(model, host)
    np.testing.assert_allclose(shared, plain, atol=2e-5, rtol=1e-5)
    layers = len(model.model.layers)
    assert kernels == ["xla"] * (3 * layers), kernels  # plain, prefill, completions: all fused

    logp = np.asarray(
        token_logprobs(model, host["input_ids"], host["attention_mask"], host["targets"])
    )
    host["old_logp"] = logp - 0.3 * host["completion_mask"]
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    block = dict(numGenerations=G, maxNewTokens=N, beta=0.0)
    grads = {}
    for share in (True, False):
        loss = declared_loss("grpo", sharePromptForward=share, **block)
        grads[share] = loss_and_grads(loss, model, batch)[2]
    for a, b in zip(grads[True], grads[False], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_grpo_loss_and_gradients_equal_with_and_without_the_shared_prompt(tiny):
    tok, model = tiny
    host = group_rows(tok, np.random.default_rng(2))
    logp = np.asarray(
        token_logprobs(model, host["input_ids"], host["attention_mask"], host["targets"])
    )
    host["old_logp"] = logp - 0.3 * host["completion_mask"]  # the ratio leaves 1 and clips
    host["ref_logp"] = logp - 0.1
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    block = dict(numGenerations=G, maxNewTokens=N, beta=0.1)
    shared_loss = declared_loss("grpo", sharePromptForward=True, **block)
    plain_loss = declared_loss("grpo", sharePromptForward=False, **block)

    v_shared, m_shared, g_shared = loss_and_grads(shared_loss, model, batch)
    v_plain, m_plain, g_plain = loss_and_grads(plain_loss, model, batch)
    assert v_shared == pytest.approx(v_plain, rel=1e-5, abs=1e-6)
    assert float(m_shared["clip_fraction"]) == pytest.approx(float(m_plain["clip_fraction"]))
    assert float(m_plain["clip_fraction"]) > 0  # the ratio really moved
    assert sum(float(jnp.abs(g).sum()) for g in g_plain) > 0
    for a, b in zip(g_shared, g_plain, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_shared_log_probs_of_the_no_gradient_passes(tiny):
    tok, model = tiny
    host = group_rows(tok, np.random.default_rng(3))
    args = (model, host["input_ids"], host["attention_mask"], host["targets"])
    plain = np.asarray(token_logprobs(*args, completion_width=N))
    shared = np.asarray(token_logprobs(*args, completion_width=N, prompt_group=G))
    scored = host["completion_mask"] > 0
    np.testing.assert_allclose(shared[scored], plain[scored], atol=1e-5)
    assert (shared[:, : P - 1] == 0).all() and (shared[:, -1] == 0).all()  # no LM head there


def test_rows_that_are_not_runs_of_one_prompt_are_refused(tiny):
    tok, _ = tiny
    batch = group_rows(tok, np.random.default_rng(4))
    grpo.check_prompt_runs(batch, G, N)  # runs: fine
    batch["input_ids"][1, P - 2] += 1  # the second row's prompt differs from its run's first
    with pytest.raises(ValueError, match="not runs of 4 copies of one prompt; sharePromptForward"):
        grpo.check_prompt_runs(batch, G, N)
    with pytest.raises(ValueError, match="not whole runs of group=5"):
        shared_prefix_hidden(tiny[1], batch["input_ids"], batch["attention_mask"], prefix_len=P, group=5)  # fmt: skip


def _settings(**block):
    return GrpoSpec(rewards=[{"builtin": "length-penalty"}], num_generations=G, **block)


@pytest.mark.parametrize(
    ("block", "training", "want"),
    [
        ({}, {}, G),
        ({"share_prompt_forward": False}, {}, 1),
        ({"num_mini_batches": 2}, {}, 1),  # mini-batches permute rows
        ({"sft_warmup_steps": 1, "beta": 0.0}, {}, 1),  # SFT rows are not groups
        ({}, {"micro_batch_size": 1}, G),  # the rows reordered: contiguous_micro_order
        ({}, {"micro_batch_size": 2}, G),  # one micro-batch of the whole batch
        ({}, {"remat": "full"}, 1),  # the shared path runs without remat
        ({}, {"scan_layers": True}, 1),
    ],
)
def test_the_update_shares_only_where_its_micro_batches_are_whole_groups(block, training, want):
    spec = TrainingSpec(steps=3, batch_size=2, **training)
    assert grpo.update_prompt_group(_settings(**block), spec) == want


def test_the_no_gradient_passes_share_only_in_chunks_of_whole_groups():
    def group(rows, micro_rows):
        return Context(job=None, tokenizer=None, output_dir="", micro_rows=micro_rows).pass_prompt_group(rows, G)  # type: ignore[arg-type]  # fmt: skip

    assert group(16, None) == G
    assert group(16, 16) == G
    assert group(16, 8) == G  # two chunks of two runs
    assert group(16, 6) == 1  # chunks would split runs
    assert group(12, 8) == 1  # the short last chunk is padded with copies of one row
    assert group(14, None) == 1


def test_the_micro_batch_order_hands_each_micro_batch_whole_groups():
    from posttrain.trainer.loop_step import contiguous_micro_order, split_micro

    rows, num_micro = 24, 3
    order = contiguous_micro_order(rows, num_micro)
    assert sorted(order.tolist()) == list(range(rows))  # a permutation
    micro = np.asarray(split_micro({"row": jnp.asarray(order)}, num_micro)["row"])
    np.testing.assert_array_equal(micro, np.arange(rows).reshape(num_micro, rows // num_micro))


def _grpo_job(tmp: Path, share: bool):
    # mu 2: the old policy's log-probs; step 2 trains on step 1's rollouts with moved weights
    training = {"steps": 2, "microBatchSize": 2, "learningRate": 1e-2, "schedule": {"name": "constant", "warmupSteps": 0}}  # fmt: skip
    return _loop_jobs().grpo_job(
        tmp, prompts=32, training=training, numIterations=2, sharePromptForward=share
    )


def _loop_jobs():
    spec = importlib.util.spec_from_file_location(
        "loop_jobs", os.path.join(os.path.dirname(__file__), "loop_jobs.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_grpo_run_with_micro_batches_trains_the_same_with_the_shared_prompt(tmp_path):
    # Two micro-batches (the rows reordered into whole groups), old and reference log-probs:
    # every pass that shares must give the run that does not share.
    jobs = _loop_jobs()
    runs = {}
    for share in (True, False):
        out = tmp_path / f"share-{share}"
        out.mkdir()
        jobs.run_training(_grpo_job(out, share), out / "run")
        runs[share] = [m for m in jobs.metrics(out / "run") if "loss" in m]
    for shared, plain in zip(runs[True], runs[False], strict=True):
        for key in ("loss", "grad_norm", "kl", "clip_fraction", "reward_mean"):
            assert shared[key] == pytest.approx(plain[key], rel=2e-3, abs=1e-5), (key, shared)
    assert len(runs[True]) == 2 and runs[True][1]["kl"] > 0  # step 2 moved off the reference
