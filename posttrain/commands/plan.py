"""`posttrain plan FILE`: will this job fit its accelerators, and how fast can a step go?

From the model's config.json alone (no weights), on simulated host devices (one per chip of the
job's slice), it builds the model abstractly with the trainer's dtypes and split (policy plus the
algorithm's heads), shards it over the job's mesh, and compiles the training step ahead of time
for the job's shapes, and for RL jobs the rollout too. Printed per device: parameters, frozen
parameters, optimizer state, a frozen reference copy (KL or DPO with full fine-tuning),
activations and temporaries of the step and of the rollout (XLA's memory analysis of each
compiled program), the step's and the rollout's totals and the chip's HBM; then FLOPs per step
and the step time at 100% and 50% MFU. Exit 0 when both fit, 2 when not (naming the biggest
consumer), 1 when the job is invalid.

The step runs the algorithm's own loss on the columns its batch source writes: GRPO, GSPO-token,
DAPO and Dr. GRPO over ``batchSize x numGenerations`` rows of ``maxPromptLength + maxNewTokens``
tokens; PPO with its critic over ``batchSize`` such rows; DPO and ORPO over ``batchSize`` pairs
of ``maxLength``; SFT and distillation the SFT step over ``batchSize x maxLength`` (without the
teacher's forward). The rollout is ``sampling.generate``'s program for ``batchSize x
numGenerations`` prompts (PPO: ``batchSize x numMiniBatches``) of ``maxPromptLength`` tokens and
``maxNewTokens`` new ones. When the resident state alone exceeds the chip, it says so without
compiling.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.api import JobInvalid, load_documents, parse_job
from posttrain.api import accelerators as acc
from posttrain.commands.plan_models import KNOWN_CONFIGS

GIB = 2**30
# Per chip: HBM bytes and dense bf16 peak FLOP/s (vendor datasheets).
CHIPS: dict[str, tuple[float, float]] = {
    "tpu-v4": (32 * GIB, 275e12),
    "tpu-v5e": (16 * GIB, 197e12),
    "tpu-v5p": (95 * GIB, 459e12),
    "tpu-v6e": (32 * GIB, 918e12),
    "nvidia-h100": (80 * GIB, 989e12),
    "nvidia-h200": (141 * GIB, 989e12),
    "nvidia-a100": (40 * GIB, 312e12),
    "nvidia-l4": (24 * GIB, 121e12),
}
EXIT_FITS, EXIT_INVALID, EXIT_DOES_NOT_FIT = 0, 1, 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="say whether a PostTrainJob fits its accelerators (AOT compile on simulated devices)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="a PostTrainJob manifest (its first document)")
    p.add_argument(
        "--config",
        metavar="PATH",
        help="the model's config.json (default: spec.model.base's, or a known model's)",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)


def chip_count(resources: Any) -> int:
    if acc.is_tpu(resources.accelerator):
        return acc.topology_chips(resources.topology) * resources.slices
    if acc.is_gpu(resources.accelerator):
        return resources.nodes * (resources.gpus_per_node or 8)
    return resources.nodes


def model_config_json(base: str, override: str | None) -> dict[str, Any]:
    """The config.json dict: --config, a local/mounted base folder, or a known hub model."""
    if override:
        return json.loads(Path(override).read_text())
    name = base.removeprefix("hf://")
    if name.startswith("builtin:"):
        from posttrain.trainer.models import builtin_config

        return builtin_config(name.removeprefix("builtin:")).to_hf()
    if name in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[name]
    local = Path(base) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    raise ValueError(
        f"spec.model.base {base!r}: no config.json to plan from; pass --config PATH "
        f"(known without one: {', '.join(sorted(KNOWN_CONFIGS))})"
    )


@dataclass(frozen=True)
class Plan:
    devices: int
    hbm_bytes: float
    parameters: int  # per device, trainable
    frozen: int  # per device, not trained (LoRA's base)
    optimizer: int  # per device
    activations: int | None  # per device, XLA temporaries of the step; None when not compiled
    flops_per_step: float
    peak_flops: float
    loss: str = "sft"  # whose loss the compiled step runs
    reference: int = 0  # per device, a frozen copy of the initial weights (KL, full fine-tuning)
    rollout: int | None = None  # per device, the rollout's temporaries (KV cache, logits, loop)
    kv_cache: int = 0  # the whole rollout batch's KV cache, all devices together (for reading)

    @property
    def resident(self) -> int:
        """Held through the step and the rollout alike."""
        return self.parameters + self.frozen + self.optimizer + self.reference

    @property
    def train_total(self) -> int:
        return self.resident + (self.activations or 0)

    @property
    def rollout_total(self) -> int:
        return self.resident + (self.rollout or 0)

    @property
    def total(self) -> int:
        """The peak: the step or the rollout, whichever needs more."""
        return max(self.train_total, self.rollout_total)

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm_bytes

    def consumers(self) -> dict[str, int]:
        parts = {
            "parameters": self.parameters,
            "frozen parameters": self.frozen,
            "optimizer state": self.optimizer,
        }
        if self.reference:
            parts["reference copy"] = self.reference
        if self.activations is not None:
            parts["activations/temporaries"] = self.activations
        if self.rollout is not None:
            parts["rollout (KV cache, temporaries)"] = self.rollout
        return parts

    def step_seconds(self, mfu: float) -> float:
        return self.flops_per_step / (self.devices * self.peak_flops * mfu)


def run(args: argparse.Namespace) -> int:
    try:
        docs = load_documents(args.file)
        if not docs:
            raise JobInvalid([], source=args.file)
        job = parse_job(docs[0], source=args.file)
        resources = job.spec.resources
        if resources.accelerator not in CHIPS:
            raise ValueError(
                f"spec.resources.accelerator: no HBM figure for {resources.accelerator}"
            )
        devices = chip_count(resources)
        _simulate_devices(devices)  # before anything imports JAX
        config = model_config_json(job.spec.model.base, args.config)
    except (OSError, JobInvalid, ValueError) as err:
        print(f"{args.file}: {err}", file=sys.stderr)
        return EXIT_INVALID
    plan = plan_job(job, config, devices)
    print(json.dumps(_as_dict(plan)) if args.json else report(job, plan))
    return EXIT_FITS if plan.fits else EXIT_DOES_NOT_FIT


def _simulate_devices(n: int) -> None:
    """Ask for ``n`` host devices; JAX must not have started yet (it reads these once)."""
    if "jax" in sys.modules:
        import jax

        if len(jax.devices()) < n:
            raise RuntimeError(f"plan needs {n} devices but JAX started with {len(jax.devices())}")
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _nbytes_per_device(tree: Any, shardings: Any) -> int:
    import jax

    leaves, shards = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    return sum(
        math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
        for x, s in zip(leaves, shards, strict=True)
    )


def _state_shardings(state: Any, mesh: Any) -> Any:
    """NamedSharding per variable from its ``logical_axes`` (replicated without them)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from posttrain.trainer.models import logical_to_spec

    def one(var: Any) -> Any:
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        axes = var.get_metadata().get("logical_axes")
        spec = logical_to_spec(axes, var.shape, mesh) if axes else PartitionSpec()
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _like_params(opt_state: Any, params: Any, param_shardings: Any, mesh: Any) -> Any:
    """Optimizer-state shardings: a leaf shaped like a parameter is sharded like it (AdamW's
    moments); other leaves (step counts) are replicated. Without this XLA replicates the zeros
    ``init`` creates."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    by_shape = {
        x.shape: sh
        for x, sh in zip(jax.tree.leaves(params), jax.tree.leaves(param_shardings), strict=True)
    }
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: by_shape.get(x.shape, replicated), opt_state)


GRPO_FAMILY = ("grpo", "gspo-token", "dapo", "dr-grpo")
PAIR_LOSSES = ("dpo", "orpo")  # rows of [2, T]: chosen and rejected


@dataclass(frozen=True)
class Shapes:
    """What plan compiles for a job: the step's rows and tokens, the loss, and the rollout."""

    rows: int  # of the optimizer step
    seq: int  # tokens per row
    loss: str  # "sft" or the algorithm whose loss runs
    rollout_rows: int = 0  # 0: no rollout (not an RL algorithm)
    prompt_len: int = 0
    sampling: Any = None  # rollout.SamplingSettings
    reference: bool = False  # the algorithm keeps a frozen reference policy


