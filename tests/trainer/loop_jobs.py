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
from posttrain.api.v1alpha1 import PostTrainJob
from posttrain.trainer.tasks import arithmetic

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


def write_recipe(tmp_path: Path, **spec: Any) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest(tmp_path, **spec)))
    return str(path)


def metrics(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


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
