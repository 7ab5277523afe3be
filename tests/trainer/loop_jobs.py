"""Tiny SFT jobs on the arithmetic task for the loop tests, and `posttrain run` on a recipe for
the quickstart tests (imported by path, see each test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from posttrain.api import parse_job
from posttrain.api.algorithms import REGISTRY
from posttrain.api.v1alpha1 import PostTrainJob
from posttrain.trainer.tasks import arithmetic, preferences

# A persistent XLA cache shared by these tests and the processes they start: the same tiny
# steps compile once per machine instead of once per train() call (13 s -> 2 s per run).
COMPILE_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "posttrain-test-jax-cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def enable_compile_cache() -> None:
    import jax

    jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE_ENV["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, **COMPILE_CACHE_ENV}


def write_data(folder: Path) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    train, test = folder / "train.jsonl", folder / "test.jsonl"
    arithmetic.write_jsonl(
        str(train), arithmetic.problems("train", max_operand=19, held_out=16)[:256]
    )
    arithmetic.write_jsonl(str(test), arithmetic.problems("test", max_operand=19, held_out=16))
    return str(train), str(test)


def manifest(tmp_path: Path, **spec: Any) -> dict[str, Any]:
    train, test = write_data(tmp_path / "data")
    base: dict[str, Any] = {
        "algorithm": "sft",
        "model": {"base": "builtin:tiny", "dtype": "float32"},
        "data": {"train": train, "eval": test, "maxLength": 12, "maxPromptLength": 7},
        "training": {
            "steps": 6,
            "batchSize": 8,
            "learningRate": 3e-3,
            "schedule": {"warmupSteps": 1},
            "checkpoint": {"everySteps": 2, "keep": 2},
            "seed": 3,
        },
        "resources": {"accelerator": "cpu"},
    }
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainJob",
        "metadata": {"name": "t"},
        "spec": base,
    }


def job(tmp_path: Path, **spec: Any) -> PostTrainJob:
    return parse_job(manifest(tmp_path, **spec))


DIGIT_REWARD = (
    "def digits(prompts, completions, **columns):\n"
    "    return [sum(c.isdigit() for c in x) / max(len(x), 1) for x in completions]\n"
)


def grpo_job(
    tmp: Path, prompts: int = 64, training: dict[str, Any] | None = None, **block: Any
) -> PostTrainJob:
    """A small GRPO job in ``tmp``: ``prompts`` arithmetic prompts of up to 8 tokens, G = 4
    completions of up to 8 tokens rewarded for their share of digits, beta 0.04 (the reference's
    log-probs); ``block`` adds to (or overrides) spec.grpo, ``training`` spec.training."""
    arithmetic.write_jsonl(str(tmp / "prompts.jsonl"), arithmetic.problems("train")[:prompts])
    (tmp / "rewards.py").write_text(DIGIT_REWARD)
    data = {"train": str(tmp / "prompts.jsonl"), "eval": None, "maxLength": 24, "maxPromptLength": 8}  # fmt: skip
    grpo = {
        "numGenerations": 4,
        "beta": 0.04,
        "maxNewTokens": 8,
        "rewards": [{"function": f"{tmp}/rewards.py:digits"}],
        **block,
    }
    training = {"steps": 3, "batchSize": 4, "checkpoint": {"everySteps": 1000}, **(training or {})}
    return job(
        tmp, algorithm="grpo", training=training, output={"export": False}, data=data, grpo=grpo
    )


def write_pairs(folder: Path) -> tuple[str, str]:
    """Preference pairs on the arithmetic task: 128 for training, the held-out ones for eval."""
    folder.mkdir(parents=True, exist_ok=True)
    train_path, test_path = str(folder / "train.jsonl"), str(folder / "test.jsonl")
    preferences.write_jsonl(train_path, preferences.pairs("train", max_operand=19, held_out=16)[:128])  # fmt: skip
    preferences.write_jsonl(test_path, preferences.pairs("test", max_operand=19, held_out=16))
    return train_path, test_path


def write_unpaired(folder: Path) -> tuple[str, str]:
    """KTO's rows: each training pair as a desirable and an undesirable completion; eval pairs."""
    train_pairs, test_path = write_pairs(folder / "pairs")
    rows = [json.loads(line) for line in Path(train_pairs).read_text().splitlines()]
    out = folder / "train.jsonl"
    with out.open("w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["chosen"], "label": True}) + "\n")  # fmt: skip
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["rejected"], "label": False}) + "\n")  # fmt: skip
    return str(out), test_path


def preference_job(tmp_path: Path, algorithm: str, **spec: Any) -> PostTrainJob:
    """A preference job (DPO, ORPO, SimPO, KTO, ...) on those pairs, 4 pairs per micro-batch."""
    writer = write_unpaired if algorithm == "kto" else write_pairs
    train_path, test_path = writer(tmp_path / "prefs")
    data = {"train": train_path, "eval": test_path, **spec.pop("data", {})}
    training = {"microBatchSize": 4, "evalEverySteps": 3, **spec.pop("training", {})}
    return job(tmp_path, algorithm=algorithm, data=data, training=training, **spec)


