"""posttrain against google-tunix 0.1.7 on the workload of ``tunix_workload.py``, alternating.

    .venv/bin/python -P benchmarks/compare_tunix.py              # 2 rounds: ours, Tunix, ours, Tunix
    .venv/bin/python -P benchmarks/compare_tunix.py --rounds 3 --only decode

On first use it creates a virtual environment with ``google-tunix==0.1.7`` (from PyPI) in
``~/.cache/posttrain/tunix-0.1.7`` (override with ``POSTTRAIN_TUNIX_VENV``). Each measurement is a
fresh process (``tunix_workload.py`` for posttrain, this file with ``--tunix`` inside Tunix's
environment), so neither side warms the other's caches; rounds alternate the two, and the ratios
use the per-side medians over rounds. On a shared machine absolute figures drift by 10-20%
between runs: compare only ratios taken within one run.

The Tunix side builds ``tunix.models.llama3.model.Llama3`` with the same shapes, trains through
``tunix.sft.peft_trainer.PeftTrainer.train()`` as its users do (its default loss: mean next-token
CE over the 255 targets; LoRA through ``qwix.LoraProvider`` on all seven projections, optimizer
over ``nnx.LoRAParam``; a step timed from one ``on_train_step_end`` hook to the next), and decodes with ``tunix.generate.sampler.Sampler`` (greedy), with the same
data, warm-up and medians. GRPO (``--only grpo``): posttrain's own loop against Tunix's
``GRPOLearner`` on a 4-layer model of the same shape (see ``tunix_workload.py``); both sides
report their parameters, generated tokens per step and optimizer steps per GRPO step, and the
ratios are refused when those differ. It works from any working directory.
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
    "grpo_step_s",
    "grpo_step_cpu_s",
    "grpo_update_cpu_s",  # of which the policy update (posttrain: the jitted step; Tunix: update_actor)
)
# What each side reports about the GRPO work it did: must agree, or the timing compares nothing.
SAME_WORK = ("grpo_parameters", "grpo_generated_tokens", "grpo_optimizer_steps_per_grpo_step")


def tunix_python() -> Path:
    """Tunix's venv interpreter, creating the venv on first use."""
    python = VENV / "bin" / "python"
    marker = VENV / f".google-tunix-{TUNIX_VERSION}"
    if not marker.exists():
        print(f"installing google-tunix=={TUNIX_VERSION} into {VENV} (first use)", flush=True)
        # -P and a neutral working directory: run from the repository root, "-m pip" would
        # otherwise import the project's operator/ folder in place of the stdlib's operator.
        neutral = VENV.parent
        neutral.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-P", "-m", "venv", str(VENV)], check=True, cwd=neutral)
        pip = [str(python), "-P", "-m", "pip", "install", "-q"]
        subprocess.run([*pip, f"google-tunix=={TUNIX_VERSION}"], check=True, cwd=neutral)
        marker.touch()
    return python


def measure(command: list[str]) -> dict[str, float]:
    """Run one side in a fresh process; its last stdout line is the JSON result."""
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=HERE)
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
    for key in SAME_WORK:
        seen = {json.dumps(x.get(key)) for results in runs.values() for x in results}
        if len(seen) > 1:
            raise SystemExit(f"the two sides did different GRPO work: {key} = {sorted(seen)}")
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
    if "grpo" in parts:
        wall, cpu, work = _tunix_grpo(w)
        out |= w.results("grpo_step", (wall, cpu))
        out |= {f"grpo_{k}": v for k, v in work.items()}
    return out


def _tunix_model(w, layers: int | None = None):
    from flax import nnx
    from tunix.models.llama3 import model as llama3

    config = llama3.ModelConfig(
        num_layers=layers or w.LAYERS,
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
    import time

    import jax
    import jax.numpy as jnp
    import optax
    import qwix
    from flax import nnx
    from tunix.sft import hooks, peft_trainer, utils

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
    # Timed as a Tunix user runs it: PeftTrainer.train() over the batches, a step's end being
    # its on_train_step_end hook (Tunix calls it once that step's loss is on the host, while the
    # next step runs: its loop keeps up to 2 steps in flight). The warm-up steps, then the
    # medians between consecutive step ends, as for GRPO.
    steps = w.WARMUP_STEPS + w.TIMED_STEPS + 2  # the last step's hook fires only after the next
    tokens = w.sft_tokens()
    ends: list[tuple[float, float]] = []

    class StepEnds(hooks.TrainingHooks):
        def on_train_start(self, train_ctx) -> None:
            pass

        def on_train_end(self, train_ctx) -> None:
            pass

        def on_train_step_start(self, train_ctx) -> None:
            pass

        def on_train_step_end(self, train_ctx, train_step, train_loss) -> None:
            jax.block_until_ready(train_loss)  # on the host already (Tunix logged it)
            ends.append((time.perf_counter(), time.process_time()))

        def on_eval_step_start(self, train_ctx) -> None:
            pass

        def on_eval_step_end(self, train_ctx, eval_loss) -> None:
            pass

    trainer = peft_trainer.PeftTrainer(
        model,
        optax.adamw(w.LEARNING_RATE),
        peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=steps),
    )

    def model_inputs(x: peft_trainer.TrainingInput):
        return {
            "input_tokens": x.input_tokens,
            "input_mask": x.input_mask,
            "positions": utils.build_positions_from_mask(x.input_mask),
            "attention_mask": utils.make_causal_attn_mask(x.input_mask),
        }

    trainer = trainer.with_gen_model_input_fn(model_inputs)
    trainer.with_training_hooks(StepEnds())  # returns None, unlike with_gen_model_input_fn
    batches = [
        peft_trainer.TrainingInput(
            input_tokens=jnp.asarray(t), input_mask=jnp.ones(t.shape, jnp.bool_)
        )
        for t in (tokens[i % len(tokens)] for i in range(steps))
    ]
    trainer.train(batches)
    return w.step_intervals(ends, w.WARMUP_STEPS, w.TIMED_STEPS)


