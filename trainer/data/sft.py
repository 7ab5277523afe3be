"""SFT data: rows -> token sequences with a loss mask -> fixed-shape batches in a seeded order.

Rows are ``{"prompt": ..., "completion": ...}`` or ``{"messages": [{"role", "content"}, ...]}``
(field names from ``spec.data``). Every sequence is ``spec.data.maxLength`` tokens:

- prompt/completion: ``[bos] prompt completion eos``. The prompt keeps its last
  ``maxPromptLength`` tokens (cut from the left, BOS kept in front); then the completion is cut
  from the right to fit.
- messages: the chat template rendered turn by turn (each render must extend the previous one);
  assistant turns are the completion; BOS first unless the template wrote it. The whole
  conversation is cut from the right at ``maxLength`` (later turns are lost first).
- loss: on completion tokens only (``spec.sft.completionOnlyLoss``, default) or on every token.
- packing (``spec.data.packing``): examples are concatenated, in data order, into rows of
  ``maxLength`` tokens; an example never straddles two rows. Packed batches carry ``segment_ids``
  (which example of the row each token belongs to; 0 = padding): the model attends only within an
  example and restarts positions at each, and no token is trained to predict the next example's
  first token, so a packed example's loss equals its loss unpacked.

Order: epoch ``e`` visits the examples in a permutation seeded by ``(training.seed, e)`` (or file
order without ``shuffle``); the position ``(epoch, index)`` is the source's checkpointed state.
Every process builds the same global batches (the data is tokenised once per process).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from posttrain.api.v1alpha1 import DataSpec
from posttrain.trainer.data.order import EpochCursor
from posttrain.trainer.data.readers import BadRow, load_rows
from posttrain.trainer.data.text import keep_last, prepend_bos, template_name


class TokenizerLike(Protocol):
    eos_token_id: int
    pad_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
    ) -> str: ...


@dataclass(frozen=True)
class Example:
    tokens: tuple[int, ...]
    loss: tuple[bool, ...]  # per token: is it trained on (as a target)?
    segments: tuple[int, ...] | None = None  # packed rows: per token, which example (1, 2, ...)


ROLES = ("system", "user", "assistant", "tool")


def _string(row: Mapping[str, Any], name: str, where: str) -> str:
    if name not in row:
        raise BadRow(where, f"missing field {name!r} (has: {', '.join(sorted(row)) or 'nothing'})")
    value = row[name]
    if not isinstance(value, str):
        raise BadRow(where, f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _bos_id(tokenizer: TokenizerLike) -> int | None:
    return getattr(tokenizer, "bos_token_id", None)


def _continuation(longer: str, shorter: str, i: int, tokenizer: TokenizerLike, where: str) -> str:
    """The text ``longer`` adds to ``shorter``; turn-by-turn tokenisation needs each render to
    extend the previous one, which a template that rewrites earlier turns breaks."""
    if not longer.startswith(shorter):
        raise BadRow(
            where,
            f"{template_name(tokenizer)} rewrites earlier turns: the conversation rendered up to "
            f"message {i} does not start with its rendering up to message {i - 1}, so assistant "
            "turns cannot be told apart; use a template whose renders extend each other",
        )
    return longer[len(shorter) :]


def prompt_completion_example(
    row: Mapping[str, Any],
    where: str,
    tokenizer: TokenizerLike,
    data: DataSpec,
    completion_only: bool,
) -> Example:
    prompt = _string(row, data.prompt_field, where)
    completion = _string(row, data.completion_field, where)
    if not completion:
        raise BadRow(where, f"field {data.completion_field!r} is empty")
    bos = _bos_id(tokenizer)
    prompt_ids = keep_last(prepend_bos(tokenizer.encode(prompt), bos), data.max_prompt_length, bos)
    completion_ids = (tokenizer.encode(completion) + [tokenizer.eos_token_id])[
        : data.max_length - len(prompt_ids)
    ]
    tokens = prompt_ids + completion_ids
    loss = [not completion_only] * len(prompt_ids) + [True] * len(completion_ids)
    return Example(tuple(tokens), tuple(loss))


def checked_messages(value: Any, name: str, where: str) -> list[dict[str, str]]:
    """``value`` (field ``name`` of the row at ``where``) as chat messages, or ``BadRow``."""
    if not isinstance(value, list) or not value:
        raise BadRow(where, f"field {name!r} must be a non-empty list of messages")
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or m.get("role") not in ROLES
        ):
            raise BadRow(
                where,
                f"{name}[{i}] must be {{role: {'|'.join(ROLES)}, content: string}}, got {m!r}",
            )
    return value


def messages_example(
    row: Mapping[str, Any],
    where: str,
    tokenizer: TokenizerLike,
    data: DataSpec,
    completion_only: bool,
) -> Example:
    messages = checked_messages(row.get(data.messages_field), data.messages_field, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(where, f"{data.messages_field} has no assistant message to train on")
    # Render prefixes so each message's text is the difference of two renders (the template's own
    # markup included); assistant spans are what the model learns to write.
    tokens: list[int] = []
    loss: list[bool] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            span_ids = tokenizer.encode(_continuation(before, done, i, tokenizer, where))
            tokens += span_ids
            loss += [not completion_only] * len(span_ids)
            done = before
        after = tokenizer.apply_chat_template(messages[: i + 1])
        span_ids = tokenizer.encode(_continuation(after, done, i, tokenizer, where))
        if (
            m["role"] == "assistant"
            and i == len(messages) - 1
            and tokenizer.eos_token_id not in span_ids
        ):
            span_ids.append(tokenizer.eos_token_id)  # the template did not end the turn with EOS
        tokens += span_ids
        loss += [m["role"] == "assistant" or not completion_only] * len(span_ids)
        done = after
    tokens = prepend_bos(tokens, _bos_id(tokenizer))  # not a second one after the template's
    loss = [not completion_only] * (len(tokens) - len(loss)) + loss
    return Example(tuple(tokens[: data.max_length]), tuple(loss[: data.max_length]))


@dataclass(frozen=True)
class LoadReport:
    examples: list[Example]
    skipped: list[BadRow]


def load_examples(
    path: str, tokenizer: TokenizerLike, data: DataSpec, *, completion_only: bool = True
) -> LoadReport:
    """Tokenise every row; a bad row stops with its file and line unless skipBadRows is set."""
    made, skipped = load_rows(
        path,
        data,
        lambda value, where: (where, _example(value, where, tokenizer, data, completion_only)),
    )
    examples: list[Example] = []
    for where, example in made:
        # A row whose trained tokens were all truncated away teaches nothing.
        if any(example.loss[1:]):
            examples.append(example)
        else:
            skipped.append(
                BadRow(where, f"no completion tokens left within maxLength {data.max_length}")
            )
    if not examples:
        raise ValueError(f"spec.data: {path}: no usable rows ({len(skipped)} skipped)")
    return LoadReport(examples, skipped)


def _example(
    value: Mapping[str, Any],
    where: str,
    tokenizer: TokenizerLike,
    data: DataSpec,
    completion_only: bool,
) -> Example:
    if data.messages_field in value:
        return messages_example(value, where, tokenizer, data, completion_only)
    if data.prompt_field in value or data.completion_field in value:
        return prompt_completion_example(value, where, tokenizer, data, completion_only)
    raise BadRow(
        where,
        f"row has neither {data.messages_field!r} nor {data.prompt_field!r}/{data.completion_field!r} "
        f"(has: {', '.join(sorted(value)) or 'nothing'})",
    )


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Greedy packing in order: start a new row when the next example does not fit."""
    rows: list[Example] = []
    tokens: list[int] = []
    loss: list[bool] = []
    segments: list[int] = []
    for ex in examples:
        if tokens and len(tokens) + len(ex.tokens) > max_length:
            rows.append(Example(tuple(tokens), tuple(loss), tuple(segments)))
            tokens, loss, segments = [], [], []
        segment = segments[-1] + 1 if segments else 1
        tokens += ex.tokens
        loss += ex.loss
        segments += [segment] * len(ex.tokens)
    if tokens:
        rows.append(Example(tuple(tokens), tuple(loss), tuple(segments)))
    return rows


