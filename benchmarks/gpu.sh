#!/usr/bin/env bash
# SFT MFU, decode bandwidth and a GRPO step on one NVIDIA H100/H200 (issues #12, #27). NOT RUN YET:
# prepared for a session that is lent a GPU. Needs JAX with CUDA, flax, optax and this repo
# importable:
#
#   benchmarks/gpu.sh                      # all parts (~5 min SFT + decode; GRPO: a few more?)
#   BATCH=4 REMAT=full benchmarks/gpu.sh   # knobs: BATCH, SEQ, REMAT, DECODE_BATCH, NEW_TOKENS
#   PARTS=grpo GRPO_ARGS="--prompts 8" benchmarks/gpu.sh   # PARTS: "sft" (SFT and decode), "grpo"
#   SMALL=1 BATCH=2 SEQ=32 DECODE_BATCH=2 NEW_TOKENS=8 GRPO_ARGS=--small benchmarks/gpu.sh
#                                          # a tiny model: the CPU smoke test (tests/trainer/test_gpu_script.py)
#
# SFT: the Llama-3.2-1B shape (random weights) at sequence SEQ (2048), float32 master weights and
# AdamW state, bfloat16 compute (the loss casts the params), attention "auto" (cuDNN for bf16 on a
# GPU), chunked log-probs; MFU = analytic model FLOPs (6 x params x tokens + causal attention) per
# second over the chip's dense bf16 peak. Decode: batch DECODE_BATCH (64) x NEW_TOKENS (512) new
# tokens after 64-token prompts, bf16 weights and cache, greedy; achieved HBM bandwidth = bytes
# read per step (weights + the KV cache so far) x steps / time, against the chip's HBM peak.
# Prints one JSON line last. The model config and the chip peaks come from gpu_grpo.py.
#
# GRPO (benchmarks/gpu_grpo.py, its own process so it gets the whole GPU; its docstring has the
# details): the same shape through the trainer's own loop, 16 prompts x G = 8, 256 prompt + 512
# new tokens, beta 0.04, bf16 compute / float32 master weights, remat full; 2 warm-up steps then
# medians of 3 of the step, the rollout, the update; update MFU (6 x params x tokens / update
# time) and the rollout's tokens/s and HBM bandwidth. Prints its own JSON line last.
# GRPO_ARGS passes its flags (--prompts, --generations, --prompt-tokens, --new-tokens, --remat).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
PARTS=${PARTS:-sft grpo}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [[ " $PARTS " == *" sft "* ]]; then
BATCH=${BATCH:-8} SEQ=${SEQ:-2048} REMAT=${REMAT:-full} DECODE_BATCH=${DECODE_BATCH:-64} \
NEW_TOKENS=${NEW_TOKENS:-512} "$PYTHON" -P - <<'EOF'
import json, os, statistics, subprocess, sys, time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from posttrain.trainer.algorithms import sft
from posttrain.trainer.algorithms.base import Models
from posttrain.trainer.models import create_model, set_remat
from posttrain.trainer.sampling import generate

sys.path.append(os.path.join(os.getcwd(), "benchmarks"))
from gpu_grpo import chip_peaks, llama_1b_config, small_config  # shapes and peaks, shared with GRPO

env = {k: int(os.environ[k]) for k in ("BATCH", "SEQ", "DECODE_BATCH", "NEW_TOKENS")}
REMAT = os.environ["REMAT"]
name = jax.devices()[0].device_kind
_, peak_flops, peak_bw = chip_peaks(name)

config = small_config() if os.environ.get("SMALL") == "1" else llama_1b_config()  # Llama-3.2-1B
B, T = env["BATCH"], env["SEQ"]


def timed(fn, warmup=2, runs=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------ SFT
# The trainer's mixed precision: float32 master weights, bfloat16 compute (nnx param_dtype/dtype).
model = create_model(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
set_remat(model, REMAT)
graphdef, params = nnx.split(model, nnx.Param)
n_params = sum(x.size for x in jax.tree.leaves(params))
tx = optax.adamw(1e-4)
opt_state = tx.init(params)


def loss_fn(p32, batch):
    return sft.loss(Models(policy=nnx.merge(graphdef, p32)), batch)[0]


@jax.jit
def step(p, o, batch):
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss


rng = np.random.default_rng(0)
ids = rng.integers(1, config.vocab_size, size=(B, T)).astype(np.int32)
w = np.full((B, T), 1 / (T - 1), np.float32); w[:, -1] = 0
batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((B, T), jnp.int32),
         "targets": jnp.asarray(np.roll(ids, -1, 1)), "loss_weights": jnp.asarray(w)}
state = [params, opt_state]


def sft_step():
    p, o, loss = step(state[0], state[1], batch)
    jax.block_until_ready(loss); state[0], state[1] = p, o


step_s = timed(sft_step)
L, H, D = config.num_layers, config.num_heads, config.head_dim
flops = 6 * n_params * B * T + 6 * L * H * D * T * B * T  # matmuls + causal attention, fwd+bwd
out = {"device": name, "sft_batch": B, "sft_seq": T, "remat": REMAT, "sft_step_s": step_s,
       "sft_tokens_per_s": B * T / step_s, "sft_mfu": flops / step_s / peak_flops}
del state, params, opt_state, model

# ------------------------------------------------------------------ decode
model = create_model(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
DB, N, P = env["DECODE_BATCH"], env["NEW_TOKENS"], 64
prompts = rng.integers(1, config.vocab_size, size=(DB, P)).astype(np.int32)
decode_s = timed(lambda: np.asarray(generate(model, prompts, N, eos_id=None).tokens), 1, 3)
weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
kv_per_token = 2 * L * config.num_kv_heads * D * 2  # k and v, bf16, all layers
mean_context = P + N / 2
bytes_per_step = weight_bytes + DB * mean_context * kv_per_token
out.update(decode_batch=DB, new_tokens=N, decode_tokens_per_s=DB * N / decode_s,
           decode_hbm_fraction=bytes_per_step * N / decode_s / peak_bw,
           decode_roofline_tokens_per_s=DB * peak_bw / bytes_per_step)
print(json.dumps(out))
EOF
fi
if [[ " $PARTS " == *" grpo "* ]]; then
  # shellcheck disable=SC2086  # GRPO_ARGS is a list of flags
  "$PYTHON" -P benchmarks/gpu_grpo.py ${GRPO_ARGS:-}
fi
