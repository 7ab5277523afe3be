"""Preference pairs on the arithmetic task: prefer the correct sum over a wrong one.

Each problem of ``arithmetic.problems`` (same train/test split) becomes
``{"prompt": "12+7=", "chosen": "19", "rejected": "63"}``: the rejected answer is another number
a sum of two operands could be (0 to 2 x maxOperand), drawn uniformly by a seeded generator. The
DPO and ORPO quickstarts train on these. (Near misses, e.g. the sum +-1..10, are too hard for the
built-in model to learn from preferences alone in a quickstart's minute: we measured chance-level
held-out accuracy after 600 DPO steps.)

    python -m posttrain.trainer.tasks.preferences --out DIR   # writes DIR/train.jsonl, DIR/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Sequence

from posttrain.trainer.tasks import arithmetic


def wrong_answer(answer: str, largest: int, rng: random.Random) -> str:
    """A number in [0, largest] other than ``answer``."""
    value = rng.randrange(largest)  # one fewer than the choices, then skip the answer
    return str(value + 1 if value >= int(answer) else value)


def pairs(
    split: str = "train", *, max_operand: int = 49, held_out: int = 200, seed: int = 1234
) -> list[dict[str, str]]:
    """The preference rows of a split (deterministic in its arguments)."""
    rng = random.Random(f"{seed}-{split}")
    problems = arithmetic.problems(split, max_operand=max_operand, held_out=held_out, seed=seed)
    return [
        {
            "prompt": p.prompt,
            "chosen": p.answer,
            "rejected": wrong_answer(p.answer, 2 * max_operand, rng),
        }
        for p in problems
    ]


def write_jsonl(path: str, rows: Sequence[dict[str, str]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--max-operand", type=int, default=49)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    for split in ("train", "test"):
        rows = pairs(split, seed=args.seed, max_operand=args.max_operand, held_out=args.held_out)
        write_jsonl(os.path.join(args.out, f"{split}.jsonl"), rows)
        print(f"{args.out}/{split}.jsonl: {len(rows)} pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
