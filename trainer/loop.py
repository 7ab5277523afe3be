"""The one training loop every algorithm shares (read top to bottom, like nanoGPT's train.py).

    setup (trainer/setup.py): mesh -> model (+ LoRA/QLoRA, the algorithm's heads) -> split ->
          frozen extras -> optimizer -> jitted step; the algorithm's data (its batch source)
    loop: batch -> step -> log (+ eval every evalEverySteps) -> checkpoint -> preempted?
    end:  final checkpoint -> export DIR/final (LoRA merged) -> the algorithm's finish report

``rank0`` gates side effects that must happen once (metrics, progress, logs); checkpoints and the
export are collective (every process calls them, orbax and save_pretrained decide who writes).
Steps count finished optimizer updates: the checkpoint and metrics record at step N are taken
after N updates, and a resumed run starts with update N + 1.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from posttrain.api.v1alpha1 import ModelSpec, OutputSpec, PostTrainJob
from posttrain.trainer import peft, storage
from posttrain.trainer.algorithms.base import Algorithm, Context
from posttrain.trainer.async_rl import service as async_rl
from posttrain.trainer.checkpoint import Checkpointer, checkpoint_dir
from posttrain.trainer.metrics import MetricsWriter
from posttrain.trainer.placement import device_batch
from posttrain.trainer.setup import (  # noqa: F401  (re-exported: tests and tools build models)
    BUILTIN,
    LiveWeights,
    Run,
    TrainState,
    build_model,
    build_run,
    load_tokenizer,
    make_mesh,
    model_dtypes,
    split_trainable,
)

if TYPE_CHECKING:
    from posttrain.trainer.models import CausalLM


@dataclass
class RunResult:
    step: int  # optimizer steps finished
    preempted: bool = False
    final: dict[str, float] = field(default_factory=dict)
    export_dir: str | None = None


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
    ``stop_after`` (tests) ends the run after that many steps as a preemption would."""
    training = job.spec.training
    say = say if jax.process_index() == 0 else (lambda _msg: None)
    run = build_run(job)
    state = TrainState(run.params, run.opt_state)
    algo: Algorithm = run.module.build(make_context(job, run, state, output_dir, say))
    say(run.describe())
    ckpt = Checkpointer(checkpoint_dir(training.checkpoint, output_dir), training.checkpoint)
    start = state.step = _resume(ckpt, state, algo, say)
    metrics = MetricsWriter(
        output_dir,
        total_steps=training.steps,
        start_step=start,
        enabled=jax.process_index() == 0,
        progress_bar=progress_bar,
        reporter=reporter,
    )
    preempted, timer = _PreemptionFlag(), _Throughput()
    service = async_rl.for_job(job, algo.source, say)  # async RL: the rollout workers' service
    if service is not None:
        metrics.rollout_status = service.status
        service.publish(state.step, state.params)
    try:
        if start == 0 and algo.eval_batches is not None:
            metrics.log(0, evaluate(run, state, algo))  # the baseline, before the first update
        while state.step < training.steps:
            host = algo.source.next_batch(state.step)
            run.check_batch(host)
            timer.add(host)
            state.params, state.opt_state, out = run.train_step(
                state.params, run.frozen, state.opt_state, device_batch(host, run.mesh),
                jnp.int32(state.step), run.extras,
            )  # fmt: skip
            state.step += 1
            if service is not None:
                service.publish(state.step, state.params)
            _log(run, state, algo, metrics, out, timer)
            stopping = preempted.reached(state.step) or (
                stop_after is not None and state.step - start >= stop_after
            )
            if (
                state.step % training.checkpoint.every_steps == 0
                or stopping
                or state.step == training.steps
            ):
                _save(ckpt, state, algo, reporter)  # fmt: skip
            if stopping and state.step < training.steps:
                ckpt.wait()
                say(f"stopping at step {state.step}: checkpoint saved; run again with the same output to continue")  # fmt: skip
                return RunResult(step=state.step, preempted=True)
        ckpt.wait()
        return _finish(run, state, algo, metrics, output_dir, start, say)
    finally:
        if service is not None:  # finished: the workers exit; stopped: they wait for us
            service.close(finished=state.step >= training.steps)
        preempted.restore()
        metrics.close()
        if reporter is not None:
            reporter.flush()
        ckpt.close()


# --------------------------------------------------------------------------- the loop's parts


