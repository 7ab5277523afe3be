"""Unpaired preference data (KTO): rows -> (prompt, completion, desirable) -> [B, 2, T] batches.

Rows (field names from ``spec.data``, the label's from ``label_field``) are plain text

    {"prompt": "12+7=", "completion": "19", "label": true}

or chat: a history plus one answer (a string, an assistant message or a list of messages)

    {"messages": [{"role": "user", "content": "hi"}], "completion": "hello", "label": true}

``label`` true marks a desirable completion, false an undesirable one (TRL's ``KTOTrainer``
format). Tokenisation is the preference data's (``preference.py``): ``[bos] prompt completion
eos``, the prompt keeping its last ``maxPromptLength`` tokens.

KTO's reference point z0 is estimated on mismatched pairs: each row's prompt with another row's
completion. As TRL builds them, a batch shifts the completions by one among its real rows (row i
gets row i-1's completion, the first row the last's). A batch holds both as [B, 2, T] arrays,
index 0 the row itself and index 1 its mismatched pair, so a micro-batch split along rows keeps
each row with its pair and the DPO forward over pairs ([B, 2, T] -> [2B, T]) serves KTO as is.
Keys: ``input_ids``, ``attention_mask``, ``targets``, ``completion_mask`` [B, 2, T] (as
``preference.collate``), ``desirable`` [B] (1 desirable, 0 not) and ``row_weights`` [B] (real
rows, scaled so "mean over rows" is the mean over the batch's real rows).

Evaluation keeps pairs (``preference.load_pairs`` / ``fixed_batches``): the preference accuracy
of KTO's implicit reward is measured on held-out (chosen, rejected) pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from posttrain.api.v1alpha1 import DataSpec
from posttrain.trainer.data.order import EpochCursor
from posttrain.trainer.data.preference import (
    Pair,
    _chat_completion,
    _text,
    _with_bos,
    collate,
)
from posttrain.trainer.data.readers import BadRow, load_rows
from posttrain.trainer.data.sft import TokenizerLike, checked_messages

LABEL_FIELD = "label"  # TRL's column name


@dataclass(frozen=True)
class Example:
    prompt: tuple[int, ...]  # [bos] prompt, already cut to maxPromptLength
    completion: tuple[int, ...]  # completion + eos, already cut to fit maxLength
    desirable: bool


@dataclass(frozen=True)
class LoadReport:
    examples: list[Example]
    skipped: list[BadRow]


def load_examples(
    path: str, tokenizer: TokenizerLike, data: DataSpec, *, label_field: str = LABEL_FIELD
) -> LoadReport:
    """Tokenise every row; a bad row stops with its file and line unless skipBadRows is set."""
    examples, skipped = load_rows(
        path, data, lambda value, where: _example(value, where, tokenizer, data, label_field)
    )
    if not examples:
        raise ValueError(f"spec.data: {path}: no usable unpaired rows ({len(skipped)} skipped)")
    return LoadReport(examples, skipped)


def _example(
    value: Mapping[str, Any], where: str, tokenizer: TokenizerLike, data: DataSpec, label_field: str
) -> Example:
    for name in (data.completion_field, label_field):
        if name not in value:
            raise BadRow(
                where, f"missing field {name!r} (has: {', '.join(sorted(value)) or 'nothing'})"
            )
    label = value[label_field]
    if not isinstance(label, bool):  # 0/1 or "yes" would be guesses about the data
        raise BadRow(where, f"field {label_field!r} must be true or false, got {label!r}")
    name = data.completion_field
    if data.messages_field in value:
        history = checked_messages(value[data.messages_field], data.messages_field, where)
        prompt_text = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        prompt = _with_bos(tokenizer, tokenizer.encode(prompt_text))
        completion = _chat_completion(tokenizer, history, prompt_text, value[name], name, where)
    elif data.prompt_field in value:
        prompt = _with_bos(
            tokenizer, tokenizer.encode(_text(value, data.prompt_field, where, may_be_empty=True))
        )
        completion = tokenizer.encode(_text(value, name, where)) + [tokenizer.eos_token_id]
    else:
        raise BadRow(
            where,
            f"row has neither {data.prompt_field!r} nor {data.messages_field!r} "
            f"(has: {', '.join(sorted(value)) or 'nothing'})",
        )
    prompt = prompt[-data.max_prompt_length :]
    if not prompt:
        raise BadRow(where, "the prompt is empty and the tokenizer has no BOS token to start from")
    return Example(tuple(prompt), tuple(completion[: data.max_length - len(prompt)]), label)


# ------------------------------------------------------------------------------------ batches


def with_mismatched_completions(
    examples: Sequence[Example | None], seq_len: int
) -> list[Pair | None]:
    """Each real row as a ``Pair`` (its prompt, its completion, the previous real row's
    completion: TRL's shift by one, the first row taking the last's), the mismatched completion
    cut to fit ``seq_len`` after this row's prompt. ``None`` (padding) stays ``None``."""
    real = [e for e in examples if e is not None]
    shifted = iter(real[-1:] + real[:-1])
    pairs: list[Pair | None] = []
    for e in examples:
        if e is None:
            pairs.append(None)
            continue
        other = next(shifted).completion[: seq_len - len(e.prompt)]
        pairs.append(Pair(e.prompt, e.completion, other))
    return pairs


def collate_unpaired(
    examples: Sequence[Example | None], seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Rows -> the [B, 2, T] batch of the module docstring, ``row_weights`` scaled so that "mean
    over rows" is the mean over the real rows."""
    batch = collate(with_mismatched_completions(examples, seq_len), seq_len, pad_id)
    del batch["nll_weights"]  # KTO has no NLL term
    B = len(examples)
    real = float(batch["row_weights"].sum())
    batch["row_weights"] = batch["row_weights"] * np.float32(B / max(real, 1.0))
    batch["desirable"] = np.asarray(
        [1.0 if e is not None and e.desirable else 0.0 for e in examples], np.float32
    )
    return batch


class UnpairedSource:
    """Global batches of ``batch_size`` rows in a seeded, resumable order: ``PreferenceSource``'s
    (epoch ``e`` is a permutation seeded by ``(seed, e)``, or file order without ``shuffle``)."""

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        batch_size: int,
        seq_len: int,
        pad_id: int,
        seed: int,
        shuffle: bool = True,
    ):
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.cursor = EpochCursor(examples, seed=seed, shuffle=shuffle)

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        del step  # the order is positional; the loop restores the position on resume
        rows = self.cursor.take(self.batch_size)
        return collate_unpaired(rows, self.seq_len, self.pad_id)

    def state(self) -> dict[str, Any]:
        return self.cursor.state()

    def restore(self, state: Mapping[str, Any]) -> None:
        self.cursor.restore(state)
