#!/usr/bin/env bash
# SFT MFU and decode bandwidth on one NVIDIA H100/H200 (issue #12). NOT RUN YET: prepared for a
# session that is lent a GPU. Needs JAX with CUDA, flax, optax and this repo importable:
#
#   benchmarks/gpu.sh                      # both parts, ~5 minutes with compilation
#   BATCH=4 REMAT=full benchmarks/gpu.sh   # knobs: BATCH, SEQ, REMAT, DECODE_BATCH, NEW_TOKENS
#
# SFT: the Llama-3.2-1B shape (random weights) at sequence SEQ (2048), float32 master weights and
# AdamW state, bfloat16 compute (the loss casts the params), attention "auto" (cuDNN for bf16 on a
# GPU), chunked log-probs; MFU = analytic model FLOPs (6 x params x tokens + causal attention) per
# second over the chip's dense bf16 peak. Decode: batch DECODE_BATCH (64) x NEW_TOKENS (512) new
# tokens after 64-token prompts, bf16 weights and cache, greedy; achieved HBM bandwidth = bytes
# read per step (weights + the KV cache so far) x steps / time, against the chip's HBM peak.
# Prints one JSON line last.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
BATCH=${BATCH:-8} SEQ=${SEQ:-2048} REMAT=${REMAT:-full} DECODE_BATCH=${DECODE_BATCH:-64} \
NEW_TOKENS=${NEW_TOKENS:-512} exec "$PYTHON" -P - <<'EOF'
import json, os, statistics, subprocess, time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from posttrain.trainer.algorithms import sft
from posttrain.trainer.algorithms.base import Models
from posttrain.trainer.models import ModelConfig, RopeConfig, create_model, set_remat
from posttrain.trainer.sampling import generate

env = {k: int(os.environ[k]) for k in ("BATCH", "SEQ", "DECODE_BATCH", "NEW_TOKENS")}
REMAT = os.environ["REMAT"]
# Dense bf16 peak FLOP/s and HBM bytes/s by device name (NVIDIA datasheets, SXM parts).
CHIPS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12)}
name = jax.devices()[0].device_kind
peak_flops, peak_bw = next((v for k, v in CHIPS.items() if k in name), CHIPS["H100"])

config = ModelConfig(  # meta-llama/Llama-3.2-1B
    model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
    num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
    rope=RopeConfig(theta=500000.0), tie_word_embeddings=True,
)
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
