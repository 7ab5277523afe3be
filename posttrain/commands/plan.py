"""`posttrain plan FILE`: will this job fit its accelerators, and how fast can a step go?

From the models' config.json alone (no weights), on simulated host devices (one per chip of the
job's slice), it builds the run with the trainer's own setup (``trainer/setup.py``: the
algorithm's declaration, model, heads, split, frozen reference or teacher, optimizer, the jitted
step) under ``eval_shape``, and compiles ahead of time exactly the step the loop runs, on the
batch the algorithm declares; for RL jobs the rollout too. Printed per device: parameters, frozen
parameters, optimizer state, frozen models (a reference copy, a teacher), activations and
temporaries of the step and of the rollout (XLA's memory analysis of each compiled program), the
step's and the rollout's totals and the chip's HBM; then FLOPs per step and the step time at
100% and 50% MFU. Exit 0 when both fit, 2 when not (naming the biggest consumer), 1 when the job
is invalid or cannot be planned (a model without a config.json to read). When the resident
state alone exceeds the chip, it says so without compiling.

An async RL job (spec.rollout.mode async) plans two roles, each on its own devices: the trainer as
above on spec.resources, and one rollout worker on spec.rollout.resources (default: spec.resources)
holding the policy for sampling (base and adapters in the model dtype; no optimizer, gradients or
reference) and the sampler's KV cache for the rollout batch; its sampler is compiled on the
worker's devices. Exit 2 when either role does not fit (naming spec.rollout.resources for the
workers).

Which compiler gives the figures: for a TPU target, libtpu's (the TPU's own compiler, ahead of
time on the CPU host through ``jax.experimental.topologies``, on the devices of the job's
topology) when libtpu is installed (``pip install 'posttrain[tpu-plan]'``); otherwise, and for
GPU and CPU targets, XLA:CPU on simulated host devices, whose temporaries can differ from the
accelerator's. The report and ``--json`` (``compiler``) say which. When the job does not fit,
``plan`` tries a few changes (``spec.training.remat: full``, a smaller
``spec.training.microBatchSize``, more chips), each a compile, and prints those that fit
(``fits_with``); ``--advice 0`` skips them.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.api import JobInvalid, load_documents, parse_job
from posttrain.api import accelerators as acc
from posttrain.api.geometry import check_geometry
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
XLA_CPU = "XLA:CPU"
# Ours -> libtpu's topology prefix ("v5e:2x4"), its chip config (megacore: one device per chip)
# and a TPU_ACCELERATOR_TYPE for libtpu's start-up on a host without a TPU (quiets its warnings).
LIBTPU_TOPOLOGIES: dict[str, tuple[str, str, str]] = {
    "tpu-v4": ("v4", "megacore", "v4-8"),
    "tpu-v5e": ("v5e", "default", "v5litepod-8"),
    "tpu-v5p": ("v5", "megacore", "v5p-8"),
    "tpu-v6e": ("v6e", "default", "v6e-8"),
}
# When a job does not fit: at most this many changes are compiled to find what would fit.
ADVICE_TRIES = 6


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
    p.add_argument(
        "--compiler",
        choices=("auto", "libtpu", "xla-cpu"),
        default="auto",
        help="whose memory figures: libtpu's for TPU targets when installed (auto), or XLA:CPU's "
        "on simulated host devices",
    )
    p.add_argument(
        "--advice",
        type=int,
        default=ADVICE_TRIES,
        metavar="N",
        help="when the job does not fit, compile at most N changes to find what would "
        f"(default {ADVICE_TRIES}; 0: none)",
    )
    p.add_argument(
        "--hbm",
        type=float,
        metavar="GIB",
        help="memory per chip to fit in, GiB (default: the chip's HBM; less to keep headroom)",
    )
    p.set_defaults(func=run)


def libtpu_version() -> str | None:
    """The installed libtpu's version, None when absent (without importing it)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Compiler:
    """Which compiler plans a role: libtpu's for a TPU target when it is installed (``auto``,
    ``libtpu``), on the compile-only devices of the role's topology; else XLA:CPU on the first
    simulated host devices."""

    choice: str = "auto"  # auto | libtpu | xla-cpu

    def uses_libtpu(self, resources: Any) -> bool:
        return (
            self.choice != "xla-cpu"
            and acc.is_tpu(resources.accelerator)
            and libtpu_version() is not None
        )

    def label(self, resources: Any) -> str:
        return f"libtpu {libtpu_version()}" if self.uses_libtpu(resources) else XLA_CPU

    def devices(self, resources: Any, n: int) -> list[Any]:
        if self.uses_libtpu(resources):
            return list(tpu_devices(resources.accelerator, resources.topology, resources.slices))
        import jax

        if len(jax.devices()) < n:
            raise RuntimeError(f"plan needs {n} devices but JAX started with {len(jax.devices())}")
        return jax.devices()[:n]


