"""The tools quickstart's environment and tool (examples/local/grpo-tools-quickstart.yaml).

Three-digit sums ("123+456=") that the built-in character model cannot add by itself in a few
minutes of training, and a calculator tool, ``calc(x)``, that it can call with a Llama 3.x JSON
call, ``{"name":"calc","parameters":{"x":"123+456"}}`` (one argument, the sum as written: the
model copies one span of its prompt). The trainer runs the call and appends
the result as a tool message (``T: 579`` in the built-in model's plain-text chat format); the
next turn is the answer, which ``SumEnv.step`` scores: 1 for the right sum, else 0.

Written to the environment protocol only (it imports nothing from posttrain):

    python examples/local/envs/calculator.py --out examples/local/data/sums   # writes the data
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re


class SumEnv:
    """One episode per data row: the question, then the model's final answer, scored."""

    def __init__(self, row: dict):
        self.a, self.b = int(row["a"]), int(row["b"])

    def reset(self) -> str:
        return f"{self.a}+{self.b}="

    def step(self, text: str) -> tuple[str | None, float, bool]:
        # Without spec tools, the environment serves the calculator itself: a JSON call
        # {"name":"calc"} gets the sum back (the trainer appends it as a tool message).
        if text.lstrip().startswith("{"):
            try:
                call = json.loads(text)
            except json.JSONDecodeError as err:
                return f"Error: not JSON: {err}", 0.0, False
            if not isinstance(call, dict) or call.get("name") != "calc":
                return "Error: the tool is calc", 0.0, False
            return str(self.a + self.b), 0.0, False
        # A turn without a tool call is the answer: the episode ends.
        match = re.match(r"\s*(-?\d+)", text)
        right = match is not None and int(match.group(1)) == self.a + self.b
        return None, float(right), True


def calc(x: str) -> int:
    """Add integers: calc("123+456") -> 579."""
    terms = str(x).split("+")
    if not all(t.strip().isdigit() for t in terms):
        raise ValueError(f"calc adds integers like '123+456', got {x!r}")
    return sum(int(t) for t in terms)


def call(a: int, b: int, spec_tool: bool) -> str:
    if not spec_tool:  # the environment's calculator knows the sum: no arguments to copy
        return json.dumps({"name": "calc"}, separators=(",", ":"))
    return json.dumps({"name": "calc", "parameters": {"x": f"{a}+{b}"}}, separators=(",", ":"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--spec-tool",
        action="store_true",
        help="warm-up turns call the spec's calc tool with the sum as its argument",
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    pairs = set()
    while len(pairs) < args.train + args.test:
        pairs.add((rng.randint(500, 999), rng.randint(500, 999)))  # four-digit sums
    ordered = sorted(pairs)
    rng.shuffle(ordered)
    os.makedirs(args.out, exist_ok=True)
    splits = {"train": ordered[: args.train], "test": ordered[args.train :]}
    for split, rows in splits.items():
        with open(os.path.join(args.out, f"{split}.jsonl"), "w") as f:
            for a, b in rows:
                # completion: the model's turns for the SFT warm-up (the call, then the answer).
                row = {
                    "a": a,
                    "b": b,
                    "answer": str(a + b),
                    "completion": [call(a, b, args.spec_tool), str(a + b)],
                }
                f.write(json.dumps(row) + "\n")
        print(f"{args.out}/{split}.jsonl: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
