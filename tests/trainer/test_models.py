"""Parity with Hugging Face on the tiny reference models, config layouts, checkpoint I/O and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from posttrain.trainer.models import (
    SUPPORTED_MODEL_TYPES,
    CausalLM,
    ModelConfig,
    builtin_config,
    create_model,
    load_pretrained,
    save_pretrained,
    set_scan_layers,
)

from .hf_reference import HF_REFERENCE, MODEL_FIXTURES

TOL = dict(atol=1e-4, rtol=1e-4)  # 15x the float32 noise measured in the fixtures' README


@nnx.jit(static_argnames="return_hidden")
def _forward(model, ids, mask=None, return_hidden=False):
    return model(ids, mask, return_hidden=return_hidden)


@nnx.jit
def _forward_cached(model, ids, cache):
    return model(ids, cache=cache)


def _with_config(tmp_path: Path, name: str, config_file: str) -> Path:
    """The fixture folder with ``config_file`` as its config.json (weights symlinked, not copied)."""
    src = HF_REFERENCE / name
    if config_file == "config.json":
        return src
    dst = tmp_path / name
    dst.mkdir()
    shutil.copy(src / config_file, dst / "config.json")
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    ("config_file", "scan"),
    [("config.json", False), ("config.legacy.json", False), ("config.json", True)],
)
@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_logits_match_hugging_face(tmp_path, name, config_file, scan):
    """Also with the layers under lax.scan (spec.training.scanLayers): the same checkpoint, the
    same logits, Gemma's alternating sliding/global layers and per-type RoPE included."""
    ref = np.load(HF_REFERENCE / name / "reference.npz")
    model = load_pretrained(_with_config(tmp_path, name, config_file))
    set_scan_layers(model, scan)

    logits, hidden = _forward(model, jnp.asarray(ref["input_ids"]), return_hidden=True)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], **TOL)
    np.testing.assert_allclose(np.asarray(hidden), ref["hidden_last"], **TOL)

    # Right-padded row: 9 pads outnumber the Gemma sliding window of 8 (the -inf NaN trap).
    mask = ref["padded_attention_mask"]
    padded = np.asarray(_forward(model, jnp.asarray(ref["padded_input_ids"]), jnp.asarray(mask)))
    assert np.isfinite(padded).all()
    valid = mask.astype(bool)
    np.testing.assert_allclose(padded[valid], ref["padded_logits"][valid], **TOL)


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_both_config_layouts_parse_to_the_same_config(name):
    new = ModelConfig.from_json_file(str(HF_REFERENCE / name / "config.json"))
    legacy = ModelConfig.from_json_file(str(HF_REFERENCE / name / "config.legacy.json"))
    assert new == legacy


def test_family_features_are_parsed():
    cfg = {
        n: ModelConfig.from_json_file(str(HF_REFERENCE / n / "config.legacy.json"))
        for n in MODEL_FIXTURES
    }
    assert cfg["llama3-gqa"].rope.type == "llama3" and cfg["llama3-gqa"].rope.factor == 8.0
    assert cfg["qwen2-bias-tied"].qkv_bias and not cfg["qwen2-bias-tied"].o_bias
    assert cfg["qwen3-qknorm"].qk_norm and cfg["qwen3-qknorm"].head_dim == 32
    g3 = cfg["gemma3-text"]
    assert g3.layer_types == ("sliding_attention", "full_attention") * 2
    assert (g3.rope.theta, g3.rope_local.theta) == (1e6, 1e4)
    g2 = cfg["gemma2-softcap-active"]
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.attention_scale) == (
        50.0,
        30.0,
        24**-0.5,
    )


def test_unsupported_model_type_lists_supported_ones(tmp_path):
    hf = json.loads((HF_REFERENCE / "llama3-gqa" / "config.json").read_text())
    hf["model_type"] = "mixtral"
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="mixtral") as err:
        load_pretrained(tmp_path)
    for supported in SUPPORTED_MODEL_TYPES:
        assert supported in str(err.value)