@functools.cache
def tpu_devices(accelerator: str, topology: str, slices: int = 1) -> tuple[Any, ...]:
    """libtpu's compile-only devices of a TPU slice (as MaxText's train_compile.py): programs
    lowered on a mesh of them compile with the TPU's compiler on this CPU host."""
    prefix, chip_config, accelerator_type = LIBTPU_TOPOLOGIES[accelerator]
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compile-only: no chip is opened, so plans may run side by side (and beside a TPU job)
    # without libtpu's one-process lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    dims = [int(d) for d in topology.split("x")] + [1]
    if topology in acc.TPU_GENERATIONS[accelerator].single_host:
        per_host = (dims[0], dims[1], 1)
    else:
        per_host = (min(2, dims[0]), min(2, dims[1]), 1)
    desc = topologies.get_topology_desc(
        topology_name=f"{prefix}:{topology}",
        platform="tpu",
        chip_config_name=chip_config,
        chips_per_host_bounds=per_host,
        num_slices=slices,
    )
    return tuple(desc.devices)


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
    loss: str = "sft"  # the algorithm whose step was compiled
    reference: int = 0  # per device, a frozen copy of the initial weights (KL, full fine-tuning)
    teacher: int = 0  # per device, a frozen teacher (distillation)
    compile_seconds: float | None = None  # of the train step
    rollout: int | None = None  # per device, the rollout's temporaries (KV cache, logits, loop)
    kv_cache: int = 0  # the whole rollout batch's KV cache, all devices together (for reading)
    kv_cache_per_device: int = 0  # what one device holds: its rows of one generation chunk
    data_parallel: int = 1  # the rollout's data-parallel size (data x fsdp)
    rollout_role: RolloutRolePlan | None = None  # async RL: one rollout worker, on its devices
    compiler: str = XLA_CPU  # whose figures: "libtpu <version>" or "XLA:CPU"
    # libtpu refused to compile the step (or the rollout) for want of HBM; its temporaries are
    # the figure its error gave
    refused: bool = False
    fits_with: tuple[Advice, ...] = ()  # when it does not fit: the changes tried that fit
    advice_tried: tuple[Advice, ...] = ()  # every change compiled for that, in order

    @property
    def resident(self) -> int:
        """Held through the step and the rollout alike."""
        return self.parameters + self.frozen + self.optimizer + self.reference + self.teacher

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
    def trainer_fits(self) -> bool:
        """The trainer's devices (spec.resources) hold its step and its rollout."""
        return self.total <= self.hbm_bytes

    @property
    def fits(self) -> bool:
        """Every role fits: the trainer, and an async job's rollout workers."""
        return self.trainer_fits and (self.rollout_role is None or self.rollout_role.fits)

    def consumers(self) -> dict[str, int]:
        parts = {
            "parameters": self.parameters,
            "frozen parameters": self.frozen,
            "optimizer state": self.optimizer,
        }
        if self.reference:
            parts["reference copy"] = self.reference
        if self.teacher:
            parts["teacher (frozen)"] = self.teacher
        if self.activations is not None:
            parts["activations/temporaries"] = self.activations
        if self.rollout is not None:
            parts["rollout (KV cache, temporaries)"] = self.rollout
        return parts

    def step_seconds(self, mfu: float) -> float:
        return self.flops_per_step / (self.devices * self.peak_flops * mfu)


