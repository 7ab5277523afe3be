"""Unpaired (KTO) rows from preference pairs: each pair gives a desirable and an undesirable row.

As TRL's ``unpair_preference_dataset``: ``{"prompt": p, "chosen": c, "rejected": r}`` becomes
``{"prompt": p, "completion": c, "label": true}`` and ``{"prompt": p, "completion": r, "label":
false}``, in that order, so the set is balanced (KTO's default weights of 1 assume roughly as
many desirable as undesirable rows). The test split stays pairs: KTO's implicit reward is scored
by how often it prefers the chosen answer of a held-out pair.

    python -m posttrain.trainer.tasks.unpaired_preferences \\
        --pairs examples/local/data/arithmetic-preferences --out examples/local/data/arithmetic-kto
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from posttrain.trainer.tasks.preferences import write_jsonl


def unpair(pairs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Two unpaired rows per pair: the chosen answer desirable, then the rejected one not."""
    rows = []
    for pair in pairs:
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", required=True, help="folder with train.jsonl and test.jsonl")
    parser.add_argument("--out", required=True, help="folder for train.jsonl and test.jsonl")
    args = parser.parse_args(argv)
    train = unpair(read_jsonl(os.path.join(args.pairs, "train.jsonl")))
    test = read_jsonl(os.path.join(args.pairs, "test.jsonl"))
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "test.jsonl"), test)
    print(f"{args.out}/train.jsonl: {len(train)} unpaired rows; test.jsonl: {len(test)} pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