def run_training(job: PostTrainJob, out: Path, **kw: Any) -> tuple[Any, list[str]]:
    """``train`` in this process, without a progress bar: (its result, what it said)."""
    from posttrain.trainer.loop import train

    said: list[str] = []
    result = train(job, str(out), say=said.append, progress_bar=False, **kw)
    return result, said


PPO_REWARDS = """
def digits(prompts, completions, answer, **columns):
    # Dense and easy to learn: the share of digits in the completion.
    assert len(answer) == len(completions)  # the data row's columns arrive aligned
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
"""


def write_ppo_files(root: Path) -> Path:
    """64 arithmetic prompts and ``my_rewards.py:digits`` (``PPO_REWARDS``) in ``root``."""
    arithmetic.write_jsonl(str(root / "train.jsonl"), arithmetic.problems("train")[:64])
    (root / "my_rewards.py").write_text(PPO_REWARDS)
    return root


def ppo_job(
    files: Path,
    *,
    steps: int,
    model: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    **ppo: Any,
) -> PostTrainJob:
    """A PPO job on ``write_ppo_files``' prompts rewarded by their digits: 16 prompts a step,
    8 new tokens, two PPO epochs of two mini-batches; ``ppo`` and ``training`` override."""
    block = {
        "maxNewTokens": 8,
        "klCoef": 0.05,
        "numIterations": 2,
        "numMiniBatches": 2,
        "rewards": [{"function": f"{files}/my_rewards.py:digits"}],
        **ppo,
    }
    return PostTrainJob.model_validate(
        {
            "apiVersion": "posttrain.dev/v1alpha1",
            "kind": "PostTrainJob",
            "metadata": {"name": "ppo-test"},
            "spec": {
                "algorithm": "ppo",
                "model": {"base": "builtin:tiny", "dtype": "float32", **(model or {})},
                "data": {
                    "train": str(files / "train.jsonl"),
                    "maxLength": 24,
                    "maxPromptLength": 8,
                },
                "ppo": block,
                "training": {
                    "steps": steps,
                    "batchSize": 16,
                    "learningRate": 1e-2,
                    "schedule": {"name": "constant", "warmupSteps": 0},
                    "checkpoint": {"everySteps": 1000},
                    **(training or {}),
                },
                "output": {"export": False},
                "resources": {"accelerator": "cpu"},
            },
        }
    )


def write_recipe(tmp_path: Path, **spec: Any) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest(tmp_path, **spec)))
    return str(path)


def metrics(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def per_step(output: Path) -> dict[int, dict[str, Any]]:
    """The step records (the final summary line shares the last step number; merged in)."""
    steps: dict[int, dict[str, Any]] = {}
    for record in metrics(output):
        steps.setdefault(record["step"], {}).update(record)
    return steps


def rl_manifest(
    files: Path,
    algorithm: str,
    *,
    steps: int = 12,
    batch_size: int = 4,
    reward: str = "digits",
    name: str = "rl-test",
    **block: Any,
) -> dict[str, Any]:
    """A GRPO-family job on a test's ``files``: ``train.jsonl`` (arithmetic prompts of up to 8
    tokens) and ``my_rewards.py`` (its reward functions, ``reward`` the one used); completions of
    up to 8 tokens, a constant learning rate of 1e-2. ``block`` adds to (or overrides) the
    algorithm's block (spec.grpo, spec.dapo, ...)."""
    settings = {
        "maxNewTokens": 8,
        "rewards": [{"function": f"{files}/my_rewards.py:{reward}"}],
        **block,
    }
    return {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainJob",
        "metadata": {"name": name},
        "spec": {
            "algorithm": algorithm,
            "model": {"base": "builtin:tiny", "dtype": "float32"},
            "data": {"train": str(files / "train.jsonl"), "maxLength": 24, "maxPromptLength": 8},
            REGISTRY[algorithm].block: settings,
            "training": {
                "steps": steps,
                "batchSize": batch_size,
                "learningRate": 1e-2,
                "schedule": {"name": "constant", "warmupSteps": 0},
                "checkpoint": {"everySteps": 1000},
            },
            "output": {"export": False},
            "resources": {"accelerator": "cpu"},
        },
    }


def losses(output: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for record in metrics(output):
        if "loss" in record:
            assert record["step"] not in out, f"step {record['step']} logged twice"
            out[record["step"]] = record["loss"]
    return out


ROOT = Path(__file__).resolve().parents[2]


def posttrain_run(recipe: Path, out: Path, timeout: int) -> subprocess.CompletedProcess:
    """`posttrain run RECIPE --output OUT` from the repository root, as a user runs a quickstart."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "posttrain.cli", "run", str(recipe), "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
