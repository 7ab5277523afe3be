"""Multi-turn GRPO end to end on the tiny model: a held-out environment (a temp file written only
to the protocol, importing nothing of the project) and a held-out HTTP reward server (stdlib
http.server on 127.0.0.1, a random port) plug in unchanged; tools; the masks; the failures."""

from __future__ import annotations

import json
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from posttrain.api import parse_job
from posttrain.trainer.environments import EnvironmentFailure
from posttrain.trainer.loop import train
from posttrain.trainer.rewards import RewardError

ENV = textwrap.dedent(
    """
    # Written to the protocol only: no import of the project.
    class Echo:
        def __init__(self, row):
            self.row = row
            self.turn = 0

        def reset(self):
            return "say " + self.row["word"]

        def step(self, text):
            self.turn += 1
            reward = 0.5 * text.count(self.row["word"][0])
            if self.turn == 1:
                return "again " + self.row["word"], reward, False
            return None, reward, True

    class Broken(Echo):
        def step(self, text):
            if self.row["word"] == "cab":
                raise RuntimeError("the maze is on fire")
            return super().step(text)
    """
)
TOOLS = textwrap.dedent(
    """
    def add(a, b):
        "Add two integers."
        return int(a) + int(b)
    """
)
WORDS = ["abc", "cab", "bad", "dab", "ace", "bed", "fed", "cafe"]


class Scorer:
    """The held-out reward service: reward = the completion's length / 100; counts completions."""

    def __init__(self) -> None:
        self.completions: list[str] = []
        self.calls = 0
        self.fail = False
        self.lock = threading.Lock()


@pytest.fixture
def scorer() -> Iterator[tuple[Scorer, str]]:
    state = Scorer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert set(body) == {"prompts", "completions", "columns"}
            with state.lock:
                state.calls += 1
                state.completions += body["completions"]
            if state.fail:
                reply = json.dumps({"rewards": [1.0]})  # the wrong count: a broken service
            else:
                reply = json.dumps({"rewards": [len(c) / 100 for c in body["completions"]]})
            data = reply.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/score"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multiturn")
    (root / "held_out_env.py").write_text(ENV)
    (root / "my_tools.py").write_text(TOOLS)
    with open(root / "train.jsonl", "w") as f:
        for w in WORDS:
            f.write(json.dumps({"word": w}) + "\n")
    return root


def job(
    files: Path,
    url: str | None,
    steps: int = 2,
    env: str = "Echo",
    max_length: int = 128,
    **block: Any,
):
    grpo: dict[str, Any] = {
        "numGenerations": 2,
        "beta": 0.04,
        "maxNewTokens": 6,
        "environment": {
            "class": f"{files}/held_out_env.py:{env}",
            "maxTurns": 2,
            "maxObservationTokens": 16,
        },
        "rewards": [{"http": {"url": url}}] if url else [],
        **block,
    }
    return parse_job(
        {
            "apiVersion": "posttrain.dev/v1alpha1",
            "kind": "PostTrainJob",
            "metadata": {"name": "mt"},
            "spec": {
                "algorithm": "grpo",
                "model": {"base": "builtin:tiny", "dtype": "float32"},
                "data": {
                    "train": str(files / "train.jsonl"),
                    "maxLength": max_length,
                    "maxPromptLength": 16,
                    "shuffle": False,
                },
                "grpo": grpo,
                "training": {
                    "steps": steps,
                    "batchSize": 4,
                    "learningRate": 1e-3,
                    "schedule": {"name": "constant", "warmupSteps": 0},
                    "checkpoint": {"everySteps": 1000},
                    "logEverySteps": 1,
                },
                "output": {"export": False},
                "resources": {"accelerator": "cpu"},
            },
        }
    )


def per_step(out: Path) -> dict[int, dict]:
    steps: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        steps.setdefault(m["step"], {}).update(m)
    return steps