@dataclass(frozen=True)
class RolloutRolePlan:
    """An async job's rollout worker (each of ``workers`` alike): one host of ``devices`` chips
    holding the policy for sampling and the sampler's KV cache for the rollout batch."""

    workers: int
    resources: str  # the field its devices come from: spec.rollout.resources or spec.resources
    accelerator: str
    topology: str | None
    devices: int  # per worker
    hbm_bytes: float
    weights: int  # per device: the policy (base + adapters) in the model dtype
    rows: int  # the rollout batch's rows, generated by each worker
    kv_cache: int  # the whole rollout batch's KV cache, all the worker's devices together
    kv_cache_per_device: int  # one device's rows of one generation chunk
    data_parallel: int  # the worker's data-parallel size (data x fsdp of its mesh)
    rollout: int | None = None  # per device, the sampler's temporaries; None when not compiled
    compile_seconds: float | None = None  # of the sampler
    compiler: str = XLA_CPU  # whose figures: "libtpu <version>" or "XLA:CPU"

    @property
    def total(self) -> int:
        """Per device: the weights and the sampler's temporaries (the KV cache alone when not
        compiled)."""
        return self.weights + (self.kv_cache_per_device if self.rollout is None else self.rollout)

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm_bytes

    def consumers(self) -> dict[str, int]:
        if self.rollout is None:
            return {"policy weights": self.weights, "KV cache": self.kv_cache_per_device}
        return {"policy weights": self.weights, "rollout (KV cache, temporaries)": self.rollout}


@dataclass(frozen=True)
class Advice:
    """A change to the job (field path -> value) and the trainer's peak per device with it."""

    changes: dict[str, Any]
    total: int  # per device, the trainer's peak (the state alone when that is over)
    devices: int
    fits: bool

    def text(self) -> str:
        what = " and ".join(f"{k}: {v}" for k, v in self.changes.items())
        chips = f"{self.devices} chips, " if any(".resources." in k for k in self.changes) else ""
        return f"{what} ({chips}{self.total / GIB:.2f} GiB per device)"


@dataclass(frozen=True)
class Candidate:
    """A change ``plan`` may try when a job does not fit; ``kind`` groups the alternatives
    (remat, micro-batches, chips): the first that fits of each kind is advised."""

    kind: str
    changes: dict[str, Any] = field(default_factory=dict)
    job: Any = None


