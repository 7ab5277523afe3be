"""SFT packing: segment ids keep packed examples independent (attention, positions, loss)."""

from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.trainer.algorithms import sft
from posttrain.trainer.algorithms.base import Models, token_logprobs
from posttrain.trainer.data import sft as data
from posttrain.trainer.loop import train
from posttrain.trainer.models import builtin_config, create_model, transformer
from posttrain.trainer.models.transformer import segment_positions

VOCAB = 40
SEQ = 24
PAD = 0
MODEL_KEYS = ("input_ids", "attention_mask", "segment_ids")


def tiny_model(**overrides):
    return create_model(builtin_config("tiny", vocab_size=VOCAB, **overrides), rngs=nnx.Rngs(0))


def examples(seed: int = 0) -> list[data.Example]:
    rng = np.random.default_rng(seed)
    return [
        data.Example(tuple(rng.integers(3, VOCAB, n).tolist()), (False,) * (n - k) + (True,) * k)
        for n, k in ((7, 3), (5, 4), (9, 5), (6, 2), (8, 8))
    ]


def device(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def logprobs(model, batch):
    return np.asarray(
        token_logprobs(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["targets"],
            segment_ids=batch.get("segment_ids"),
        )
    )


def per_example_rows(packed_batch) -> list[tuple[int, slice]]:
    """(row, token span) of each packed example, in order."""
    spans = []
    for b, segs in enumerate(packed_batch["segment_ids"]):
        for s in range(1, segs.max() + 1):
            where = np.flatnonzero(segs == s)
            spans.append((b, slice(where[0], where[-1] + 1)))
    return spans


def test_pack_numbers_segments_and_collate_emits_them():
    rows = data.pack(examples(), SEQ)
    assert [r.segments for r in rows][0] == (1,) * 7 + (2,) * 5 + (3,) * 9
    batch = data.collate(rows, SEQ, PAD, segment_ids=True)
    assert batch["segment_ids"].shape == batch["input_ids"].shape
    assert ((batch["segment_ids"] > 0) == (batch["attention_mask"] > 0)).all()
    # no trained target crosses into the next example
    segs = batch["segment_ids"]
    crossing = segs[:, :-1] != segs[:, 1:]
    assert not (batch["loss_weights"][:, :-1][crossing] > 0).any()
    # unpacked rows: no extra key (shapes and compiled step as before) unless asked for
    assert "segment_ids" not in data.collate(examples(), SEQ, PAD)
    ones = data.collate(examples(), SEQ, PAD, segment_ids=True)["segment_ids"]
    assert (ones == data.collate(examples(), SEQ, PAD)["attention_mask"]).all()


def test_segment_positions_restart_at_each_example():
    segs = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    pos = np.asarray(segment_positions(segs, segs != 0))
    np.testing.assert_array_equal(pos[0, :6], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(pos[1], np.arange(8))


def test_model_restarts_rope_positions_per_segment(monkeypatch):
    # RoPE scores depend on position differences only, so logits cannot show a constant shift
    # per segment; check the positions the model hands to RoPE instead.
    seen = []
    real_rope = transformer.apply_rope

    def recording_rope(x, positions_bt, inv_freq):
        seen.append(np.asarray(positions_bt))
        return real_rope(x, positions_bt, inv_freq)

    monkeypatch.setattr(transformer, "apply_rope", recording_rope)
    segs = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    tiny_model()(jnp.full((1, 8), 5, jnp.int32), segment_ids=segs)
    np.testing.assert_array_equal(seen[0][0, :6], [0, 1, 2, 0, 1, 0])


@pytest.mark.parametrize("sliding", [False, True], ids=["full", "sliding-window"])
def test_packed_equals_unpacked_per_example(sliding):
    overrides = {}
    if sliding:  # windows shorter than the examples: the window must stay inside a segment too
        overrides = dict(layer_types=("sliding_attention", "full_attention"), sliding_window=4)
    model = tiny_model(**overrides)
    exs = examples()
    rows = data.pack(exs, SEQ)
    assert len(rows) < len(exs)  # several examples share a row
    packed = data.collate(rows, SEQ, PAD, segment_ids=True)
    unpacked = data.collate(exs, SEQ, PAD)
    packed_logp = logprobs(model, device(packed))
    unpacked_logp = logprobs(model, device(unpacked))

    spans = per_example_rows(packed)
    assert len(spans) == len(exs)
    for i, (row, span) in enumerate(spans):
        n = span.stop - span.start
        # every token but the last predicts a token of its own example
        np.testing.assert_allclose(
            packed_logp[row, span.start : span.stop - 1],
            unpacked_logp[i, : n - 1],
            rtol=1e-5,
            atol=1e-5,
        )
        # per-example loss: the same trained tokens, the same NLL
        packed_mask = packed["loss_weights"][row, span] > 0
        unpacked_mask = unpacked["loss_weights"][i, :n] > 0
        np.testing.assert_array_equal(packed_mask, unpacked_mask)
        np.testing.assert_allclose(
            -(packed_logp[row, span] * packed_mask).sum(),
            -(unpacked_logp[i, :n] * unpacked_mask).sum(),
            rtol=1e-5,
        )

    # the batch loss: the mean NLL over the same set of trained tokens
    loss_packed, _ = sft.loss(Models(policy=model), device(packed))
    loss_unpacked, _ = sft.loss(Models(policy=model), device(unpacked))
    assert float(loss_packed) == pytest.approx(float(loss_unpacked), rel=1e-5)


def test_changing_one_packed_example_leaves_the_next_unchanged():
    model = tiny_model()
    row = data.pack(examples()[:3], SEQ)[0]
    batch = data.collate([row], SEQ, PAD, segment_ids=True)
    changed = {k: v.copy() for k, v in batch.items()}
    first = changed["segment_ids"][0] == 1
    changed["input_ids"][0, first] = (changed["input_ids"][0, first] + 7) % (VOCAB - 3) + 3

    logits = np.asarray(model(**{k: jnp.asarray(batch[k]) for k in MODEL_KEYS}))
    logits_changed = np.asarray(model(**{k: jnp.asarray(changed[k]) for k in MODEL_KEYS}))
    later = batch["segment_ids"][0] >= 2
    np.testing.assert_allclose(logits[0, later], logits_changed[0, later], rtol=1e-6, atol=1e-6)
    assert not np.allclose(logits[0, first], logits_changed[0, first])

    # without segment ids the same change leaks into the later examples (what packing used to do)
    plain = np.asarray(model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])))
    plain_changed = np.asarray(
        model(jnp.asarray(changed["input_ids"]), jnp.asarray(changed["attention_mask"]))
    )
    assert not np.allclose(plain[0, later], plain_changed[0, later], atol=1e-4)


