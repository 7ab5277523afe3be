"""The shared loop on real tiny SFT jobs: loss falls, resume equals no interruption, the export loads."""

from __future__ import annotations

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.trainer.loop import train
from posttrain.trainer.models import load_pretrained

_spec = importlib.util.spec_from_file_location(
    "loop_jobs", os.path.join(os.path.dirname(__file__), "loop_jobs.py")
)
jobs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jobs)
jobs.enable_compile_cache()


def quiet(_msg: str) -> None:
    pass


def eval_loss_of(model, job) -> float:
    """The exported model's loss on the eval data, computed here independently of the loop."""
    from posttrain.trainer.algorithms import sft
    from posttrain.trainer.algorithms.base import Models
    from posttrain.trainer.data import sft as data
    from posttrain.trainer.tasks.chars import CharTokenizer

    tok = CharTokenizer()
    d = job.spec.data
    examples = data.load_examples(d.eval, tok, d).examples
    values = [
        float(sft.loss(Models(policy=model), {k: jnp.asarray(v) for k, v in b.items()})[0])
        for b in data.fixed_batches(
            examples, batch_size=8, seq_len=d.max_length, pad_id=tok.pad_token_id
        )
    ]
    return float(np.mean(values))


def test_loss_falls_and_the_export_loads(tmp_path):
    job = jobs.job(tmp_path, training={"steps": 12})
    out = tmp_path / "out"
    result = train(job, str(out), say=quiet, progress_bar=False)
    losses = jobs.losses(out)
    assert sorted(losses) == list(range(1, 13))
    assert np.mean([losses[11], losses[12]]) < 0.7 * losses[1]
    baseline, *records = jobs.metrics(out)  # step 0: the eval before the first update
    assert baseline["step"] == 0 and "eval_loss" in baseline and "loss" not in baseline
    assert {"learning_rate", "tokens_per_second", "grad_norm"} <= set(records[0])
    assert records[0]["learning_rate"] == 0.0 and records[1]["learning_rate"] == pytest.approx(3e-3)
    assert os.listdir(out / "tensorboard")
    assert result.export_dir == str(out / "final")
    model = load_pretrained(result.export_dir)
    assert eval_loss_of(model, job) == pytest.approx(result.final["eval_loss"], rel=1e-5)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    job = jobs.job(tmp_path)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    uninterrupted = train(job, str(whole), say=quiet, progress_bar=False)
    first = train(job, str(parts), say=quiet, progress_bar=False, stop_after=3)
    assert first.preempted and first.step == 3
    assert sorted(jobs.losses(parts)) == [1, 2, 3]
    second = train(job, str(parts), say=quiet, progress_bar=False)
    assert second.step == 6 and not second.preempted
    # same steps, once each, with bit-identical losses
    assert jobs.losses(parts) == jobs.losses(whole)
    assert second.final == uninterrupted.final


def test_lora_changes_only_low_rank_deltas_of_target_projections(tmp_path):
    job = jobs.job(
        tmp_path,
        model={"lora": {"rank": 2, "alpha": 4, "targets": ["q_proj", "down_proj"]}},
        training={"learningRate": 1e-2},  # PEFT's smaller A init: adapters start slower
    )
    out = tmp_path / "out"
    result = train(job, str(out), say=quiet, progress_bar=False)
    trained = nnx.state(load_pretrained(result.export_dir), nnx.Param)
    # the base the run started from: the built-in model with the same seed
    from posttrain.trainer.loop import build_model, load_tokenizer
    from posttrain.trainer.models import make_mesh

    plain = job.spec.model.model_copy(update={"lora": None})
    base = nnx.state(
        build_model(plain, load_tokenizer(plain), make_mesh(), job.spec.training.seed), nnx.Param
    )
    changed = []
    for (path, new), (_, old) in zip(
        nnx.to_flat_state(trained), nnx.to_flat_state(base), strict=True
    ):
        delta = np.asarray(new.get_value()) - np.asarray(old.get_value())
        if np.any(delta):
            changed.append(path[-2])
            assert np.linalg.matrix_rank(delta, tol=1e-6) <= 2
    assert set(changed) == {"q_proj", "down_proj"}
    # the merged export computes what the adapted model computed
    assert eval_loss_of(load_pretrained(result.export_dir), job) == pytest.approx(
        result.final["eval_loss"], rel=1e-5
    )
    assert jobs.losses(out)[6] < jobs.losses(out)[1]


def test_output_to_gcs(gcs_emulator, tmp_path):
    """Metrics and the export go to gs:// (checkpoints stay local: orbax's gs:// I/O, tensorstore
    OCDBT, needs object generations the local emulator does not implement)."""
    from posttrain.trainer import storage

    out = f"gs://{gcs_emulator}/runs/sft"
    job = jobs.job(tmp_path, training={"steps": 2, "checkpoint": {"dir": str(tmp_path / "ckpt")}})
    result = train(job, out, say=quiet, progress_bar=False)
    records = [json.loads(line) for line in storage.read_text(f"{out}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 2]  # baseline eval, two steps, final eval
    assert result.export_dir == f"{out}/final"
    model = load_pretrained(result.export_dir)
    assert eval_loss_of(model, job) == pytest.approx(result.final["eval_loss"], rel=1e-5)


def test_progress_reports_the_last_checkpoint_step(tmp_path):
    """The loop tells the trainer's ProgressReporter each checkpoint it saves; the reports (to a
    local HTTP server standing in for the API server) carry status.progress.lastCheckpointStep,
    the last one the final step's."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from posttrain.progress import ProgressReporter

    bodies: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:  # noqa: N802
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reporter = ProgressReporter(
            "job", "ml", api_server=f"http://127.0.0.1:{server.server_port}", token="t",
            min_interval=0, env={},
        )  # fmt: skip
        job = jobs.job(tmp_path, training={"steps": 4})  # a checkpoint every 2 steps
        train(job, str(tmp_path / "out"), say=quiet, progress_bar=False, reporter=reporter)
    finally:
        server.shutdown()
    progress = [b["status"]["progress"] for b in bodies]
    assert [p.get("lastCheckpointStep") for p in progress if p["step"] == 3] == [2]
    assert progress[-1]["step"] == 4 and progress[-1]["lastCheckpointStep"] == 4
    assert bodies[-1]["status"]["summary"]["progress"] == "100%"