def advice_candidates(doc: dict[str, Any], job: Any) -> list[Candidate]:
    """The changes to try, in the order users try them: ``remat: full``; a smaller
    ``microBatchSize`` (half, a quarter; then half with remat); more chips (the next two larger
    topologies of the generation, or 2x and 4x the GPU nodes, each alone then with remat). Only
    those that validate (``parse_job``). Pure: no JAX."""
    spec, out = job.spec, []
    t = spec.training

    def add(kind: str, changes: dict[str, Any]) -> bool:
        changed = copy.deepcopy(doc)
        for path, value in changes.items():
            node = changed
            *parents, leaf = path.split(".")[1:]  # below the document's "spec"
            node = node.setdefault("spec", {})
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        try:
            candidate = parse_job(changed)
            check_geometry(candidate.spec)  # what the trainer would refuse at its first step
        except (JobInvalid, ValueError):
            return False
        out.append(Candidate(kind, changes, candidate))
        return True

    remat = {"spec.training.remat": "full"} if t.remat != "full" else {}
    if remat:
        add("remat", remat)
    micro = t.micro_batch_size or t.batch_size
    smaller = [m for m in (micro // 2, micro // 4) if 1 <= m < micro and t.batch_size % m == 0]
    for m in dict.fromkeys(smaller):
        add("micro-batches", {"spec.training.microBatchSize": m})
    if remat and smaller:
        add("micro-batches", {**remat, "spec.training.microBatchSize": smaller[0]})
    default_mesh = (t.mesh.data, t.mesh.fsdp, t.mesh.tensor) == (1, -1, 1)
    for more in _more_chips(spec.resources):
        if not add("chips", more) and default_mesh:
            # The step's rows do not divide over more data-parallel chips: the new ones split
            # each layer instead (tensor parallelism), the data-parallel size kept.
            fsdp = chip_count(spec.resources)
            more = {**more, "spec.training.mesh.fsdp": fsdp, "spec.training.mesh.tensor": -1}
            if not add("chips", more):
                continue
        if remat:
            add("chips", {**more, **remat})
    return out


def _more_chips(resources: Any) -> list[dict[str, Any]]:
    if acc.is_tpu(resources.accelerator):
        sizes = acc.TPU_GENERATIONS[resources.accelerator].topologies
        bigger = [
            t
            for t in sizes
            if acc.topology_chips(t) > acc.topology_chips(resources.topology or sizes[0])
        ]
        return [{"spec.resources.topology": t} for t in bigger[:2]]
    if acc.is_gpu(resources.accelerator):
        return [{"spec.resources.nodes": resources.nodes * k} for k in (2, 4)]
    return []


def advise(
    plan: Plan,
    candidates: list[Candidate],
    read: Any,
    compiler: Compiler,
    tries: int = ADVICE_TRIES,
) -> Plan:
    """Try ``candidates`` on a plan that does not fit, at most ``tries`` of them compiled, the
    first that fits of each kind kept. When the resident state alone is over, only more chips
    can help. Combined changes (with remat) are tried only when remat alone did not fit."""
    tried: list[Advice] = []
    fitted: dict[str, Advice] = {}
    state_over = plan.activations is None
    for c in candidates:
        if len(tried) >= tries:
            break
        if c.kind in fitted or (state_over and c.kind != "chips"):
            continue
        if len(c.changes) > 1 and "remat" in fitted:
            continue
        try:
            p = plan_job(
                c.job,
                read,
                chip_count(c.job.spec.resources),
                compiler=compiler,
                hbm_bytes=plan.hbm_bytes,
            )
        except (ValueError, RuntimeError):
            continue
        a = Advice(dict(c.changes), p.total, p.devices, p.trainer_fits)
        tried.append(a)
        if a.fits:
            fitted[c.kind] = a
    fits = tuple(a for a in tried if a.fits)
    return Plan(**{**plan.__dict__, "fits_with": fits, "advice_tried": tuple(tried)})


def devices_needed(job: Any) -> int:
    """Simulated devices the plan needs: the trainer's, or an async rollout worker's if more."""
    n = chip_count(job.spec.resources)
    if job.spec.rollout_role.is_async:  # setup.rollout_devices, without importing JAX yet
        n = max(n, chip_count(job.spec.rollout_role.resources or job.spec.resources))
    return n


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
        compiler = Compiler(args.compiler)
        if args.compiler == "libtpu" and not compiler.uses_libtpu(resources):
            raise ValueError(
                f"--compiler libtpu: {resources.accelerator} is not a TPU"
                if not acc.is_tpu(resources.accelerator)
                else "--compiler libtpu: libtpu is not installed (pip install 'posttrain[tpu-plan]')"
            )
        candidates = advice_candidates(docs[0], job) if args.advice > 0 else []
        # before anything imports JAX: the job's devices and those of the changes it may try
        _simulate_devices(max([devices_needed(c.job) for c in candidates] + [devices_needed(job)]))
        read = config_reader(job, args.config)
        read(job.spec.model.base)  # fail early, before compiling, if there is no config
        hbm = args.hbm * GIB if args.hbm is not None else None
        plan = plan_job(job, read, devices, compiler=compiler, hbm_bytes=hbm)
        if not plan.trainer_fits and candidates:
            plan = advise(plan, candidates, read, compiler, args.advice)
    except (OSError, JobInvalid, ValueError) as err:
        print(f"{args.file}: {err}", file=sys.stderr)
        return EXIT_INVALID
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


def _nbytes_per_device(tree: Any) -> int:
    """Bytes per device of abstract arrays that carry their shardings."""
    import jax

    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


# libtpu does not compile a program whose temporaries are over the chip's HBM; its error names them:
# "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries
# (50.74G) exceeds available HBM (15.75G)."
_LIBTPU_OVER = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)i?B?\)")


def _temporaries(lowered: Any, libtpu: bool = False) -> tuple[int, bool]:
    """The compiled program's temporaries per device, and whether the compiler refused it for
    want of memory (libtpu: then its error's figure)."""
    import jax

    try:
        return _peak_bytes(lowered.compile(), libtpu), False
    except jax.errors.JaxRuntimeError as err:
        over = _LIBTPU_OVER.search(str(err))
        if over is None:
            raise
        return int(float(over[1]) * 1024 ** " KMGT".index(over[2] or " ")), True


def _peak_bytes(compiled: Any, libtpu: bool = False) -> int:
    """What the program needs per device beside its arguments (the resident state, counted from
    the shardings). XLA:CPU: its temporaries. libtpu: its peak less the arguments, so also the
    program itself and outputs not written over their inputs (it places small temporaries outside
    HBM and reports them as 0)."""
    memory = compiled.memory_analysis()
    if memory is None:  # a backend without memory analysis
        raise RuntimeError("XLA gave no memory analysis for the compiled program")
    temporaries = int(memory.temp_size_in_bytes)
    peak = getattr(memory, "peak_memory_in_bytes", 0)
    if libtpu and peak:
        return max(temporaries, int(peak - memory.argument_size_in_bytes))
    return temporaries


