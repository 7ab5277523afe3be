"""SFT data: tokenisation and loss masks, truncation, packing, bad rows, seeded resumable order."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.api.v1alpha1 import DataSpec
from posttrain.trainer.data import sft
from posttrain.trainer.data.readers import BadRow
from posttrain.trainer.tasks.chars import CharTokenizer

TOK = CharTokenizer()


def data_spec(path, **kw) -> DataSpec:
    return DataSpec(train=str(path), **{"max_length": 16, "max_prompt_length": 8, **kw})


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_prompt_completion_masks_only_the_completion(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2=", "completion": "3"}])
    (ex,) = sft.load_examples(path, TOK, data_spec(path)).examples
    assert ex.tokens == (TOK.bos_token_id, *TOK.encode("1+2="), *TOK.encode("3"), TOK.eos_token_id)
    assert ex.loss == (False,) * 5 + (True, True)
    batch = sft.collate([ex], 16, TOK.pad_token_id)
    # targets are the next tokens; weights sit where the target is a completion token
    assert batch["targets"][0, 4] == TOK.encode("3")[0]
    assert np.flatnonzero(batch["loss_weights"][0]).tolist() == [4, 5]
    assert batch["loss_weights"].sum() == pytest.approx(1.0)  # B / trained tokens * trained tokens


def test_completion_only_off_trains_prompt_tokens_too(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2=", "completion": "3"}])
    (ex,) = sft.load_examples(path, TOK, data_spec(path), completion_only=False).examples
    assert all(ex.loss)


def test_truncation_keeps_prompt_end_and_cuts_completion(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "abcdefghijkl", "completion": "0123456789xyz"}]
    )
    (ex,) = sft.load_examples(path, TOK, data_spec(path)).examples
    assert len(ex.tokens) == 16
    # the last maxPromptLength tokens, with the BOS kept in front (the model expects it first)
    assert ex.tokens[0] == TOK.bos_token_id and TOK.decode(ex.tokens[1:8]) == "fghijkl"
    assert TOK.decode(ex.tokens[8:]) == "01234567"


def test_messages_train_on_assistant_turns(tmp_path):
    row = {"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    (ex,) = sft.load_examples(path, TOK, data_spec(path, max_length=32)).examples
    trained = "".join(TOK.decode([t]) for t, m in zip(ex.tokens, ex.loss, strict=True) if m)
    assert (
        trained == "4\n"
    )  # the assistant's text and the template's end of turn (+ eos, not printed)
    assert ex.tokens[-1] == TOK.eos_token_id and ex.loss[-1]
    assert TOK.decode(ex.tokens) == "Q: 2+2\nA: 4\n"


def test_bad_row_names_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "1+1=", "completion": "2"},
            "{not json",
            {"prompt": "x"},
            {"prompt": 3, "completion": "y"},
        ],
    )
    with pytest.raises(BadRow, match=r"d\.jsonl:2: not valid JSON.*skipBadRows"):
        sft.load_examples(path, TOK, data_spec(path))
    report = sft.load_examples(path, TOK, data_spec(path, skip_bad_rows=True))
    assert len(report.examples) == 1
    assert [b.where.rsplit(":", 1)[1] for b in report.skipped] == ["2", "3", "4"]
    assert "missing field 'completion'" in report.skipped[1].reason
    assert "must be a string" in report.skipped[2].reason


def test_parquet_rows_and_bad_row_numbers(tmp_path):
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"prompt": ["1+1=", "2+2="], "completion": ["2", None]}), path)
    with pytest.raises(BadRow, match=r"d\.parquet row 2: field 'completion' must be a string"):
        sft.load_examples(path, TOK, data_spec(path))


def test_packing_fills_rows_without_splitting_examples():
    exs = [sft.Example(tuple(range(n)), (True,) * n) for n in (5, 6, 7, 3)]
    rows = sft.pack(exs, 12)
    assert [len(r.tokens) for r in rows] == [11, 10]
    assert sum(len(r.tokens) for r in rows) == 21


def test_source_order_is_seeded_and_resumable():
    exs = [sft.Example((1, i + 3, 2), (False, True, True)) for i in range(10)]

    def make(seed):
        return sft.SftSource(exs, batch_size=4, seq_len=8, pad_id=0, seed=seed)

    a = make(0)
    first = [a.next_batch(s)["input_ids"] for s in range(2)]
    state = a.state()
    later = [a.next_batch(s)["input_ids"] for s in range(2, 6)]  # crosses into epoch 1
    b = make(0)
    b.restore(json.loads(json.dumps(state)))
    assert all(
        (x == y).all()
        for x, y in zip(later, [b.next_batch(s)["input_ids"] for s in range(2, 6)], strict=True)
    )
    c = make(1)
    assert not all(
        (x == y).all()
        for x, y in zip(first, [c.next_batch(s)["input_ids"] for s in range(2)], strict=True)
    )
    # an epoch visits every example once
    seen = np.concatenate(first + later[:1])[:, 1][:10]
    assert sorted(seen.tolist()) == list(range(3, 13))


def test_messages_with_a_hugging_face_chat_template(tmp_path):
    from posttrain.trainer.data.text import HfTokenizer

    tok = HfTokenizer("tests/fixtures/tokenizer")
    row = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"},
        ]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    (ex,) = sft.load_examples(
        path, tok, data_spec(path, max_length=64, max_prompt_length=32)
    ).examples
    trained = [t for t, m in zip(ex.tokens, ex.loss, strict=True) if m]
    # both assistant turns with the template's own end of turn (<|eos|>), nothing of the user's
    assert (
        tok.decode(trained, skip_special_tokens=False).replace(" ", "")
        == "hello<|eos|>\nciao<|eos|>\n"
    )
    assert ex.tokens.count(tok.eos_token_id) == 4  # no extra EOS appended: the template ends turns
    assert ex.tokens[0] == tok.bos_token_id


def test_rows_from_gcs_jsonl_and_parquet(gcs_emulator, tmp_path):
    from posttrain.trainer import storage

    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}]
    local_parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(local_parquet))
    storage.write_text(
        f"gs://{gcs_emulator}/sft/d.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
    )
    storage.write_bytes(f"gs://{gcs_emulator}/sft/d.parquet", local_parquet.read_bytes())
    for name in ("d.jsonl", "d.parquet"):
        path = f"gs://{gcs_emulator}/sft/{name}"
        examples = sft.load_examples(path, TOK, data_spec(path)).examples
        assert [TOK.decode(e.tokens) for e in examples] == ["1+1=2", "2+2=4"]
    storage.write_text(f"gs://{gcs_emulator}/sft/bad.jsonl", json.dumps(rows[0]) + "\n[1]\n")
    with pytest.raises(
        BadRow, match=rf"gs://{gcs_emulator}/sft/bad\.jsonl:2: a row must be a JSON object"
    ):
        path = f"gs://{gcs_emulator}/sft/bad.jsonl"
        sft.load_examples(path, TOK, data_spec(path))


def fixture_tokenizer_with_template(folder, template: str):
    """The fixture tokenizer (tests/fixtures/tokenizer) with another chat template."""
    import shutil

    from posttrain.trainer.data.text import HfTokenizer

    shutil.copytree("tests/fixtures/tokenizer", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return HfTokenizer(str(folder))


CHAT = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "ciao"},
]


def test_a_template_that_writes_bos_gets_no_second_one(tmp_path):
    original = json.loads(open("tests/fixtures/tokenizer/tokenizer_config.json").read())
    tok = fixture_tokenizer_with_template(
        tmp_path / "tok", "{{ bos_token }}" + original["chat_template"]
    )
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    (ex,) = sft.load_examples(path, tok, data_spec(path, max_length=64)).examples
    assert ex.tokens[0] == tok.bos_token_id and ex.tokens.count(tok.bos_token_id) == 1
    trained = [t for t, m in zip(ex.tokens, ex.loss, strict=True) if m]
    assert tok.decode(trained, skip_special_tokens=False).replace(" ", "") == (
        "hello<|eos|>\nciao<|eos|>\n"
    )


def test_a_template_that_rewrites_earlier_turns_is_refused_by_name(tmp_path):
    # Renders the number of messages first, so no render is a prefix of the next.
    tok = fixture_tokenizer_with_template(
        tmp_path / "tok",
        "{{ messages | length }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}",
    )
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    with pytest.raises(BadRow, match=r"the chat template of .*/tok rewrites earlier turns"):
        sft.load_examples(path, tok, data_spec(path, max_length=64))
