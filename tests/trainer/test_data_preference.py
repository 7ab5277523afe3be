"""Preference data: text and chat rows -> pairs, [B, 2, T] batches and their weights, bad rows
named with their line, JSONL/Parquet local and gs://, seeded resumable order."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.api.v1alpha1 import DataSpec
from posttrain.trainer.data import preference
from posttrain.trainer.data.readers import BadRow
from posttrain.trainer.tasks.chars import CharTokenizer

TOK = CharTokenizer()
BOS, EOS, PAD = TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id


def data_spec(path, **kw) -> DataSpec:
    return DataSpec(train=str(path), **{"max_length": 16, "max_prompt_length": 8, **kw})


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def decode(ids) -> str:
    return TOK.decode(list(ids), skip_special_tokens=False)


def test_text_rows_become_pairs_and_batches(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2=", "chosen": "3", "rejected": "45"}])
    (pair,) = preference.load_pairs(path, TOK, data_spec(path)).pairs
    assert pair.prompt == (BOS, *TOK.encode("1+2="))
    assert pair.chosen == (*TOK.encode("3"), EOS)
    assert pair.rejected == (*TOK.encode("45"), EOS)
    batch = preference.collate([pair], 16, PAD)
    assert batch["input_ids"].shape == (1, 2, 16) and batch["row_weights"].shape == (1,)
    # chosen and rejected share the prompt; each target is the next token
    assert decode(batch["input_ids"][0, 0, :7]) == "<bos>1+2=3<eos>"
    assert decode(batch["input_ids"][0, 1, :8]) == "<bos>1+2=45<eos>"
    assert (batch["targets"][0, :, :-1] == batch["input_ids"][0, :, 1:]).all()
    # the completion mask sits where the target is a completion token (position 4 predicts "3")
    assert np.flatnonzero(batch["completion_mask"][0, 0]).tolist() == [4, 5]
    assert np.flatnonzero(batch["completion_mask"][0, 1]).tolist() == [4, 5, 6]
    assert batch["attention_mask"][0].sum(-1).tolist() == [7, 8]


def test_custom_field_names_and_truncation(tmp_path):
    row = {"q": "abcdefghijkl", "good": "0123456789xyz", "bad": "no"}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    spec = data_spec(path, prompt_field="q", chosen_field="good", rejected_field="bad")
    (pair,) = preference.load_pairs(path, TOK, spec).pairs
    assert decode(pair.prompt) == "efghijkl"  # the last maxPromptLength tokens
    assert decode(pair.chosen) == "01234567"  # cut to fit maxLength
    assert decode(pair.rejected) == "no<eos>"


def test_chat_rows_share_the_history(tmp_path):
    history = [{"role": "user", "content": "2+2"}]
    rows = [
        {"messages": history, "chosen": "4", "rejected": "5"},
        {"messages": history, "chosen": {"role": "assistant", "content": "4"}, "rejected": "5"},
        {"messages": history, "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    pairs = preference.load_pairs(
        path, TOK, data_spec(path, max_length=32, max_prompt_length=16)
    ).pairs
    assert pairs[0] == pairs[1] == pairs[2]  # an answer as string, message or list of messages
    assert decode(pairs[0].prompt) == "<bos>Q: 2+2\nA: "
    assert decode(pairs[0].chosen) == "4\n<eos>"
    assert decode(pairs[0].rejected) == "5\n<eos>"


def test_chat_rows_with_a_hugging_face_chat_template(tmp_path):
    from posttrain.trainer.data.text import HfTokenizer

    tok = HfTokenizer("tests/fixtures/tokenizer")
    row = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
        ],
        "chosen": "ciao",
        "rejected": "no",
    }
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    spec = data_spec(path, max_length=64, max_prompt_length=32)
    (pair,) = preference.load_pairs(path, tok, spec).pairs
    # only the final answer is the completion, with the template's own end of turn (no extra EOS)
    assert tok.decode(pair.chosen, skip_special_tokens=False).replace(" ", "") == "ciao<|eos|>\n"
    assert pair.chosen.count(tok.eos_token_id) == 1
    assert pair.prompt[0] == tok.bos_token_id and pair.prompt.count(tok.bos_token_id) == 1


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"prompt": "1+1=", "chosen": "2"}, "missing field 'rejected'"),
        ({"prompt": "1+1=", "chosen": 2, "rejected": "3"}, "field 'chosen' must be a string"),
        ({"prompt": "1+1=", "chosen": "", "rejected": "3"}, "field 'chosen' is empty"),
        ({"chosen": "2", "rejected": "3"}, "row has neither 'prompt' nor 'messages'"),
        ({"messages": [{"role": "bot", "content": "x"}], "chosen": "2", "rejected": "3"}, r"messages\[0\] must be"),
    ],
)  # fmt: skip
def test_a_bad_row_is_named_with_its_line(tmp_path, row, reason):
    good = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, row, good])
    with pytest.raises(BadRow, match=rf"d\.jsonl:2: {reason}.*spec\.data\.skipBadRows"):
        preference.load_pairs(path, TOK, data_spec(path))
    report = preference.load_pairs(path, TOK, data_spec(path, skip_bad_rows=True))
    assert len(report.pairs) == 2 and [b.where for b in report.skipped] == [f"{path}:2"]


def test_parquet_rows_and_bad_row_numbers(tmp_path):
    path = str(tmp_path / "d.parquet")
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": None, "rejected": "3"}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(BadRow, match=r"d\.parquet row 2: field 'chosen' must be a string"):
        preference.load_pairs(path, TOK, data_spec(path))


def test_rows_from_gcs_jsonl_and_parquet(gcs_emulator, tmp_path):
    from posttrain.trainer import storage

    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}]
    local_parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(local_parquet))
    storage.write_text(f"gs://{gcs_emulator}/prefs/d.jsonl", json.dumps(rows[0]) + "\n")
    storage.write_bytes(f"gs://{gcs_emulator}/prefs/d.parquet", local_parquet.read_bytes())
    for name in ("d.jsonl", "d.parquet"):
        path = f"gs://{gcs_emulator}/prefs/{name}"
        (pair,) = preference.load_pairs(path, TOK, data_spec(path)).pairs
        assert decode(pair.prompt + pair.chosen) == "<bos>1+1=2<eos>"


def pairs_file(tmp_path, n: int) -> list[preference.Pair]:
    rows = [{"prompt": f"{i}+0=", "chosen": str(i), "rejected": str(i + 1)} for i in range(n)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    return preference.load_pairs(path, TOK, data_spec(path)).pairs


def test_source_is_seeded_resumable_and_weighs_the_whole_batch(tmp_path):
    pairs = pairs_file(tmp_path, 10)

    def source(seed=0):
        return preference.PreferenceSource(pairs, batch_size=4, seq_len=16, pad_id=PAD, seed=seed)

    a = source()
    first = [a.next_batch(s) for s in range(4)]  # 16 pairs: into the second epoch
    for batch in first:
        assert batch["input_ids"].shape == (4, 2, 16)
        assert batch["row_weights"].tolist() == [1.0] * 4
        # NLL weights: chosen tokens scaled so the mean over rows of their sum is 1 token-mean
        assert batch["nll_weights"].sum() == pytest.approx(4.0)
        assert (batch["nll_weights"] > 0).tolist() == (batch["completion_mask"][:, 0] > 0).tolist()
    b = source()
    b.next_batch(0)
    state = b.state()
    c = source()
    c.restore(state)
    for s in range(1, 4):  # the restored source continues where the first one was
        got = c.next_batch(s)
        for k, v in first[s].items():
            np.testing.assert_array_equal(got[k], v)
    epoch0 = np.concatenate(
        [first[0]["input_ids"], first[1]["input_ids"], first[2]["input_ids"][:2]]
    )
    assert len({decode(r[0]) for r in epoch0}) == 10  # each pair once per epoch
    other = source(seed=1).next_batch(0)["input_ids"]
    assert not np.array_equal(other, first[0]["input_ids"])


def test_eval_batches_average_to_the_mean_over_all_pairs(tmp_path):
    """With the loop's plain average over batches of "mean over rows", the weights give the mean
    over the real pairs (and chosen tokens), although the last batch is padded."""
    pairs = pairs_file(tmp_path, 10)
    batches = list(preference.fixed_batches(pairs, batch_size=4, seq_len=16, pad_id=PAD))
    assert len(batches) == 3 and batches[-1]["row_weights"][2:].tolist() == [0.0, 0.0]
    per_pair = np.arange(10, dtype=np.float64)  # any per-pair figure
    rows = np.concatenate([per_pair, np.zeros(2)]).reshape(3, 4)
    averaged = np.mean([np.mean(r * b["row_weights"]) for r, b in zip(rows, batches, strict=True)])
    assert averaged == pytest.approx(per_pair.mean())
    tokens = np.mean([b["nll_weights"].sum() / 4 for b in batches])
    assert tokens == pytest.approx(1.0)