def test_unsupported_rope_type_is_named():
    hf = json.loads((HF_REFERENCE / "qwen2-bias-tied" / "config.legacy.json").read_text())
    hf["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="yarn.*llama3"):
        ModelConfig.from_hf(hf)


def _fixture_copy(tmp_path: Path, name: str, edit) -> Path:
    """Copy of a fixture whose tensors were passed through ``edit(dict) -> dict``."""
    dst = tmp_path / name
    dst.mkdir()
    shutil.copy(HF_REFERENCE / name / "config.json", dst / "config.json")
    tensors = load_file(str(HF_REFERENCE / name / "model.safetensors"))
    save_file(edit(tensors), str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(tmp_path):
    name = "model.layers.1.self_attn.k_proj.bias"
    folder = _fixture_copy(
        tmp_path, "qwen2-bias-tied", lambda t: {k: v for k, v in t.items() if k != name}
    )
    with pytest.raises(KeyError, match=rf"{name} \(32,\)"):
        load_pretrained(folder)


def test_misshaped_tensor_is_named(tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"

    def edit(t):
        t[name] = t[name][:100]
        return t

    folder = _fixture_copy(tmp_path, "llama3-gqa", edit)
    with pytest.raises(ValueError, match=rf"{name} has shape \(100, 64\).*\(160, 64\)"):
        load_pretrained(folder)


@pytest.mark.parametrize("name", ["llama3-gqa", "gemma3-text"])
def test_save_load_round_trip_is_exact(tmp_path, name):
    model = load_pretrained(HF_REFERENCE / name)
    save_pretrained(model, tmp_path / "out")
    original = load_file(str(HF_REFERENCE / name / "model.safetensors"))
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert saved.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(saved[key], original[key], err_msg=key)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (HF_REFERENCE / name / "config.json").read_text()
    )
    reloaded = load_pretrained(tmp_path / "out")
    assert reloaded.config == model.config
    ids = jnp.arange(10)[None] % model.config.vocab_size
    np.testing.assert_array_equal(
        np.asarray(_forward(reloaded, ids)), np.asarray(_forward(model, ids))
    )


def test_builtin_model_runs_and_round_trips(tmp_path):
    config = builtin_config("tiny", vocab_size=100)
    model = create_model(config, rngs=nnx.Rngs(3))
    assert isinstance(model, CausalLM) and model.config is config
    ids = jnp.array([[1, 2, 3, 4], [0, 0, 5, 6]])
    logits = _forward(model, ids, jnp.array([[1, 1, 1, 1], [0, 0, 1, 1]]))
    assert logits.shape == (2, 4, 100) and logits.dtype == jnp.float32
    save_pretrained(model, tmp_path / "tiny")
    reloaded = load_pretrained(tmp_path / "tiny")
    assert reloaded.config == config
    for (_, a), (_, b) in zip(nnx.iter_graph(model), nnx.iter_graph(reloaded), strict=True):
        if isinstance(a, nnx.Param):
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


def test_left_padded_rows_match_unpadded_rows():
    """Default positions count real tokens, so a left-padded row equals the same row unpadded."""
    model = load_pretrained(HF_REFERENCE / "gemma3-text")
    ids = np.asarray(np.load(HF_REFERENCE / "gemma3-text" / "reference.npz")["input_ids"][:1, :14])
    alone = np.asarray(_forward(model, jnp.asarray(ids)))
    padded = np.concatenate([np.zeros((1, 10), ids.dtype), ids], axis=1)  # 10 pads > window 8
    mask = np.concatenate([np.zeros((1, 10)), np.ones((1, 14))], axis=1).astype(np.int32)
    out = np.asarray(_forward(model, jnp.asarray(padded), jnp.asarray(mask)))
    np.testing.assert_allclose(out[:, 10:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gemma3-text", "qwen2-bias-tied"])
def test_kv_cache_steps_match_full_forward(name):
    """Prefill with a cache, then one token at a time: same logits as one full forward."""
    model = load_pretrained(HF_REFERENCE / name)
    ids = jnp.asarray(np.load(HF_REFERENCE / name / "reference.npz")["input_ids"][:, :20])
    full = np.asarray(_forward(model, ids))
    cache = model.init_cache(batch=2, max_len=32)
    logits, cache = _forward_cached(model, ids[:, :5], cache)
    steps = [np.asarray(logits)]
    for t in range(5, 20):
        logits, cache = _forward_cached(model, ids[:, t : t + 1], cache)
        steps.append(np.asarray(logits))
    assert int(cache.index) == 20
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def test_bfloat16_load_keeps_dtype_and_stays_close():
    ref = np.load(HF_REFERENCE / "llama3-gqa" / "reference.npz")
    model = load_pretrained(HF_REFERENCE / "llama3-gqa", dtype=jnp.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.kernel.get_value().dtype == jnp.bfloat16
    logits = _forward(model, jnp.asarray(ref["input_ids"]))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=0.1)


def test_lora_attaches_to_the_projections(tmp_path):
    """nnx.LoRA and qwix's LoRA wrap the nnx.Linear projections; fresh adapters leave the logits unchanged."""
    import qwix

    config = builtin_config("tiny", vocab_size=64)
    ids = jnp.arange(12)[None] % 64
    model = create_model(config, rngs=nnx.Rngs(0))
    base = np.asarray(_forward(model, ids))

    rngs = nnx.Rngs(1)
    for layer in model.model.layers:
        for name in ("q_proj", "v_proj"):
            proj = getattr(layer.self_attn, name)
            lora = nnx.LoRA(proj.in_features, 4, proj.out_features, base_module=proj, rngs=rngs)
            setattr(layer.self_attn, name, lora)
    np.testing.assert_allclose(np.asarray(_forward(model, ids)), base, atol=1e-6)
    assert len(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))) == 2 * 2 * config.num_layers
    with pytest.raises(ValueError, match="LoRA parameters"):
        save_pretrained(model, tmp_path / "x")

    model = create_model(config, rngs=nnx.Rngs(0))
    provider = qwix.LoraProvider(
        module_path=r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        rank=4,
        alpha=8.0,
    )
    lora_model = qwix.apply_lora_to_model(model, provider, ids, rngs=nnx.Rngs(2))
    np.testing.assert_allclose(np.asarray(_forward(lora_model, ids)), base, atol=1e-6)
    paths = {
        ".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(lora_model, nnx.LoRAParam))
    }
    assert (
        "model.layers.1.mlp.down_proj.kernel_lora_b" in paths
        and len(paths) == 2 * 7 * config.num_layers
    )


def test_sharded_checkpoint_index_loads(tmp_path):
    """model.safetensors.index.json + several files, as large hub checkpoints ship."""
    name = "qwen3-qknorm"
    tensors = load_file(str(HF_REFERENCE / name / "model.safetensors"))
    keys = sorted(tensors)
    parts = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for file, part in parts.items():
        save_file({k: tensors[k] for k in part}, str(tmp_path / file), metadata={"format": "pt"})
    weight_map = {k: file for file, part in parts.items() for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    shutil.copy(HF_REFERENCE / name / "config.json", tmp_path / "config.json")
    ref = np.load(HF_REFERENCE / name / "reference.npz")
    logits = _forward(load_pretrained(tmp_path), jnp.asarray(ref["input_ids"]))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], **TOL)


def test_load_streams_tensor_by_tensor(tmp_path):
    """Host memory during a load stays near one tensor, far below the checkpoint size."""
    import tracemalloc

    config = builtin_config(
        "small", vocab_size=2048, hidden_size=256, intermediate_size=1024, tie_word_embeddings=False
    )
    save_pretrained(create_model(config, rngs=nnx.Rngs(0)), tmp_path)
    total = (tmp_path / "model.safetensors").stat().st_size
    largest = 2048 * 256 * 4
    load_pretrained(tmp_path)  # warm up tracing caches outside the measurement
    tracemalloc.start()
    model = load_pretrained(tmp_path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total > 15e6
    assert peak < 2 * largest, (
        f"peak host allocation {peak / 1e6:.1f} MB for a {total / 1e6:.1f} MB checkpoint"
    )
    assert model.lm_head.kernel.get_value().shape == (256, 2048)
