"""Unpaired (KTO) data: rows -> examples, [B, 2, T] batches with TRL's mismatched pairs for the
KL estimate, weights, bad rows, Parquet, resumable order; and the shipped arithmetic-kto set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.api.v1alpha1 import DataSpec
from posttrain.trainer.data import unpaired
from posttrain.trainer.data.readers import BadRow
from posttrain.trainer.tasks import unpaired_preferences
from posttrain.trainer.tasks.chars import CharTokenizer

TOK = CharTokenizer()
BOS, EOS, PAD = TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id
ROOT = Path(__file__).resolve().parents[2]


def data_spec(path, **kw) -> DataSpec:
    return DataSpec(train=str(path), **{"max_length": 16, "max_prompt_length": 8, **kw})


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def decode(ids) -> str:
    return TOK.decode(list(ids), skip_special_tokens=False)


ROWS = [
    {"prompt": "1+2=", "completion": "3", "label": True},
    {"prompt": "4+4=", "completion": "71", "label": False},
    {"prompt": "9+9=", "completion": "18", "label": True},
]


def test_text_rows_become_examples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    examples = unpaired.load_examples(path, TOK, data_spec(path)).examples
    assert [e.desirable for e in examples] == [True, False, True]
    assert examples[0].prompt == (BOS, *TOK.encode("1+2="))
    assert examples[1].completion == (*TOK.encode("71"), EOS)


def test_batches_pair_each_row_with_the_previous_rows_completion(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    examples = unpaired.load_examples(path, TOK, data_spec(path)).examples
    batch = unpaired.collate_unpaired([*examples, None], 16, PAD)
    assert batch["input_ids"].shape == (4, 2, 16)
    texts = [
        [decode(batch["input_ids"][b, k]).replace("<pad>", "") for k in (0, 1)] for b in (0, 1, 2)
    ]
    # index 0: the row itself; index 1: its prompt with the previous real row's completion
    # (TRL's shift by one; the first row takes the last's)
    assert texts == [
        ["<bos>1+2=3<eos>", "<bos>1+2=18<eos>"],
        ["<bos>4+4=71<eos>", "<bos>4+4=3<eos>"],
        ["<bos>9+9=18<eos>", "<bos>9+9=71<eos>"],
    ]
    assert (batch["input_ids"][3] == PAD).all() and not batch["attention_mask"][3].any()
    assert batch["desirable"].tolist() == [1.0, 0.0, 1.0, 0.0]
    # 3 real rows of 4: "mean over rows" of the weights is the mean over real rows
    np.testing.assert_allclose(batch["row_weights"], [4 / 3] * 3 + [0.0])
    assert "nll_weights" not in batch
    # the completion mask covers the completion's targets in both halves
    assert np.flatnonzero(batch["completion_mask"][0, 0]).tolist() == [4, 5]
    assert np.flatnonzero(batch["completion_mask"][0, 1]).tolist() == [4, 5, 6]


def test_a_mismatched_completion_is_cut_to_fit_its_new_prompt():
    long_prompt = unpaired.Example((BOS, *TOK.encode("1234567")), (5, 6, EOS), True)
    long_answer = unpaired.Example((BOS, 9), tuple(range(10, 24)), False)  # 14 tokens, fits
    pairs = unpaired.with_mismatched_completions([long_prompt, long_answer], 16)
    assert pairs[0] is not None and len(pairs[0].prompt) + len(pairs[0].rejected) == 16
    assert pairs[0].rejected == tuple(range(10, 18))


def test_chat_rows_and_custom_fields(tmp_path):
    history = [{"role": "user", "content": "2+2"}]
    rows = [
        {"messages": history, "answer": "4", "ok": True},
        {"messages": history, "answer": {"role": "assistant", "content": "5"}, "ok": False},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    spec = data_spec(path, max_length=32, max_prompt_length=16, completion_field="answer")
    examples = unpaired.load_examples(path, TOK, spec, label_field="ok").examples
    assert decode(examples[0].prompt) == "<bos>Q: 2+2\nA: "
    assert decode(examples[0].completion) == "4\n<eos>"
    assert decode(examples[1].completion) == "5\n<eos>"
    assert [e.desirable for e in examples] == [True, False]


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"prompt": "1+2=", "completion": "3"}, "missing field 'label'"),
        ({"prompt": "1+2=", "completion": "3", "label": 1}, "'label' must be true or false"),
        ({"prompt": "1+2=", "label": True}, "missing field 'completion'"),
        ({"prompt": "1+2=", "completion": "", "label": True}, "'completion' is empty"),
        ({"completion": "3", "label": True}, "neither 'prompt' nor 'messages'"),
    ],
)
def test_bad_rows_are_named_or_skipped(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], row])
    with pytest.raises(BadRow, match=rf"d.jsonl:2: .*{reason}.*skipBadRows"):
        unpaired.load_examples(path, TOK, data_spec(path))
    report = unpaired.load_examples(path, TOK, data_spec(path, skip_bad_rows=True))
    assert len(report.examples) == 1 and len(report.skipped) == 1


def test_parquet_rows(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    examples = unpaired.load_examples(str(path), TOK, data_spec(path)).examples
    assert [e.desirable for e in examples] == [True, False, True]


def test_order_is_seeded_and_resumable(tmp_path):
    rows = [{"prompt": f"{i}+0=", "completion": str(i), "label": i % 2 == 0} for i in range(7)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples = unpaired.load_examples(path, TOK, data_spec(path)).examples

    def source():
        return unpaired.UnpairedSource(examples, batch_size=3, seq_len=16, pad_id=PAD, seed=4)

    straight = source()
    batches = [straight.next_batch(s) for s in range(5)]  # crosses an epoch boundary
    resumed = source()
    for s in range(2):
        resumed.next_batch(s)
    state = resumed.state()
    fresh = source()
    fresh.restore(state)
    for s in range(2, 5):
        got = fresh.next_batch(s)
        for key, value in batches[s].items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    first_epoch = np.concatenate([b["input_ids"][:, 0, 1] for b in batches])[:7]
    assert sorted(first_epoch.tolist()) == sorted(e.prompt[1] for e in examples)  # a permutation


def test_the_shipped_arithmetic_kto_set_is_the_pairs_unpaired():
    pairs_dir = ROOT / "examples" / "local" / "data" / "arithmetic-preferences"
    kto_dir = ROOT / "examples" / "local" / "data" / "arithmetic-kto"
    pairs = unpaired_preferences.read_jsonl(str(pairs_dir / "train.jsonl"))
    rows = unpaired_preferences.read_jsonl(str(kto_dir / "train.jsonl"))
    assert rows == unpaired_preferences.unpair(pairs)  # regenerated files would be identical
    assert len(rows) == 2 * len(pairs) == 4600
    assert sum(r["label"] for r in rows) == len(pairs)
    test = (kto_dir / "test.jsonl").read_text()
    assert test == (pairs_dir / "test.jsonl").read_text()  # held-out pairs, for preference accuracy
    data = DataSpec(train=str(kto_dir / "train.jsonl"), max_length=16, max_prompt_length=8)
    report = unpaired.load_examples(data.train, TOK, data)
    assert len(report.examples) == 4600 and not report.skipped