def capture_batches(monkeypatch) -> list[dict[str, np.ndarray]]:
    """Every batch the multi-turn source hands the loop."""
    from posttrain.trainer.algorithms import grpo

    seen: list[dict[str, np.ndarray]] = []
    original = grpo.RolloutSource.next_batch

    def next_batch(self, step):
        batch = original(self, step)
        seen.append({k: np.array(v) for k, v in batch.items()})
        return batch

    monkeypatch.setattr(grpo.RolloutSource, "next_batch", next_batch)
    return seen


def test_held_out_environment_and_reward_server_plug_in(files, scorer, tmp_path, monkeypatch):
    state, url = scorer
    batches = capture_batches(monkeypatch)
    out = tmp_path / "run"
    train(job(files, url, steps=2), str(out), progress_bar=False)

    # Each completion scored once: 2 rollouts x 4 prompts x G=2, one request each (chunk 64).
    assert len(state.completions) == 2 * 4 * 2 and state.calls == 2
    steps = per_step(out)
    for key in (
        "reward_mean", "reward/http", "reward/environment", "turns", "tool_calls",
        "tool_errors", "environment_seconds", "reward_seconds", "kl", "episodes_done_fraction",
    ):  # fmt: skip
        assert steps[1].get(key) is not None, key
    assert steps[1]["turns"] == 2.0  # Echo always takes two turns
    assert steps[1]["episodes_done_fraction"] == 1.0

    # Observation tokens are in the sequence but out of the loss: completion_mask is 1 exactly on
    # the positions whose target is a model token.
    from posttrain.trainer.tasks.chars import CharTokenizer

    tok = CharTokenizer()
    batch = batches[0]
    P = 16
    L = P + 2 * (6 + 16)
    assert batch["input_ids"].shape == (8, L) and batch["completion_mask"].shape == (8, L)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and samples[0]["turns"] == 2
    for r in range(8):
        ids, mask = batch["input_ids"][r], batch["completion_mask"][r]
        text = tok.decode(ids[P:].tolist(), skip_special_tokens=False)
        assert "\nQ: again " in text  # the environment's reply (a user message) is in the row
        model_targets = tok.decode(
            [int(t) for t, m in zip(batch["targets"][r], mask, strict=True) if m],
            skip_special_tokens=False,
        )
        assert "again" not in model_targets and "Q:" not in model_targets
        assert mask.sum() <= 2 * 6 and mask.sum() >= 2  # two turns of 1..6 tokens (EOS incl.)
        assert mask[: P - 1].sum() == 0
    # The loss, the ratio and the KL see model tokens only: the observation's positions are 0.
    first_obs = [
        i
        for i in range(P, L - 4)
        if tok.decode(batch["input_ids"][0, i : i + 4].tolist()) == "\nQ: "
    ]
    assert first_obs and batch["completion_mask"][0, first_obs[0] : first_obs[0] + 8].sum() == 0


def test_reward_server_failure_names_the_reward(files, scorer, tmp_path):
    state, url = scorer
    state.fail = True
    with pytest.raises(RewardError, match=r"spec.grpo.rewards\[0\] \(http\).*1 values for 8"):
        train(job(files, url, steps=1), str(tmp_path / "x"), progress_bar=False)


def test_reward_server_default_keeps_training(files, scorer, tmp_path):
    state, url = scorer
    state.fail = True
    spec = job(files, None, steps=1, rewards=[{"http": {"url": url, "default": -1.0}}])
    train(spec, str(tmp_path / "x"), progress_bar=False)
    assert per_step(tmp_path / "x")[1]["reward/http"] == -1.0


def test_an_environment_that_raises_is_named_with_the_row(files, tmp_path):
    with pytest.raises(EnvironmentFailure, match=r"held_out_env.py:Broken \(row 1\)\.step raised"):
        train(job(files, None, steps=1, env="Broken"), str(tmp_path / "x"), progress_bar=False)


