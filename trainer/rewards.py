"""Reward functions for RL (GRPO, GSPO-token, PPO): built-ins, the user's own, and their weighted sum.

Every reward follows one contract, built-ins included:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

`prompts[i]` is the prompt text that produced `completions[i]`; `columns` holds the data row's other
columns, each a list aligned with `completions` (a prompt's G completions repeat its row). A reward
that raises, returns the wrong number of values, or a value that is not a finite number stops the
run with a `RewardError` naming it (`spec.grpo.rewards[1] (brevity)`).

This module is plain Python (no JAX): rewards run on the host, between sampling and the loss.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.api.settings.rl import RewardSpec

RewardFn = Callable[..., Sequence[float]]


class RewardError(RuntimeError):
    """A reward could not be built or returned something unusable; the message names it."""


# --------------------------------------------------------------------------- number extraction

_NUMBER = r"[-+−]?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?%?|[-+−]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
# Where a final answer is announced, most explicit first; the number is taken from what follows.
_ANSWER_MARKERS = [
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"<answer>(.*?)</answer>", re.DOTALL),
    re.compile(r"####\s*(.+)"),
    re.compile(r"answer\s*(?:is|:|=)\s*(.+)", re.IGNORECASE),
]


def parse_number(text: str) -> Fraction | None:
    """'1,234' -> 1234, '-3.5' -> -7/2, '3/4' -> 3/4, '$5' -> 5, '50%' -> 50; else None.

    Exact fractions, so '0.1 + 0.2'-style float noise never decides a match.
    """
    s = text.strip().replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
    s = s.rstrip("%").rstrip(".")
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(num) / Fraction(den) if Fraction(den) != 0 else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(completion: str) -> Fraction | None:
    """The final numeric answer: after an answer marker if there is one, else the last number."""
    for marker in _ANSWER_MARKERS:
        found = marker.findall(completion)
        if found:
            numbers = _NUMBER_RE.findall(found[-1])
            if numbers:
                return parse_number(numbers[0])
    numbers = _NUMBER_RE.findall(completion)
    return parse_number(numbers[-1]) if numbers else None


def _normalise_text(value: Any) -> str:
    return str(value).strip().lower().rstrip(".")


def answers_match(completion: str, expected: Any) -> bool:
    """Numeric answers compare as numbers; anything else as trimmed, case-folded text."""
    want = expected if isinstance(expected, int | float) else parse_number(str(expected))
    if want is None:
        return _normalise_text(completion).endswith(_normalise_text(expected))
    got = extract_answer(completion)
    if got is None:
        return False
    return math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-9)


# --------------------------------------------------------------------------- built-ins


def math_answer(answer_field: str) -> RewardFn:
    """1.0 when the completion's final number equals the row's `answer_field`, else 0.0."""

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        if answer_field not in columns:
            raise KeyError(
                f"answerField {answer_field!r} is not a data column; columns: "
                f"{', '.join(sorted(columns)) or 'none'}"
            )
        expected = columns[answer_field]
        return [float(answers_match(c, e)) for c, e in zip(completions, expected, strict=True)]

    return reward


def regex_format(pattern: str) -> RewardFn:
    """1.0 when `re.search(pattern, completion)` finds a match, else 0.0."""
    compiled = re.compile(pattern)

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [float(compiled.search(c) is not None) for c in completions]

    return reward


def length_penalty(target_length: int) -> RewardFn:
    """0 up to `target_length` characters, then -(excess / target_length), floored at -1."""

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [max(-1.0, -max(0, len(c) - target_length) / target_length) for c in completions]

    return reward


# --------------------------------------------------------------------------- user functions


def load_function(ref: str) -> RewardFn:
    """`"pkg.module:name"` (imported) or `"/path/file.py:name"` (loaded from the file)."""
    target, _, name = ref.rpartition(":")
    if target.endswith(".py") or "/" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        module_name = f"posttrain_user_reward_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load Python from {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if fn is None:
        raise AttributeError(f"{target} has no attribute {name!r}")
    if not callable(fn):
        raise TypeError(f"{target}:{name} is not callable")
    return fn


# --------------------------------------------------------------------------- the weighted sum


@dataclass(frozen=True)
class Reward:
    name: str
    weight: float
    fn: RewardFn
    where: str  # e.g. "spec.grpo.rewards[1] (brevity)", for error messages


def build_rewards(
    specs: Sequence[RewardSpec],
    field: str = "spec.grpo.rewards",
    *,
    reward_model: Callable[[RewardSpec, str], RewardFn] | None = None,
) -> list[Reward]:
    """Turn `spec.grpo.rewards` into callables; fails naming the entry that cannot be built.

    `http` items become an `HttpReward` (`rewards_http.py`); `rewardModel` items are built by
    `reward_model(spec, where)` (the trainer passes one that loads the model on its mesh in the
    compute dtype; default: `reward_model_reward.RewardModelReward` on the default device)."""
    rewards: list[Reward] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        name = spec.display_name
        where = f"{field}[{i}] ({name})"
        if name in seen:
            raise RewardError(
                f"{field}[{i}].name: {name!r} is already used by {field}[{seen[name]}]; "
                "each reward needs its own name (it keys the reward/<name> metric)"
            )
        seen[name] = i
        if spec.builtin == "math-answer":
            fn = math_answer(spec.answer_field)
        elif spec.builtin == "regex-format":
            assert spec.pattern is not None  # the API requires it
            fn = regex_format(spec.pattern)
        elif spec.builtin == "length-penalty":
            fn = length_penalty(spec.target_length)
        elif spec.http is not None or spec.reward_model is not None:
            fn = _served(spec, where, f"{field}[{i}]", reward_model)
        else:
            assert spec.function is not None
            try:
                fn = load_function(spec.function)
            except Exception as err:
                raise RewardError(
                    f"{field}[{i}].function: cannot load {spec.function!r}: "
                    f"{type(err).__name__}: {err}"
                ) from err
        rewards.append(Reward(name=name, weight=spec.weight, fn=fn, where=where))
    return rewards


def _served(
    spec: RewardSpec,
    where: str,
    item: str,
    reward_model: Callable[[RewardSpec, str], RewardFn] | None,
) -> RewardFn:
    """An `http` or `rewardModel` item as a reward function."""
    if spec.http is not None:
        from posttrain.trainer.rewards_http import HttpReward

        h = spec.http
        return HttpReward(
            h.url,
            name=where,
            timeout_s=h.timeout,
            retries=h.retries,
            chunk_size=h.chunk_size,
            concurrency=h.max_concurrency,
            default=h.default,
        )
    if reward_model is None:
        from posttrain.trainer.reward_model_reward import RewardModelReward

        def reward_model(s: RewardSpec, w: str) -> RewardFn:
            assert s.reward_model is not None
            return RewardModelReward(s.reward_model, w)

    try:
        return reward_model(spec, where)
    except Exception as err:
        assert spec.reward_model is not None
        raise RewardError(
            f"{item}.rewardModel: cannot load {spec.reward_model.path!r}: "
            f"{type(err).__name__}: {err}"
        ) from err


def _check_values(reward: Reward, values: Any, n: int) -> np.ndarray:
    if isinstance(values, str | bytes) or not hasattr(values, "__len__"):
        raise RewardError(
            f"{reward.where} returned {type(values).__name__}; expected a list of {n} floats"
        )
    if len(values) != n:
        raise RewardError(
            f"{reward.where} returned {len(values)} values for {n} completions; "
            "expected one float per completion"
        )
    try:
        out = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise RewardError(f"{reward.where} returned a value that is not a number: {err}") from err
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise RewardError(
            f"{reward.where} returned {out[bad[0]]} for completion {bad[0]} "
            f"({bad.size} non-finite values); rewards must be finite numbers"
        )
    return out


def score(
    rewards: Sequence[Reward],
    prompts: list[str],
    completions: list[str],
    columns: Mapping[str, list[Any]],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Total reward sum_k w_k r_k per completion, [N] float64, and each term's raw values by name."""
    n = len(completions)
    if len(prompts) != n or any(len(v) != n for v in columns.values()):
        raise ValueError("prompts and every column must have one entry per completion")
    total = np.zeros(n, dtype=np.float64)
    each: dict[str, np.ndarray] = {}
    for reward in rewards:
        try:
            values = reward.fn(
                list(prompts), list(completions), **{k: list(v) for k, v in columns.items()}
            )
        except RewardError:
            raise
        except Exception as err:
            raise RewardError(f"{reward.where} raised {type(err).__name__}: {err}") from err
        each[reward.name] = _check_values(reward, values, n)
        total += reward.weight * each[reward.name]
    return total, each
