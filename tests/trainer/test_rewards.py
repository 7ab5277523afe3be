"""Rewards: built-ins, user functions from a module or a file path, weighted sums, errors by name."""

from __future__ import annotations

import math
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest

from posttrain.api.settings.rl import RewardSpec
from posttrain.trainer import rewards as rw


def specs(*items: dict) -> list[RewardSpec]:
    return [RewardSpec.model_validate(item) for item in items]


def total_and_each(items, prompts, completions, **columns):
    return rw.score(rw.build_rewards(specs(*items)), prompts, completions, columns)


# ------------------------------------------------------------------ number extraction


@pytest.mark.parametrize(
    "text, want",
    [
        ("1,234", 1234),
        ("-3.5", Fraction(-7, 2)),
        ("3/4", Fraction(3, 4)),
        ("$5", 5),
        ("50%", 50),
        (" 42. ", 42),
        ("−7", -7),
        ("seven", None),
        ("1/0", None),
    ],
)
def test_parse_number(text, want):
    assert rw.parse_number(text) == want


@pytest.mark.parametrize(
    "completion, want",
    [
        ("12 + 7 = 19", 19),
        ("First 3 apples, then 4; so 7 in all.", 7),
        ("The answer is 1,250 dollars, not 12.", 1250),
        ("We get \\boxed{-2.5} since 5 / 2 = 2.5", Fraction(-5, 2)),
        ("<answer>\n 3/4 \n</answer> (checked with 0.75)", Fraction(3, 4)),
        ("5 + 5 = 10\n#### 10\nDone in 2 steps", 10),
        ("10 - 3 = 7", 7),
        ("no digits here", None),
    ],
)
def test_extract_answer(completion, want):
    assert rw.extract_answer(completion) == want


def test_math_answer_matches_numbers_and_text():
    total, each = total_and_each(
        [{"builtin": "math-answer", "answerField": "solution"}],
        ["q"] * 5,
        ["= 19", "it is 19.0", "18", "Paris.", "no idea"],
        solution=["19", 19, "19", "paris", "4"],
    )
    np.testing.assert_array_equal(total, [1, 1, 0, 1, 0])
    np.testing.assert_array_equal(each["math-answer"], total)


def test_regex_format_and_length_penalty():
    _, each = total_and_each(
        [
            {"builtin": "regex-format", "pattern": r"^<answer>\d+</answer>$"},
            {"builtin": "length-penalty", "targetLength": 10},
        ],
        ["q"] * 3,
        ["<answer>7</answer>", "7", "x" * 25],
    )
    np.testing.assert_array_equal(each["regex-format"], [1, 0, 0])
    np.testing.assert_allclose(each["length-penalty"], [-0.8, 0.0, -1.0])


def test_weighted_sum_and_per_reward_values():
    total, each = total_and_each(
        [
            {"builtin": "math-answer", "weight": 2.0},
            {"builtin": "length-penalty", "targetLength": 4, "weight": 0.5, "name": "short"},
        ],
        ["a", "b"],
        ["= 3", "it is 4 ok"],
        answer=["3", "4"],
    )
    np.testing.assert_allclose(each["math-answer"], [1, 1])
    np.testing.assert_allclose(each["short"], [0, -1.0])
    np.testing.assert_allclose(total, [2.0, 2.0 - 0.5])


def test_math_answer_missing_column_names_the_reward_and_columns():
    with pytest.raises(
        rw.RewardError, match=r"spec.grpo.rewards\[0\] \(math-answer\).*'answer'.*question"
    ):
        total_and_each([{"builtin": "math-answer"}], ["p"], ["1"], question=["p"])


# ------------------------------------------------------------------ user functions


USER_REWARDS = textwrap.dedent(
    """
    def mentions_target(prompts, completions, target, **columns):
        return [float(t in c) + 0.0 * len(p) for p, c, t in zip(prompts, completions, target)]

    def boom(prompts, completions, **columns):
        raise ZeroDivisionError("user bug")

    def too_few(prompts, completions, **columns):
        return [1.0]

    def nan(prompts, completions, **columns):
        return [float("nan")] * len(completions)

    def words(prompts, completions, **columns):
        return ["high"] * len(completions)

    not_a_function = 3
    """
)


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_user_function_from_a_file_gets_prompts_completions_and_columns(reward_file):
    total, each = total_and_each(
        [{"function": f"{reward_file}:mentions_target", "weight": 3.0}],
        ["say cat", "say dog"],
        ["a cat", "a cat"],
        target=["cat", "dog"],
        unused=[1, 2],
    )
    np.testing.assert_allclose(each["mentions_target"], [1, 0])
    np.testing.assert_allclose(total, [3, 0])


def test_user_function_from_a_module(reward_file, monkeypatch):
    monkeypatch.syspath_prepend(str(reward_file.parent))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    _, each = total_and_each(
        [{"function": "my_rewards:mentions_target", "name": "mentions"}],
        ["p"],
        ["dog"],
        target=["dog"],
    )
    np.testing.assert_allclose(each["mentions"], [1.0])


@pytest.mark.parametrize(
    "name, message",
    [
        ("boom", r"spec.grpo.rewards\[1\] \(boom\) raised ZeroDivisionError: user bug"),
        ("too_few", r"spec.grpo.rewards\[1\] \(too_few\) returned 1 values for 2 completions"),
        ("nan", r"spec.grpo.rewards\[1\] \(nan\) returned nan .*finite"),
        ("words", r"spec.grpo.rewards\[1\] \(words\) returned a value that is not a number"),
    ],
)
def test_bad_rewards_stop_with_a_message_naming_them(reward_file, name, message):
    rewards = rw.build_rewards(
        specs({"builtin": "length-penalty"}, {"function": f"{reward_file}:{name}"})
    )
    with pytest.raises(rw.RewardError, match=message):
        rw.score(rewards, ["p", "q"], ["a", "b"], {})


@pytest.mark.parametrize(
    "ref, message",
    [
        ("{dir}/missing.py:f", r"rewards\[0\].function: cannot load .*no such file"),
        ("{dir}/my_rewards.py:absent", r"rewards\[0\].function: .*has no attribute 'absent'"),
        ("{dir}/my_rewards.py:not_a_function", r"rewards\[0\].function: .*not callable"),
        ("no_such_module_xyz:f", r"rewards\[0\].function: .*ModuleNotFoundError"),
    ],
)
def test_unloadable_functions_are_reported_by_field(reward_file, ref, message):
    with pytest.raises(rw.RewardError, match=message):
        rw.build_rewards(specs({"function": ref.format(dir=reward_file.parent)}))


def test_duplicate_names_are_refused():
    with pytest.raises(rw.RewardError, match=r"rewards\[1\].name: 'math-answer' is already used"):
        rw.build_rewards(specs({"builtin": "math-answer"}, {"builtin": "math-answer"}))


def test_totals_are_finite_floats():
    total, _ = total_and_each([{"builtin": "length-penalty"}], ["p"], ["x"])
    assert total.dtype == np.float64 and math.isfinite(total[0])