def test_tools_are_called_and_their_results_are_tool_messages(files, tmp_path):
    from posttrain.trainer.algorithms import multiturn as mt

    spec = job(
        files,
        None,
        environment={
            "class": f"{files}/held_out_env.py:Echo",
            "maxTurns": 3,
            "maxObservationTokens": 16,
            "tools": [f"{files}/my_tools.py:add"],
            "sandbox": {"timeoutSeconds": 5},
        },
    )
    env = spec.spec.settings.environment
    box = mt.build_tools(env, "spec.grpo.environment")
    assert box is not None and sorted(box.tools) == ["add", "python"]
    assert box.run('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>') == [
        {"role": "tool", "name": "add", "content": "5"}
    ]
    assert box.run('{"name": "add", "parameters": {"a": 2, "b": 40}}')[0]["content"] == "42"
    assert (
        box.run('<tool_call>{"name": "python", "arguments": {"code": "print(6*7)"}}</tool_call>')[
            0
        ]["content"].strip()
        == "42"
    )
    schema = mt.tool_schema("add", box.tools["add"])
    assert schema["function"]["parameters"]["required"] == ["a", "b"]


def test_scripted_episode_layout_masks_observations_and_counts_tools(files, tmp_path):
    """The engine on a scripted policy: a tool call turn, then an answer; exact masks."""
    from posttrain.trainer.algorithms import multiturn as mt
    from posttrain.trainer.algorithms.base import Context
    from posttrain.trainer.algorithms.rollout import SamplingSettings
    from posttrain.trainer.tasks.chars import CharTokenizer

    spec = job(
        files,
        None,
        environment={
            "class": f"{files}/held_out_env.py:Echo",
            "maxTurns": 3,
            "maxObservationTokens": 16,
            "tools": [f"{files}/my_tools.py:add"],
        },
    )
    tok = CharTokenizer()
    ctx = Context(job=spec, tokenizer=tok, output_dir=str(tmp_path))
    rows = [mt.EpisodeRow(0, {"word": "abc"}, {"word": "abc"}, ())]
    g = spec.spec.settings
    engine = mt.MultiTurnEngine(ctx, "grpo", SamplingSettings.of(g), g.environment, rows, [], None)
    script = ["a", "abc"]

    def policy(turn, active):
        return [[*tok.encode(script[turn]), tok.eos_token_id] if turn < 2 else None for _ in active]

    episodes = engine._play(rows, policy)
    e = episodes[0]
    assert e.turns == 2 and e.done and e.rewards == [0.5, 0.5]
    assert [m["role"] for m in e.messages] == ["user", "assistant", "user", "assistant"]
    arrays = engine._arrays(episodes)
    P = 16
    text = tok.decode(arrays["input_ids"][0].tolist(), skip_special_tokens=False)
    assert text.replace("<pad>", "") == "<bos>Q: say abc\nA: a<eos>\nQ: again abc\nA: abc<eos>"
    targets = arrays["targets"][0][arrays["completion_mask"][0] > 0]
    assert tok.decode(targets.tolist(), skip_special_tokens=False) == "a<eos>abc<eos>"
    assert arrays["completion_mask"][0, P - 1] == 1  # the first model token is predicted at P - 1


