"""Multi-turn rollouts for the GRPO family: the model's turns alternate with an environment's
observations (tool results, user replies) until the environment says done or ``maxTurns``.

``MultiTurnEngine`` has the ``RolloutEngine``'s interface (``prompt``, ``rollout``,
``teacher_forced``, ``evaluate``, ``metric_names``), so ``grpo.RolloutSource`` drives it
unchanged; ``grpo._build`` selects it when ``spec.<block>.environment`` is set.

One episode per batch row, built from its data row (``environments.CheckedEnvironment``):

1. ``reset()`` is the first user message; rendered with the chat template (tool schemas included
   when tools are set), generation prompt added, it is the prompt (at most maxPromptLength tokens,
   left-padded to exactly that);
2. each turn, the episodes still running (a finished one holds no slot) are left-padded to their
   longest context and sampled together, padded to a power-of-two row count (so the jitted sampler
   compiles for a bounded set of shapes), up to ``maxNewTokens`` tokens, stopping at EOS;
3. the turn goes to the tools when ``tools``/``sandbox`` are set and it makes tool calls (the
   results are ``tool`` messages, reward 0, the environment is not stepped), else to the
   environment's ``step`` (its observation is a ``tool`` message if the turn made calls, else a
   ``user`` message); the per-turn rewards are summed into the episode's reward;
4. what follows the model's turn (the template's end of turn, the observation's message, the next
   generation prompt) is the chat template's rendering of the conversation with the observation
   minus its rendering without: tokens that stay in the sequence as context, with
   ``completion_mask`` 0 (no loss, no ratio, no KL on them).

Every row has the fixed shape [P + room]: room = maxTurns x (maxNewTokens + maxObservationTokens),
or data.maxLength - P when maxObservationTokens is unset. The prompt is
left-padded to P, then the turns and observations back to back, then padding. An episode that runs
out of room ends there (truncated). The job's ``rewards`` score each episode once, with the prompt
text and the decoded transcript after the prompt (special tokens skipped) as the completion; the
total reward is their weighted sum plus the environment's reward (``reward/environment``).
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from posttrain.api.settings.environment import EnvironmentSpec, SandboxSpec
from posttrain.api.settings.grpo import ENVIRONMENT_REWARD
from posttrain.trainer import rewards as rw
from posttrain.trainer.algorithms.rollout import Rollout, SamplingSettings, group_seed, sample
from posttrain.trainer.data.order import EpochStream
from posttrain.trainer.data.prompts import check_same_columns
from posttrain.trainer.data.readers import BadRow, read_rows
from posttrain.trainer.data.text import pad_id_of, prepend_bos, render_chat
from posttrain.trainer.environments import CheckedEnvironment, EnvironmentFailure, load_environment
from posttrain.trainer.tools import calls as tc

Message = dict[str, str]
SAMPLES_FILE = "samples.jsonl"  # sample transcripts, under the output dir
SAMPLES_PER_ROLLOUT = 2
MULTITURN_METRICS = (
    "turns",
    "tool_calls",
    "tool_errors",
    "episodes_done_fraction",
    "environment_seconds",
    "tool_seconds",
    "reward_seconds",
)


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class EpisodeRow:
    """One data row: every column goes to the environment; rewards get all but the prompt."""

    index: int  # the row's number in the data file, for messages
    row: Mapping[str, Any]
    columns: Mapping[str, Any]
    turns: tuple[str, ...] = ()  # the SFT warm-up's scripted model turns (completionField)


def load_episode_rows(path: str, data: Any, *, completion: bool = False) -> list[EpisodeRow]:
    """The data rows as dicts. With ``completion`` (the SFT warm-up), data.completionField holds
    the model's turns: a list of strings (one per turn) or one string (the first turn)."""
    out: list[EpisodeRow] = []
    for i, item in enumerate(read_rows(path, data.format)):
        try:
            if isinstance(item.value, BadRow):
                raise item.value
            row = dict(item.value)
            turns: tuple[str, ...] = ()
            if completion:
                value = row.get(data.completion_field)
                if isinstance(value, str) and value:
                    turns = (value,)
                elif isinstance(value, list) and value and all(isinstance(t, str) for t in value):
                    turns = tuple(value)
                else:
                    raise BadRow(
                        item.where,
                        f"sftWarmupSteps with an environment needs the model's turns in "
                        f"{data.completion_field!r} (spec.data.completionField): a string or a "
                        "list of strings",
                    )
            columns = {k: v for k, v in row.items() if k != data.prompt_field}
            out.append(EpisodeRow(i, row, columns, turns))
        except BadRow:
            if not data.skip_bad_rows:
                raise
    if not out:
        raise ValueError(f"spec.data: {path}: no usable rows")
    check_same_columns(path, [r.columns for r in out])
    return out


