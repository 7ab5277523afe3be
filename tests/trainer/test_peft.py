"""LoRA and QLoRA: adapters start as a no-op, only adapters train, a QLoRA base stays quantized."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.api.v1alpha1 import LoraSpec, ModelSpec, TrainingSpec
from posttrain.trainer import peft
from posttrain.trainer.algorithms import sft
from posttrain.trainer.data import sft as data
from posttrain.trainer.loop import build_model, load_tokenizer, train
from posttrain.trainer.loop_optim import optimizer, schedule
from posttrain.trainer.loop_step import make_train_step, policy_view
from posttrain.trainer.models import load_pretrained, make_mesh

_spec = importlib.util.spec_from_file_location(
    "loop_jobs", os.path.join(os.path.dirname(__file__), "loop_jobs.py")
)
jobs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jobs)
jobs.enable_compile_cache()

LORA = {"rank": 4, "alpha": 8}


def model_spec(**kw) -> ModelSpec:
    return ModelSpec(base="builtin:tiny", dtype="float32", **kw)


def batch_for(tok) -> dict[str, jax.Array]:
    examples = []
    for a in range(10, 18):
        prompt = [tok.bos_token_id, *tok.encode(f"{a}+{a}=")]
        answer = [*tok.encode(str(2 * a)), tok.eos_token_id]
        examples.append(
            data.Example(tuple(prompt + answer), (False,) * len(prompt) + (True,) * len(answer))
        )
    return {k: jnp.asarray(v) for k, v in data.collate(examples, 12, tok.pad_token_id).items()}


@pytest.mark.parametrize(
    "quant", [None, {"type": "int8", "blockSize": 32}, {"type": "nf4", "blockSize": 32}]
)
def test_only_adapters_train_and_the_base_stays_put(quant):
    spec = model_spec(lora=LORA, quantization=quant)
    tok = load_tokenizer(spec)
    model = build_model(spec, tok, make_mesh(), seed=0)
    plain = build_model(model_spec(), tok, make_mesh(), seed=0)
    batch = batch_for(tok)
    if quant is None:  # B = 0: a fresh adapter is exactly the base model
        np.testing.assert_array_equal(model(batch["input_ids"]), plain(batch["input_ids"]))
    graphdef, params, frozen = nnx.split(model, peft.trainable_filter(spec.lora), ...)
    paths = [p for p, _ in nnx.to_flat_state(params)]
    assert paths and all(p[-1] in ("lora_a", "lora_b") for p in paths)
    if quant is not None:
        codes = [v for p, v in nnx.to_flat_state(frozen) if p[-1] == "codes"]
        assert len(codes) == 2 * 7  # every projection of both layers
        assert {str(v.get_value().dtype) for v in codes} == {
            "uint4" if quant["type"] == "nf4" else "int8"
        }
        assert not any(
            p[-1] == "kernel" for p, _ in nnx.to_flat_state(frozen)
        )  # no float copy kept
    ts = TrainingSpec(steps=5, learning_rate=1e-2, schedule={"warmup_steps": 0})
    tx = optimizer(ts)
    opt_state = tx.init(params)
    # Adam keeps two moments per trained value: the optimizer state is the adapters' size, x2.
    assert peft.nbytes(opt_state) - 8 == 2 * peft.nbytes(params)
    step = jax.jit(make_train_step(policy_view(graphdef), sft.loss, tx, schedule(ts), num_micro=2))
    losses = []
    for k in range(5):
        params, opt_state, metrics = step(params, frozen, opt_state, batch, jnp.int32(k))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    # The trained model's base (wherever the split put it) equals a freshly built one, and the
    # adapters moved: a filter that let base weights into the optimizer would fail here.
    trained = nnx.merge(graphdef, params, frozen)
    fresh = build_model(spec, tok, make_mesh(), seed=0)
    base_of = lambda m: nnx.to_flat_state(nnx.state(m, nnx.Not(nnx.LoRAParam)))  # noqa: E731
    for (path, new), (_, old) in zip(base_of(trained), base_of(fresh), strict=True):
        np.testing.assert_array_equal(
            np.asarray(new.get_value()), np.asarray(old.get_value()), path
        )
    lora_b = [
        v for p, v in nnx.to_flat_state(nnx.state(trained, nnx.LoRAParam)) if p[-1] == "lora_b"
    ]
    assert all(np.any(np.asarray(v.get_value()) != 0) for v in lora_b)


def test_lora_a_starts_like_peft():
    """PEFT: kaiming_uniform_(a=sqrt(5)) on A [r, d_in], i.e. uniform in +-1/sqrt(d_in)."""
    model = build_model(model_spec(lora=LORA), load_tokenizer(model_spec()), make_mesh(), seed=0)
    q = np.asarray(model.model.layers[0].self_attn.q_proj.lora.lora_a[...])  # d_in = 64
    down = np.asarray(model.model.layers[0].mlp.down_proj.lora.lora_a[...])  # d_in = 128
    for values, d_in in ((q, 64), (down, 128)):
        gain = np.sqrt(2.0 / (1 + 5))  # torch's leaky_relu gain with a = sqrt(5)
        bound = gain * np.sqrt(3.0 / d_in)
        assert np.abs(values).max() <= bound
        assert np.abs(values).max() > 0.9 * bound  # uniform, so it nearly reaches the bound
        assert values.std() == pytest.approx(bound / np.sqrt(3), rel=0.15)


def test_qlora_block_size_must_divide_every_input_dimension():
    from posttrain.api.v1alpha1 import QuantizationSpec

    model = build_model(model_spec(), load_tokenizer(model_spec()), make_mesh(), seed=0)
    with pytest.raises(ValueError) as err:
        peft.apply_peft(model, LoraSpec(), QuantizationSpec(block_size=48), rngs=nnx.Rngs(0))
    message = str(err.value)
    assert message.startswith("spec.model.quantization.blockSize: 48 does not divide")
    # tiny: hidden 64 (q/k/v/gate/up inputs), heads x head_dim 64 (o_proj), intermediate 128
    assert "q_proj (64)" in message and "down_proj (128)" in message
    assert "16, 32, 64" in message  # the sizes that would work


def test_qlora_job_trains_and_exports_a_plain_model(tmp_path):
    job = jobs.job(
        tmp_path,
        model={"lora": LORA, "quantization": {"type": "nf4", "blockSize": 32}},
        training={"steps": 4},
    )
    out = tmp_path / "out"
    result = train(job, str(out), say=lambda _m: None, progress_bar=False)
    losses = jobs.losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    exported = load_pretrained(result.export_dir)
    assert isinstance(exported.model.layers[0].self_attn.q_proj, nnx.Linear)
    assert result.final["eval_loss"] < losses[1]


def test_quantization_without_lora_is_refused():
    from posttrain.api.v1alpha1 import QuantizationSpec

    model = build_model(model_spec(), load_tokenizer(model_spec()), make_mesh(), seed=0)
    with pytest.raises(ValueError, match="quantization needs spec.model.lora"):
        peft.apply_peft(model, None, QuantizationSpec(), rngs=nnx.Rngs(0))
    assert isinstance(LoraSpec().targets, list)
