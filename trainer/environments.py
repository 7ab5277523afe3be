"""Multi-turn environments: the user's protocol, a model-free episode driver, and the token layout.

**The protocol.** An environment is a Python class named `"pkg.module:Class"` or
`"/path/file.py:Class"`, built once per episode from one data row (a dict of the row's columns):

    class Env:
        def __init__(self, row: dict): ...
        def reset(self) -> str: ...                                   # the first user message
        def step(self, text: str) -> tuple[str | None, float, bool]: ...  # (observation, reward, done)

`step` gets the model's whole turn (decoded text) and returns the next observation (a tool result
or the next user message; None for none), the reward for that turn, and whether the episode is
over. A class that raises or returns the wrong types stops with an `EnvironmentFailure` naming the
class, the row and the call (`my_envs:Maze (row 3).step returned ...`).

**The driver.** `run_episodes(envs, policy_fn, max_turns)` plays every episode to its end:

1. each episode starts as `[{"role": "user", "content": env.reset()}]`;
2. `policy_fn` gets the conversations of the episodes still running (a finished one holds no
   slot, so the batch shrinks) and returns one model turn (text) each;
3. each turn becomes an `assistant` message and goes to its environment's `step`; the reward is
   recorded per turn; a non-None observation is appended as a `tool` message when the turn
   made tool calls (`count_tool_calls`), else as a `user` message;
4. an episode ends when `step` says done, or after `max_turns` model turns (`truncated`).

It records per episode the messages, per-turn rewards, turns, tool calls and the seconds spent in
`reset`/`step`. It knows nothing of models or tokens, so it is tested with scripted policies.

**Token layout.** `layout_tokens(segments)` joins chat-rendered segments `(token_ids,
is_model_turn)` into `input_ids` and a `loss_mask` that is 1 exactly on model-turn tokens: the
prompt, environment observations and tool results are context, never trained on.

Wired into the GRPO family by `trainer/algorithms/multiturn.py` (`spec.<block>.environment`), which
plays episodes on token ids with its own driver on these semantics (tools, room limits, masks).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from posttrain.trainer.rewards import load_function

Message = dict[str, str]
Conversation = list[Message]
PolicyFn = Callable[[list[Conversation]], Sequence[str]]


@runtime_checkable
class Environment(Protocol):
    def reset(self) -> str: ...

    def step(self, text: str) -> tuple[str | None, float, bool]: ...


class EnvironmentFailure(RuntimeError):
    """An environment could not be loaded or built, raised, or returned something unusable."""


def load_environment(ref: str) -> type:
    """The class named by `"pkg.module:Class"` or `"/path/file.py:Class"`."""
    try:
        cls = load_function(ref)
    except Exception as err:
        raise EnvironmentFailure(
            f"environment {ref!r}: cannot load: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(cls, type):
        raise EnvironmentFailure(f"environment {ref!r} is not a class (got {type(cls).__name__})")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise EnvironmentFailure(f"environment {ref!r} has no {' or '.join(missing)} method")
    return cls


class CheckedEnvironment:
    """One episode's environment; every call's failure or bad return names the class and row."""

    def __init__(self, cls: type, row: Mapping[str, Any], index: int, name: str | None = None):
        self.where = f"{name or f'{cls.__module__}:{cls.__qualname__}'} (row {index})"
        try:
            self.env = cls(dict(row))
        except Exception as err:
            raise EnvironmentFailure(f"{self.where}: __init__ raised {_describe(err)}") from err

    def reset(self) -> str:
        out = self._call("reset")
        if not isinstance(out, str):
            raise EnvironmentFailure(
                f"{self.where}.reset returned {type(out).__name__}; expected str "
                "(the first user message)"
            )
        return out

    def step(self, text: str) -> tuple[str | None, float, bool]:
        out = self._call("step", text)
        expected = "expected (observation: str | None, reward: float, done: bool)"
        if not isinstance(out, tuple | list) or len(out) != 3:
            raise EnvironmentFailure(f"{self.where}.step returned {_short(out)}; {expected}")
        observation, reward, done = out
        if observation is not None and not isinstance(observation, str):
            raise EnvironmentFailure(
                f"{self.where}.step returned observation {_short(observation)}; {expected}"
            )
        # bool is a numbers.Real too; a reward of True is a bug worth naming.
        if isinstance(reward, bool | np.bool_) or not isinstance(reward, numbers.Real):
            raise EnvironmentFailure(
                f"{self.where}.step returned reward {_short(reward)}; {expected}"
            )
        if not math.isfinite(float(reward)):
            raise EnvironmentFailure(f"{self.where}.step returned reward {reward}; must be finite")
        if not isinstance(done, bool | np.bool_):
            raise EnvironmentFailure(f"{self.where}.step returned done {_short(done)}; {expected}")
        return observation, float(reward), bool(done)

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.env, method)(*args)
        except Exception as err:
            raise EnvironmentFailure(f"{self.where}.{method} raised {_describe(err)}") from err


def make_environments(
    cls: type | str, rows: Sequence[Mapping[str, Any]], first_index: int = 0
) -> list[CheckedEnvironment]:
    """One checked environment per row; `first_index` numbers the rows in error messages."""
    name = cls if isinstance(cls, str) else None  # the user's spelling, not a generated module name
    if isinstance(cls, str):
        cls = load_environment(cls)
    return [CheckedEnvironment(cls, row, first_index + i, name) for i, row in enumerate(rows)]


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


# --------------------------------------------------------------------------- the episode driver


@dataclass
class Episode:
    messages: Conversation
    rewards: list[float] = field(default_factory=list)  # one per model turn
    tool_calls: int = 0
    env_seconds: float = 0.0  # in reset and step
    done: bool = False  # the environment ended it (else max_turns did)

    @property
    def turns(self) -> int:
        return len(self.rewards)

    @property
    def reward(self) -> float:
        return float(sum(self.rewards))

    @property
    def truncated(self) -> bool:
        return not self.done


def _timed(episode: Episode, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    try:
        return fn()
    finally:
        episode.env_seconds += time.perf_counter() - start


def run_episodes(
    envs: Sequence[CheckedEnvironment],
    policy_fn: PolicyFn,
    max_turns: int,
    *,
    count_tool_calls: Callable[[str], int] | None = None,
    workers: int = 1,
) -> list[Episode]:
    """Play every episode to done or `max_turns` model turns; only unfinished ones are stepped.

    `count_tool_calls(text)` (default: the Hermes/Qwen and Llama 3 parsers of
    `posttrain.trainer.tools.calls`) decides whether an observation is a `tool` message.
    `workers` > 1 runs the environments' steps concurrently (for slow tools); order is kept.
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be at least 1, got {max_turns}")
    if count_tool_calls is None:
        from posttrain.trainer.tools import calls

        count_tool_calls = calls.count_tool_calls
    count = count_tool_calls
    episodes = [Episode(messages=[]) for _ in envs]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

        def each(fn: Callable[[int], Any], indices: list[int]) -> list[Any]:
            return list(pool.map(fn, indices)) if workers > 1 else [fn(i) for i in indices]

        firsts = each(lambda i: _timed(episodes[i], envs[i].reset), list(range(len(envs))))
        for episode, first in zip(episodes, firsts, strict=True):
            episode.messages.append({"role": "user", "content": first})
        active = list(range(len(envs)))
        for _ in range(max_turns):
            if not active:
                break
            texts = list(policy_fn([episodes[i].messages for i in active]))
            if len(texts) != len(active) or not all(isinstance(t, str) for t in texts):
                raise ValueError(
                    f"policy_fn returned {len(texts)} turns for {len(active)} conversations; "
                    "expected one str each"
                )
            for i, text in zip(active, texts, strict=True):
                episodes[i].messages.append({"role": "assistant", "content": text})
                episodes[i].tool_calls += count(text)
            results = each(
                lambda i: _timed(
                    episodes[i], lambda: envs[i].step(episodes[i].messages[-1]["content"])
                ),
                active,
            )
            still = []
            for i, (observation, reward, done) in zip(active, results, strict=True):
                episode = episodes[i]
                episode.rewards.append(reward)
                if done:
                    episode.done = True
                    continue
                if observation is not None:
                    called = count(episode.messages[-1]["content"]) > 0
                    role = "tool" if called else "user"
                    episode.messages.append({"role": role, "content": observation})
                still.append(i)
            active = still
    return episodes