def test_segment_ids_with_a_cache_are_refused():
    model = tiny_model()
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids .* KV cache"):
        model(ids, segment_ids=jnp.ones((1, 4), jnp.int32), cache=model.init_cache(1, 8))


def test_source_with_packing_yields_segment_ids():
    source = data.SftSource(examples(), batch_size=2, seq_len=SEQ, pad_id=PAD, seed=0, packing=True)
    batch = source.next_batch(0)
    assert batch["segment_ids"].shape == (2, SEQ)
    assert batch["segment_ids"].max() >= 2
    plain = data.SftSource(examples(), batch_size=2, seq_len=SEQ, pad_id=PAD, seed=0)
    assert "segment_ids" not in plain.next_batch(0)


def test_a_packed_sft_job_trains_through_the_loop(tmp_path):
    """segment_ids travel through device placement and micro-batch splitting; eval stays unpacked."""
    spec = importlib.util.spec_from_file_location(
        "loop_jobs", os.path.join(os.path.dirname(__file__), "loop_jobs.py")
    )
    jobs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jobs)
    jobs.enable_compile_cache()
    job = jobs.job(
        tmp_path,
        data={"maxLength": 32, "packing": True},
        training={"steps": 4, "microBatchSize": 4},
    )
    out = tmp_path / "out"
    result = train(job, str(out), say=lambda _msg: None, progress_bar=False)
    losses = jobs.losses(out)
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(np.isfinite(v) for v in losses.values())
    assert np.isfinite(result.final["eval_loss"])
