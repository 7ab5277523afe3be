"""`posttrain score --reward-model DIR FILE.jsonl`: one reward-model score per line of
`{"text": ...}`, printed in input order."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score texts with a Hugging Face reward model (*ForSequenceClassification)",
        description="Print one score per line of FILE (JSON lines with a 'text' field), in "
        "order. Each text is tokenised as written with the tokenizer beside the weights (no "
        "special tokens added: render chats with the model's chat template first) and pooled as "
        "transformers pools.",
    )
    p.add_argument("--reward-model", required=True, metavar="DIR", help="folder, gs:// or hf://")
    p.add_argument("file", metavar="FILE.jsonl", help="'-' reads stdin")
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward pass")
    p.set_defaults(func=run)


def read_texts(lines: list[str], source: str) -> list[str]:
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}:{number}: not JSON: {err}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f'{source}:{number}: expected an object with a "text" string')
        texts.append(row["text"])
    return texts


def _bucket(n: int) -> int:
    # Few distinct shapes, so few compilations: powers of two from 16.
    size = 16
    while size < n:
        size *= 2
    return size


def run(args: argparse.Namespace) -> int:
    try:
        if args.file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.file) as f:
                lines = f.read().splitlines()
        texts = read_texts(lines, args.file)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 1

    import numpy as np
    from flax import nnx

    from posttrain.trainer.data.text import HfTokenizer
    from posttrain.trainer.models.reward_model import load_reward_model

    model = load_reward_model(args.reward_model)
    tokenizer = HfTokenizer(args.reward_model)
    encoded = [tokenizer.encode(t) for t in texts]
    empty = [i + 1 for i, ids in enumerate(encoded) if not ids]
    if empty:
        print(f"error: {args.file}: texts {empty[:5]} encode to no tokens", file=sys.stderr)
        return 1
    # Padding must use the id pooling skips; without one transformers scores a single row only.
    pad = model.config.pad_token_id
    batch = args.batch_size if pad is not None else 1
    # The model as an argument, not a closure: its weights must not become compiled constants.
    scores = nnx.jit(lambda m, ids, mask: m.scores(ids, mask))
    for start in range(0, len(encoded), batch):
        rows = encoded[start : start + batch]
        width = _bucket(max(len(r) for r in rows)) if pad is not None else len(rows[0])
        ids = np.full((len(rows), width), pad if pad is not None else 0, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        for value in np.asarray(scores(model, ids, mask)):
            print(repr(float(value)))
    return 0
