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
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP = 8192, 512, 8, 8, 4, 64, 1536
NORM_EPS, ROPE_THETA = 1e-5, 500_000.0
BATCH, SEQ, DATA_STEPS = 8, 256, 13
WARMUP_STEPS, TIMED_STEPS = 3, 10
LEARNING_RATE = 1e-4
LORA_RANK, LORA_ALPHA = 16, 16
PROMPTS, PROMPT_LEN, NEW_TOKENS, DECODE_CALLS = 8, 32, 64, 3
PARTS = ("sft_full", "sft_lora", "decode", "grpo")
# GRPO (issue #27): a 4-layer model of the same shape, full fine-tuning, 8 prompts x G = 4
# completions, 32 prompt + 32 new tokens (sampled at temperature 1, EOS never produced), beta 0.04
# (the reference's log-probs), one optimizer step per GRPO step; 2 warm-up steps, then the median
# of 5, each timed from the end of one step's update to the end of the next (rollout, rewards,
# reference log-probs and the update).
GRPO_LAYERS, GRPO_PROMPTS, GRPO_G, GRPO_PROMPT_LEN, GRPO_NEW = 4, 8, 4, 32, 32
GRPO_BETA, GRPO_WARMUP, GRPO_TIMED = 0.04, 2, 5


def sft_tokens() -> np.ndarray:
    """[13, 8, 256] int32 token ids in [1, VOCAB): one batch per step."""
    rng = np.random.default_rng(0)
    return rng.integers(1, VOCAB, size=(DATA_STEPS, BATCH, SEQ)).astype(np.int32)


def decode_prompts() -> np.ndarray:
    """[8, 32] int32 prompt ids in [1, VOCAB)."""
    rng = np.random.default_rng(1)
    return rng.integers(1, VOCAB, size=(PROMPTS, PROMPT_LEN)).astype(np.int32)


def grpo_prompts() -> list[str]:
    """The prompts of every GRPO step, as text: 32 space-separated token ids in [1, VOCAB) each
    (both sides' tokenizers map the text ``"17"`` to id 17)."""
    rng = np.random.default_rng(2)
    rows = (GRPO_WARMUP + GRPO_TIMED + 1) * GRPO_PROMPTS
    ids = rng.integers(1, VOCAB, size=(rows, GRPO_PROMPT_LEN))
    return [" ".join(map(str, row)) for row in ids]


def grpo_reward(prompts: list[str], completions: list[str], **_columns: Any) -> list[float]:
    """Cheap and varied within a group: the share of even token ids in the completion."""
    del prompts
    return [sum(int(t) % 2 == 0 for t in c.split()) / max(len(c.split()), 1) for c in completions]


def step_intervals(
    ends: list[tuple[float, float]], warmup: int = GRPO_WARMUP, timed_steps: int = GRPO_TIMED
) -> tuple[float, float]:
    """Medians of (wall, CPU) between consecutive step ends, after the warm-up steps."""
    timed = ends[warmup : warmup + timed_steps + 1]
    assert len(timed) == timed_steps + 1, f"{len(ends)} step ends recorded"
    walls = [b[0] - a[0] for a, b in zip(timed, timed[1:], strict=False)]
    cpus = [b[1] - a[1] for a, b in zip(timed, timed[1:], strict=False)]
    return statistics.median(walls), statistics.median(cpus)


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


def model_config(layers: int = LAYERS):
    from posttrain.trainer.models import ModelConfig, RopeConfig

    return ModelConfig(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_layers=layers,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rms_norm_eps=NORM_EPS,
        rope=RopeConfig(theta=ROPE_THETA),
        tie_word_embeddings=False,
    )


def sft_step_time(lora: bool, remat: str = "none", scan: bool = False) -> tuple[float, float]:
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
    if scan:
        from posttrain.trainer.models import set_scan_layers

        set_scan_layers(model, True)  # spec.training.scanLayers
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


