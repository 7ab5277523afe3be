"""Every registered algorithm is complete: its settings type, a trainer module with ``declare`` and
``build``, an example and a section in the docs (the registry is the one place to add one)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from posttrain.api.algorithms import REGISTRY
from posttrain.api.base import Spec

ROOT = Path(__file__).resolve().parents[2]
DOCS = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("name", list(REGISTRY))
def test_registered_algorithm_is_complete(name: str) -> None:
    entry = REGISTRY[name]
    assert issubclass(entry.settings, Spec)
    assert entry.settings.__module__.startswith("posttrain.api.settings."), entry.settings
    spec = importlib.util.find_spec(entry.module)
    assert spec is not None and spec.origin is not None, entry.module
    source = Path(spec.origin).read_text()
    assert "declare" in source and "build" in source, f"{entry.module}: declare and build"
    examples = [
        *(ROOT / "examples").glob("*.yaml"),
        *(ROOT / "examples" / "local").glob("*.yaml"),
    ]
    assert any(f"algorithm: {name}\n" in p.read_text() for p in examples), f"no example for {name}"
    assert f"`algorithm: {name}`" in DOCS, f"no docs section says `algorithm: {name}`"


def test_block_names_are_the_algorithm_in_camel_case() -> None:
    assert REGISTRY["dr-grpo"].block == "drGrpo"
    assert REGISTRY["reinforce-plus-plus"].block == "reinforcePlusPlus"
    assert {e.block for e in REGISTRY.values()} >= {"grpo", "dapo", "ppo", "dpo", "rloo"}
