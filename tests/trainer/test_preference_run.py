"""DPO and ORPO in the shared loop: accumulation over pairs equals one big batch, the reference
under LoRA is the base, resume equals no interruption, ORPO keeps no reference, and the baseline
evaluation is logged at step 0."""

from __future__ import annotations

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.api.v1alpha1 import ModelSpec, TrainingSpec
from posttrain.trainer.algorithms import dpo, orpo
from posttrain.trainer.algorithms.base import Models
from posttrain.trainer.data import preference
from posttrain.trainer.loop import build_model, load_tokenizer
from posttrain.trainer.loop_optim import optimizer, schedule
from posttrain.trainer.loop_step import make_train_step, policy_view
from posttrain.trainer.models import make_mesh

_spec = importlib.util.spec_from_file_location(
    "loop_jobs", os.path.join(os.path.dirname(__file__), "loop_jobs.py")
)
jobs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jobs)
jobs.enable_compile_cache()
write_pairs, preference_job, run = jobs.write_pairs, jobs.preference_job, jobs.run_training


@pytest.mark.parametrize("algorithm", ["dpo", "orpo"])
def test_accumulation_over_pairs_equals_one_big_batch(tmp_path, algorithm):
    """8 pairs in 4 micro-batches of 2 (strided rows; a pair is one row, so it stays whole)."""
    spec = ModelSpec(base="builtin:tiny", dtype="float32")
    tok = load_tokenizer(spec)
    model = build_model(spec, tok, make_mesh(), seed=0)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    train_path, _ = write_pairs(tmp_path)
    d = jobs.job(tmp_path).spec.data.model_copy(update={"train": train_path})
    pairs = preference.load_pairs(train_path, tok, d).pairs
    # chosen completions of different lengths: a plain mean over micro-batches would differ
    pairs = [p for p in pairs if len(p.chosen) == 2][:3] + [p for p in pairs if len(p.chosen) == 3][
        :5
    ]
    host = preference.PreferenceSource(
        pairs, batch_size=8, seq_len=12, pad_id=tok.pad_token_id, seed=0, shuffle=False
    ).next_batch(0)
    assert len(set((host["nll_weights"] > 0).sum(-1).tolist())) > 1
    logp = dpo.pair_token_logprobs(model, {k: jnp.asarray(v) for k, v in host.items()})
    noise = np.random.default_rng(0).normal(0, 0.5, (8, 2))
    host["reference_logps"] = np.asarray(
        (logp * host["completion_mask"]).sum(-1) + noise, np.float32
    )
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    loss = dpo.make_loss(0.5, "sigmoid", 0.1) if algorithm == "dpo" else orpo.make_loss(0.5)
    t = TrainingSpec(steps=10, learning_rate=1.0, max_grad_norm=None, optimizer={"name": "sgd"})
    tx = optimizer(t)
    results = []
    for num_micro in (1, 4):
        step = jax.jit(
            make_train_step(policy_view(graphdef), loss, tx, schedule(t), num_micro=num_micro)
        )
        new, _, metrics = step(params, frozen, tx.init(params), batch, jnp.int32(3))
        results.append((new, metrics))
    (p1, m1), (p4, m4) = results
    for k in m1:
        assert float(m1[k]) == pytest.approx(float(m4[k]), rel=1e-5, abs=1e-6), k
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # and the loss is the one of the whole batch computed directly
    value, _ = loss(Models(policy=model), batch)
    assert float(m1["loss"]) == pytest.approx(float(value), rel=1e-5)


def test_dpo_with_lora_scores_against_the_base(tmp_path):
    job = preference_job(
        tmp_path,
        "dpo",
        model={"lora": {"rank": 4, "alpha": 8}},
        dpo={"beta": 1.0},
        training={"learningRate": 1e-2},
    )
    result, said = run(job, tmp_path / "out")
    assert any("reference kept" in line for line in said)
    baseline, *records = jobs.metrics(tmp_path / "out")
    # step 0: a fresh adapter is the base, so policy and reference agree exactly
    assert baseline["step"] == 0
    assert baseline["eval_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert baseline["eval_reward_margin"] == 0.0 and baseline["eval_preference_accuracy"] == 0.0
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert {"preference_accuracy", "reward_chosen", "reward_rejected", "reward_margin"} <= set(
        steps[0]
    )
    # the reference stays the base while the adapters train: rewards move off zero
    assert result.final["eval_reward_margin"] != 0.0
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]


def test_dpo_resume_equals_an_uninterrupted_run(tmp_path):
    job = preference_job(tmp_path, "dpo", dpo={"lossType": "ipo", "beta": 0.5})
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    uninterrupted, _ = run(job, whole)
    first, _ = run(job, parts, stop_after=3)
    assert first.preempted and first.step == 3
    second, _ = run(job, parts)
    assert second.step == 6
    # the reference after resume is the initial model again, not the restored weights
    assert jobs.losses(parts) == jobs.losses(whole)
    assert second.final == uninterrupted.final
    assert [r["step"] for r in jobs.metrics(parts)].count(0) == 1  # one baseline, not one per run


def test_orpo_keeps_no_reference_and_learns(tmp_path):
    job = preference_job(tmp_path, "orpo", orpo={"lambda": 0.5})
    # what a run that crashed before its first checkpoint left: a fresh start logs afresh
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text(
        '{"step": 0, "eval_loss": 99}\n{"step": 1, "loss": 99}\n'
    )
    result, said = run(job, tmp_path / "out")
    assert not any("reference kept" in line for line in said)
    baseline, *records = jobs.metrics(tmp_path / "out")
    assert baseline["step"] == 0 and 0.0 < baseline["eval_preference_accuracy"] < 1.0
    assert baseline["eval_loss"] != 99 and [r["step"] for r in records].count(0) == 0
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert {"nll", "log_odds_ratio", "preference_accuracy"} <= set(steps[0])
    assert np.mean([steps[-1]["loss"], steps[-2]["loss"]]) < 0.9 * steps[0]["loss"]
    assert result.final["eval_nll"] < baseline["eval_nll"]


@pytest.mark.slow
def test_dpo_on_two_processes_gives_the_figures_of_one(tmp_path):
    """The reference is scored with ctx.forward over a 2-device mesh spanning two processes."""
    import subprocess
    import sys

    import yaml

    manifest = jobs.manifest(tmp_path, algorithm="dpo")
    train_path, test_path = write_pairs(tmp_path / "prefs")
    manifest["spec"]["data"].update(train=train_path, eval=test_path)
    manifest["spec"]["training"].update(steps=4, microBatchSize=4, evalEverySteps=2)
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump(manifest))
    figures = []
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        proc = subprocess.run(
            [sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--output", str(out), "--processes", str(n)],
            capture_output=True,
            text=True,
            timeout=300,
            env=jobs.subprocess_env(),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        figures.append([(r["step"], r.get("loss"), r.get("eval_loss")) for r in jobs.metrics(out)])
    assert "'fsdp': 2" in proc.stdout
    (one, two) = figures
    assert [s for s, *_ in one] == [s for s, *_ in two] == [0, 1, 2, 3, 4, 4]
    np.testing.assert_allclose(
        [v for _, *vs in two for v in vs if v is not None],
        [v for _, *vs in one for v in vs if v is not None],
        rtol=2e-5,
    )
