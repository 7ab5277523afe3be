"""Tokenizer ids, decoding and chat templates identical to transformers' (tests/fixtures/tokenizer/expected.json)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest

from posttrain.trainer.tokenizer import Tokenizer

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer"
EXPECTED = json.loads((TOKENIZER_DIR / "expected.json").read_text())


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(TOKENIZER_DIR)


def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        EXPECTED["bos_token_id"],
        EXPECTED["eos_token_id"],
        EXPECTED["pad_token_id"],
    )
    assert tok.vocab_size == EXPECTED["vocab_size"]
    for token, id_ in EXPECTED["special_tokens"].items():
        assert tok.token_to_id(token) == id_


@pytest.mark.parametrize("case", EXPECTED["encodings"], ids=lambda c: repr(c["text"][:20]))
def test_encode_decode_match_transformers(tok, case):
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.encode(case["text"], add_special_tokens=True) == case["ids_add_special_tokens_true"]
    assert [tok.id_to_token(i) for i in case["ids"]] == case["tokens"]
    assert tok.decode(case["ids"]) == case["decoded"]


@pytest.mark.parametrize("chat", EXPECTED["chats"], ids=lambda c: f"{len(c['messages'])} messages")
def test_chat_template_matches_transformers(tok, chat):
    assert (
        tok.apply_chat_template(chat["messages"], add_generation_prompt=True, tokenize=False)
        == chat["text"]
    )
    assert tok.apply_chat_template(chat["messages"], add_generation_prompt=True) == chat["ids"]
    assert (
        tok.apply_chat_template(chat["messages"], add_generation_prompt=False, tokenize=False)
        == chat["text_without_generation_prompt"]
    )


def test_template_exceptions_surface(tok):
    with pytest.raises(jinja2.exceptions.TemplateError, match="got system"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_hf_template_semantics(tmp_path):
    """trim_blocks/lstrip_blocks, tojson keeping non-ASCII, special tokens and extra kwargs as variables."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "    {% if loop.index > 1 %}{% break %}{% endif %}\n"
        "{{ m | tojson }}|{{ flag }}\n"
        "{% endfor %}"
    )
    tok = Tokenizer.from_pretrained(tmp_path)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Ça"}, {"role": "user", "content": "b"}],
        tokenize=False,
        flag="on",
    )
    assert text == '<|bos|>\n{"role": "user", "content": "Ça"}|on\n'
