"""Tiny SFT jobs on the arithmetic task for the loop tests (imported by path, see each test)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from posttrain.trainer.tasks import arithmetic

from posttrain.api import parse_job
from posttrain.api.v1alpha1 import PostTrainJob


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
