"""The shipped arithmetic task: "12+7=" -> "19". Small enough for the built-in model to learn on a laptop.

Problems are every pair (a, b) with 0 <= a, b <= max_operand, shuffled by a seed; the last
``held_out`` of that order are the test split, so train and test never share a problem. The SFT
quickstart trains on ``{"prompt", "completion"}`` rows; the GRPO quickstart uses the prompts with
``answer`` and ``correct``/``accuracy`` as the reward check.

    python -m posttrain.trainer.tasks.arithmetic --out DIR   # writes DIR/train.jsonl, DIR/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    prompt: str  # "12+7="
    answer: str  # "19"

    def row(self) -> dict[str, str]:
        return {"prompt": self.prompt, "completion": self.answer, "answer": self.answer}


def problems(
    split: str = "train", *, max_operand: int = 49, held_out: int = 200, seed: int = 1234
) -> list[Problem]:
    """The train or test split (deterministic in its arguments)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    if held_out >= len(pairs):
        raise ValueError(f"held_out={held_out} leaves no training problems out of {len(pairs)}")
    random.Random(seed).shuffle(pairs)
    chosen = pairs[-held_out:] if split == "test" else pairs[:-held_out]
    return [Problem(f"{a}+{b}=", str(a + b)) for a, b in chosen]


_NUMBER = re.compile(r"-?\d+")


def correct(completion: str, answer: str) -> bool:
    """The first integer in the completion equals the answer."""
    match = _NUMBER.match(completion.strip())
    return match is not None and match.group() == answer.strip()


def accuracy(completions: Sequence[str], answers: Sequence[str]) -> float:
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions for {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(correct(c, a) for c, a in zip(completions, answers, strict=True)) / len(answers)


def write_jsonl(path: str, rows: Sequence[Problem]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for p in rows:
            f.write(json.dumps(p.row()) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--max-operand", type=int, default=49)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    for split in ("train", "test"):
        rows = problems(split, max_operand=args.max_operand, held_out=args.held_out, seed=args.seed)
        write_jsonl(os.path.join(args.out, f"{split}.jsonl"), rows)
        print(f"{args.out}/{split}.jsonl: {len(rows)} problems")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
