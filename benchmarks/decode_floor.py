"""Greedy decode of the issue #12 workload against its matmul floor, alternating in one process.

    .venv/bin/python -P benchmarks/decode_floor.py            # 7 rounds

Measures, per round: ``generate`` with 64 and with 1 new token (the same prompts as
``tunix_workload.py``), so a decode step costs (t64 - t1) / 63; and the floor: a jitted loop of
63 steps that does only one decode step's weight matmuls (every layer's seven projections and
the LM head, 8 rows, the model's own float32 weights), each depending on the previous one as in
the model. The floor runs twice: with the weights as compile-time constants
(``matmul_floor``, the issue's figure; XLA may prepare constant operands ahead of time) and
passed as arguments (``matmul_floor_args``), as ``generate`` passes the model's. A third loop
adds what no decode step can skip either: each layer writes its key and value into a cache of
the call's length and attends over it, with the model's own ``write_kv`` and
``cached_attention`` (``attention_floor``). Prints the minimum over rounds of each (the
least-disturbed measurement on a shared machine) and the step's ratio to each, as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def matmul_floor(model, steps: int, cache_len: int | None = None):
    """A jitted function of (x, weights) running ``steps`` steps of the model's weight matmuls
    only, and the weights: [per layer {name: kernel}], the LM head's kernel. With ``cache_len``,
    each layer also writes its keys/values at the step's slot of a cache that long (the prompt
    fills the slots before ``cache_len - steps - 1``) and attends over the slots written so far."""
    import jax
    import jax.numpy as jnp

    from posttrain.trainer.models.transformer import cached_attention, write_kv

    layers = [
        {
            name: getattr(getattr(layer, part), name).kernel[...]
            for part, names in (
                ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                ("mlp", ("gate_proj", "up_proj", "down_proj")),
            )
            for name in names
        }
        for layer in model.model.layers
    ]
    head = model.lm_head.kernel[...]
    attn = model.model.layers[0].self_attn
    H, K, D = attn.num_heads, attn.num_kv_heads, attn.head_dim

    def attend(q, k, v, kv, slot):
        B = q.shape[0]
        kv = write_kv(kv, k.reshape(B, 1, K, D), v.reshape(B, 1, K, D), slot)
        mask = jnp.broadcast_to(jnp.arange(cache_len) <= slot, (B, 1, cache_len))
        out = cached_attention(q.reshape(B, 1, H, D), *kv, mask, attn.scale, None)
        return out.reshape(B, H * D), kv

    def step(slot, x, caches, weights):
        layers, head = weights
        written = []
        for w, kv in zip(layers, caches, strict=True):
            q, k, v = x @ w["q_proj"], x @ w["k_proj"], x @ w["v_proj"]
            if cache_len is None:
                mixed = q + jnp.concatenate([k, v], axis=-1)
            else:
                mixed, kv = attend(q, k, v, kv, slot)
            written.append(kv)
            x = x + mixed @ w["o_proj"]
            x = x + (jax.nn.silu(x @ w["gate_proj"]) * (x @ w["up_proj"])) @ w["down_proj"]
        logits = x @ head
        return x + 1e-3 * logits[:, : x.shape[1]], written  # the next step depends on the logits

    @jax.jit
    def run(x, weights):
        B = x.shape[0]
        if cache_len is None:
            caches = [None] * len(layers)
        else:
            caches = [
                (jnp.zeros((B, K, D, cache_len)), jnp.zeros((B, K, cache_len, D))) for _ in layers
            ]
        first = 0 if cache_len is None else cache_len - steps - 1

        def body(i, carry):
            return step(first + i, *carry, weights)

        return jax.lax.fori_loop(0, steps, body, (x, caches))[0]

    return run, (layers, head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # -P leaves the script's folder out
    import tunix_workload as w

    from posttrain.trainer.models import create_model
    from posttrain.trainer.sampling import generate
    from posttrain.trainer.sampling.sampler import (
        MIN_NEW_TOKENS_BUCKET,
        MIN_PROMPT_BUCKET,
        bucket,
    )

    model = create_model(w.model_config(), rngs=nnx.Rngs(0))
    prompts = w.decode_prompts()
    steps = w.NEW_TOKENS - 1
    floor, weights = matmul_floor(model, steps)
    x = jnp.ones((w.PROMPTS, w.HIDDEN), jnp.float32)
    floor_of_constants = jax.jit(lambda x: floor(x, weights))  # the weights baked into the program
    cache_len = bucket(w.PROMPT_LEN, MIN_PROMPT_BUCKET) + bucket(
        w.NEW_TOKENS, MIN_NEW_TOKENS_BUCKET
    )
    attention_floor, _ = matmul_floor(model, steps, cache_len)  # generate's cache length

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    calls = {
        "generate_64": lambda: np.asarray(generate(model, prompts, w.NEW_TOKENS).tokens),
        "generate_1": lambda: np.asarray(generate(model, prompts, 1).tokens),
        "matmul_floor": lambda: jax.block_until_ready(floor_of_constants(x)),
        "matmul_floor_args": lambda: jax.block_until_ready(floor(x, weights)),
        "attention_floor": lambda: jax.block_until_ready(attention_floor(x, weights)),
    }
    for call in calls.values():
        call()  # compile
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            times[name].append(timed(call))
    best = {name: min(t) for name, t in times.items()}
    step_ms = (best["generate_64"] - best["generate_1"]) / steps * 1e3
    floor_ms = best["matmul_floor"] / steps * 1e3
    args_floor_ms = best["matmul_floor_args"] / steps * 1e3
    attention_floor_ms = best["attention_floor"] / steps * 1e3
    print(
        json.dumps(
            {
                "call_s": best["generate_64"],
                "prefill_call_s": best["generate_1"],
                "decode_step_ms": step_ms,
                "matmul_floor_step_ms": floor_ms,
                "step_over_floor": step_ms / floor_ms,
                "matmul_floor_args_step_ms": args_floor_ms,
                "step_over_args_floor": step_ms / args_floor_ms,
                "attention_floor_step_ms": attention_floor_ms,
                "step_over_attention_floor": step_ms / attention_floor_ms,
                "tokens_per_s": w.PROMPTS * w.NEW_TOKENS / best["generate_64"],
            }
        )
    )


if __name__ == "__main__":
    main()
