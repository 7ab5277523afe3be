"""The Hugging Face reference fixtures (tests/fixtures/hf-reference, see its NOTE.md)."""

from __future__ import annotations

from pathlib import Path

HF_REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "hf-reference"
MODEL_FIXTURES = (
    "llama3-gqa",
    "qwen2-bias-tied",
    "qwen3-qknorm",
    "gemma3-text",
    "gemma2-softcap",
    "gemma2-softcap-active",
)
