"""posttrain against google-tunix 0.1.7 on the workload of ``tunix_workload.py``, alternating.

    .venv/bin/python -P benchmarks/compare_tunix.py              # 2 rounds: ours, Tunix, ours, Tunix
    .venv/bin/python -P benchmarks/compare_tunix.py --rounds 3 --only decode

On first use it creates a virtual environment with ``google-tunix==0.1.7`` (from PyPI) in
``~/.cache/posttrain/tunix-0.1.7`` (override with ``POSTTRAIN_TUNIX_VENV``). Each measurement is a
fresh process (``tunix_workload.py`` for posttrain, this file with ``--tunix`` inside Tunix's
environment), so neither side warms the other's caches; rounds alternate the two, and the ratios
use the per-side medians over rounds. On a shared machine absolute figures drift by 10-20%
between runs: compare only ratios taken within one run.

The Tunix side builds ``tunix.models.llama3.model.Llama3`` with the same shapes, trains with the
jitted step of ``tunix.sft.peft_trainer.PeftTrainer`` (its default loss: mean next-token CE over
the 255 targets; LoRA through ``qwix.LoraProvider`` on all seven projections, optimizer over
``nnx.LoRAParam``), and decodes with ``tunix.generate.sampler.Sampler`` (greedy), with the same
data, warm-up and medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TUNIX_VERSION = "0.1.7"
VENV = Path(
    os.environ.get(
        "POSTTRAIN_TUNIX_VENV", Path.home() / ".cache" / "posttrain" / f"tunix-{TUNIX_VERSION}"
    )
)
KEYS = (
    "sft_full_step_s",
    "sft_full_step_cpu_s",
    "sft_lora_step_s",
    "sft_lora_step_cpu_s",
    "decode_tokens_per_s",
    "decode_tokens_per_s_cpu",
)


def tunix_python() -> Path:
    """Tunix's venv interpreter, creating the venv on first use."""
    python = VENV / "bin" / "python"
    marker = VENV / f".google-tunix-{TUNIX_VERSION}"
    if not marker.exists():
        print(f"installing google-tunix=={TUNIX_VERSION} into {VENV} (first use)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, f"google-tunix=={TUNIX_VERSION}"], check=True)
        marker.touch()
    return python


def measure(command: list[str]) -> dict[str, float]:
    """Run one side in a fresh process; its last stdout line is the JSON result."""
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(rounds: int, parts: list[str]) -> dict[str, dict[str, float]]:
    ours_cmd = [sys.executable, "-P", str(HERE / "tunix_workload.py")]
    tunix_cmd = [str(tunix_python()), "-P", str(Path(__file__).resolve()), "--tunix"]
    for part in parts:
        ours_cmd += ["--only", part]
        tunix_cmd += ["--only", part]
    runs: dict[str, list[dict[str, float]]] = {"posttrain": [], "tunix": []}
    for r in range(rounds):
        for side, cmd in (("posttrain", ours_cmd), ("tunix", tunix_cmd)):
            result = measure(cmd)
            runs[side].append(result)
            print(f"round {r + 1} {side}: {json.dumps(result)}", flush=True)
    medians = {
        side: {k: statistics.median(x[k] for x in results) for k in KEYS if k in results[0]}
        for side, results in runs.items()
    }
    ours, theirs = medians["posttrain"], medians["tunix"]
    # ours / Tunix's: below 1 is better for step times, above 1 for tokens/s.
    ratios = {k: ours[k] / theirs[k] for k in ours}
    return {"posttrain": ours, "tunix": theirs, "ratios": ratios}


# --------------------------------------------------------------------------- Tunix side


def tunix_run(parts: list[str]) -> dict[str, float]:
    """Runs inside Tunix's venv: only numpy, JAX, flax, optax, qwix and tunix are importable."""
    sys.path.insert(0, str(HERE))
    import tunix_workload as w

    out: dict[str, float] = {}
    if "sft_full" in parts:
        out |= w.results("sft_full_step", _tunix_sft(w, lora=False))
    if "sft_lora" in parts:
        out |= w.results("sft_lora_step", _tunix_sft(w, lora=True))
    if "decode" in parts:
        out |= w.results("decode_tokens_per_s", _tunix_decode(w), per=w.PROMPTS * w.NEW_TOKENS)
    return out


def _tunix_model(w):
    from flax import nnx
    from tunix.models.llama3 import model as llama3

    config = llama3.ModelConfig(
        num_layers=w.LAYERS,
        vocab_size=w.VOCAB,
        embed_dim=w.HIDDEN,
        hidden_dim=w.MLP,
        num_heads=w.HEADS,
        head_dim=w.HEAD_DIM,
        num_kv_heads=w.KV_HEADS,
        rope_theta=int(w.ROPE_THETA),
        norm_eps=w.NORM_EPS,
        weight_tying=False,
    )
    return llama3.Llama3(config, rngs=nnx.Rngs(0))


def _tunix_sft(w, lora: bool) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp
    import optax
    import qwix
    from flax import nnx
    from tunix.sft import peft_trainer, utils

    model = _tunix_model(w)
    if lora:
        provider = qwix.LoraProvider(
            module_path=".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
            rank=w.LORA_RANK,
            alpha=float(w.LORA_ALPHA),
        )
        model = qwix.apply_lora_to_model(
            model, provider, rngs=nnx.Rngs(1), **model.get_model_input()
        )
    trainer = peft_trainer.PeftTrainer(
        model,
        optax.adamw(w.LEARNING_RATE),
        peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=w.DATA_STEPS),
    )

    def model_inputs(x: peft_trainer.TrainingInput):
        return {
            "input_tokens": x.input_tokens,
            "input_mask": x.input_mask,
            "positions": utils.build_positions_from_mask(x.input_mask),
            "attention_mask": utils.make_causal_attn_mask(x.input_mask),
        }

    trainer = trainer.with_gen_model_input_fn(model_inputs)
    train_step, _ = trainer.jit_train_and_eval_step()
    batches = [
        peft_trainer.TrainingInput(
            input_tokens=jnp.asarray(t), input_mask=jnp.ones(t.shape, jnp.bool_)
        )
        for t in w.sft_tokens()
    ]

    def step(i: int) -> None:
        loss, _, _ = train_step(batches[i])
        jax.block_until_ready((loss, jax.tree.leaves(trainer.model)[0]))

    return w.median_step_time(step)