def make_context(
    job: PostTrainJob, run: Run, state: TrainState, output_dir: str, say: Callable[[str], None]
) -> Context:
    return Context(
        job=job,
        tokenizer=run.tokenizer,
        output_dir=output_dir,
        config=run.config,
        weights=LiveWeights(run, state),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        log=say,
        micro_rows=next(iter(run.declaration.columns.values()))[0][0] // run.num_micro,
    )


def _resume(ckpt: Checkpointer, state: TrainState, algo: Algorithm, say: Callable) -> int:
    latest = ckpt.latest_step()
    if latest is None:
        return 0
    saved, meta = ckpt.restore(latest, {"params": state.params, "opt_state": state.opt_state})
    state.params, state.opt_state = saved["params"], saved["opt_state"]
    arrays = ckpt.restore_arrays(latest)  # a rollout batch in the middle of its steps
    algo.source.restore(
        meta["data"] if arrays is None else {**meta["data"], "batch_arrays": arrays}
    )
    say(f"resumed from checkpoint step {int(meta['step'])} in {ckpt.directory}")
    return int(meta["step"])


def _save(ckpt: Checkpointer, state: TrainState, algo: Algorithm, reporter: Any) -> None:
    arrays = algo.source.arrays() if hasattr(algo.source, "arrays") else None
    ckpt.save(
        state.step,
        {"params": state.params, "opt_state": state.opt_state},
        {"step": state.step, "data": algo.source.state()},
        arrays=arrays,
    )
    if reporter is not None and hasattr(reporter, "checkpointed"):
        reporter.checkpointed(state.step)  # status.progress.lastCheckpointStep


def evaluate(run: Run, state: TrainState, algo: Algorithm) -> dict[str, float]:
    """The algorithm's held-out batches through its loss, averaged, as ``eval_*`` metrics."""
    if algo.eval_batches is None:
        return {}
    sums: dict[str, float] = {}
    n = 0
    for batch in algo.eval_batches():
        placed = device_batch(batch, run.mesh)
        out = jax.device_get(run.eval_step(state.params, run.frozen, placed, run.extras))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    return {f"eval_{k}": v / max(n, 1) for k, v in sums.items()}


class _Throughput:
    """Tokens per second and wall seconds per step between logged steps, timed on this host."""

    def __init__(self) -> None:
        self.last, self.tokens, self.steps = time.perf_counter(), 0, 0

    def add(self, batch: Any) -> None:
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else 0
        self.steps += 1

    def take(self) -> tuple[float, float]:
        now = time.perf_counter()
        seconds = max(now - self.last, 1e-9)
        rate, per_step = self.tokens / seconds, seconds / max(self.steps, 1)
        self.last, self.tokens, self.steps = now, 0, 0
        return rate, per_step


def _log(
    run: Run, state: TrainState, algo: Algorithm, metrics: MetricsWriter, out: Any, timer: Any
) -> None:
    training, step = run.job.spec.training, state.step
    eval_metrics = {}
    every = training.eval_every_steps
    if every and step % every == 0 and step < training.steps:  # the final one after the loop
        eval_metrics = evaluate(run, state, algo)
        if algo.evaluate is not None:  # RL: the greedy reward on data.eval
            eval_metrics.update(algo.evaluate())
    if step % training.log_every_steps and step != training.steps and not eval_metrics:
        return
    values = {k: float(v) for k, v in jax.device_get(out).items()}
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(f"loss is {values['loss']} at step {step}; stopping")
    values["tokens_per_second"], values["step_seconds"] = timer.take()
    values.update(getattr(algo.source, "host_metrics", {}))  # the host's own timers (RL)
    record = metrics.log(step, {**values, **eval_metrics})
    metrics.advance(step, f"loss {record['loss']:.4f}")


def _finish(
    run: Run,
    state: TrainState,
    algo: Algorithm,
    metrics: MetricsWriter,
    output_dir: str,
    start: int,
    say: Callable[[str], None],
) -> RunResult:
    spec = run.job.spec
    final = evaluate(run, state, algo)
    model = LiveWeights(run, state).policy()
    export_dir = None
    if spec.output.export:
        export_dir = storage.join(output_dir, "final")
        export(model, run.tokenizer, export_dir, dtype=export_dtype(spec.model, spec.output))
        say(f"exported the model to {export_dir}")
    if algo.finish is not None:
        final.update(algo.finish(LiveWeights(run, state).policy()))
    if final:
        if state.step > start:  # a rerun of a finished job reports again but logs nothing twice
            metrics.log(state.step, final)
        say("final: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items()))
    return RunResult(step=state.step, final=final, export_dir=export_dir)


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
