"""A GRPO step on the Llama-3.2-1B shape on one GPU (issue #27): the update's MFU, rollout tokens/s
and the rollout's HBM bandwidth. Part of ``benchmarks/gpu.sh``; NOT RUN on a GPU yet.

    python -P benchmarks/gpu_grpo.py           # the GPU workload below
    python -P benchmarks/gpu_grpo.py --small   # 2 layers, hidden 64, a few tokens: a CPU smoke test

Model: random weights of the Llama-3.2-1B shape (``llama_1b_config``, the config gpu.sh's SFT and
decode use), written as a Hugging Face folder in bfloat16 with a word-level tokenizer
(``tunix_workload._grpo_folder``: tokens are the ids written out, EOS past the vocabulary, so no
completion ends early); bfloat16 compute, float32 master weights and AdamW state, remat full.
Workload: 16 prompts x G = 8 completions (128 rows), 256 random prompt tokens + 512 new ones sampled
at temperature 1, beta 0.04 (the reference's log-probs), one optimizer step per GRPO step, reward
``tunix_workload.grpo_reward``. Run by the trainer's own loop (``loop.train`` on a parsed
PostTrainJob, ``tunix_workload.train_timed`` timing the jitted update); no checkpoint is written.
2 warm-up steps, then the medians of 3.

Timed per step: ``grpo_step_s`` from the end of one update to the end of the next; ``rollout_s``
the sampler (prefill, the decode steps, tokens to the host, detokenising), as the engine times it
itself (``Rollout.seconds``, what the loop's ``generation_tokens_per_second`` divides by);
``batch_s`` the batch source's whole ``next_batch`` (rollout, rewards, reference log-probs);
``update_s`` the jitted update (forward, backward, AdamW), blocking on its result.
Derived: ``rollout_tokens_per_s`` = generated tokens / rollout_s; ``update_mfu`` = 6 x parameters x
update tokens (rows x (prompt + new)) / update_s / the chip's dense bf16 peak (no attention term,
remat's recompute not counted); ``rollout_weights_hbm_fraction`` = the policy's weight bytes as
stored (float32: the sampler gets the master weights) x decode steps / rollout_s / the HBM peak,
and ``rollout_hbm_fraction`` the same with the KV cache read at the mean context added. Peaks by
device name (``CHIPS``: H100 SXM 989 TFLOP/s, 3.35 TB/s; H200 989 TFLOP/s, 4.8 TB/s), else the
H100's; the output names the one used. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tunix_workload as w  # noqa: E402

# Dense bf16 peak FLOP/s and HBM bytes/s by device name (NVIDIA datasheets, SXM parts).
CHIPS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12)}
WARMUP, TIMED = 2, 3
BETA, LEARNING_RATE = 0.04, 1e-6
# (prompts, G, prompt tokens, new tokens) of the GPU workload and of --small.
FULL, SMALL = (16, 8, 256, 512), (4, 4, 16, 16)


def chip_peaks(device_kind: str) -> tuple[str, float, float]:
    """(the chip whose peaks apply, dense bf16 FLOP/s, HBM bytes/s); the H100's when unknown."""
    name = next((k for k in CHIPS if k in device_kind), "H100")
    return name, *CHIPS[name]


def llama_1b_config() -> Any:
    """meta-llama/Llama-3.2-1B's shape (gpu.sh's SFT and decode use it too)."""
    from posttrain.trainer.models import ModelConfig, RopeConfig

    return ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0), tie_word_embeddings=True,
    )  # fmt: skip


def small_config() -> Any:
    """The --small model: 2 layers, hidden 64, vocabulary 512."""
    from posttrain.trainer.models import ModelConfig, RopeConfig

    return ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0), tie_word_embeddings=True,
    )  # fmt: skip


def grpo_job(
    root: str, model_dir: str, vocab: int, shape: tuple[int, int, int, int], remat: str
) -> Any:
    """The PostTrainJob: random prompts of ``shape``'s length over ids [1, vocab)."""
    import jax

    prompts, _, P, _ = shape
    steps = WARMUP + TIMED + 1
    ids = np.random.default_rng(2).integers(1, vocab, size=(steps * prompts, P))
    data, reward = w._grpo_inputs(root, [" ".join(map(str, row)) for row in ids])
    gpu = jax.default_backend() == "gpu"
    return w.grpo_job(
        "gpu-grpo",
        {"base": model_dir, "dtype": "bfloat16", "paramDtype": "float32"},
        data,
        reward,
        shape,
        steps,
        beta=BETA,
        learning_rate=LEARNING_RATE,
        training={"remat": remat},
        resources={"accelerator": "nvidia-h100", "gpusPerNode": 1} if gpu else None,
    )