def _grpo_folder(root: str, config: Any = None, dtype: Any = None) -> str:
    """A Hugging Face folder for a GRPO workload: config.json and random weights of ``config``
    (default: the 4-layer model), written in ``dtype`` (default: the params' own), and a word-level
    tokenizer whose tokens are the ids written out ("0" ... str(vocab - 1), "0" padding) plus an
    EOS past the model's vocabulary, so sampling never ends a completion early."""
    import tokenizers
    from flax import nnx

    from posttrain.trainer.models import create_model, save_pretrained

    config = model_config(GRPO_LAYERS) if config is None else config
    save_pretrained(create_model(config, rngs=nnx.Rngs(0)), root, dtype=dtype)
    vocab_size = config.vocab_size
    vocab = {str(i): i for i in range(vocab_size)} | {"<eos>": vocab_size}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
    tok.add_special_tokens(["<eos>"])
    tok.save(f"{root}/tokenizer.json")
    with open(f"{root}/tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<eos>", "pad_token": "0"}, f)
    return root


def _grpo_inputs(root: str, prompts: list[str]) -> tuple[str, str]:
    """``root``/prompts.jsonl (one ``{"prompt": text}`` a line) and ``root``/rewards.py, which
    serves ``grpo_reward``: (the data path, the reward's ``file:function`` for the job)."""
    with open(f"{root}/prompts.jsonl", "w") as f:
        for text in prompts:
            f.write(json.dumps({"prompt": text}) + "\n")
    with open(f"{root}/rewards.py", "w") as f:
        here = os.path.dirname(os.path.abspath(__file__))
        f.write(f"import sys\nsys.path.insert(0, {here!r})\n")
        f.write("from tunix_workload import grpo_reward\n")
    return f"{root}/prompts.jsonl", f"{root}/rewards.py:grpo_reward"


@dataclass
class LoopTimes:
    """What ``train_timed`` recorded: one entry per optimizer step in each list."""

    ends: list[tuple[float, float]] = field(default_factory=list)  # (wall, CPU) clocks at its end
    updates: list[tuple[float, float]] = field(default_factory=list)  # (wall, CPU) s in the update
    generated_tokens: list[int] = field(default_factory=list)  # completion_mask.sum(), -1: none
    batch_tokens: list[int] = field(default_factory=list)  # input_ids.size: rows x padded length
    parameters: int = 0  # the trained weights
    parameter_bytes: int = 0  # as stored (float32 master weights: 4 a parameter)


def train_timed(job: Any, output_dir: str, *, checkpoints: bool = True) -> tuple[Any, LoopTimes]:
    """The trainer's own loop (``loop.train``) on ``job``, with ``loop.build_run`` wrapped so that
    each call of the jitted update is timed (blocking on its result; the step ends there).
    ``checkpoints=False`` skips the loop's checkpoint saves (a benchmark's final one of a large
    model is gigabytes of writing nobody reads). Returns (the loop's RunResult, the times)."""
    import jax

    from posttrain.trainer import loop

    times = LoopTimes()
    build_run, save = loop.build_run, loop._save

    def timed_run(job: Any, **kw: Any) -> Any:
        run = build_run(job, **kw)
        step = run.train_step
        leaves = jax.tree.leaves(run.params)
        times.parameters = sum(int(x.size) for x in leaves)
        times.parameter_bytes = sum(int(x.size) * x.dtype.itemsize for x in leaves)

        def train_step(params, frozen, opt_state, batch, *rest):
            wall, cpu = time.perf_counter(), time.process_time()
            out = step(params, frozen, opt_state, batch, *rest)
            jax.block_until_ready(out)
            times.ends.append((time.perf_counter(), time.process_time()))
            times.updates.append((times.ends[-1][0] - wall, times.ends[-1][1] - cpu))
            mask = np.asarray(batch["completion_mask"]) if "completion_mask" in batch else None
            times.generated_tokens.append(int(mask.sum()) if mask is not None else -1)
            times.batch_tokens.append(int(batch["input_ids"].size))
            return out

        run.train_step = train_step
        return run

    loop.build_run = timed_run
    if not checkpoints:
        loop._save = lambda *_a, **_k: None
    try:
        result = loop.train(job, output_dir, say=lambda _m: None, progress_bar=False)
    finally:
        loop.build_run, loop._save = build_run, save
    return result, times