def job_shapes(spec: Any) -> Shapes:
    """The shapes the trainer would run for this job (worst case: prompts of maxPromptLength)."""
    from posttrain.trainer.algorithms.rollout import SamplingSettings

    t, d = spec.training, spec.data
    if spec.algorithm in GRPO_FAMILY:
        g = spec.grpo_settings
        rows = t.batch_size * g.num_generations
        return Shapes(
            rows=rows,
            seq=d.max_prompt_length + g.max_new_tokens,
            loss=spec.algorithm,
            rollout_rows=rows,
            prompt_len=d.max_prompt_length,
            sampling=SamplingSettings.of(g),
            reference=g.beta > 0,
        )
    if spec.algorithm == "ppo":
        p = spec.ppo
        return Shapes(
            rows=t.batch_size,
            seq=d.max_prompt_length + p.max_new_tokens,
            loss="ppo",
            rollout_rows=t.batch_size * p.num_mini_batches,
            prompt_len=d.max_prompt_length,
            sampling=SamplingSettings.of(p),
            reference=p.kl_coef > 0,
        )
    if spec.algorithm in PAIR_LOSSES:
        return Shapes(
            rows=t.batch_size,
            seq=d.max_length,
            loss=spec.algorithm,
            reference=spec.algorithm == "dpo",
        )
    return Shapes(rows=t.batch_size, seq=d.max_length, loss="sft")