# Simplified templates of the families, with the fixture tokenizer's <|eos|> as the end of turn:
# Qwen 2.5 / Hermes (tool results as <tool_response> blocks in a user turn, consecutive ones
# grouped) and Llama 3.x (tool results as ipython turns).
QWEN_LIKE = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{ '<|eos|>\\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|eos|>\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
LLAMA_LIKE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{%- set role = 'ipython' if message.role == 'tool' else message.role -%}"
    "{{ '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message.content + '<|eos|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (
            QWEN_LIKE,
            "\n<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\n"
            "Error: unknown tool 'mul'; available: add\n</tool_response><|eos|>\n"
            "<|im_start|>assistant\n",
        ),
        (
            LLAMA_LIKE,
            "<|start_header_id|>ipython<|end_header_id|>\n\n5<|eos|>"
            "<|start_header_id|>ipython<|end_header_id|>\n\nError: unknown tool 'mul'; available: "
            "add<|eos|><|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
    ],
    ids=["qwen-hermes", "llama3"],
)
def test_hf_chat_templates_render_tool_turns_as_masked_segments(
    files, tmp_path, fixtures_dir, template, expected
):
    import shutil

    from posttrain.trainer.algorithms import multiturn as mt
    from posttrain.trainer.algorithms.base import Context
    from posttrain.trainer.algorithms.rollout import SamplingSettings
    from posttrain.trainer.data.text import HfTokenizer

    folder = tmp_path / "tok"
    shutil.copytree(fixtures_dir / "tokenizer", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HfTokenizer(str(folder))
    spec = job(
        files,
        None,
        environment={
            "class": f"{files}/held_out_env.py:Echo",
            "maxTurns": 2,
            "maxObservationTokens": 200,
            "tools": [f"{files}/my_tools.py:add"],
        },
        maxNewTokens=200,
        max_length=1000,
    )
    g = spec.spec.settings
    ctx = Context(job=spec, tokenizer=tok, output_dir="")
    engine = mt.MultiTurnEngine(ctx, "grpo", SamplingSettings.of(g), g.environment, [], [], None)
    engine.prompt_len = 256  # the rendered prompt only has to fit (no arrays here)
    turn = (
        '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
        '<tool_call>{"name": "mul", "arguments": {}}</tool_call>'
    )
    script = [turn, "five"]

    def policy(t, active):
        return [[*tok.encode(script[t]), tok.eos_token_id] for _ in active]

    rows = [mt.EpisodeRow(0, {"word": "abc"}, {"word": "abc"}, ())]
    (e,) = engine._play(rows, policy)
    assert [m["role"] for m in e.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert e.tool_calls == 2 and e.tool_errors == 1 and e.rewards == [0.0]  # step: turn 2 only
    model = np.asarray(e.model)
    observation = [t for t, m in zip(e.ids, model, strict=True) if not m]
    assert tok.decode(observation, skip_special_tokens=False) == expected
    spoken = tok.decode(
        [t for t, m in zip(e.ids, model, strict=True) if m], skip_special_tokens=False
    )
    assert spoken == turn + "<|eos|>" + "five<|eos|>"


def test_dapo_defaults_run_on_episodes(files, tmp_path):
    """DAPO's overlong penalty and dynamic sampling on multi-turn rollouts: the penalty reads each
    episode's longest turn, rounds of episodes are gathered by group."""
    spec = job(files, None, steps=1).model_dump(by_alias=True, exclude_none=True)
    block = spec["spec"].pop("grpo")
    for key in (
        "beta",
        "epsilon",
        "epsilonHigh",
        "advantage",
        "lossAggregation",
        "dynamicSampling",
    ):
        block.pop(key, None)  # DAPO's own defaults
    block.update({"maxSamplingRounds": 2, "overlong": {"mode": "penalty", "buffer": 2}})
    spec["spec"]["algorithm"] = "dapo"
    spec["spec"]["dapo"] = block
    out = tmp_path / "dapo"
    train(parse_job(spec), str(out), progress_bar=False)
    first = per_step(out)[1]
    assert first["reward/overlong"] <= 0 and first["sampling_rounds"] in (1.0, 2.0)
    assert first["turns"] is not None


def test_the_contract_alone_uses_data_max_length_for_the_rows(files, scorer, tmp_path, monkeypatch):
    """environment: {class, maxTurns: 2} and nothing else: rows are data.maxLength long."""
    state, url = scorer
    batches = capture_batches(monkeypatch)
    spec = job(
        files,
        url,
        steps=1,
        max_length=64,
        environment={"class": f"{files}/held_out_env.py:Echo", "maxTurns": 2},
    )
    train(spec, str(tmp_path / "x"), progress_bar=False)
    assert batches[0]["input_ids"].shape == (8, 64) and len(state.completions) == 8
    assert per_step(tmp_path / "x")[1]["turns"] == 2.0
