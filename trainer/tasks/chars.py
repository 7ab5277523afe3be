"""A character-level tokenizer for the built-in model and the shipped tasks.

One token per printable ASCII character (and newline) plus <pad>, <bos>, <eos>. It is a real
Hugging Face ``tokenizers`` tokenizer (WordLevel over single characters), so ``save_pretrained``
writes a tokenizer.json that any HF-format reader loads beside the exported weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
# A minimal chat layout in plain characters (the vocabulary has no role tokens); tool results
# (multi-turn rollouts) are "T: " lines.
ROLE_PREFIX = {"system": "# ", "user": "Q: ", "assistant": "A: ", "tool": "T: "}


class CharTokenizer:
    """encode/decode/apply_chat_template with the ids the loop and sampler need."""

    def __init__(self) -> None:
        vocab = {tok: i for i, tok in enumerate([*SPECIALS, *CHARS])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens(list(SPECIALS))
        self._tok = tok
        self.pad_token_id = vocab[PAD]
        self.bos_token_id = vocab[BOS]
        self.eos_token_id = vocab[EOS]
        self.vocab_size = len(vocab)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        tools: Sequence[object] | None = None,
    ) -> str:
        """'Q: ...\\nA: ...' lines; the assistant turn's text is followed by <eos> by the caller.
        Tool results are 'T: ...' lines; ``tools`` (schemas) are not written: the built-in model
        learns its tools from rewards, and its prompts are short."""
        text = "".join(f"{ROLE_PREFIX[m['role']]}{m['content']}\n" for m in messages)
        return text + (ROLE_PREFIX["assistant"] if add_generation_prompt else "")

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self._tok.save(os.path.join(path, "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "pad_token": PAD,
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "model_max_length": 2048,
        }
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
