"""Prompt rows for the rollout algorithms (GRPO, GSPO-token, PPO): read, tokenise, order.

A row's prompt is a string (used as written) or chat messages (rendered with the tokenizer's chat
template, generation prompt added). The row's other columns travel with the prompt to the reward
functions. Prompt k of a run (k counting over epochs) is a pure function of k and the seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from posttrain.api.v1alpha1 import DataSpec
from posttrain.trainer.data.order import EpochStream
from posttrain.trainer.data.readers import BadRow, load_rows
from posttrain.trainer.data.text import keep_last, prepend_bos


@dataclass(frozen=True)
class Prompt:
    text: str  # what reward functions see as the prompt
    ids: tuple[int, ...]  # its tokens, one [bos] first when the tokenizer has one
    columns: Mapping[str, Any]  # the row's other columns, passed to reward functions
    completion: tuple[int, ...] = ()  # data.completionField's tokens + EOS (SFT warm-up only)


def encode_prompt(
    row: Mapping[str, Any], where: str, tokenizer: Any, data: DataSpec, *, completion: bool = False
) -> Prompt:
    """A string prompt is used as written (like SFT's prompt/completion rows); a list of chat
    messages goes through the tokenizer's chat template with the generation prompt added.
    With `completion`, the row's data.completionField is tokenised too (for the SFT warm-up)."""
    if data.prompt_field not in row:
        raise BadRow(
            where,
            f"missing prompt field {data.prompt_field!r} (spec.data.promptField; row has: "
            f"{', '.join(sorted(row)) or 'nothing'})",
        )
    value = row[data.prompt_field]
    if isinstance(value, list):
        text = tokenizer.apply_chat_template(value, add_generation_prompt=True)
    elif isinstance(value, str) and value:
        text = value
    else:
        raise BadRow(
            where, f"prompt field {data.prompt_field!r} must be a non-empty string or messages"
        )
    bos = getattr(tokenizer, "bos_token_id", None)
    # One BOS (not a second after a template's), kept when the prompt is cut from the left.
    ids = keep_last(prepend_bos(tokenizer.encode(text), bos), data.max_prompt_length, bos)
    columns = {k: v for k, v in row.items() if k != data.prompt_field}
    target: tuple[int, ...] = ()
    if completion:
        value = row.get(data.completion_field)
        if not isinstance(value, str) or not value:
            raise BadRow(
                where,
                f"sftWarmupSteps needs a non-empty string in completion field "
                f"{data.completion_field!r} (spec.data.completionField)",
            )
        target = (*tokenizer.encode(value), tokenizer.eos_token_id)
    return Prompt(text=text, ids=tuple(ids), columns=columns, completion=target)


def load_prompts(
    path: str, tokenizer: Any, data: DataSpec, *, completion: bool = False
) -> list[Prompt]:
    prompts, _ = load_rows(
        path,
        data,
        lambda value, where: encode_prompt(value, where, tokenizer, data, completion=completion),
    )
    if not prompts:
        raise ValueError(f"spec.data: {path}: no usable prompts")
    check_same_columns(path, [p.columns for p in prompts])
    return prompts


def check_same_columns(path: str, columns: list[Mapping[str, Any]]) -> None:
    """Every row must carry the same columns: reward functions get them as aligned lists."""
    keys = set(columns[0])
    for row in columns:
        if set(row) != keys:
            raise ValueError(
                f"spec.data: {path}: rows have different columns ({sorted(keys)} vs "
                f"{sorted(row)}); reward functions need the same columns in every row"
            )


class PromptStream(EpochStream[Prompt]):
    """Prompt k of the run (k counts over epochs): a seeded permutation per epoch."""
