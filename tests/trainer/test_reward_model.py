"""Reward models against transformers' `*ForSequenceClassification` scores (tests/fixtures/hf-reward),
and `posttrain score` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.cli import main
from posttrain.trainer.models.reward_model import load_reward_model, pool_index

REWARD_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf-reward"
NAMES = ["llama-rm", "qwen2-rm"]
TOL = dict(atol=1e-4, rtol=0)  # the fixtures' README: 20x the float32 noise measured there


def expected(name: str) -> dict:
    return json.loads((REWARD_FIXTURES / name / "expected.json").read_text())


def legacy_copy(tmp_path: Path, name: str) -> Path:
    """The fixture with its transformers 4.x config.json (rope_theta / rope_scaling)."""
    folder = tmp_path / name
    shutil.copytree(REWARD_FIXTURES / name, folder)
    shutil.copy(folder / "config.legacy.json", folder / "config.json")
    return folder


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
    return request.param, load_reward_model(REWARD_FIXTURES / request.param)


@nnx.jit
def forward(model, ids, mask):
    """Pooled scores [B] and the head at every position [B, T] (positions 0..T-1, as in HF)."""
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return model.scores(ids, mask), model(ids, mask, positions=positions)[..., 0]


def test_each_text_alone_matches_transformers(loaded):
    name, model = loaded
    for text in expected(name)["texts"]:
        ids = jnp.asarray([text["ids"]], jnp.int32)
        scores, per_position = forward(model, ids, jnp.ones_like(ids))
        np.testing.assert_allclose(scores, [text["score"]], **TOL, err_msg=text["name"])
        np.testing.assert_allclose(
            per_position[0], text["per_position_scores"], **TOL, err_msg=text["name"]
        )
        assert int(pool_index(ids, 0)[0]) == text["pooled_index"]


@pytest.mark.parametrize("side", ["right_padded", "left_padded"])
def test_padded_batches_match_transformers(loaded, side):
    name, model = loaded
    batch = expected(name)[side]
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    mask = jnp.asarray(batch["attention_mask"], jnp.int32)
    np.testing.assert_array_equal(pool_index(ids, 0), batch["pooled_index"])
    np.testing.assert_allclose(forward(model, ids, mask)[0], batch["scores"], **TOL)


def test_pooling_quirks_match_transformers(loaded):
    # A trailing real pad id is skipped; padding with another id under mask 0 is pooled into.
    name, model = loaded
    for case in expected(name)["edge_cases"]:
        ids = jnp.asarray(case["input_ids"], jnp.int32)
        mask = jnp.asarray(case["attention_mask"], jnp.int32)
        np.testing.assert_array_equal(
            pool_index(ids, 0), case["pooled_index"], err_msg=case["name"]
        )
        np.testing.assert_allclose(
            forward(model, ids, mask)[0], case["scores"], **TOL, err_msg=case["name"]
        )


@pytest.mark.parametrize("name", NAMES)
def test_legacy_config_layout_gives_the_same_scores(tmp_path, name):
    model = load_reward_model(legacy_copy(tmp_path, name))
    batch = expected(name)["right_padded"]
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    mask = jnp.asarray(batch["attention_mask"], jnp.int32)
    np.testing.assert_allclose(forward(model, ids, mask)[0], batch["scores"], **TOL)


def test_pool_index_without_pad_token():
    assert pool_index(jnp.zeros((1, 5), jnp.int32), None).tolist() == [4]
    with pytest.raises(ValueError, match="no pad_token_id"):
        pool_index(jnp.zeros((2, 5), jnp.int32), None)


def test_refuses_what_is_not_a_one_label_classifier(tmp_path):
    folder = tmp_path / "rm"
    shutil.copytree(REWARD_FIXTURES / "llama-rm", folder)
    config = json.loads((folder / "config.json").read_text())
    for edit, message in [
        ({"architectures": ["LlamaForCausalLM"]}, "name no \\*ForSequenceClassification"),
        ({"id2label": {"0": "bad", "1": "good"}}, "has 2 labels"),
        ({"model_type": "gemma3_text"}, "model_type 'gemma3_text' is not supported"),
    ]:
        (folder / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(ValueError, match=message):
            load_reward_model(folder)
    # A checkpoint without the head fails naming the tensor.
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["score.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match="score.weight"):
        load_reward_model(folder)


@pytest.mark.parametrize("name", NAMES)
def test_score_command_prints_one_score_per_line_in_order(tmp_path, capsys, name):
    texts = expected(name)["texts"]
    data = tmp_path / "texts.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t["text"], "id": i}) + "\n" for i, t in enumerate(texts))
    )
    code = main(
        ["score", "--reward-model", str(REWARD_FIXTURES / name), str(data), "--batch-size", "3"]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(texts)
    np.testing.assert_allclose([float(x) for x in lines], [t["score"] for t in texts], **TOL)


def test_score_command_names_the_bad_line(tmp_path, capsys):
    data = tmp_path / "texts.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"prompt": "no text"}) + "\n")
    code = main(["score", "--reward-model", str(REWARD_FIXTURES / "llama-rm"), str(data)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"{data}:2: " in err and '"text"' in err
