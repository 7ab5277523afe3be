"""SimPO, RPO, precomputed reference log-probs and KTO in the shared loop (issue #26): SimPO and
precomputing keep no reference model, precomputed figures equal the held reference's, resume
equals no interruption, RPO adds alpha x the chosen NLL, and KTO learns from unpaired rows and is
evaluated on held-out pairs with DPO's eval_preference_accuracy."""

from __future__ import annotations

import importlib.util
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.api.settings.dpo import DpoSpec
from posttrain.trainer.algorithms import dpo, kto
from posttrain.trainer.algorithms.base import ModelConfigs, Models
from posttrain.trainer.data import preference
from posttrain.trainer.loop import build_model, load_tokenizer
from posttrain.trainer.models import make_mesh

_spec = importlib.util.spec_from_file_location(
    "loop_jobs", os.path.join(os.path.dirname(__file__), "loop_jobs.py")
)
jobs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jobs)
jobs.enable_compile_cache()
write_pairs, preference_job, run = jobs.write_pairs, jobs.preference_job, jobs.run_training


TRL_NAMES = {
    "logps/chosen",
    "logps/rejected",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
}
DPO_NAMES = {"preference_accuracy", "reward_chosen", "reward_rejected", "reward_margin"}


def test_settings_defaults_and_refusals():
    s = DpoSpec()
    assert (s.beta, s.simpo_gamma, s.rpo_alpha, s.precompute_reference_log_probs) == (
        0.1,
        0.5,
        None,
        False,
    )
    with pytest.raises(ValueError, match="simpo uses no reference model"):
        DpoSpec.model_validate({"lossType": "simpo", "precomputeReferenceLogProbs": True})
    DpoSpec.model_validate({"lossType": "simpo", "labelSmoothing": 0.1})  # TRL's CPO smooths


def test_declarations_say_which_keep_a_reference(tmp_path):
    configs = ModelConfigs(None, lambda _: None)
    cases = {
        "sigmoid": ({"lossType": "sigmoid"}, True),
        "simpo": ({"lossType": "simpo"}, False),
        "precomputed": ({"precomputeReferenceLogProbs": True}, False),
    }
    for name, (settings, kept) in cases.items():
        job = preference_job(tmp_path / name, "dpo", dpo=settings)
        d = dpo.declare(job.spec, configs)
        assert d.reference is kept, name
        assert ("reference_logps" in d.columns) is (settings.get("lossType") != "simpo"), name
    assert kto.declare(preference_job(tmp_path / "kto", "kto").spec, configs).reference


def test_rpo_adds_alpha_times_the_chosen_nll(tmp_path):
    from posttrain.api.v1alpha1 import ModelSpec

    spec = ModelSpec(base="builtin:tiny", dtype="float32")
    tok = load_tokenizer(spec)
    model = build_model(spec, tok, make_mesh(), seed=0)
    train_path, _ = write_pairs(tmp_path)
    d = jobs.job(tmp_path).spec.data.model_copy(update={"train": train_path})
    pairs = preference.load_pairs(train_path, tok, d).pairs[:8]
    host = preference.PreferenceSource(
        pairs, batch_size=8, seq_len=12, pad_id=tok.pad_token_id, seed=0, shuffle=False
    ).next_batch(0)
    host["reference_logps"] = np.random.default_rng(0).normal(-5, 1, (8, 2)).astype(np.float32)
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    plain, m0 = dpo.make_loss(0.5, "sigmoid", 0.0)(Models(policy=model), batch)
    with_nll, m1 = dpo.make_loss(0.5, "sigmoid", 0.0, rpo_alpha=0.7)(Models(policy=model), batch)
    logp = dpo.pair_token_logprobs(model, batch)
    nll = -float(jnp.sum(logp[:, 0] * batch["nll_weights"])) / 8
    assert float(m1["nll_loss"]) == pytest.approx(nll, rel=1e-5)
    assert float(with_nll) == pytest.approx(float(plain) + 0.7 * nll, rel=1e-5)
    assert TRL_NAMES | DPO_NAMES <= set(m0)
    assert float(m0["preference_accuracy"]) == float(m0["rewards/accuracies"])