def collate(
    examples: Sequence[Example], seq_len: int, pad_id: int, *, segment_ids: bool = False
) -> dict[str, np.ndarray]:
    """Rows -> {input_ids, attention_mask, targets, loss_weights}, each [B, seq_len].

    ``targets[t] = tokens[t + 1]``; ``loss_weights`` = mask * B / (masked tokens in the batch), so
    the loss written as "mean over rows of sum(weights * nll)" is the mean over the batch's trained
    tokens, whatever the micro-batching. With ``segment_ids`` (packing) the batch also has
    ``segment_ids`` [B, seq_len] (0 = padding; a row that is one example is segment 1), and a
    token whose target starts the next example is not trained on.
    """
    B = len(examples)
    input_ids = np.full((B, seq_len), pad_id, np.int32)
    attention_mask = np.zeros((B, seq_len), np.int32)
    targets = np.full((B, seq_len), pad_id, np.int32)
    mask = np.zeros((B, seq_len), np.float32)
    segments = np.zeros((B, seq_len), np.int32)
    for b, ex in enumerate(examples):
        n = len(ex.tokens)
        input_ids[b, :n] = ex.tokens
        attention_mask[b, :n] = 1
        targets[b, : n - 1] = ex.tokens[1:]
        mask[b, : n - 1] = ex.loss[1:]
        segments[b, :n] = ex.segments if ex.segments is not None else 1
    # The last token of a packed example cannot see the next one, so its target is not its to learn.
    mask[:, :-1] *= segments[:, :-1] == segments[:, 1:]
    weights = mask * (B / max(mask.sum(), 1.0))
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": targets,
        "loss_weights": weights,
    }
    if segment_ids:
        batch["segment_ids"] = segments
    return batch


class SftSource:
    """Global batches of ``batch_size`` rows in a seeded, resumable order (see module docstring)."""

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        batch_size: int,
        seq_len: int,
        pad_id: int,
        seed: int,
        shuffle: bool = True,
        packing: bool = False,
    ):
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.packing = packing
        arrange = (lambda rows: pack(rows, seq_len)) if packing else None
        self.cursor = EpochCursor(examples, seed=seed, shuffle=shuffle, arrange=arrange)

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        del step  # the order is positional; the loop restores the position on resume
        rows = self.cursor.take(self.batch_size)
        return collate(rows, self.seq_len, self.pad_id, segment_ids=self.packing)

    def state(self) -> dict[str, Any]:
        return self.cursor.state()

    def restore(self, state: Mapping[str, Any]) -> None:
        self.cursor.restore(state)


def fixed_batches(
    examples: Sequence[Example], *, batch_size: int, seq_len: int, pad_id: int
) -> Iterator[dict[str, np.ndarray]]:
    """Evaluation batches in file order; the last is filled with empty (zero-weight) rows."""
    empty = Example((pad_id,), (False,))
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        chunk += [empty] * (batch_size - len(chunk))
        yield collate(chunk, seq_len, pad_id)