def kv_cache_bytes(config: Any, rows: int, slots: int, itemsize: int) -> int:
    """Keys and values of every layer for ``rows`` x ``slots`` cache slots."""
    return 2 * config.num_layers * rows * slots * config.num_kv_heads * config.head_dim * itemsize


def _compile_rollout(run: Any, libtpu: bool = False) -> tuple[int, bool]:
    """XLA's temporaries per device for one rollout (prefill + decode loop): the program the
    trainer's sampler runs (``sampler.lower_generate``), rows sharded over the data-parallel
    axes and generated ``generationBatchSize`` at a time, the weights as trained."""
    from flax import nnx

    policy = run.view(run.params, run.frozen, run.extras).policy
    graphdef, state = nnx.split(policy)
    return _compile_sampler(graphdef, state, run.mesh, run.declaration.rollout, run.config, libtpu)


def _compile_sampler(
    graphdef: Any, state: Any, mesh: Any, shape: Any, config: Any, libtpu: bool = False
) -> tuple[int, bool]:
    """XLA's temporaries per device of the sampler's program for the rollout ``shape`` with the
    policy ``state`` (abstract, with its shardings) on ``mesh``."""
    from posttrain.trainer.models import attention_kernels
    from posttrain.trainer.sampling import sampler

    g = shape.sampling
    with attention_kernels.target_backend("tpu" if libtpu else None):  # the TPU's prefill kernel
        lowered = sampler.lower_generate(
            graphdef,
            state,
            jax_tree_shardings(state),
            mesh,
            shape.rows,
            shape.prompt_len,
            g.max_new_tokens,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=None if g.top_p >= 1.0 else g.top_p,
            chunk_rows=g.chunk_rows,
            eos_count=max(1, len(config.eos_token_ids)),
            prompt_group=g.prompt_group,
        )
    return _temporaries(lowered, libtpu)


def jax_tree_shardings(tree: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: x.sharding, tree)


def rollout_rows_per_device(rows: int, mesh: Any, chunk_rows: int | None) -> int:
    """Rows whose KV cache one device holds at a time: a chunk's share of the data-parallel
    devices (the whole rollout batch's share without chunking)."""
    from posttrain.trainer.sampling import sampler

    dp = sampler.data_parallel_size(mesh)
    _, chunk = sampler.row_layout(rows, dp, chunk_rows)
    return chunk // dp


def config_reader(job: Any, override: str | None) -> Any:
    """spec.model.base / a teacher -> ModelConfig from config.json (--config for the policy)."""
    from posttrain.trainer.models import ModelConfig

    def read(ref: str) -> Any:
        chosen = override if ref == job.spec.model.base else None
        return ModelConfig.from_hf(model_config_json(ref, chosen))

    return read


