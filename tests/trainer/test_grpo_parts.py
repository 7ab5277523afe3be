"""GRPO's pieces around the loss: prompts, rollout rows, EOS cuts, seeds, the loss on a real model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.api import parse_job
from posttrain.api.algorithms import REGISTRY
from posttrain.api.v1alpha1 import DataSpec
from posttrain.trainer import algorithms
from posttrain.trainer.algorithms import grpo, report, rollout
from posttrain.trainer.algorithms.base import LossFn, ModelConfigs, Models, token_logprobs
from posttrain.trainer.data import prompts
from posttrain.trainer.data.readers import BadRow
from posttrain.trainer.models import builtin_config, create_model
from posttrain.trainer.tasks.chars import CharTokenizer


def test_rollout_rows_line_up_targets_with_completion_tokens():
    prompts = [[1, 10, 11], [1, 12]]
    completions = np.array([[20, 21, 2, 0], [22, 2, 0, 0]])
    valid = rollout.cut_at_eos(completions, np.ones_like(completions), eos_id=2)
    np.testing.assert_array_equal(valid, [[1, 1, 1, 0], [1, 1, 0, 0]])
    rows = rollout.rollout_arrays(prompts, completions, valid, prompt_len=4, pad_id=0)
    ids, mask = rows["input_ids"], rows["completion_mask"]
    np.testing.assert_array_equal(ids[0], [0, 1, 10, 11, 20, 21, 2, 0])
    np.testing.assert_array_equal(ids[1], [0, 0, 1, 12, 22, 2, 0, 0])
    np.testing.assert_array_equal(rows["attention_mask"][1], [0, 0, 1, 1, 1, 1, 0, 0])
    # Position t's target is token t + 1: the masked targets are exactly the completion tokens.
    assert rows["targets"][0][mask[0] > 0].tolist() == [20, 21, 2]
    assert rows["targets"][1][mask[1] > 0].tolist() == [22, 2]


def test_cut_at_eos_keeps_the_first_eos_and_respects_the_sampler_mask():
    tokens = np.array([[5, 2, 5, 2], [5, 5, 5, 5], [2, 5, 5, 5]])
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(
        rollout.cut_at_eos(tokens, valid, 2), [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]
    )


def test_group_seed_is_a_pure_function_of_seed_and_group():
    assert rollout.group_seed(0, 3) == rollout.group_seed(0, 3)
    assert len({rollout.group_seed(s, k) for s in range(3) for k in range(50)}) == 150


def test_prompts_string_or_messages_and_errors_name_the_field():
    tok = CharTokenizer()
    data = DataSpec(train="x.jsonl", max_prompt_length=4, max_length=16)
    p = prompts.encode_prompt({"prompt": "12+7=", "answer": "19"}, "f:1", tok, data)
    assert p.text == "12+7=" and p.columns == {"answer": "19"}
    # cut from the left to maxPromptLength, the BOS kept in front
    assert list(p.ids) == [tok.bos_token_id, *tok.encode("+7=")]
    chat = prompts.encode_prompt({"prompt": [{"role": "user", "content": "hi"}]}, "f:2", tok, data)
    assert chat.text == "Q: hi\nA: "
    with pytest.raises(BadRow, match=r"f:3: missing prompt field 'prompt' \(spec.data.promptField"):
        prompts.encode_prompt({"question": "q"}, "f:3", tok, data)


def test_chat_prompt_from_a_template_that_writes_bos_has_one_bos(tmp_path):
    import json
    import shutil

    from posttrain.trainer.data.text import HfTokenizer

    shutil.copytree("tests/fixtures/tokenizer", tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}" + config["chat_template"]
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HfTokenizer(str(tmp_path / "tok"))
    data = DataSpec(train="x.jsonl", max_prompt_length=64, max_length=128)
    chat = prompts.encode_prompt({"prompt": [{"role": "user", "content": "hi"}]}, "f:1", tok, data)
    assert chat.ids[0] == tok.bos_token_id and chat.ids.count(tok.bos_token_id) == 1


def test_reward_summary_and_plot(tmp_path):
    history = [{"step": s, "reward_mean": s / 10, "reward/a": s / 20} for s in range(1, 11)]
    summary = report.reward_summary(history, window=3)
    assert summary["reward_first"] == pytest.approx(0.2)
    assert summary["reward_last"] == pytest.approx(0.9)
    path = report.plot_rewards(history, str(tmp_path / "reward.png"))
    assert path and (tmp_path / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.plot_rewards([], str(tmp_path / "none.png")) is None


@pytest.fixture(scope="module")
def tiny():
    tok = CharTokenizer()
    return tok, create_model(builtin_config("tiny", vocab_size=tok.vocab_size))


def rollout_batch(tok, rng, R=4, P=8, N=6):
    prompts = [[tok.bos_token_id, *tok.encode(f"{i}+1=")] for i in range(R)]
    completions = rng.integers(5, 60, (R, N))
    completions[np.arange(R), rng.integers(1, N, R)] = tok.eos_token_id
    valid = rollout.cut_at_eos(completions, np.ones_like(completions), tok.eos_token_id)
    batch = rollout.rollout_arrays(prompts, completions, valid, P, tok.pad_token_id)
    batch["advantages"] = rng.normal(size=R).astype(np.float32)
    batch["tokens_per_row"] = np.full(R, batch["completion_mask"].sum() / R, np.float32)
    batch[grpo.METRIC + "reward_mean"] = rng.normal(size=R).astype(np.float32)
    return batch


def declared_loss(algorithm: str, **block) -> LossFn:
    """The loss ``algorithm`` declares for a job whose block holds ``block`` (its settings
    type's defaults for the rest): what the loop and ``plan`` compile. The rows of these tests
    are not runs of G completions of one prompt, so the shared prompt forward is off unless a
    test turns it on (``test_shared_prompt_forward_*``)."""
    block = {"rewards": [{"builtin": "length-penalty"}], "sharePromptForward": False, **block}
    job = parse_job(
        {
            "apiVersion": "posttrain.dev/v1alpha1",
            "kind": "PostTrainJob",
            "metadata": {"name": "t"},
            "spec": {
                "algorithm": algorithm,
                "model": {"base": "builtin:tiny"},
                "data": {"train": "x.jsonl", "maxLength": 32, "maxPromptLength": 8},
                "training": {"steps": 2, "batchSize": 2},
                "resources": {"accelerator": "cpu"},
                REGISTRY[algorithm].block: block,
            },
        }
    )
    return algorithms.load(algorithm).declare(job.spec, ModelConfigs(None, lambda ref: None)).loss


@pytest.mark.parametrize("algorithm", ["grpo", "gspo-token"])
def test_loss_on_a_real_model_is_minus_mean_advantage_on_policy(tiny, algorithm):
    tok, model = tiny
    batch = {k: jnp.asarray(v) for k, v in rollout_batch(tok, np.random.default_rng(0)).items()}
    value, metrics = declared_loss(algorithm, beta=0.0)(Models(policy=model), batch)
    # On-policy (old = current): ratio 1, no clipping, loss = -mean advantage (sequence-mean).
    assert float(value) == pytest.approx(-float(batch["advantages"].mean()), rel=1e-5)
    assert float(metrics["clip_fraction"]) == 0.0
    assert float(metrics["reward_mean"]) == pytest.approx(float(batch["metric/reward_mean"].mean()))
    assert 0 < float(metrics["entropy"]) <= np.log(tok.vocab_size) + 1e-4


@pytest.mark.parametrize("algorithm", ["dapo", "dr-grpo"])
def test_loss_aggregation_follows_the_algorithm_on_a_real_model(tiny, algorithm):
    # On-policy every token's loss is -A_i, so completion i contributes -A_i |o_i|: DAPO divides
    # by the batch's tokens (token-mean), Dr. GRPO by rows x maxNewTokens (its constant).
    tok, model = tiny
    host = rollout_batch(tok, np.random.default_rng(2), N=6)
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    value, _ = declared_loss(algorithm, maxNewTokens=6)(Models(policy=model), batch)
    lengths = host["completion_mask"].sum(axis=1)
    summed = -(host["advantages"] * lengths).sum()
    expected = summed / lengths.sum() if algorithm == "dapo" else summed / (len(lengths) * 6)
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_filtered_rows_keep_sequence_mean_exact_over_micro_batches(tiny):
    # overlong filter: truncated rows carry no loss. Two in the first half, none in the second:
    # each micro-batch's mean must still add up to the whole batch's mean over rows with loss.
    tok, model = tiny
    host = rollout_batch(tok, np.random.default_rng(3), R=8)
    host["completion_mask"][[0, 2]] = 0.0
    with_loss = host["completion_mask"].sum(axis=1) > 0
    host["sequences_per_row"] = np.full(8, with_loss.mean(), np.float32)
    loss = declared_loss("grpo", beta=0.0, overlong={"mode": "filter"})

    def value(rows):
        part = {k: jnp.asarray(v[rows]) for k, v in host.items()}
        return float(loss(Models(policy=model), part)[0])

    want = -float(host["advantages"][with_loss].mean())  # on-policy: -A_i per token
    assert value(np.arange(8)) == pytest.approx(want, rel=1e-5)
    halves = (value(np.arange(4)) + value(np.arange(4, 8))) / 2
    assert halves == pytest.approx(want, rel=1e-5)


def test_loss_uses_given_old_and_reference_logprobs(tiny):
    tok, model = tiny
    host = rollout_batch(tok, np.random.default_rng(1))
    logp = np.asarray(
        token_logprobs(model, host["input_ids"], host["attention_mask"], host["targets"])
    )
    host["old_logp"] = logp - 0.5 * host["completion_mask"]  # ratio e^0.5 > 1 + eps everywhere
    host["ref_logp"] = logp - 0.1
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    loss = declared_loss("grpo", beta=0.1)
    _, metrics = loss(Models(policy=model), batch)
    positive = (host["advantages"] > 0).astype(np.float32)[:, None] * host["completion_mask"]
    assert float(metrics["clip_fraction"]) == pytest.approx(
        positive.sum() / host["completion_mask"].sum(), rel=1e-5
    )
    x = -0.1
    assert float(metrics["kl"]) == pytest.approx(np.expm1(x) - x, rel=1e-3)
    grads = nnx.grad(lambda m: loss(Models(policy=m), batch)[0])(model)
    total = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads))
    assert np.isfinite(total) and total > 0


def test_loss_log_probs_are_at_the_sampling_temperature(tiny):
    """The KL and ratio see log softmax(logits / T), the policy that sampled (verl, TRL)."""
    tok, model = tiny
    host = rollout_batch(tok, np.random.default_rng(2))
    T = 0.5
    logits = np.asarray(model(jnp.asarray(host["input_ids"]), jnp.asarray(host["attention_mask"])))
    scaled = logits.astype(np.float64) / T
    log_softmax = (
        scaled
        - np.log(np.exp(scaled - scaled.max(-1, keepdims=True)).sum(-1))[..., None]
        - scaled.max(-1, keepdims=True)
    )
    logp_T = np.take_along_axis(log_softmax, host["targets"][..., None], -1)[..., 0]
    host["ref_logp"] = (logp_T - 0.2).astype(
        np.float32
    )  # so the k3 KL is exactly expm1(-0.2) + 0.2
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    _, metrics = declared_loss("grpo", beta=0.1, temperature=T)(Models(policy=model), batch)
    assert float(metrics["kl"]) == pytest.approx(np.expm1(-0.2) + 0.2, rel=1e-3)
