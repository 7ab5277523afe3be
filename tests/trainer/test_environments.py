"""The environment protocol, the episode driver (scripted policies, no model) and the token layout."""

from __future__ import annotations

import numpy as np
import pytest

from posttrain.trainer.environments import (
    EnvironmentFailure,
    TokenLayout,
    layout_tokens,
    load_environment,
    make_environments,
    pad_layouts,
    run_episodes,
)

GUESS_ENV = '''
class Guess:
    """Guess the row's number; 'higher'/'lower' hints; reward 1 on the right guess."""

    def __init__(self, row):
        self.target = int(row["target"])

    def reset(self):
        return "Guess my number between 0 and 9."

    def step(self, text):
        if "<tool_call>" in text:
            return "tool result: 7", 0.0, False
        guess = int(text.strip())
        if guess == self.target:
            return None, 1.0, True
        return ("higher" if guess < self.target else "lower"), -0.1, False
'''


@pytest.fixture
def guess_ref(tmp_path):
    path = tmp_path / "guess_env.py"
    path.write_text(GUESS_ENV)
    return f"{path}:Guess"


def test_loads_from_a_file_and_builds_one_environment_per_row(guess_ref):
    cls = load_environment(guess_ref)
    assert cls.__name__ == "Guess"
    envs = make_environments(guess_ref, [{"target": 3}, {"target": 5}], first_index=10)
    assert [e.where for e in envs] == [f"{guess_ref} (row 10)", f"{guess_ref} (row 11)"]
    assert envs[0].reset().startswith("Guess")
    assert envs[0].step("3") == (None, 1.0, True)


def test_driver_steps_only_unfinished_episodes_and_records_everything(guess_ref):
    envs = make_environments(guess_ref, [{"target": 0}, {"target": 2}, {"target": 9}])
    batches: list[int] = []

    def policy(conversations):
        batches.append(len(conversations))
        # Guess the number of assistant turns so far: 0, 1, 2, ... (one tool call on turn 1).
        out = []
        for conv in conversations:
            turn = sum(m["role"] == "assistant" for m in conv)
            out.append(
                '<tool_call>{"name": "peek", "arguments": {}}</tool_call>'
                if turn == 1
                else str(turn)
            )
        return out

    episodes = run_episodes(envs, policy, max_turns=4)
    # Turn 0 ends episode 0; turn 1 is a tool call; turn 2 ends episode 1; episode 2 hits the cap.
    assert batches == [3, 2, 2, 1]
    assert [e.turns for e in episodes] == [1, 3, 4]
    assert [e.done for e in episodes] == [True, True, False]
    assert [e.truncated for e in episodes] == [False, False, True]
    assert episodes[0].rewards == [1.0]
    assert episodes[1].rewards == [-0.1, 0.0, 1.0]
    assert episodes[2].rewards == [-0.1, 0.0, -0.1, -0.1]
    assert episodes[1].reward == pytest.approx(0.9)
    assert [e.tool_calls for e in episodes] == [0, 1, 1]
    roles = [m["role"] for m in episodes[1].messages]
    assert roles == ["user", "assistant", "user", "assistant", "tool", "assistant"]
    assert episodes[1].messages[2]["content"] == "higher"
    assert episodes[1].messages[4]["content"] == "tool result: 7"
    assert all(e.env_seconds > 0 for e in episodes)


def test_concurrent_steps_keep_the_order(guess_ref):
    rows = [{"target": t} for t in (4, 1, 7, 2)]
    serial = run_episodes(make_environments(guess_ref, rows), _counting_policy, max_turns=10)
    threaded = run_episodes(
        make_environments(guess_ref, rows), _counting_policy, max_turns=10, workers=4
    )
    assert [e.messages for e in serial] == [e.messages for e in threaded]
    assert [e.turns for e in threaded] == [5, 2, 8, 3]


def _counting_policy(conversations):
    return [str(sum(m["role"] == "assistant" for m in c)) for c in conversations]