def test_simpo_keeps_no_reference_and_learns(tmp_path):
    job = preference_job(
        tmp_path, "dpo", dpo={"lossType": "simpo", "beta": 2.0}, training={"steps": 9}
    )
    result, said = run(job, tmp_path / "out")
    assert not any("reference kept" in line for line in said)
    baseline, *records = jobs.metrics(tmp_path / "out")
    assert baseline["step"] == 0 and 0.0 < baseline["eval_preference_accuracy"] < 1.0
    steps = [r for r in records if "loss" in r]
    assert TRL_NAMES | DPO_NAMES <= set(steps[0])
    assert {f"eval_{k}" for k in TRL_NAMES | DPO_NAMES} <= set(baseline)
    # the reward is beta x the mean log-prob (no reference): TRL's CPO/SimPO figures
    assert baseline["eval_rewards/chosen"] == pytest.approx(2.0 * baseline["eval_logps/chosen"])
    assert np.mean([s["loss"] for s in steps[-3:]]) < np.mean([s["loss"] for s in steps[:3]])
    assert result.final["eval_reward_margin"] > baseline["eval_reward_margin"]


def test_precomputed_reference_equals_the_held_one_and_resumes_exactly(tmp_path):
    held = preference_job(tmp_path / "held", "dpo", dpo={"beta": 0.5})
    pre = preference_job(
        tmp_path / "pre", "dpo", dpo={"beta": 0.5, "precomputeReferenceLogProbs": True}
    )
    _, said_held = run(held, tmp_path / "held-out")
    whole, said = run(pre, tmp_path / "whole")
    assert any("reference kept" in line for line in said_held)
    assert not any("reference kept" in line for line in said)
    assert any("precomputed" in line for line in said)
    a, b = jobs.losses(tmp_path / "held-out"), jobs.losses(tmp_path / "whole")
    assert a.keys() == b.keys()
    np.testing.assert_allclose(list(b.values()), list(a.values()), rtol=1e-4)
    baseline = jobs.metrics(tmp_path / "whole")[0]
    assert baseline["eval_loss"] == pytest.approx(math.log(2), rel=1e-6)  # policy == reference
    first, _ = run(pre, tmp_path / "parts", stop_after=3)
    assert first.preempted and first.step == 3
    second, _ = run(pre, tmp_path / "parts")
    # the log-probs are scored again from the initial weights, not the restored ones
    assert jobs.losses(tmp_path / "parts") == b
    assert second.final == whole.final


def test_kto_learns_from_unpaired_rows_and_is_evaluated_on_pairs(tmp_path):
    job = preference_job(tmp_path, "kto", kto={"beta": 1.0}, training={"steps": 9})
    result, said = run(job, tmp_path / "out")
    assert any("reference kept" in line for line in said)
    assert any("128 desirable, 128 not" in line for line in said)
    baseline, *records = jobs.metrics(tmp_path / "out")
    # step 0: the policy is its reference, every implicit reward 0, no pair preferred (TRL's >)
    assert baseline["eval_preference_accuracy"] == 0.0 and baseline["eval_reward_margin"] == 0.0
    assert baseline["eval_loss"] == pytest.approx(0.5, rel=1e-6)
    steps = [r for r in records if "loss" in r]
    assert {"kl", "count/chosen", "count/rejected"} | (TRL_NAMES - {"rewards/accuracies"}) <= set(
        steps[0]
    )
    # counts (and z0) are per micro-batch of 4 rows, averaged over the step's micro-batches
    assert all(s["count/chosen"] + s["count/rejected"] == 4 for s in steps)
    assert np.mean([s["loss"] for s in steps[-3:]]) < np.mean([s["loss"] for s in steps[:3]])
    assert result.final["eval_reward_margin"] > 0.0


def test_kto_resume_equals_an_uninterrupted_run(tmp_path):
    job = preference_job(tmp_path, "kto")
    whole, _ = run(job, tmp_path / "whole")
    first, _ = run(job, tmp_path / "parts", stop_after=3)
    assert first.preempted and first.step == 3
    second, _ = run(job, tmp_path / "parts")
    assert jobs.losses(tmp_path / "parts") == jobs.losses(tmp_path / "whole")
    assert second.final == whole.final