def measure(shape: tuple[int, int, int, int], remat: str, small: bool) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from posttrain.trainer.algorithms import grpo
    from posttrain.trainer.algorithms.rollout import RolloutEngine

    prompts, G, P, N = shape
    config = small_config() if small else llama_1b_config()
    root = tempfile.mkdtemp(prefix="gpu-grpo-")
    model_dir = w._grpo_folder(f"{root}/model", config, dtype=jnp.bfloat16)
    job = grpo_job(root, model_dir, config.vocab_size, shape, remat)

    # The rollout and the whole batch, timed where the loop's batch source calls them.
    rollouts: list[tuple[float, int]] = []  # (Rollout.seconds, tokens generated)
    batches: list[float] = []
    rollout, next_batch = RolloutEngine.rollout, grpo.RolloutSource.next_batch

    def timed_rollout(self: Any, *args: Any, **kw: Any) -> Any:
        out = rollout(self, *args, **kw)
        rollouts.append((out.seconds, int(out.lengths.sum())))
        return out

    def timed_next_batch(self: Any, step: int) -> Any:
        started = time.perf_counter()
        batch = next_batch(self, step)
        batches.append(time.perf_counter() - started)
        return batch

    RolloutEngine.rollout, grpo.RolloutSource.next_batch = timed_rollout, timed_next_batch  # type: ignore[method-assign]
    try:
        result, times = w.train_timed(job, f"{root}/out", checkpoints=False)
    finally:
        RolloutEngine.rollout, grpo.RolloutSource.next_batch = rollout, next_batch  # type: ignore[method-assign]
    steps = WARMUP + TIMED + 1
    assert result.step == steps and len(rollouts) == steps, (result.step, len(rollouts))
    ends = [e[0] for e in times.ends[WARMUP:]]
    step_s = statistics.median(b - a for a, b in zip(ends, ends[1:], strict=False))
    timed = slice(WARMUP + 1, None)  # the steps between those ends
    rollout_s = statistics.median(r[0] for r in rollouts[timed])
    batch_s = statistics.median(batches[timed])
    update_s = statistics.median(u[0] for u in times.updates[timed])
    generated = statistics.median(r[1] for r in rollouts[timed])
    update_tokens = times.batch_tokens[-1]

    device = jax.devices()[0].device_kind
    chip, peak_flops, peak_bw = chip_peaks(device)
    rows = prompts * G
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2  # k, v bf16
    kv_bytes = rows * (P + N / 2) * kv_per_token  # read per decode step, at the mean context
    weight_bytes = times.parameter_bytes
    return {
        "device": device,
        "backend": jax.default_backend(),
        "model": "small (2 layers, hidden 64)" if small else "Llama-3.2-1B shape",
        "parameters": times.parameters,
        "prompts": prompts,
        "generations": G,
        "prompt_tokens": P,
        "new_tokens": N,
        "remat": remat,
        "grpo_step_s": step_s,
        "rollout_s": rollout_s,
        "batch_s": batch_s,
        "update_s": update_s,
        "other_s": step_s - batch_s - update_s,
        "generated_tokens_per_step": generated,
        "rollout_tokens_per_s": generated / rollout_s,
        "update_tokens": update_tokens,
        "update_mfu": 6 * times.parameters * update_tokens / update_s / peak_flops,
        "rollout_weight_bytes": weight_bytes,
        "rollout_kv_bytes_per_decode_step": kv_bytes,
        "rollout_weights_hbm_fraction": weight_bytes * N / rollout_s / peak_bw,
        "rollout_hbm_fraction": (weight_bytes + kv_bytes) * N / rollout_s / peak_bw,
        "peak_of": chip,
        "peak_bf16_flops_per_s": peak_flops,
        "peak_hbm_bytes_per_s": peak_bw,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny model: a CPU smoke test")
    parser.add_argument("--prompts", type=int, help="prompts per step (16; --small 4)")
    parser.add_argument("--generations", type=int, help="G (8; --small 4)")
    parser.add_argument("--prompt-tokens", type=int, help="prompt length (256; --small 16)")
    parser.add_argument("--new-tokens", type=int, help="tokens sampled per completion (512; 16)")
    parser.add_argument("--remat", default="full", help="spec.training.remat (full)")
    args = parser.parse_args()
    given = (args.prompts, args.generations, args.prompt_tokens, args.new_tokens)
    shape = tuple(g or d for g, d in zip(given, SMALL if args.small else FULL, strict=True))
    print(json.dumps(measure(shape, args.remat, args.small)))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