# --------------------------------------------------------------------------- tools


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def tool_schema(name: str, fn: Callable[..., Any]) -> dict[str, Any]:
    """The OpenAI-style function schema chat templates render (from the signature and doc)."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = []  # type: ignore[assignment]
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        kind = _JSON_TYPES.get(p.annotation) if isinstance(p.annotation, type) else None
        if isinstance(p.annotation, str):
            kind = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
                p.annotation
            )
        properties[p.name] = {"type": kind or "string"}
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    doc = inspect.getdoc(fn) or name
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": doc.strip().splitlines()[0],
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def sandbox_tool(spec: SandboxSpec) -> Callable[[str], str]:
    """``python(code)``: the sandbox's observation for the model's code, within ``spec``'s limits."""
    from posttrain.trainer.tools.sandbox import Limits, run_python

    limits = Limits(
        timeout_s=spec.timeout_seconds,
        memory_bytes=spec.memory_mb << 20,
        output_chars=spec.max_output_chars,
    )

    def python(code: str) -> str:
        """Run Python code in a sandbox and return what it prints."""
        text = run_python(code, limits).observation()
        return text[: spec.max_output_chars]

    return python


def build_tools(env: EnvironmentSpec, field: str) -> tc.ToolBox | None:
    """The environment's tools (``tools`` and the sandbox's ``python``), or None for none."""
    try:
        box = tc.ToolBox.load(env.tools)
    except ValueError as err:
        raise ValueError(f"{field}.{err}") from err
    if env.sandbox is not None and env.sandbox.enabled:
        box.tools["python"] = sandbox_tool(env.sandbox)
    return box if box.tools else None


# --------------------------------------------------------------------------- episodes


@dataclass
class _Episode:
    source: EpisodeRow
    env: CheckedEnvironment
    messages: list[Message]
    prompt_text: str
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # after the prompt
    model: list[int] = field(default_factory=list)  # 1 where ids[t] is a model token
    rewards: list[float] = field(default_factory=list)  # per environment step
    turns: int = 0
    turn_lengths: list[int] = field(default_factory=list)  # model tokens per turn
    tool_calls: int = 0
    tool_errors: int = 0
    env_seconds: float = 0.0
    tool_seconds: float = 0.0
    done: bool = False  # the environment ended it
    finished: bool = False  # no more model turns (done, maxTurns or out of room)

    @property
    def reward(self) -> float:
        return float(sum(self.rewards))


# policy(turn, episodes still running) -> each one's model tokens (EOS included when it stopped),
# or None for "no turn" (a scripted episode whose script ran out).
Policy = Callable[[int, list[_Episode]], list[list[int] | None]]


@dataclass
class MultiTurnRollout(Rollout):
    """A ``Rollout`` plus the episode metrics (turns, tool calls, seconds, ...) and what the
    overlong modes read: an episode is truncated when the environment did not end it (maxTurns,
    out of room, or a turn cut at maxNewTokens that ended it); the soft penalty is on its
    longest model turn."""

    metrics: dict[str, float] = field(default_factory=dict)
    truncated: np.ndarray | None = None  # [R] bool
    longest_turn: np.ndarray | None = None  # [R] tokens