def plan_job(
    job: Any,
    config_json: dict[str, Any] | Any,
    n_devices: int,
    *,
    state_only: bool = False,
    compiler: Compiler | None = None,
    hbm_bytes: float | None = None,
) -> Plan:
    """Build the job's run abstractly with the trainer's setup and compile its step (and rollout).
    ``config_json``: the policy's config.json dict, or a reader ref -> ModelConfig. With
    ``state_only`` (or when the state alone does not fit) nothing is compiled: the resident state
    per device (parameters, optimizer, frozen models), ``activations`` and ``rollout`` None.
    ``compiler`` (default ``Compiler()``: libtpu's for a TPU target when installed) gives the
    devices and so the compiler; ``hbm_bytes`` replaces the chip's HBM (``--hbm``)."""
    import time

    import jax
    from flax import nnx

    from posttrain.trainer.models import ModelConfig, attention_kernels
    from posttrain.trainer.sampling import sampler
    from posttrain.trainer.setup import Abstract, build_run

    spec = job.spec
    compiler = compiler or Compiler()
    hbm, peak = CHIPS[spec.resources.accelerator]
    hbm = hbm_bytes if hbm_bytes is not None else hbm
    if isinstance(config_json, dict):
        policy_config, fallback = ModelConfig.from_hf(config_json), config_reader(job, None)
        read = lambda ref: policy_config if ref == spec.model.base else fallback(ref)  # noqa: E731
    else:
        read = config_json
    devices = compiler.devices(spec.resources, n_devices)
    n_devices = len(devices)
    run = build_run(job, abstract=Abstract(read, devices))
    d, config = run.declaration, run.config
    dtype = jax.numpy.dtype(spec.model.dtype)

    policy = nnx.state(run.view(run.params, run.frozen, run.extras).policy, nnx.Param)
    n_policy = sum(x.size for x in jax.tree.leaves(policy))
    heads = run.params["heads"] if "heads" in run.params else {}
    n_heads = sum(x.size for x in jax.tree.leaves(heads))
    columns = dict(d.columns)
    rows_shape = columns["input_ids"][0]
    tokens = math.prod(rows_shape)
    seq = rows_shape[-1]
    # Matmuls: forward 2 FLOPs per weight per token; backward 2 more for activations, and 2 for
    # weight gradients unless frozen (LoRA; heads always train). Causal attention adds
    # 6 x layers x heads x dim x seq (the policy's). A teacher's forward adds 2 per weight.
    per_weight = 4 if spec.model.lora is not None else 6
    attention = 6 * config.num_layers * config.num_heads * config.head_dim * seq
    teacher = run.extras.get("teacher")
    n_teacher = sum(x.size for x in jax.tree.leaves(teacher)) if teacher is not None else 0
    flops = (per_weight * n_policy + 6 * n_heads + 2 * n_teacher + attention) * tokens

    rollout_slots = rollout_rows = device_rows = 0
    if d.rollout is not None:
        rollout_rows = d.rollout.rows
        device_rows = _device_rows(spec, d.rollout, run.mesh)
        rollout_slots = _cache_slots(d.rollout)
    plan = Plan(
        devices=n_devices,
        hbm_bytes=hbm,
        parameters=_nbytes_per_device(run.params),
        frozen=_nbytes_per_device(run.frozen),
        optimizer=_nbytes_per_device(run.opt_state),
        activations=None,
        flops_per_step=flops,
        peak_flops=peak,
        loss=spec.algorithm,
        # With LoRA the reference is the base with adapters off: adapters only.
        reference=_nbytes_per_device(run.extras["reference"]) if d.reference else 0,
        teacher=_nbytes_per_device(teacher) if teacher is not None else 0,
        kv_cache=kv_cache_bytes(config, rollout_rows, rollout_slots, dtype.itemsize),
        kv_cache_per_device=kv_cache_bytes(config, device_rows, rollout_slots, dtype.itemsize),
        data_parallel=sampler.data_parallel_size(run.mesh),
        compiler=compiler.label(spec.resources),
    )
    if spec.rollout_role.is_async and d.rollout is not None:
        role = plan_rollout_role(job, read, d.rollout, state_only=state_only, compiler=compiler)
        plan = Plan(**{**plan.__dict__, "rollout_role": role})
    if state_only or not plan.trainer_fits:  # the state alone does not fit: no need to compile
        return plan
    started = time.perf_counter()
    libtpu = compiler.uses_libtpu(spec.resources)
    # libtpu compiles the step as a TPU runs it: the TPU's attention kernels, traced on this host.
    with attention_kernels.target_backend("tpu" if libtpu else None):
        lowered_step = run.lower_step()
    activations, refused = _temporaries(lowered_step, libtpu)
    plan = Plan(
        **{
            **plan.__dict__,
            "activations": activations,
            "compile_seconds": time.perf_counter() - started,
            "refused": refused,
        }
    )
    if d.rollout is not None:
        rollout, over = _compile_rollout(run, libtpu)
        plan = Plan(**{**plan.__dict__, "rollout": rollout, "refused": refused or over})
    return plan


def _cache_slots(shape: Any) -> int:
    """KV-cache slots per row: the prompt and the new tokens, each rounded up to the sampler's
    buckets (as ``sampler.generate`` does)."""
    from posttrain.trainer.sampling import sampler

    slots = sampler.bucket(shape.prompt_len, sampler.MIN_PROMPT_BUCKET)
    return slots + sampler.bucket(shape.sampling.max_new_tokens, sampler.MIN_NEW_TOKENS_BUCKET)


def _device_rows(spec: Any, shape: Any, mesh: Any, where: str = "") -> int:
    try:
        return rollout_rows_per_device(shape.rows, mesh, shape.sampling.chunk_rows)
    except ValueError as err:
        raise ValueError(f"spec.{_block(spec)}.generationBatchSize: {err}{where}") from None


