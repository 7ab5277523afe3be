"""The one training loop every algorithm shares (read top to bottom, like nanoGPT's train.py).

    setup: mesh -> tokenizer -> model (+ LoRA/QLoRA) -> algorithm (loss, batch source, heads,
           frozen models it declares) -> split trainable/frozen -> reference/teacher -> optimizer
           (parameter groups) -> restore the latest checkpoint, if any
    loop:  eval (at step 0 when starting fresh, then every evalEverySteps) -> batch -> jitted step
           -> log -> checkpoint -> preempted?
    end:   final checkpoint -> export DIR/final (LoRA merged) -> the algorithm's finish report

``rank0`` gates side effects that must happen once (metrics, progress, logs); checkpoints and the
export are collective (every process calls them, orbax and save_pretrained decide who writes).
Steps count finished optimizer updates: the checkpoint and metrics record at step N are taken
after N updates, and a resumed run starts with update N + 1.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from posttrain.api.v1alpha1 import ModelSpec, OutputSpec, PostTrainJob
from posttrain.trainer import algorithms, peft, storage
from posttrain.trainer.algorithms.base import Algorithm, Context, ForwardFn
from posttrain.trainer.checkpoint import Checkpointer, checkpoint_dir
from posttrain.trainer.loop_optim import optimizer, schedule
from posttrain.trainer.loop_step import (
    Trainee,
    device_batch,
    make_eval_step,
    make_train_step,
    trainee_view,
)
from posttrain.trainer.metrics import MetricsWriter

if TYPE_CHECKING:
    from posttrain.trainer.models import CausalLM

log = logging.getLogger(__name__)

BUILTIN = "builtin:"


@dataclass
class RunResult:
    step: int  # optimizer steps finished
    preempted: bool = False
    final: dict[str, float] = field(default_factory=dict)
    export_dir: str | None = None


# --------------------------------------------------------------------------- setup helpers


def make_mesh(job: PostTrainJob) -> Mesh:
    from posttrain.trainer.models import make_mesh as models_make_mesh

    m = job.spec.training.mesh
    try:
        return models_make_mesh(m.data, m.fsdp, m.tensor)
    except ValueError as err:
        raise ValueError(f"spec.training.mesh: {err} ({jax.device_count()} devices)") from None


def load_tokenizer(model: ModelSpec) -> Any:
    """The built-in character tokenizer for ``builtin:`` models, else the HF tokenizer beside the
    weights (or at ``spec.model.tokenizer``), both seen through ``data/text.py``'s interface."""
    if model.base.startswith(BUILTIN) and model.tokenizer is None:
        from posttrain.trainer.tasks.chars import CharTokenizer

        return CharTokenizer()
    from posttrain.trainer.data.text import HfTokenizer

    return HfTokenizer(model.tokenizer or model.base)