def _train_batch(shapes: Shapes, spec: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Name -> (shape, dtype) of the step's batch columns for the compiled loss: the columns the
    algorithm's batch source writes (fixed keys, as the trainer's step sees them)."""
    import jax.numpy as jnp

    R, L = shapes.rows, shapes.seq
    i32, f32 = jnp.int32, jnp.float32
    if shapes.loss in PAIR_LOSSES:
        pairs = {
            "input_ids": ((R, 2, L), i32),
            "attention_mask": ((R, 2, L), i32),
            "targets": ((R, 2, L), i32),
            "completion_mask": ((R, 2, L), f32),
            "row_weights": ((R,), f32),
        }
        if shapes.loss == "dpo":
            pairs["reference_logps"] = ((R, 2), f32)
        else:
            pairs["nll_weights"] = ((R, L), f32)
        return pairs
    columns: dict[str, tuple[tuple[int, ...], Any]] = {
        "input_ids": ((R, L), i32),
        "attention_mask": ((R, L), i32),
        "targets": ((R, L), i32),
    }
    if shapes.loss == "sft":
        columns["loss_weights"] = ((R, L), f32)
        return columns
    columns["completion_mask"] = ((R, L), f32)
    columns["tokens_per_row"] = ((R,), f32)
    if shapes.loss == "ppo":  # PpoSource._columns and _rollouts
        if spec.ppo.sft_warmup_steps:
            columns["sft"] = ((R,), f32)
        for name in ("old_logp", "old_values", "advantages", "returns"):
            columns[name] = ((R, L), f32)
        return columns
    g = spec.grpo_settings  # GrpoSource._finish_batch
    columns["advantages"] = ((R,), f32)
    if g.overlong.mode == "filter":
        columns["sequences_per_row"] = ((R,), f32)
    if g.sft_warmup_steps:
        columns["sft"] = ((R,), f32)
    if g.num_iterations > 1:
        columns["old_logp"] = ((R, L), f32)
    if g.beta > 0:
        columns["ref_logp"] = ((R, L), f32)
    return columns


def _loss_fn(shapes: Shapes, spec: Any) -> Any:
    from posttrain.trainer.algorithms import dpo, grpo, orpo, ppo, sft

    if shapes.loss == "ppo":
        return ppo.make_loss(spec.ppo)
    if shapes.loss == "dpo":
        b = spec.block
        return dpo.make_loss(b.beta, b.loss_type, b.label_smoothing)
    if shapes.loss == "orpo":
        return orpo.make_loss(spec.block.lambda_)
    if shapes.loss in GRPO_FAMILY:
        return grpo.make_loss(spec.grpo_settings, spec.algorithm)
    return sft.loss


def _learning_rates(spec: Any) -> dict[str, float]:
    """Per-head peak learning rates, as the algorithm declares them (they shape the optimizer)."""
    if spec.algorithm == "ppo" and spec.ppo.value_learning_rate:
        return {"value": spec.ppo.value_learning_rate}
    return {}


def _heads(spec: Any, config: Any, dtype: Any, master: Any) -> dict[str, Any]:
    """The algorithm's trainable heads, as the trainer builds them (PPO's critic)."""
    from flax import nnx

    from posttrain.trainer.algorithms import ppo
    from posttrain.trainer.models import create_model

    if spec.algorithm != "ppo":
        return {}
    rngs = nnx.Rngs(2)
    if spec.ppo.critic == "value-head":
        return {ppo.VALUE: ppo.ValueHead(config.hidden_size, rngs=rngs)}
    trunk = create_model(config, rngs=rngs, dtype=dtype, param_dtype=master)  # trained in full
    return {ppo.VALUE: ppo.SeparateCritic(trunk, config.hidden_size, rngs=rngs)}


def _peak_bytes(compiled: Any) -> int:
    memory = compiled.memory_analysis()
    if memory is None:  # a backend without memory analysis
        raise RuntimeError("XLA gave no memory analysis for the compiled program")
    return int(memory.temp_size_in_bytes)


def _as_dtype(tree: Any, dtype: Any) -> Any:
    """Abstract arrays of ``tree`` in ``dtype`` (the reference copy is kept in the compute dtype)."""
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), tree)


def kv_cache_bytes(config: Any, rows: int, slots: int, itemsize: int) -> int:
    """Keys and values of every layer for ``rows`` x ``slots`` cache slots."""
    return 2 * config.num_layers * rows * slots * config.num_kv_heads * config.head_dim * itemsize


def _compile_rollout(
    shapes: Shapes, graphdef: Any, state: Any, state_shardings: Any, mesh: Any, vocab: int
) -> int:
    """XLA's temporaries per device for one rollout (prefill + decode loop) on the sharded
    weights, as the trainer generates: prompts replicated, weights as trained."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from posttrain.trainer.sampling import sampler

    g, R = shapes.sampling, shapes.rollout_rows
    prompt_len = sampler.bucket(shapes.prompt_len, sampler.MIN_PROMPT_BUCKET)
    new_len = sampler.bucket(g.max_new_tokens, sampler.MIN_NEW_TOKENS_BUCKET)
    rep = NamedSharding(mesh, PartitionSpec())
    options = dict(
        new_len=new_len,
        greedy=g.temperature == 0.0,
        top_k=None if g.top_k is None or g.top_k >= vocab else int(g.top_k),
        use_top_p=g.top_p < 1.0,
    )

    def generate(state: Any, *inputs: Any) -> Any:  # the sampler takes the model as a pytree
        return sampler._generate_jit(nnx.merge(graphdef, state), *inputs, **options)

    def scalar(dtype: Any) -> Any:
        return jax.ShapeDtypeStruct((), dtype)

    args = (
        state,
        jax.ShapeDtypeStruct((R, prompt_len), jnp.int32),  # ids
        jax.ShapeDtypeStruct((R, prompt_len), jnp.int32),  # mask
        scalar(jnp.int32),  # max_new
        jax.eval_shape(lambda: jax.random.key(0)),  # key
        scalar(jnp.float32),  # temperature
        scalar(jnp.float32),  # top_p
        jax.ShapeDtypeStruct((1,), jnp.int32),  # eos
        scalar(jnp.int32),  # pad_id
    )
    in_shardings = (state_shardings, *([rep] * (len(args) - 1)))
    compiled = jax.jit(generate, in_shardings=in_shardings).lower(*args).compile()
    return _peak_bytes(compiled)