def plan_rollout_role(
    job: Any, read: Any, shape: Any, *, state_only: bool = False, compiler: Compiler | None = None
) -> RolloutRolePlan:
    """An async job's rollout worker on its own devices (the first of the simulated ones): its
    policy built abstractly by the trainer's setup (``build_rollout_policy``: base and adapters
    in the model dtype, on the worker's mesh), the KV cache of the declared rollout batch as the
    sampler splits it over the worker's data-parallel devices, ``generationBatchSize`` rows at a
    time, and the sampler's program compiled there (not with ``state_only``, nor when the weights
    and the KV cache alone are over the chip)."""
    import time

    import jax

    from posttrain.trainer.sampling import sampler
    from posttrain.trainer.setup import Abstract, build_rollout_policy, rollout_devices

    spec = job.spec
    compiler = compiler or Compiler()
    resources = rollout_devices(job)
    field = "spec.rollout.resources" if spec.rollout_role.resources else "spec.resources"
    if resources.accelerator not in CHIPS:
        raise ValueError(f"{field}.accelerator: no HBM figure for {resources.accelerator}")
    devices = compiler.devices(resources, chip_count(resources))
    n = len(devices)
    policy = build_rollout_policy(job, abstract=Abstract(read, devices))
    itemsize = jax.numpy.dtype(spec.model.dtype).itemsize
    slots = _cache_slots(shape)
    rows = _device_rows(spec, shape, policy.mesh, f" (a rollout worker's devices, {field})")
    role = RolloutRolePlan(
        workers=spec.rollout_role.workers,
        resources=field,
        accelerator=resources.accelerator,
        topology=resources.topology,
        devices=n,
        hbm_bytes=CHIPS[resources.accelerator][0],
        weights=_nbytes_per_device(policy.state),
        rows=shape.rows,
        kv_cache=kv_cache_bytes(policy.config, shape.rows, slots, itemsize),
        kv_cache_per_device=kv_cache_bytes(policy.config, rows, slots, itemsize),
        data_parallel=sampler.data_parallel_size(policy.mesh),
        compiler=compiler.label(resources),
    )
    if state_only or not role.fits:
        return role
    started = time.perf_counter()
    temporaries, _ = _compile_sampler(
        policy.graphdef,
        policy.state,
        policy.mesh,
        shape,
        policy.config,
        compiler.uses_libtpu(resources),
    )
    return RolloutRolePlan(
        **{
            **role.__dict__,
            "rollout": temporaries,
            "compile_seconds": time.perf_counter() - started,
        }
    )


def _block(spec: Any) -> str:
    from posttrain.api.algorithms import REGISTRY

    return REGISTRY[spec.algorithm].block


def report(job: Any, plan: Plan) -> str:
    r = job.spec.resources
    where = f"{r.accelerator} {r.topology or ''}".strip()
    lines = [f"{job.metadata.name}: {plan.devices} x {where}, per device:"]
    lines.append(f"  (figures from {_compiler_words(plan.compiler, r.accelerator)})")
    for name, n in plan.consumers().items():
        lines.append(f"  {name:<32} {n / GIB:8.2f} GiB")
    if plan.activations is None:
        why = ": the state alone is over" if not plan.fits else ", state only"
        lines.append(f"  {'activations/temporaries':<32}   (not compiled{why})")
    how = "refused by libtpu, over HBM," if plan.refused else "compiled"
    step_loss = (
        f"{plan.loss}'s step {how} in {plan.compile_seconds:.1f} s"
        if plan.activations is not None and plan.compile_seconds is not None
        else "state only"
    )
    lines.append(f"  {'training step':<32} {plan.train_total / GIB:8.2f} GiB ({step_loss})")
    if plan.rollout is not None:
        lines.append(
            f"  {'rollout':<32} {plan.rollout_total / GIB:8.2f} GiB (KV cache per device "
            f"{plan.kv_cache_per_device / GIB:.2f} GiB; the whole rollout batch's "
            f"{plan.kv_cache / GIB:.2f} GiB over data-parallel size {plan.data_parallel})"
        )
    lines.append(
        f"  {'total (peak)':<32} {plan.total / GIB:8.2f} GiB of {plan.hbm_bytes / GIB:g} GiB HBM"
    )
    lines.append(
        f"  step: {plan.flops_per_step:.3g} FLOPs; {plan.step_seconds(1.0):.3g} s at 100% MFU, "
        f"{plan.step_seconds(0.5):.3g} s at 50%"
    )
    role = plan.rollout_role
    if role is not None:
        lines += _role_lines(role, plan.compiler)
    compiled = plan.activations is not None and (role is None or role.rollout is not None)
    if plan.fits and not compiled:  # plan_job(state_only=True)
        lines.append("the state fits; the step was not compiled, so no verdict")
    elif plan.fits:
        lines.append("fits")
    if not plan.trainer_fits:
        name, n = _biggest(plan.consumers())
        lines.append(
            f"does not fit: {plan.total / GIB:.2f} GiB > {plan.hbm_bytes / GIB:g} GiB; "
            f"biggest consumer: {name} ({n / GIB:.2f} GiB)"
        )
    if not plan.trainer_fits and plan.fits_with:
        lines.append("would fit with: " + "; ".join(a.text() for a in plan.fits_with))
    elif not plan.trainer_fits and plan.advice_tried:
        tried = "; ".join(a.text() for a in plan.advice_tried)
        lines.append(f"no change tried fits: {tried}")
    if role is not None and not role.fits:
        name, n = _biggest(role.consumers())
        lines.append(
            f"does not fit: {role.resources} ({_where(role)}): a rollout worker needs "
            f"{role.total / GIB:.2f} GiB per device > {role.hbm_bytes / GIB:g} GiB; "
            f"biggest consumer: {name} ({n / GIB:.2f} GiB)"
        )
    return "\n".join(lines)