def grpo_job(
    name: str,
    model: dict[str, Any],
    data: str,
    reward: str,
    shape: tuple[int, int, int, int],
    steps: int,
    *,
    beta: float = GRPO_BETA,
    learning_rate: float = LEARNING_RATE,
    training: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    grpo: dict[str, Any] | None = None,
) -> Any:
    """The GRPO benchmarks' PostTrainJob: ``shape`` = (prompts per step, G, prompt tokens, new
    tokens), sampled at temperature 1, a constant learning rate, no checkpoint during the run and
    no export; ``training`` and ``grpo`` add to (or override) spec.training and spec.grpo."""
    from posttrain.api import parse_job

    prompts, G, P, N = shape
    return parse_job(
        {
            "apiVersion": "posttrain.dev/v1alpha1",
            "kind": "PostTrainJob",
            "metadata": {"name": name},
            "spec": {
                "algorithm": "grpo",
                "model": model,
                "data": {"train": data, "maxPromptLength": P, "maxLength": P + N, "shuffle": False},
                "grpo": {
                    "numGenerations": G,
                    "beta": beta,
                    "maxNewTokens": N,
                    "temperature": 1.0,
                    "rewards": [{"function": reward}],
                    **(grpo or {}),
                },
                "training": {
                    "steps": steps,
                    "batchSize": prompts,
                    "learningRate": learning_rate,
                    "schedule": {"name": "constant", "warmupSteps": 0},
                    "checkpoint": {"everySteps": 10**6},
                    **(training or {}),
                },
                "output": {"export": False},
                "resources": resources or {"accelerator": "cpu"},
            },
        }
    )


def grpo_step_time(
    scan: bool | None = None, share_prompt: bool | None = None
) -> tuple[float, float, dict[str, Any]]:
    """The trainer's own loop (``train_timed``) on the GRPO workload: step ends recorded where the
    loop's jitted update returns (blocking on it). Also returns what the step did, to check both
    sides do the same work."""
    import tempfile

    root = tempfile.mkdtemp(prefix="grpo-workload-")
    model_dir = _grpo_folder(f"{root}/model")
    data, reward = _grpo_inputs(root, grpo_prompts())
    steps = GRPO_WARMUP + GRPO_TIMED + 1
    job = grpo_job(
        "grpo-workload",
        {"base": model_dir, "dtype": "float32"},
        data,
        reward,
        (GRPO_PROMPTS, GRPO_G, GRPO_PROMPT_LEN, GRPO_NEW),
        steps,
        training={} if scan is None else {"scanLayers": scan},
        grpo={} if share_prompt is None else {"sharePromptForward": share_prompt},
    )
    result, times = train_timed(job, f"{root}/out")
    assert result.step == steps
    wall, cpu = step_intervals(times.ends)
    work: dict[str, Any] = {
        "parameters": times.parameters,
        "generated_tokens": times.generated_tokens,
        "optimizer_steps_per_grpo_step": len(times.updates) / steps,
        "update_cpu_s": statistics.median(u[1] for u in times.updates[GRPO_WARMUP + 1 :]),
    }
    return wall, cpu, work


def run(
    parts: tuple[str, ...],
    remat: str = "none",
    scan: bool | None = None,
    share_prompt: bool | None = None,
) -> dict[str, float]:
    out: dict[str, float] = {}
    if "sft_full" in parts:
        out |= results("sft_full_step", sft_step_time(lora=False, remat=remat, scan=bool(scan)))
    if "sft_lora" in parts:
        out |= results("sft_lora_step", sft_step_time(lora=True, remat=remat, scan=bool(scan)))
    if "decode" in parts:
        out |= results("decode_tokens_per_s", decode_time(), per=PROMPTS * NEW_TOKENS)
    if "grpo" in parts:
        wall, cpu, work = grpo_step_time(scan, share_prompt)
        out |= results("grpo_step", (wall, cpu))
        out |= {f"grpo_{k}": v for k, v in work.items()}  # type: ignore[misc]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=PARTS, action="append", help="run only these parts")
    parser.add_argument("--remat", default="none", help="rematerialisation policy for SFT")
    parser.add_argument(
        "--scan",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="layers under lax.scan (SFT default: no; GRPO default: spec.training.scanLayers's)",
    )
    parser.add_argument(
        "--share-prompt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GRPO: spec.grpo.sharePromptForward (default: the field's default, on)",
    )
    args = parser.parse_args()
    import jax

    result = run(tuple(args.only or PARTS), args.remat, args.scan, args.share_prompt)
    result["backend"] = jax.default_backend()  # type: ignore[assignment]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