def plan_job(job: Any, config_json: dict[str, Any], n_devices: int) -> Plan:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from posttrain.trainer import peft
    from posttrain.trainer.loop import model_dtypes, split_trainable
    from posttrain.trainer.loop_optim import optimizer, schedule
    from posttrain.trainer.loop_step import Trainee, batch_sharding, make_train_step, trainee_view
    from posttrain.trainer.models import ModelConfig, create_model, make_mesh, set_remat
    from posttrain.trainer.sampling import sampler

    spec, training = job.spec, job.spec.training
    hbm, peak = CHIPS[spec.resources.accelerator]
    config = ModelConfig.from_hf(config_json)
    dtype, base_dtype, master = model_dtypes(spec.model)
    m = training.mesh
    mesh = make_mesh(m.data, m.fsdp, m.tensor, devices=jax.devices()[:n_devices])
    shapes = job_shapes(spec)

    def build():  # the dtypes of the trainer's build_model: float32 master weights by default
        model = create_model(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=base_dtype)
        peft.apply_peft(
            model, spec.model.lora, spec.model.quantization, rngs=nnx.Rngs(1), param_dtype=master
        )
        set_remat(model, training.remat)
        return Trainee(model, _heads(spec, config, dtype, master))  # split as the trainer does

    abstract = nnx.eval_shape(build)
    graphdef, params, frozen = split_trainable(abstract, spec.model.lora)
    p_sh, f_sh = _state_shardings(params, mesh), _state_shardings(frozen, mesh)
    tx = optimizer(training, _learning_rates(spec))
    opt_abstract = jax.eval_shape(tx.init, params)
    o_sh = _like_params(opt_abstract, params, p_sh, mesh)

    rows, seq = shapes.rows, shapes.seq
    n_policy = sum(x.size for x in jax.tree.leaves(nnx.state(abstract.policy, nnx.Param)))
    n_heads = sum(x.size for x in jax.tree.leaves(nnx.state(abstract.heads, nnx.Param)))
    tokens = rows * seq * (2 if shapes.loss in PAIR_LOSSES else 1)
    # Matmuls: forward 2 FLOPs per weight per token; backward 2 more for activations, and 2 for
    # weight gradients unless frozen (LoRA; heads always train). Causal attention adds
    # 6 x layers x heads x dim x seq (the policy's; a separate critic's is not counted).
    per_weight = 4 if spec.model.lora is not None else 6
    attention = 6 * config.num_layers * config.num_heads * config.head_dim * seq
    flops = (per_weight * n_policy + 6 * n_heads + attention) * tokens

    parameters = _nbytes_per_device(params, p_sh)
    rollout_slots = 0
    if shapes.rollout_rows:
        rollout_slots = sampler.bucket(shapes.prompt_len, sampler.MIN_PROMPT_BUCKET)
        rollout_slots += sampler.bucket(
            shapes.sampling.max_new_tokens, sampler.MIN_NEW_TOKENS_BUCKET
        )
    plan = Plan(
        devices=n_devices,
        hbm_bytes=hbm,
        parameters=parameters,
        frozen=_nbytes_per_device(frozen, f_sh),
        optimizer=_nbytes_per_device(opt_abstract, o_sh),
        activations=None,
        flops_per_step=flops,
        peak_flops=peak,
        loss=shapes.loss,
        # With LoRA the reference is the base with adapters off: no copy.
        reference=_nbytes_per_device(_as_dtype(params["policy"], dtype), p_sh["policy"])
        if shapes.reference and spec.model.lora is None
        else 0,
        kv_cache=kv_cache_bytes(config, shapes.rollout_rows, rollout_slots, dtype.itemsize),
    )
    if not plan.fits:  # the state alone does not fit: no need to compile
        return plan

    micro = training.micro_batch_size or training.batch_size
    num_micro = training.batch_size // micro
    step = make_train_step(
        trainee_view(graphdef), _loss_fn(shapes, spec), tx, schedule(training), num_micro=num_micro
    )
    batch, batch_sh = {}, {}
    for name, (shape, kind) in _train_batch(shapes, spec).items():
        batch_sh[name] = batch_sharding(mesh, len(shape))
        batch[name] = jax.ShapeDtypeStruct(shape, kind, sharding=batch_sh[name])
    compiled = (
        jax.jit(
            step,
            in_shardings=(p_sh, f_sh, o_sh, batch_sh, None),
            out_shardings=(p_sh, o_sh, None),
            donate_argnums=(0, 2),
        )
        .lower(params, frozen, opt_abstract, batch, jax.ShapeDtypeStruct((), jnp.int32))
        .compile()
    )
    plan = Plan(**{**plan.__dict__, "activations": _peak_bytes(compiled)})
    if shapes.rollout_rows:
        whole_graphdef, state = nnx.split(abstract.policy)  # generation: the policy, one piece
        state_sh = _state_shardings(state, mesh)
        rollout = _compile_rollout(shapes, whole_graphdef, state, state_sh, mesh, config.vocab_size)
        plan = Plan(**{**plan.__dict__, "rollout": rollout})
    return plan


