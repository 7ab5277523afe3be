"""Hugging Face tokenizers without transformers: tokenizer.json via ``tokenizers``, chat templates via jinja2.

The chat template is rendered the way transformers renders it: a sandboxed jinja2 environment with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``,
``strftime_now`` and a ``tojson`` filter that keeps non-ASCII characters, and the special-token
strings (``bos_token``, ``eos_token``, ...) passed as variables. Tokenizing a rendered chat encodes it
with ``add_special_tokens=False``, as transformers does (the template already holds any BOS).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from posttrain.trainer import storage

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = (
    "chat_template.jinja"  # transformers >= 4.43 may save the template beside the config
)
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _token_str(value: Any) -> str | None:
    """A special token as saved: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for masks in transformers); renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators=None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (applied on decode when the config asks for it)."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class Tokenizer:
    """A HF fast tokenizer: ``encode``/``decode`` with the same ids and strings, and ``apply_chat_template``."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
    ):
        self._tokenizer = tokenizer
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template) if chat_template else None
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """From a folder (local, ``gs://`` or ``hf://``) with tokenizer.json and tokenizer_config.json."""
        local = storage.local_path(str(path), allow_patterns=("*.json", "*.jinja"))
        tok_file = os.path.join(local, TOKENIZER_FILE)
        if not os.path.exists(tok_file):
            raise FileNotFoundError(
                f"{path}: no {TOKENIZER_FILE} (only fast tokenizers are supported)"
            )
        config: dict[str, Any] = {}
        if os.path.exists(os.path.join(local, TOKENIZER_CONFIG_FILE)):
            with open(os.path.join(local, TOKENIZER_CONFIG_FILE)) as f:
                config = json.load(f)
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        jinja_file = os.path.join(local, CHAT_TEMPLATE_FILE)
        if template is None and os.path.exists(jinja_file):
            with open(jinja_file) as f:
                template = f.read()
        specials = {k: _token_str(config.get(k)) for k in SPECIAL_TOKEN_KEYS}
        return cls(
            tokenizers.Tokenizer.from_file(tok_file),
            special_tokens=specials,
            chat_template=template,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    # ------------------------------------------------------------------ ids

    def _id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the size an embedding table needs at least)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, id_: int) -> str | None:
        return self._tokenizer.id_to_token(id_)

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies tokenizer.json's post-processor (e.g. BOS)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[list[int]]:
        return [
            e.ids
            for e in self._tokenizer.encode_batch(
                list(texts), add_special_tokens=add_special_tokens
            )
        ]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; like transformers, special tokens are kept unless asked otherwise."""
        text = self._tokenizer.decode(
            [int(i) for i in ids], skip_special_tokens=skip_special_tokens
        )
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def decode_batch(
        self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False
    ) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the chat template; ids when ``tokenize`` (as a flat list), else the text.

        Extra keyword arguments become template variables (e.g. ``enable_thinking=False``).
        """
        if self._template is None:
            raise ValueError(
                "this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)"
            )
        text = self._template.render(
            messages=list(messages),
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text