# --------------------------------------------------------------------------- token layout


@dataclass(frozen=True)
class TokenLayout:
    input_ids: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] int32: 1 on model-turn tokens (trained), 0 on context
    truncated: bool  # cut at max_length


def layout_tokens(
    segments: Sequence[tuple[Sequence[int], bool]], max_length: int | None = None
) -> TokenLayout:
    """Concatenate chat-rendered segments; the loss mask is 1 on model-turn tokens only.

    `loss_mask[t]` marks token t itself as a target (its log-prob is trained from the logits at
    t - 1), so the first token of a sequence can never be one. With `max_length`, tokens past it
    are dropped (the start of the episode is kept: later turns depend on it, not the reverse).
    """
    ids: list[int] = []
    mask: list[int] = []
    for i, (tokens, is_model) in enumerate(segments):
        tokens = list(tokens)
        if any(not isinstance(t, numbers.Integral) or t < 0 for t in tokens):
            raise ValueError(f"segment {i}: token ids must be non-negative integers")
        ids += tokens
        mask += [int(bool(is_model))] * len(tokens)
    if mask and mask[0]:
        raise ValueError("the first token cannot be a model token: nothing predicts it")
    truncated = max_length is not None and len(ids) > max_length
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenLayout(np.asarray(ids, np.int32), np.asarray(mask, np.int32), truncated)


def pad_layouts(
    layouts: Sequence[TokenLayout], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad to `length`: input_ids, attention_mask and loss_mask, each [B, length] int32."""
    too_long = [i for i, lay in enumerate(layouts) if lay.input_ids.size > length]
    if too_long:
        raise ValueError(f"layouts {too_long} are longer than {length} tokens")
    ids = np.full((len(layouts), length), pad_id, np.int32)
    attention = np.zeros((len(layouts), length), np.int32)
    loss = np.zeros((len(layouts), length), np.int32)
    for row, lay in enumerate(layouts):
        n = lay.input_ids.size
        ids[row, :n], attention[row, :n], loss[row, :n] = lay.input_ids, 1, lay.loss_mask
    return ids, attention, loss