def build_model(model: ModelSpec, tokenizer: Any, mesh: Mesh, seed: int) -> CausalLM:
    """The base model (built-in or loaded), with LoRA/QLoRA applied, every array on ``mesh``.

    Mixed precision (MaxText, Tunix): the model computes in ``model.dtype``; what trains (every
    weight, or the adapters) is stored in ``model.paramDtype`` (float32 master weights, so the
    optimizer state is float32 too). A frozen LoRA base is only read: it is stored in the compute
    dtype, which halves its memory in bfloat16 and changes no result.
    """
    from posttrain.trainer import models

    dtype, base_dtype, master = model_dtypes(model)
    if model.base.startswith(BUILTIN):
        name = model.base[len(BUILTIN) :]
        config = models.builtin_config(
            name,
            vocab_size=tokenizer.vocab_size,
            bos_token_id=getattr(tokenizer, "bos_token_id", None),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        net = models.create_model(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=base_dtype)
    else:
        net = models.load_pretrained(model.base, dtype=dtype, param_dtype=base_dtype, mesh=mesh)
    peft.apply_peft(
        net, model.lora, model.quantization, rngs=nnx.Rngs(seed + 1), param_dtype=master
    )
    place_on_mesh(net, mesh)
    return net


def model_dtypes(model: ModelSpec) -> tuple[Any, Any, Any]:
    """(compute, base weights, trained weights) dtypes: see ``build_model``."""
    dtype, master = jnp.dtype(model.dtype), jnp.dtype(model.param_dtype)
    return dtype, (dtype if model.lora is not None else master), master


def place_on_mesh(model: nnx.Module, mesh: Mesh) -> None:
    """Put every variable on the mesh: by its ``logical_axes`` where it has them, else replicated."""
    from posttrain.trainer.models import logical_to_spec

    state = nnx.state(model)

    def put(var: nnx.Variable) -> nnx.Variable:
        axes = var.get_metadata().get("logical_axes")
        spec = logical_to_spec(axes, var.shape, mesh) if axes else PartitionSpec()
        sharding = NamedSharding(mesh, spec)
        value = var.get_value()
        if value.sharding == sharding:
            return var
        source = value

        def shard(index: Any) -> np.ndarray:  # a tuple of slices, one per axis
            return np.asarray(source[index])

        return var.replace(jax.make_array_from_callback(var.shape, sharding, shard))

    nnx.update(model, jax.tree.map(put, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def split_trainable(trainee: nnx.Module, lora: Any) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, what trains, the rest): all Params, or with LoRA/QLoRA only the adapters; the
    algorithm's heads train in every mode."""
    wrt = nnx.Any(peft.trainable_filter(lora), nnx.All(nnx.PathContains("heads"), nnx.Param))
    # Two filters give exactly two states; flax types the tail as variadic: unpack in two steps.
    graphdef, params, *others = nnx.split(trainee, wrt, ...)
    (frozen,) = others
    return graphdef, params, frozen


def _tokens_in(batch: Mapping[str, np.ndarray]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else 0


# --------------------------------------------------------------------------- the loop


def train(
    job: PostTrainJob,
    output_dir: str,
    *,
    say: Callable[[str], None] = print,
    progress_bar: bool | None = None,
    reporter: Any = None,
    stop_after: int | None = None,
) -> RunResult:
    """Run ``job`` to the end (or until preempted) with outputs under ``output_dir``.

    ``stop_after`` (tests) ends the run after that many steps as a preemption would: checkpoint,
    then return with ``preempted`` set.
    """
    spec = job.spec
    training = spec.training
    algorithm_module = algorithms.load(spec.algorithm)
    rank0 = jax.process_index() == 0
    say = say if rank0 else (lambda _msg: None)

    # -- setup --------------------------------------------------------------------------------
    mesh = make_mesh(job)
    rows_axis = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = training.micro_batch_size or training.batch_size
    num_micro = training.batch_size // micro
    tokenizer = load_tokenizer(spec.model)
    model = build_model(spec.model, tokenizer, mesh, training.seed)
    from posttrain.trainer.models import set_remat

    set_remat(model, training.remat)  # in the graphdef: the jitted step rematerialises

    # The algorithm is built before the split: it may bring heads and declare frozen models.
    # Its hooks (ctx.model, ctx.forward) read the live weights bound below.
    ctx = Context(
        job=job,
        tokenizer=tokenizer,
        output_dir=output_dir,
        config=model.config,
        rngs=nnx.Rngs(training.seed + 2),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        model=lambda: view(params, frozen, extras).policy,
        forward=lambda fn: host_forward(fn),
        log=say,
    )
    algo: Algorithm = algorithm_module.build(ctx)

    trainee = Trainee(model, algo.heads)
    place_on_mesh(trainee, mesh)
    graphdef, params, frozen = split_trainable(trainee, spec.model.lora)
    del model, trainee  # from here on the arrays live in params / frozen / extras
    # Frozen models, only those the algorithm declared. The reference is the policy's part of
    # the trainable tree only (heads, e.g. a separate critic, need no frozen copy): with LoRA the
    # base (adapters zeroed, no copy of the weights); otherwise a copy of the initial weights.
    extras: dict[str, Any] = {}
    if algo.reference:
        compute = jnp.dtype(spec.model.dtype)  # frozen: no master copy needed
        extras["reference"] = jax.tree.map(
            jnp.zeros_like
            if spec.model.lora is not None
            else lambda x: jnp.array(x, dtype=compute, copy=True),  # never aliases donated params
            params["policy"],
        )
    teacher_graphdef = None
    if algo.teacher is not None:
        teacher = build_model(algo.teacher, tokenizer, mesh, training.seed)
        teacher_graphdef, extras["teacher"] = nnx.split(teacher)
        del teacher
    view = trainee_view(graphdef, teacher_graphdef)

    tx = optimizer(training, algo.learning_rates)
    lr = schedule(training)
    opt_state = _replicate_strays(jax.jit(tx.init)(params), mesh)
    frozen_counts = ", ".join(f"{k} {_count(v):,}" for k, v in extras.items() if k != "reference")
    say(
        f"{spec.algorithm}: mesh {dict(mesh.shape)}, {_count(params):,} trainable / "
        f"{_count(params) + _count(frozen):,} parameters"
        + (f" (heads: {', '.join(algo.heads)})" if algo.heads else "")
        + (", reference kept" if algo.reference else "")
        + (f", frozen {frozen_counts}" if frozen_counts else "")
        + f", batch {training.batch_size} ({num_micro} x {micro}), {training.steps} steps"
    )

    forwards: dict[int, Any] = {}

    def host_forward(fn: ForwardFn) -> Callable[[Mapping[str, np.ndarray]], Any]:
        """``fn(models, batch)`` jitted once, run on the live weights outside the gradient."""
        if id(fn) not in forwards:
            forwards[id(fn)] = (fn, jax.jit(lambda p, f, e, b: fn(view(p, f, e), b)))
        jitted = forwards[id(fn)][1]

        def run(batch: Mapping[str, np.ndarray]) -> Any:
            out = jitted(params, frozen, extras, device_batch(batch, mesh))
            return jax.tree.map(_gather, out)

        return run

    ckpt = Checkpointer(checkpoint_dir(training.checkpoint, output_dir), training.checkpoint)
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(latest, {"params": params, "opt_state": opt_state})
        params, opt_state = state["params"], state["opt_state"]
        algo.source.restore(meta["data"])
        start = int(meta["step"])
        say(f"resumed from checkpoint step {start} in {ckpt.directory}")

    metrics = MetricsWriter(
        output_dir,
        total_steps=training.steps,
        start_step=start,
        enabled=rank0,
        progress_bar=progress_bar,
        reporter=reporter,
    )
    # Outputs keep the inputs' shardings, so the second step does not recompile for new layouts.
    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    replicated = NamedSharding(mesh, PartitionSpec())
    train_step = jax.jit(
        make_train_step(view, algo.loss, tx, lr, num_micro=num_micro),
        out_shardings=(shardings(params), shardings(opt_state), replicated),
        donate_argnums=(0, 2),
    )
    eval_step = jax.jit(make_eval_step(view, algo.loss))

    def save(step: int) -> None:
        ckpt.save(
            step,
            {"params": params, "opt_state": opt_state},
            {"step": step, "data": algo.source.state()},
        )
        if reporter is not None and hasattr(reporter, "checkpointed"):
            reporter.checkpointed(step)  # status.progress.lastCheckpointStep

    def evaluate() -> dict[str, float]:
        if algo.eval_batches is None:
            return {}
        sums: dict[str, float] = {}
        n = 0
        for batch in algo.eval_batches():
            out = jax.device_get(eval_step(params, frozen, device_batch(batch, mesh), extras))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        return {f"eval_{k}": v / max(n, 1) for k, v in sums.items()}

    preempted = _PreemptionFlag()
    step = start
    last = time.perf_counter()
    tokens_since = 0
    try:
        if start == 0 and algo.eval_batches is not None:
            metrics.log(0, evaluate())  # the baseline, before the first update
        # -- the loop ------------------------------------------------------------------------
        while step < training.steps:
            host = algo.source.next_batch(step)
            _check_rows(host, training.batch_size, num_micro, rows_axis)
            tokens_since += _tokens_in(host)
            batch = device_batch(host, mesh)
            params, opt_state, out = train_step(
                params, frozen, opt_state, batch, jnp.int32(step), extras
            )
            step += 1
            eval_metrics = {}
            if (
                training.eval_every_steps
                and step % training.eval_every_steps == 0
                and step < training.steps
            ):
                eval_metrics = evaluate()  # the final evaluation comes after the loop
            if step % training.log_every_steps == 0 or step == training.steps or eval_metrics:
                values = {k: float(v) for k, v in jax.device_get(out).items()}
                if not math.isfinite(values["loss"]):
                    raise FloatingPointError(f"loss is {values['loss']} at step {step}; stopping")
                now = time.perf_counter()
                values["tokens_per_second"] = tokens_since / max(now - last, 1e-9)
                last, tokens_since = now, 0
                record = metrics.log(step, {**values, **eval_metrics})
                metrics.advance(step, f"loss {record['loss']:.4f}")
            stopping = (stop_after is not None and step - start >= stop_after) or preempted.reached(
                step
            )
            if step % training.checkpoint.every_steps == 0 or step == training.steps or stopping:
                save(step)
            if stopping and step < training.steps:
                ckpt.wait()
                say(
                    f"stopping at step {step}: checkpoint saved; run again with the same output to continue"
                )
                return RunResult(step=step, preempted=True)
        # -- the end -----------------------------------------------------------------------------
        ckpt.wait()
        final = evaluate() if algo.eval_batches is not None else {}
        model = view(params, frozen, extras).policy
        export_dir = None
        if spec.output.export:
            export_dir = storage.join(output_dir, "final")
            export(model, tokenizer, export_dir, dtype=export_dtype(spec.model, spec.output))
            say(f"exported the model to {export_dir}")
        if algo.finish is not None:
            final.update(algo.finish(view(params, frozen, extras).policy))
        if final:
            if step > start:  # a rerun of a finished job reports again but logs nothing twice
                metrics.log(step, final)
            say("final: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items()))
        return RunResult(step=step, final=final, export_dir=export_dir)
    finally:
        preempted.restore()
        metrics.close()
        if reporter is not None:
            reporter.flush()
        ckpt.close()


def export_dtype(model: ModelSpec, output: OutputSpec) -> str:
    """``output.exportDtype``, else the base checkpoint's dtype (float32 for built-in models)."""
    if output.export_dtype is not None:
        return output.export_dtype
    if model.base.startswith(BUILTIN):
        return "float32"
    from posttrain.trainer.models import checkpoint_dtype

    return checkpoint_dtype(model.base) or "float32"


def export(model: CausalLM, tokenizer: Any, path: str, *, dtype: str | None = None) -> None:
    """DIR/final in Hugging Face format: adapters merged (in float32), quantized bases
    dequantized, every tensor cast to ``dtype`` (default: its own) from the master weights."""
    from posttrain.trainer.models import save_pretrained

    peft.merge_peft(model)
    save_pretrained(model, path, dtype=dtype)
    if jax.process_index() == 0 and hasattr(tokenizer, "save_pretrained"):
        with storage.writable_dir(path) as local:
            tokenizer.save_pretrained(local)


def _replicate_strays(tree: Any, mesh: Mesh) -> Any:
    """Leaves left on one device (e.g. the optimizer's step count) -> replicated over the mesh."""
    replicated = NamedSharding(mesh, PartitionSpec())
    mesh_devices = set(mesh.devices.flat)

    def fix(x: Any) -> Any:
        if not isinstance(x, jax.Array) or set(x.sharding.device_set) == mesh_devices:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, replicated, lambda i: host[i])

    return jax.tree.map(fix, tree)


def _check_rows(
    batch: Mapping[str, np.ndarray], batch_size: int, num_micro: int, rows_axis: int
) -> None:
    rows = next(iter(batch.values())).shape[0]
    if rows % num_micro or (rows // num_micro) % rows_axis:
        raise ValueError(
            f"spec.training.microBatchSize: a batch of {rows} rows (batchSize {batch_size}) in "
            f"{num_micro} micro-batches does not divide over the {rows_axis} data-parallel devices "
            "(mesh data x fsdp); make each micro-batch a multiple of that"
        )


def _count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def _gather(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class _PreemptionFlag:
    """SIGTERM (and a first Ctrl-C) -> save at the end of the current step and exit 0.

    Single process: our own signal handlers; a second Ctrl-C interrupts at once. Several
    processes: JAX's coordination service (which watches SIGTERM once jax.distributed is up)
    tells every process to stop at the same step, so all of them join the same final checkpoint.
    """

    def __init__(self) -> None:
        self.signalled = False
        self._distributed = jax.process_count() > 1
        self._previous: dict[int, Any] = {}
        if self._distributed:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some embedders): no handler
                pass

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if signum == signal.SIGINT and self.signalled:
            raise KeyboardInterrupt
        self.signalled = True

    def reached(self, step: int) -> bool:
        if self._distributed:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signalled

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
