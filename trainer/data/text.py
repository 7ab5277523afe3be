"""The tokenizer as the loop and the algorithms see it, whichever tokenizer is behind it.

Algorithms use the transformers spelling: ``encode(text)``, ``decode(ids)`` (special tokens
skipped), ``apply_chat_template(messages, add_generation_prompt=...) -> str``, ``bos_token_id``,
``eos_token_id``, ``pad_token_id`` (falls back to EOS), ``vocab_size`` and
``save_pretrained(dir)``. The built-in character tokenizer already speaks it; ``HfTokenizer``
adapts ``posttrain.trainer.tokenizer.Tokenizer`` (HF tokenizer.json + chat template).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from posttrain.trainer import storage

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def pad_id_of(tokenizer: Any) -> int:
    """The id that pads rows: the tokenizer's pad token, else its EOS (Llama 3 has no pad)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prepend_bos(ids: Sequence[int], bos_id: int | None) -> list[int]:
    """``[bos] + ids``, unless there is no BOS or ``ids`` already start with it: chat templates
    that write ``{{ bos_token }}`` (Llama 3, Gemma) must not get a second one."""
    ids = list(ids)
    if bos_id is None or ids[:1] == [bos_id]:
        return ids
    return [bos_id, *ids]


def keep_last(ids: Sequence[int], n: int, bos_id: int | None) -> list[int]:
    """The last ``n`` tokens (a prompt's end is what the completion continues), keeping a
    leading BOS in front: the model was trained to see it first."""
    ids = list(ids)
    if len(ids) <= n:
        return ids
    if bos_id is not None and ids[:1] == [bos_id]:
        return [bos_id, *ids[len(ids) - n + 1 :]] if n > 1 else [bos_id]
    return ids[len(ids) - n :]


def template_name(tokenizer: Any) -> str:
    """How errors name a tokenizer's chat template: where it was loaded from."""
    path = getattr(tokenizer, "path", None)
    return f"the chat template of {path}" if path else f"{type(tokenizer).__name__}'s chat template"


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Any] | None = None,
) -> str:
    """``messages`` through the tokenizer's chat template; ``tools`` (JSON schemas) only when
    given, so templates and tokenizers without tool support render as before. Multi-turn
    rollouts render turns with it: ``assistant``, ``user`` and ``tool`` messages (Qwen 2.5/3 and
    Hermes templates write tool results as ``<tool_response>`` blocks, Llama 3.x as ``ipython``
    turns; the built-in character tokenizer as ``T: ...`` lines)."""
    if tools:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=list(tools)
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


class HfTokenizer:
    def __init__(self, path: str):
        from posttrain.trainer.tokenizer import Tokenizer

        self.path = path
        self._tok = Tokenizer.from_pretrained(path)
        self.bos_token_id = self._tok.bos_id
        self.eos_token_id = self._tok.eos_id
        if self.eos_token_id is None:
            raise ValueError(f"spec.model.tokenizer: {path}: the tokenizer names no eos_token")
        self.pad_token_id = self._tok.pad_id if self._tok.pad_id is not None else self.eos_token_id
        self.vocab_size = self._tok.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tools: Sequence[Any] | None = None,
    ) -> str:
        text = self._tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, tools=tools
        )
        assert isinstance(text, str)
        return text

    def save_pretrained(self, path: str) -> None:
        """Copy the tokenizer's files next to the exported weights."""
        local = storage.local_path(self.path, allow_patterns=("*.json", "*.jinja"))
        os.makedirs(path, exist_ok=True)
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(local, name)):
                shutil.copy(os.path.join(local, name), os.path.join(path, name))