class _IdsTokenizer:
    """A 'tokenizer' whose text is space-separated ids, so Tunix's Sampler gets exact prompts."""

    def encode(self, text: str) -> list[int]:
        text = str(text)  # GRPOLearner passes numpy strings
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


def _tunix_grpo(w) -> tuple[float, float, dict]:
    """Tunix's GRPOLearner on the GRPO workload: actor, reference (the same initial weights) and
    rollout on one mesh (the rollout shares the actor's weights), the vanilla rollout engine,
    ``optax.adamw``, one mini-batch (so one optimizer step) per GRPO step; step ends recorded
    after each global step, blocking on the actor's parameters."""
    import time

    import jax
    import numpy as np
    import optax
    from flax import nnx
    from tunix.rl import rl_cluster as rl
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    steps = w.GRPO_WARMUP + w.GRPO_TIMED + 1
    actor, reference = _tunix_model(w, w.GRPO_LAYERS), _tunix_model(w, w.GRPO_LAYERS)
    auto = (jax.sharding.AxisType.Auto,) * 2  # Tunix's models gather without out_sharding
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=auto)
    config = rl.ClusterConfig(
        role_to_mesh={rl.Role.ACTOR: mesh, rl.Role.REFERENCE: mesh, rl.Role.ROLLOUT: mesh},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl.RLTrainingConfig(
            actor_optimizer=optax.adamw(w.LEARNING_RATE),
            eval_every_n_steps=10**9,
            max_steps=steps,
        ),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=w.GRPO_NEW,
            max_prompt_length=w.GRPO_PROMPT_LEN,
            kv_cache_size=w.GRPO_PROMPT_LEN + w.GRPO_NEW,
            temperature=1.0,
            top_p=1.0,
            eos_tokens=[w.VOCAB],  # never produced: every completion has all its tokens
        ),
    )
    cluster = rl.RLCluster(
        actor=actor, reference=reference, tokenizer=_IdsTokenizer(), cluster_config=config
    )
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster,
        reward_fns=[w.grpo_reward],
        algo_config=grpo_learner.GRPOConfig(
            num_generations=w.GRPO_G, num_iterations=1, beta=w.GRPO_BETA
        ),
    )
    ends: list[tuple[float, float]] = []
    work: dict = {
        "parameters": sum(int(x.size) for x in jax.tree.leaves(nnx.state(actor, nnx.Param))),
        "generated_tokens": [],
    }
    run_global_step, generate = learner._run_global_step, cluster.generate
    update_actor, updates = cluster.update_actor, []

    def timed_update(*args, **kwargs):
        cpu = time.process_time()
        update_actor(*args, **kwargs)
        jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
        updates.append(time.process_time() - cpu)

    def timed_global_step(*args, **kwargs):
        run_global_step(*args, **kwargs)
        jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
        ends.append((time.perf_counter(), time.process_time()))

    def counted_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        if str(kwargs.get("mode", "")).lower().endswith("train"):
            work["generated_tokens"].append(sum(len(t) for t in out.tokens))
        return out

    learner._run_global_step = timed_global_step
    cluster.generate = counted_generate
    cluster.update_actor = timed_update
    prompts = w.grpo_prompts()
    batches = [
        # A numpy array, not a list: the learner repeats each prompt G times with jax.tree.map.
        {"prompts": np.asarray(prompts[i * w.GRPO_PROMPTS : (i + 1) * w.GRPO_PROMPTS])}
        for i in range(steps)
    ]
    learner.train(batches)
    assert len(ends) == steps, f"{len(ends)} global steps ran, {steps} expected"
    work["optimizer_steps_per_grpo_step"] = cluster.actor_trainer.train_steps / steps
    work["update_cpu_s"] = sorted(updates[w.GRPO_WARMUP + 1 :])[
        len(updates[w.GRPO_WARMUP + 1 :]) // 2
    ]
    wall, cpu = w.step_intervals(ends)
    return wall, cpu, work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--only", choices=("sft_full", "sft_lora", "decode", "grpo"), action="append"
    )
    parser.add_argument("--tunix", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    parts = args.only or ["sft_full", "sft_lora", "decode", "grpo"]
    if args.tunix:
        print(json.dumps(tunix_run(parts)))
        return
    result = compare(args.rounds, parts)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
