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
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
    ) -> str:
        text = self._tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
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