def _compiler_words(compiler: str, accelerator: str) -> str:
    if compiler != XLA_CPU:
        return f"{compiler}, the TPU's compiler, on the slice's topology"
    if acc.is_tpu(accelerator):
        why = "libtpu is not installed: pip install 'posttrain[tpu-plan]' for the TPU's figures"
        if libtpu_version() is not None:
            why = "--compiler xla-cpu"
        return f"XLA:CPU on simulated host devices, not the TPU's compiler ({why})"
    return "XLA:CPU on simulated host devices, not the accelerator's compiler"


def _where(role: RolloutRolePlan) -> str:
    return f"{role.accelerator} {role.topology or ''}".strip()


def _biggest(consumers: dict[str, int]) -> tuple[str, int]:
    return max(consumers.items(), key=lambda kv: kv[1])


def _role_lines(role: RolloutRolePlan, trainer_compiler: str) -> list[str]:
    workers = f"{role.workers} worker{'s' if role.workers != 1 else ''}"
    lines = [
        f"rollout role: {workers}, each {role.devices} x {_where(role)} ({role.resources}), "
        "per device:",
        f"  {'policy weights (sampling)':<32} {role.weights / GIB:8.2f} GiB",
    ]
    if role.compiler != trainer_compiler:
        lines.insert(1, f"  (figures from {_compiler_words(role.compiler, role.accelerator)})")
    kv = (
        f"KV cache per device {role.kv_cache_per_device / GIB:.2f} GiB; the rollout batch's "
        f"{role.rows} rows {role.kv_cache / GIB:.2f} GiB over data-parallel size "
        f"{role.data_parallel}"
    )
    if role.rollout is None:
        lines.append(f"  {'KV cache':<32} {role.kv_cache_per_device / GIB:8.2f} GiB (not compiled)")
    else:
        lines.append(
            f"  {'rollout (KV cache, temporaries)':<32} {role.rollout / GIB:8.2f} GiB "
            f"(sampler compiled in {role.compile_seconds or 0:.1f} s)"
        )
    lines.append(f"  ({kv})")
    lines.append(
        f"  {'total (peak)':<32} {role.total / GIB:8.2f} GiB of {role.hbm_bytes / GIB:g} GiB HBM"
    )
    return lines


def _as_dict(plan: Plan) -> dict[str, Any]:
    skip = ("rollout_role", "fits_with", "advice_tried")
    out = {k: v for k, v in plan.__dict__.items() if k not in skip}
    # When it does not fit: the changes that would make it fit, and all those tried.
    out["fits_with"] = [a.__dict__ for a in plan.fits_with]
    out["advice_tried"] = [a.__dict__ for a in plan.advice_tried]
    out.update(
        train_total=plan.train_total,
        rollout_total=plan.rollout_total if plan.rollout is not None else None,
        total=plan.total,
        fits=plan.fits,
    )
    role = plan.rollout_role
    if not plan.fits:  # the trainer's when it is over, else the rollout workers'
        over = role if plan.trainer_fits and role is not None else plan
        out["biggest_consumer"] = _biggest(over.consumers())[0]
    if role is not None:  # async RL only: a sync plan has no such key
        out["rollout_role"] = {
            **role.__dict__,
            "total": role.total,
            "fits": role.fits,
            **({} if role.fits else {"biggest_consumer": _biggest(role.consumers())[0]}),
        }
    return out
