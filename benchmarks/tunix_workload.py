"""The workload of issue #12, run with posttrain: SFT full and LoRA step times, greedy decode tokens/s.

    .venv/bin/python -P benchmarks/tunix_workload.py             # all three parts
    .venv/bin/python -P benchmarks/tunix_workload.py --only sft_full

Model: a Llama-3 decoder, vocab 8192, hidden 512, 8 layers, 8 query / 4 KV heads of 64, SwiGLU
1536, RMSNorm eps 1e-5, RoPE theta 500000, untied LM head, no biases, float32.
SFT: ``optax.adamw(1e-4)``; 8 x 256 random tokens per step; mean next-token cross-entropy over the
255 targets of each row; 3 warm-up steps, then the median of 10 (blocking on the result).
LoRA: rank 16, alpha 16 on all seven projections, the optimizer over the adapters only.
Decode: 8 prompts x 32 tokens, 64 new tokens, greedy, EOS never hit; one warm-up call, then the
median of 3 calls (prefill + decode + tokens on the host).

The constants and the data (numpy only, at module level) are shared with the Tunix side of
``compare_tunix.py``, which imports this file in Tunix's own environment. The last line printed
is one JSON object with ``sft_full_step_s``, ``sft_lora_step_s`` and ``decode_tokens_per_s``
(wall clock), and the same measured in this process's CPU seconds (``*_cpu_s``, ``*_cpu``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP = 8192, 512, 8, 8, 4, 64, 1536
NORM_EPS, ROPE_THETA = 1e-5, 500_000.0
BATCH, SEQ, DATA_STEPS = 8, 256, 13
WARMUP_STEPS, TIMED_STEPS = 3, 10
LEARNING_RATE = 1e-4
LORA_RANK, LORA_ALPHA = 16, 16
PROMPTS, PROMPT_LEN, NEW_TOKENS, DECODE_CALLS = 8, 32, 64, 3
PARTS = ("sft_full", "sft_lora", "decode")


def sft_tokens() -> np.ndarray:
    """[13, 8, 256] int32 token ids in [1, VOCAB): one batch per step."""
    rng = np.random.default_rng(0)
    return rng.integers(1, VOCAB, size=(DATA_STEPS, BATCH, SEQ)).astype(np.int32)


def decode_prompts() -> np.ndarray:
    """[8, 32] int32 prompt ids in [1, VOCAB)."""
    rng = np.random.default_rng(1)
    return rng.integers(1, VOCAB, size=(PROMPTS, PROMPT_LEN)).astype(np.int32)


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds over all threads) of one blocking call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median_step_time(step: Callable[[int], Any]) -> tuple[float, float]:
    """Warm-up steps, then the medians of wall and CPU time of the timed ones; ``step(i)`` blocks.

    CPU time is reported beside wall time because on a shared machine other jobs stretch the
    wall clock; it does not count the time this process waited for a core.
    """
    for i in range(WARMUP_STEPS):
        step(i)
    times = [_timed(lambda i=i: step(i)) for i in range(WARMUP_STEPS, WARMUP_STEPS + TIMED_STEPS)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def median_call_time(call: Callable[[], Any]) -> tuple[float, float]:
    call()
    times = [_timed(call) for _ in range(DECODE_CALLS)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def results(name: str, wall_cpu: tuple[float, float], per: float = 0.0) -> dict[str, float]:
    """``{name}_s`` and ``{name}_cpu_s``; with ``per`` (tokens/call) also ``{name}`` tokens/s."""
    wall, cpu = wall_cpu
    if per:
        return {name: per / wall, f"{name}_cpu": per / cpu}
    return {f"{name}_s": wall, f"{name}_cpu_s": cpu}


# --------------------------------------------------------------------------- posttrain side


def model_config():
    from posttrain.trainer.models import ModelConfig, RopeConfig

    return ModelConfig(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_layers=LAYERS,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rms_norm_eps=NORM_EPS,
        rope=RopeConfig(theta=ROPE_THETA),
        tie_word_embeddings=False,
    )


def sft_step_time(lora: bool, remat: str = "none") -> tuple[float, float]:
    """Median step time of the trainer's own jitted step (``loop_step.make_train_step``)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from posttrain.api.v1alpha1 import LoraSpec
    from posttrain.trainer import peft
    from posttrain.trainer.algorithms import sft
    from posttrain.trainer.loop_step import make_train_step, policy_view
    from posttrain.trainer.models import create_model

    model = create_model(model_config(), rngs=nnx.Rngs(0))
    spec = LoraSpec(rank=LORA_RANK, alpha=LORA_ALPHA) if lora else None
    peft.apply_peft(model, spec, None, rngs=nnx.Rngs(1))
    if remat != "none":
        from posttrain.trainer.models import set_remat

        set_remat(model, remat)  # the trainer does this from spec.training.remat
    graphdef, params, frozen = nnx.split(model, peft.trainable_filter(spec), ...)
    tx = optax.adamw(LEARNING_RATE)
    opt_state = tx.init(params)
    step_fn = jax.jit(
        make_train_step(
            policy_view(graphdef),
            sft.loss,
            tx,
            optax.constant_schedule(LEARNING_RATE),
            num_micro=1,
        ),
        donate_argnums=(0, 2),
    )
    tokens = sft_tokens()
    # The targets of position t is token t + 1; the last position has none (weight 0).
    weights = np.full((BATCH, SEQ), 1.0 / (SEQ - 1), np.float32)
    weights[:, -1] = 0.0
    batches = [
        {
            "input_ids": jnp.asarray(t),
            "attention_mask": jnp.ones((BATCH, SEQ), jnp.int32),
            "targets": jnp.asarray(np.concatenate([t[:, 1:], t[:, :1]], axis=1)),
            "loss_weights": jnp.asarray(weights),
        }
        for t in tokens
    ]
    state = {"params": params, "opt_state": opt_state}

    def step(i: int) -> None:
        p, o, metrics = step_fn(
            state["params"], frozen, state["opt_state"], batches[i], jnp.int32(i)
        )
        jax.block_until_ready((p, metrics["loss"]))
        state["params"], state["opt_state"] = p, o

    return median_step_time(step)


def decode_time() -> tuple[float, float]:
    from flax import nnx

    from posttrain.trainer.models import create_model
    from posttrain.trainer.sampling import generate

    model = create_model(model_config(), rngs=nnx.Rngs(0))
    prompts = decode_prompts()

    def call() -> None:
        gen = generate(model, prompts, NEW_TOKENS, temperature=0.0, eos_id=None)
        np.asarray(gen.tokens)  # tokens on the host

    return median_call_time(call)


def run(parts: tuple[str, ...], remat: str = "none") -> dict[str, float]:
    out: dict[str, float] = {}
    if "sft_full" in parts:
        out |= results("sft_full_step", sft_step_time(lora=False, remat=remat))
    if "sft_lora" in parts:
        out |= results("sft_lora_step", sft_step_time(lora=True, remat=remat))
    if "decode" in parts:
        out |= results("decode_tokens_per_s", decode_time(), per=PROMPTS * NEW_TOKENS)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=PARTS, action="append", help="run only these parts")
    parser.add_argument("--remat", default="none", help="rematerialisation policy for SFT")
    args = parser.parse_args()
    import jax

    result = run(tuple(args.only or PARTS), args.remat)
    result["backend"] = jax.default_backend()  # type: ignore[assignment]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
