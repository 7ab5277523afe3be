"""`posttrain plan FILE`: will this job fit its accelerators, and how fast can a step go?

From the model's config.json alone (no weights), on simulated host devices (one per chip of the
job's slice), it builds the model abstractly, shards it over the job's mesh, and compiles the
training step ahead of time for the job's shapes. Printed per device: parameters, optimizer
state, activations and temporaries (XLA's memory analysis of the compiled step), the total and
the chip's HBM; then FLOPs per step and the step time at 100% and 50% MFU. Exit 0 when it fits,
2 when it does not (naming the biggest consumer), 1 when the job is invalid.

The step compiled is the SFT step (next-token loss over ``batchSize`` rows of ``maxLength``
tokens; RL jobs: ``batchSize x numGenerations`` rows), which bounds what an RL loss adds on top.
The rollout (generation) is not compiled yet. When parameters and optimizer state alone exceed
the chip, it says so without compiling.
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
    activations: int | None  # per device, XLA temporaries; None when not compiled
    flops_per_step: float
    peak_flops: float

    @property
    def total(self) -> int:
        return self.parameters + self.frozen + self.optimizer + (self.activations or 0)

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm_bytes

    def consumers(self) -> dict[str, int]:
        parts = {
            "parameters": self.parameters,
            "frozen parameters": self.frozen,
            "optimizer state": self.optimizer,
        }
        if self.activations is not None:
            parts["activations/temporaries"] = self.activations
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


def plan_job(job: Any, config_json: dict[str, Any], n_devices: int) -> Plan:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from posttrain.trainer import peft
    from posttrain.trainer.algorithms import sft
    from posttrain.trainer.loop_optim import optimizer, schedule
    from posttrain.trainer.loop_step import batch_sharding, make_train_step, policy_view
    from posttrain.trainer.models import ModelConfig, create_model, make_mesh, set_remat

    spec, training = job.spec, job.spec.training
    hbm, peak = CHIPS[spec.resources.accelerator]
    config = ModelConfig.from_hf(config_json)
    dtype = jnp.dtype(spec.model.dtype)
    m = training.mesh
    mesh = make_mesh(m.data, m.fsdp, m.tensor, devices=jax.devices()[:n_devices])

    def build():
        model = create_model(config, rngs=nnx.Rngs(0), dtype=dtype)
        peft.apply_peft(model, spec.model.lora, spec.model.quantization, rngs=nnx.Rngs(1))
        set_remat(model, training.remat)
        return model

    abstract = nnx.eval_shape(build)
    graphdef, params, *rest = nnx.split(abstract, peft.trainable_filter(spec.model.lora), ...)
    (frozen,) = rest
    p_sh, f_sh = _state_shardings(params, mesh), _state_shardings(frozen, mesh)
    tx = optimizer(training)
    opt_abstract = jax.eval_shape(tx.init, params)
    o_sh = _like_params(opt_abstract, params, p_sh, mesh)

    rows = training.batch_size * (spec.grpo.num_generations if spec.grpo is not None else 1)
    seq = spec.data.max_length
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    tokens = rows * seq
    # Matmuls: forward 2 FLOPs per weight per token; backward 2 more for activations, and 2 for
    # weight gradients unless frozen (LoRA). Causal attention adds 6 x layers x heads x dim x seq.
    per_weight = 4 if spec.model.lora is not None else 6
    attention = 6 * config.num_layers * config.num_heads * config.head_dim * seq
    flops = (per_weight * n_params + attention) * tokens

    plan = Plan(
        devices=n_devices,
        hbm_bytes=hbm,
        parameters=_nbytes_per_device(params, p_sh),
        frozen=_nbytes_per_device(frozen, f_sh),
        optimizer=_nbytes_per_device(opt_abstract, o_sh),
        activations=None,
        flops_per_step=flops,
        peak_flops=peak,
    )
    if not plan.fits:  # the state alone does not fit: no need to compile
        return plan

    micro = training.micro_batch_size or training.batch_size
    num_micro = training.batch_size // micro
    step = make_train_step(
        policy_view(graphdef), sft.loss, tx, schedule(training), num_micro=num_micro
    )
    row_sharding = batch_sharding(mesh, 2)
    batch = {
        name: jax.ShapeDtypeStruct((rows, seq), kind, sharding=row_sharding)
        for name, kind in (
            ("input_ids", jnp.int32),
            ("attention_mask", jnp.int32),
            ("targets", jnp.int32),
            ("loss_weights", jnp.float32),
        )
    }
    compiled = (
        jax.jit(
            step,
            in_shardings=(p_sh, f_sh, o_sh, row_sharding, None),
            out_shardings=(p_sh, o_sh, None),
            donate_argnums=(0, 2),
        )
        .lower(params, frozen, opt_abstract, batch, jax.ShapeDtypeStruct((), jnp.int32))
        .compile()
    )
    memory = compiled.memory_analysis()
    if memory is None:  # a backend without memory analysis
        raise RuntimeError("XLA gave no memory analysis for the compiled step")
    return Plan(**{**plan.__dict__, "activations": int(memory.temp_size_in_bytes)})


def report(job: Any, plan: Plan) -> str:
    r = job.spec.resources
    where = f"{r.accelerator} {r.topology or ''}".strip()
    lines = [f"{job.metadata.name}: {plan.devices} x {where}, per device:"]
    for name, n in plan.consumers().items():
        lines.append(f"  {name:<24} {n / GIB:8.2f} GiB")
    if plan.activations is None:
        lines.append(f"  {'activations/temporaries':<24}   (not compiled: the state alone is over)")
    lines.append(
        f"  {'total':<24} {plan.total / GIB:8.2f} GiB of {plan.hbm_bytes / GIB:.0f} GiB HBM"
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
    out.update(total=plan.total, fits=plan.fits)
    if not plan.fits:
        out["biggest_consumer"] = max(plan.consumers().items(), key=lambda kv: kv[1])[0]
    return out