class MultiTurnEngine:
    """Data rows -> episodes played with the policy and the environment -> training rows."""

    def __init__(
        self,
        ctx: Any,
        block_field: str,
        settings: SamplingSettings,
        env: EnvironmentSpec,
        rows: list[EpisodeRow],
        rewards: list[rw.Reward],
        eval_rows: list[EpisodeRow] | None = None,
    ):
        spec = ctx.spec
        self.ctx = ctx
        self.field = f"spec.{block_field}.environment"
        self.settings = settings
        self.env_spec = env
        self.cls = load_environment(env.class_)
        self.rows = rows
        self.eval_prompts = eval_rows  # the name RolloutBatchSource looks for
        self.rewards = rewards
        self.tools = build_tools(env, self.field)
        self.schemas = (
            [tool_schema(n, f) for n, f in self.tools.tools.items()] if self.tools else None
        )
        tok = ctx.tokenizer
        self.tokenizer = tok
        self.eos_id = tok.eos_token_id
        self.eos_ids = [self.eos_id]  # the single-turn engine's interface (overlong, logs)
        self.pad_id = pad_id_of(tok)
        self.eos_text = tok.decode([self.eos_id], skip_special_tokens=False)
        self.shuffle, self.seed = spec.data.shuffle, spec.training.seed
        self.prompt_len = spec.data.max_prompt_length
        d = spec.data
        self.room = env.room(settings.max_new_tokens, d.max_length, d.max_prompt_length)
        self.seq_len = self.prompt_len + self.room
        if self.seq_len > d.max_length:
            raise ValueError(
                f"{self.field}: maxPromptLength ({self.prompt_len}) + maxTurns ({env.max_turns}) "
                f"x (maxNewTokens {settings.max_new_tokens} + maxObservationTokens "
                f"{env.max_observation_tokens}) = {self.seq_len} tokens exceed spec.data.maxLength "
                f"({d.max_length}); raise maxLength or lower those"
            )
        if self.room < settings.max_new_tokens:
            raise ValueError(
                f"spec.{block_field}.maxNewTokens: {settings.max_new_tokens} new tokens after "
                f"prompts of up to {self.prompt_len} tokens exceed spec.data.maxLength "
                f"({d.max_length}); lower maxNewTokens or maxPromptLength, or raise maxLength"
            )
        self._stream = EpochStream(self.rows, self.seed, self.shuffle)
        self._samples_written = 0

    # ------------------------------------------------------------------ the engine interface

    def prompt(self, k: int) -> EpisodeRow:
        return self._stream[k]

    def rollout(self, model: Any, rows: Sequence[EpisodeRow], seed: int) -> MultiTurnRollout:
        generation = [0.0]
        episodes = self._play(rows, self._sampling_policy(model, seed, False, generation))
        started = time.perf_counter()
        total, terms = self._score(episodes)
        reward_seconds = time.perf_counter() - started
        arrays = self._arrays(episodes)
        lengths = np.asarray([sum(e.model) for e in episodes])
        metrics = {
            "turns": float(np.mean([e.turns for e in episodes])),
            "tool_calls": float(np.mean([e.tool_calls for e in episodes])),
            "tool_errors": float(np.mean([e.tool_errors for e in episodes])),
            "episodes_done_fraction": float(np.mean([e.done for e in episodes])),
            "environment_seconds": float(sum(e.env_seconds for e in episodes)),
            "tool_seconds": float(sum(e.tool_seconds for e in episodes)),
            "reward_seconds": reward_seconds,
        }
        self._write_samples(episodes, total, seed)
        truncated = np.asarray([not e.done for e in episodes])
        longest = np.asarray([max(e.turn_lengths, default=0) for e in episodes])
        return MultiTurnRollout(
            arrays,
            total,
            terms,
            lengths,
            generation[0],
            texts=[self.transcript(e) for e in episodes],
            metrics=metrics,
            truncated=truncated,
            longest_turn=longest,
        )

    def teacher_forced(self, first: int, rows: int) -> dict[str, np.ndarray]:
        """SFT warm-up rows: episodes whose model turns are the data's (completionField), each
        + EOS and cut to maxNewTokens; observations come from the real environment and tools."""
        chosen = [self.prompt(first + r) for r in range(rows)]

        def scripted(turn: int, active: list[_Episode]) -> list[list[int] | None]:
            out: list[list[int] | None] = []
            for e in active:
                script = e.source.turns
                if turn >= len(script):
                    out.append(None)
                    continue
                ids = [*self.tokenizer.encode(script[turn]), self.eos_id]
                out.append(ids[: self.settings.max_new_tokens])
            return out

        return self._arrays(self._play(chosen, scripted))

    def evaluate(self, model: Any, width: int) -> float:
        """Mean total reward of greedy episodes on every data.eval row, ``width`` at a time."""
        assert self.eval_prompts
        totals: list[float] = []
        for start in range(0, len(self.eval_prompts), width):
            chunk = self.eval_prompts[start : start + width]
            episodes = self._play(chunk, self._sampling_policy(model, 0, True, [0.0]))
            total, _ = self._score(episodes)
            totals.extend(total.tolist())
        return float(np.mean(totals))

    def metric_names(self) -> list[str]:
        return [
            "reward_mean",
            "reward_std",
            *(f"reward/{r.name}" for r in self.rewards),
            f"reward/{ENVIRONMENT_REWARD}",
            "completion_length",
            "generation_tokens_per_second",
            *MULTITURN_METRICS,
        ]

    # ------------------------------------------------------------------ playing

    def _sampling_policy(self, model: Any, seed: int, greedy: bool, seconds: list[float]) -> Policy:
        def policy(turn: int, active: list[_Episode]) -> list[list[int] | None]:
            contexts = [e.prompt_ids + e.ids for e in active]
            n = len(contexts)
            rows = min(_pow2(n), max(n, len(self._batch_rows)))
            contexts += [contexts[-1]] * (rows - n)
            width = max(len(c) for c in contexts)
            ids = np.full((rows, width), self.pad_id, np.int32)
            mask = np.zeros((rows, width), np.int32)
            for r, c in enumerate(contexts):
                ids[r, width - len(c) :], mask[r, width - len(c) :] = c, 1
            started = time.perf_counter()
            tokens, keep, _sampler_logp = sample(
                model,
                ids,
                mask,
                self.settings,
                self.eos_id,
                self.pad_id,
                group_seed(seed, turn),
                greedy=greedy,
            )
            seconds[0] += time.perf_counter() - started
            lengths = keep.sum(axis=1).astype(int)
            return [tokens[r, : lengths[r]].tolist() for r in range(n)]

        return policy

    def _start(self, source: EpisodeRow) -> _Episode:
        env = CheckedEnvironment(self.cls, source.row, source.index, self.env_spec.class_)
        started = time.perf_counter()
        first = env.reset()
        messages: list[Message] = [{"role": "user", "content": first}]
        text = render_chat(self.tokenizer, messages, add_generation_prompt=True, tools=self.schemas)
        ids = prepend_bos(
            self.tokenizer.encode(text), getattr(self.tokenizer, "bos_token_id", None)
        )
        if len(ids) > self.prompt_len:
            raise ValueError(
                f"{self.field}: {env.where}.reset() renders to a prompt of {len(ids)} tokens, "
                f"more than spec.data.maxPromptLength ({self.prompt_len}); raise maxPromptLength"
            )
        episode = _Episode(source, env, messages, text, ids)
        episode.env_seconds += time.perf_counter() - started
        return episode

    def _play(self, rows: Sequence[EpisodeRow], policy: Policy) -> list[_Episode]:
        self._batch_rows = rows
        workers = self.env_spec.workers
        with ThreadPoolExecutor(max_workers=workers) as pool:

            def each(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
                return list(pool.map(fn, items)) if workers > 1 else [fn(x) for x in items]

            episodes = each(self._start, rows)
            for turn in range(self.env_spec.max_turns):
                active = [e for e in episodes if not e.finished]
                if not active:
                    break
                turns = policy(turn, active)
                played: list[tuple[_Episode, list[int]]] = []
                for e, tokens in zip(active, turns, strict=True):
                    if tokens is None:
                        e.finished = True
                        continue
                    tokens = tokens[: min(self.settings.max_new_tokens, self.room - len(e.ids))]
                    e.ids += tokens
                    e.model += [1] * len(tokens)
                    e.turns += 1
                    e.turn_lengths.append(len(tokens))
                    played.append((e, tokens))
                last = turn == self.env_spec.max_turns - 1

                def respond(pair: tuple[_Episode, list[int]], last: bool = last) -> None:
                    self._respond(*pair, last=last)

                each(respond, played)
        return episodes

    def _respond(self, e: _Episode, tokens: list[int], *, last: bool) -> None:
        """The environment's (or the tools') answer to the turn just played, into the episode."""
        stopped = bool(tokens) and tokens[-1] == self.eos_id
        text = self.tokenizer.decode(tokens[:-1] if stopped else tokens)
        e.messages.append({"role": "assistant", "content": text})
        observation: list[Message] = []
        calls = tc.parse_tool_calls(text)
        if self.tools is not None and calls:
            started = time.perf_counter()
            observation = self.tools.run(text)
            e.tool_seconds += time.perf_counter() - started
            e.tool_calls += len(calls)
            e.tool_errors += sum(m["content"].startswith("Error") for m in observation)
        else:
            started = time.perf_counter()
            try:
                reply, reward, done = e.env.step(text)
            finally:
                e.env_seconds += time.perf_counter() - started
            e.tool_calls += len(calls)
            e.rewards.append(reward)
            if done:
                e.done = e.finished = True
                return
            if reply is not None:
                observation = [{"role": "tool" if calls else "user", "content": reply}]
        if last or len(e.ids) >= self.room:
            e.finished = True
            return
        segment = self._segment(e, observation, stopped)
        e.messages += observation
        if len(e.ids) + len(segment) >= self.room:  # no room for the observation and a turn
            e.finished = True
            return
        e.ids += segment
        e.model += [0] * len(segment)

    def _segment(self, e: _Episode, observation: list[Message], stopped: bool) -> list[int]:
        """Tokens between the model's turn and its next one: the template's end of the turn, the
        observation's messages and the generation prompt (a difference of two renderings)."""
        tok, tools = self.tokenizer, self.schemas
        head = render_chat(tok, e.messages[:-1], add_generation_prompt=True, tools=tools)
        with_turn = render_chat(tok, e.messages, tools=tools)
        after = render_chat(tok, e.messages + observation, add_generation_prompt=True, tools=tools)
        content = e.messages[-1]["content"]
        if not after.startswith(with_turn):
            raise ValueError(
                f"{self.field}: the chat template does not render the conversation of "
                f"{e.env.where} as a growing text (the rendering with the observation does not "
                "start with the one without), so observations cannot be appended as tokens"
            )
        if with_turn.startswith(head) and with_turn[len(head) :].startswith(content):
            closing = with_turn[len(head) + len(content) :]
        else:  # a template that rewrites earlier text: the content's last occurrence
            at = with_turn.rfind(content)
            closing = with_turn[at + len(content) :] if at >= 0 else ""
        if stopped and self.eos_text and closing.startswith(self.eos_text):
            closing = closing[len(self.eos_text) :]  # the model wrote the end of its turn
        return list(tok.encode(closing + after[len(with_turn) :]))

    # ------------------------------------------------------------------ rows, rewards, samples

    def _arrays(self, episodes: Sequence[_Episode]) -> dict[str, np.ndarray]:
        R, P, L = len(episodes), self.prompt_len, self.seq_len
        input_ids = np.full((R, L), self.pad_id, np.int32)
        attention = np.zeros((R, L), np.int32)
        model = np.zeros((R, L), np.float32)
        for r, e in enumerate(episodes):
            p, n = len(e.prompt_ids), len(e.ids)
            input_ids[r, P - p : P] = e.prompt_ids
            input_ids[r, P : P + n] = e.ids
            attention[r, P - p : P + n] = 1
            model[r, P : P + n] = e.model
        targets = np.full((R, L), self.pad_id, np.int32)
        targets[:, :-1] = input_ids[:, 1:]
        completion_mask = np.zeros((R, L), np.float32)
        completion_mask[:, :-1] = model[:, 1:]  # position t predicts token t + 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "targets": targets,
            "completion_mask": completion_mask,
        }

    def transcript(self, e: _Episode) -> str:
        return self.tokenizer.decode(e.ids)

    def _score(self, episodes: Sequence[_Episode]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The job's rewards, each episode scored once, plus the environment's reward."""
        env = np.asarray([e.reward for e in episodes], np.float64)
        prompts = [e.prompt_text for e in episodes]
        completions = [self.transcript(e) for e in episodes]
        keys = list(episodes[0].source.columns)
        columns = {k: [e.source.columns[k] for e in episodes] for k in keys}
        if self.rewards:
            total, terms = rw.score(self.rewards, prompts, completions, columns)
        else:
            total, terms = np.zeros(len(episodes)), {}
        return total + env, {**terms, ENVIRONMENT_REWARD: env}

    def _write_samples(self, episodes: Sequence[_Episode], total: np.ndarray, seed: int) -> None:
        if not self.ctx.rank0 or not self.ctx.output_dir:
            return
        os.makedirs(self.ctx.output_dir, exist_ok=True)
        with open(os.path.join(self.ctx.output_dir, SAMPLES_FILE), "a") as f:
            for r, e in enumerate(episodes[:SAMPLES_PER_ROLLOUT]):
                record = {
                    "rollout": self._samples_written,
                    "seed": seed,
                    "row": e.source.index,
                    "reward": float(total[r]),
                    "environment_rewards": e.rewards,
                    "turns": e.turns,
                    "tool_calls": e.tool_calls,
                    "done": e.done,
                    "messages": e.messages,
                }
                f.write(json.dumps(record, default=str) + "\n")
        self._samples_written += 1


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


__all__ = [
    "EnvironmentFailure",
    "EpisodeRow",
    "MultiTurnEngine",
    "MultiTurnRollout",
    "build_tools",
    "load_episode_rows",
    "tool_schema",
]
