"""Preference data (DPO, ORPO): rows -> (prompt, chosen, rejected) token pairs -> [B, 2, T] batches.

Rows (field names from ``spec.data``) are either plain text

    {"prompt": "12+7=", "chosen": "19", "rejected": "18"}

or chat: a shared history plus the two assistant answers, each a string, an assistant message or
a list of messages (TRL's conversational form)

    {"messages": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go away"}

Sequences are built as for SFT: ``[bos] prompt completion eos``, the prompt keeping its last
``maxPromptLength`` tokens and the completion cut to fit ``maxLength``; a chat prompt is the
history rendered by the tokenizer's chat template with the generation prompt, the completion
what the template adds for the answer (EOS appended unless the template ends the turn with it).

A batch holds B pairs as [B, 2, T] arrays (index 0 = chosen, 1 = rejected), so the loop's split
into micro-batches along rows never separates a pair. Keys: ``input_ids``, ``attention_mask``,
``targets`` (next token), ``completion_mask`` (the targets that are completion tokens),
``nll_weights`` [B, T] (chosen completion tokens, scaled so "mean over rows of the weighted sum"
is the NLL per chosen token of the batch) and ``row_weights`` [B] (real pairs; padding rows of the
last evaluation batch weigh 0). Order and resumable state are those of ``SftSource``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from posttrain.api.v1alpha1 import DataSpec
from posttrain.trainer.data.order import EpochCursor
from posttrain.trainer.data.readers import BadRow, load_rows
from posttrain.trainer.data.sft import TokenizerLike, checked_messages


@dataclass(frozen=True)
class Pair:
    prompt: tuple[int, ...]  # [bos] prompt, already cut to maxPromptLength
    chosen: tuple[int, ...]  # completion + eos, already cut to fit maxLength
    rejected: tuple[int, ...]


@dataclass(frozen=True)
class LoadReport:
    pairs: list[Pair]
    skipped: list[BadRow]


def load_pairs(path: str, tokenizer: TokenizerLike, data: DataSpec) -> LoadReport:
    """Tokenise every row; a bad row stops with its file and line unless skipBadRows is set."""
    pairs, skipped = load_rows(
        path, data, lambda value, where: _pair(value, where, tokenizer, data)
    )
    if not pairs:
        raise ValueError(f"spec.data: {path}: no usable preference rows ({len(skipped)} skipped)")
    return LoadReport(pairs, skipped)


def _pair(value: Mapping[str, Any], where: str, tokenizer: TokenizerLike, data: DataSpec) -> Pair:
    for name in (data.chosen_field, data.rejected_field):
        if name not in value:
            raise BadRow(
                where, f"missing field {name!r} (has: {', '.join(sorted(value)) or 'nothing'})"
            )
    if data.messages_field in value:
        history = checked_messages(value[data.messages_field], data.messages_field, where)
        prompt_text = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        prompt = _with_bos(tokenizer, tokenizer.encode(prompt_text))
        chosen, rejected = (
            _chat_completion(tokenizer, history, prompt_text, value[name], name, where)
            for name in (data.chosen_field, data.rejected_field)
        )
    elif data.prompt_field in value:
        prompt = _with_bos(
            tokenizer, tokenizer.encode(_text(value, data.prompt_field, where, may_be_empty=True))
        )
        chosen, rejected = (
            tokenizer.encode(_text(value, name, where)) + [tokenizer.eos_token_id]
            for name in (data.chosen_field, data.rejected_field)
        )
    else:
        raise BadRow(
            where,
            f"row has neither {data.prompt_field!r} nor {data.messages_field!r} "
            f"(has: {', '.join(sorted(value)) or 'nothing'})",
        )
    prompt = prompt[-data.max_prompt_length :]
    if not prompt:
        raise BadRow(where, "the prompt is empty and the tokenizer has no BOS token to start from")
    room = data.max_length - len(prompt)
    return Pair(tuple(prompt), tuple(chosen[:room]), tuple(rejected[:room]))


def _with_bos(tokenizer: TokenizerLike, ids: list[int]) -> list[int]:
    """BOS first, once (a chat template may already have rendered it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def _text(row: Mapping[str, Any], name: str, where: str, *, may_be_empty: bool = False) -> str:
    value = row[name]
    if not isinstance(value, str):
        raise BadRow(where, f"field {name!r} must be a string, got {type(value).__name__}")
    if not value and not may_be_empty:
        raise BadRow(where, f"field {name!r} is empty")
    return value


def _chat_completion(
    tokenizer: TokenizerLike,
    history: list[dict[str, str]],
    prompt_text: str,
    answer: Any,
    name: str,
    where: str,
) -> list[int]:
    """The tokens the chat template adds after the generation prompt for this answer."""
    if isinstance(answer, str):
        turns = [{"role": "assistant", "content": answer}]
    elif isinstance(answer, dict):
        turns = checked_messages([answer], name, where)
    else:
        turns = checked_messages(answer, name, where)
    if not any(t["content"] for t in turns):
        raise BadRow(where, f"field {name!r} is empty")
    full = tokenizer.apply_chat_template([*history, *turns])
    if not full.startswith(prompt_text):
        raise ValueError(
            "spec.model.tokenizer: the chat template renders the conversation with a different "
            "prefix than the prompt with its generation prompt; it cannot split prompt and answer"
        )
    ids = tokenizer.encode(full[len(prompt_text) :])
    if tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


# ------------------------------------------------------------------------------------ batches


def collate(pairs: Sequence[Pair | None], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pairs -> [B, 2, T] arrays (module docstring); ``None`` is a padding row (weight 0).

    ``row_weights`` is 1 per real pair and ``nll_weights`` the chosen completion mask; callers
    scale both (``_scale``).
    """
    B = len(pairs)
    input_ids = np.full((B, 2, seq_len), pad_id, np.int32)
    attention_mask = np.zeros((B, 2, seq_len), np.int32)
    targets = np.full((B, 2, seq_len), pad_id, np.int32)
    completion_mask = np.zeros((B, 2, seq_len), np.float32)
    row_weights = np.zeros((B,), np.float32)
    for b, pair in enumerate(pairs):
        if pair is None:
            continue
        row_weights[b] = 1.0
        for k, completion in enumerate((pair.chosen, pair.rejected)):
            tokens = pair.prompt + completion
            n = len(tokens)
            input_ids[b, k, :n] = tokens
            attention_mask[b, k, :n] = 1
            targets[b, k, : n - 1] = tokens[1:]
            # position t predicts token t + 1: the completion's tokens are predicted from
            # len(prompt) - 1 on
            completion_mask[b, k, len(pair.prompt) - 1 : n - 1] = 1.0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": targets,
        "completion_mask": completion_mask,
        "nll_weights": completion_mask[:, 0].copy(),
        "row_weights": row_weights,
    }


def _scale(batch: dict[str, np.ndarray], rows: float, tokens: float) -> dict[str, np.ndarray]:
    """Weights such that "mean over rows" of a batch is a sum over ``rows`` real pairs (or
    ``tokens`` chosen tokens) divided by their count, times the batch's share."""
    B = batch["row_weights"].shape[0]
    batch["row_weights"] = batch["row_weights"] * np.float32(B / max(rows, 1.0))
    batch["nll_weights"] = batch["nll_weights"] * np.float32(B / max(tokens, 1.0))
    return batch


class PreferenceSource:
    """Global batches of ``batch_size`` pairs in a seeded, resumable order (epoch ``e`` visits the
    pairs in a permutation seeded by ``(seed, e)``, or file order without ``shuffle``)."""

    def __init__(
        self,
        pairs: Sequence[Pair],
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
        self.cursor = EpochCursor(pairs, seed=seed, shuffle=shuffle)

    def next_pairs(self) -> list[Pair]:
        """The next global batch's pairs, in order (what ``next_batch`` collates)."""
        return self.cursor.take(self.batch_size)

    def collate(self, pairs: Sequence[Pair]) -> dict[str, np.ndarray]:
        batch = collate(pairs, self.seq_len, self.pad_id)
        return _scale(batch, rows=self.batch_size, tokens=float(batch["nll_weights"].sum()))

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        del step  # the order is positional; the loop restores the position on resume
        return self.collate(self.next_pairs())

    def state(self) -> dict[str, Any]:
        return self.cursor.state()

    def restore(self, state: Mapping[str, Any]) -> None:
        self.cursor.restore(state)


def fixed_batches(
    pairs: Sequence[Pair], *, batch_size: int, seq_len: int, pad_id: int
) -> Iterator[dict[str, np.ndarray]]:
    """Evaluation batches in file order, the last filled with padding rows. Weights are scaled
    over the whole set, so the loop's plain average over batches is the mean over all pairs
    (and the NLL per chosen token over all of them)."""
    starts = range(0, len(pairs), batch_size)
    chosen_tokens = sum(len(p.chosen) for p in pairs)
    for start in starts:
        chunk: list[Pair | None] = list(pairs[start : start + batch_size])
        chunk += [None] * (batch_size - len(chunk))
        batch = collate(chunk, seq_len, pad_id)
        # rows / len(starts) real pairs per batch on average: the loop averages over batches
        yield _scale(batch, rows=len(pairs) / len(starts), tokens=chosen_tokens / len(starts))