class _IdsTokenizer:
    """A 'tokenizer' whose text is space-separated ids, so Tunix's Sampler gets exact prompts."""

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))

    def bos_id(self) -> int:
        return 0  # falsy: the Sampler then adds no BOS

    def eos_id(self) -> int:
        return -1

    def pad_id(self) -> int:
        return 0


def _tunix_decode(w) -> tuple[float, float]:
    from tunix.generate import sampler as sampler_lib

    sampler = sampler_lib.Sampler(
        _tunix_model(w),
        _IdsTokenizer(),
        sampler_lib.CacheConfig(
            cache_size=w.PROMPT_LEN + w.NEW_TOKENS,
            num_layers=w.LAYERS,
            num_kv_heads=w.KV_HEADS,
            head_dim=w.HEAD_DIM,
        ),
    )
    prompts = [" ".join(map(str, row)) for row in w.decode_prompts()]

    def call() -> None:
        out = sampler(
            prompts,
            max_generation_steps=w.NEW_TOKENS,
            max_prompt_length=w.PROMPT_LEN,
            eos_tokens=[w.VOCAB],  # never produced: every row decodes all steps
            temperature=0.0,
        )
        assert len(out.tokens) == w.PROMPTS

    return w.median_call_time(call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=("sft_full", "sft_lora", "decode"), action="append")
    parser.add_argument("--tunix", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    parts = args.only or ["sft_full", "sft_lora", "decode"]
    if args.tunix:
        print(json.dumps(tunix_run(parts)))
        return
    result = compare(args.rounds, parts)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