BAD_ENVS = """
class Raises:
    def __init__(self, row): self.row = row
    def reset(self): return "go"
    def step(self, text): raise KeyError("score")

class WrongTuple:
    def __init__(self, row): pass
    def reset(self): return "go"
    def step(self, text): return ("obs", 1.0)

class BoolReward:
    def __init__(self, row): pass
    def reset(self): return "go"
    def step(self, text): return (None, True, True)

class NanReward:
    def __init__(self, row): pass
    def reset(self): return "go"
    def step(self, text): return (None, float("nan"), True)

class IntDone:
    def __init__(self, row): pass
    def reset(self): return "go"
    def step(self, text): return (None, 1, 1)

class ResetNotStr:
    def __init__(self, row): pass
    def reset(self): return ["go"]
    def step(self, text): return (None, 0.0, True)

class BadInit:
    def __init__(self, row): raise ValueError(f"no column 'target' in {sorted(row)}")
    def reset(self): return "go"
    def step(self, text): return (None, 0.0, True)

class NoStep:
    def __init__(self, row): pass
    def reset(self): return "go"

def not_a_class(row): return None
"""


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Raises", r"Raises \(row 7\)\.step raised KeyError: 'score'"),
        ("WrongTuple", r"WrongTuple \(row 7\)\.step returned tuple .*expected \(observation"),
        ("BoolReward", r"BoolReward \(row 7\)\.step returned reward bool True"),
        ("NanReward", r"NanReward \(row 7\)\.step returned reward nan; must be finite"),
        ("IntDone", r"IntDone \(row 7\)\.step returned done int 1"),
        ("ResetNotStr", r"ResetNotStr \(row 7\)\.reset returned list; expected str"),
        ("BadInit", r"BadInit \(row 7\): __init__ raised ValueError: no column 'target'"),
    ],
)
def test_bad_environments_fail_naming_class_row_and_call(tmp_path, name, message):
    path = tmp_path / "bad_envs.py"
    path.write_text(BAD_ENVS)
    with pytest.raises(EnvironmentFailure, match=message):
        envs = make_environments(f"{path}:{name}", [{"x": 1}], first_index=7)
        run_episodes(envs, lambda convs: ["hi"] * len(convs), max_turns=2)


def test_bad_references_fail_at_load(tmp_path):
    path = tmp_path / "bad_envs.py"
    path.write_text(BAD_ENVS)
    with pytest.raises(EnvironmentFailure, match="has no step method"):
        load_environment(f"{path}:NoStep")
    with pytest.raises(EnvironmentFailure, match="is not a class"):
        load_environment(f"{path}:not_a_class")
    with pytest.raises(EnvironmentFailure, match="cannot load: AttributeError"):
        load_environment(f"{path}:Missing")
    with pytest.raises(EnvironmentFailure, match="cannot load: FileNotFoundError"):
        load_environment(f"{tmp_path}/none.py:Env")


def test_policy_returning_the_wrong_number_of_turns_is_refused(guess_ref):
    envs = make_environments(guess_ref, [{"target": 1}, {"target": 2}])
    with pytest.raises(ValueError, match="returned 1 turns for 2 conversations"):
        run_episodes(envs, lambda convs: ["0"], max_turns=2)


def test_layout_masks_everything_but_model_turns():
    segments = [
        ([1, 3, 50, 51], False),
        ([4, 60, 61, 2], True),
        ([3, 70], False),
        ([4, 80, 2], True),
    ]
    lay = layout_tokens(segments)
    np.testing.assert_array_equal(lay.input_ids, [1, 3, 50, 51, 4, 60, 61, 2, 3, 70, 4, 80, 2])
    np.testing.assert_array_equal(lay.loss_mask, [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1])
    assert lay.input_ids.dtype == np.int32 and not lay.truncated
    cut = layout_tokens(segments, max_length=6)
    np.testing.assert_array_equal(cut.loss_mask, [0, 0, 0, 0, 1, 1])
    assert cut.truncated
    with pytest.raises(ValueError, match="first token cannot be a model token"):
        layout_tokens([([5], True)])
    with pytest.raises(ValueError, match="segment 1: token ids"):
        layout_tokens([([1], False), ([-1], True)])


def test_pad_layouts_right_pads_all_three_arrays():
    a = layout_tokens([([1, 2], False), ([3], True)])
    b = TokenLayout(np.array([1, 5, 6, 7], np.int32), np.array([0, 0, 1, 1], np.int32), False)
    ids, attention, loss = pad_layouts([a, b], length=5, pad_id=0)
    np.testing.assert_array_equal(ids, [[1, 2, 3, 0, 0], [1, 5, 6, 7, 0]])
    np.testing.assert_array_equal(attention, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(loss, [[0, 0, 1, 0, 0], [0, 0, 1, 1, 0]])
    with pytest.raises(ValueError, match=r"layouts \[1\] are longer than 3"):
        pad_layouts([a, b], length=3, pad_id=0)