def report(job: Any, plan: Plan) -> str:
    r = job.spec.resources
    where = f"{r.accelerator} {r.topology or ''}".strip()
    lines = [f"{job.metadata.name}: {plan.devices} x {where}, per device:"]
    for name, n in plan.consumers().items():
        lines.append(f"  {name:<32} {n / GIB:8.2f} GiB")
    if plan.activations is None:
        lines.append(f"  {'activations/temporaries':<32}   (not compiled: the state alone is over)")
    step_loss = "SFT's loss" if plan.loss == "sft" else f"the {plan.loss} loss"
    step_loss = f"{step_loss} compiled" if plan.activations is not None else "state only"
    lines.append(f"  {'training step':<32} {plan.train_total / GIB:8.2f} GiB ({step_loss})")
    if plan.rollout is not None:
        lines.append(
            f"  {'rollout':<32} {plan.rollout_total / GIB:8.2f} GiB (KV cache of the whole "
            f"rollout batch: {plan.kv_cache / GIB:.2f} GiB over all devices)"
        )
    lines.append(
        f"  {'total (peak)':<32} {plan.total / GIB:8.2f} GiB of {plan.hbm_bytes / GIB:.0f} GiB HBM"
    )
    lines.append(
        f"  step: {plan.flops_per_step:.3g} FLOPs; {plan.step_seconds(1.0):.3g} s at 100% MFU, "
        f"{plan.step_seconds(0.5):.3g} s at 50%"
    )
    if plan.fits:
        lines.append("fits")
    else:
        name, n = max(plan.consumers().items(), key=lambda kv: kv[1])
        lines.append(
            f"does not fit: {plan.total / GIB:.2f} GiB > {plan.hbm_bytes / GIB:.0f} GiB; "
            f"biggest consumer: {name} ({n / GIB:.2f} GiB)"
        )
    return "\n".join(lines)


def _as_dict(plan: Plan) -> dict[str, Any]:
    out = {k: v for k, v in plan.__dict__.items()}
    out.update(
        train_total=plan.train_total,
        rollout_total=plan.rollout_total if plan.rollout is not None else None,
        total=plan.total,
        fits=plan.fits,
    )
    if not plan.fits:
        out["biggest_consumer"] = max(plan.consumers().items(), key=lambda kv: kv[1])[0]
    return out
