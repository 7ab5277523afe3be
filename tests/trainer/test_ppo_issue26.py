"""PPO's verl / TRL extras wired into the spec (issue #26): the KL as a loss term, the adaptive KL
controller (checkpointed), critic warm-up (the policy gets no gradient), the missing-EOS penalty,
dual clip and reward whitening, end to end on the tiny built-in model."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from posttrain.api.settings.ppo import PpoSpec
from posttrain.api.v1alpha1 import PostTrainJob
from posttrain.trainer.algorithms import ppo
from posttrain.trainer.algorithms.base import ModelConfigs
from posttrain.trainer.loop import train

_spec = importlib.util.spec_from_file_location(
    "loop_jobs", os.path.join(os.path.dirname(__file__), "loop_jobs.py")
)
jobs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jobs)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return jobs.write_ppo_files(tmp_path_factory.mktemp("ppo26"))


def job(files: Path, steps: int = 6, weight_decay: float = 0.0, **ppo_block) -> PostTrainJob:
    training = {"optimizer": {"weightDecay": weight_decay}, "checkpoint": {"everySteps": 2}}
    return jobs.ppo_job(files, steps=steps, training=training, **ppo_block)


def steps_of(out: Path) -> dict[int, dict]:
    records: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            records.setdefault(r["step"], {}).update(r)
    return records


def test_defaults_are_verls_and_trls():
    p = PpoSpec.model_validate({"rewards": [{"function": "m.py:f"}]})
    assert (p.use_kl_loss, p.kl_loss_coef, p.kl_loss_type) == (False, 0.001, "low_var_kl")
    assert (p.target_kl, p.kl_horizon, p.critic_warmup_steps) == (None, 10000, 0)
    assert (p.clip_ratio_c, p.missing_eos_penalty, p.whiten_rewards) == (3.0, None, False)
    with pytest.raises(ValueError, match="klCoef"):
        PpoSpec.model_validate({"rewards": [{"function": "m.py:f"}], "klCoef": 0, "targetKl": 1})


def test_kl_loss_declares_the_reference_and_its_column(files):
    j = job(files, klCoef=0.0, useKlLoss=True, criticWarmupSteps=2)
    d = ppo.declare(j.spec, ModelConfigs(None, lambda _: None))
    assert d.reference and d.columns["ref_logp"] == ((16, 16), np.float32)
    assert d.columns["policy_on"] == ((16,), np.float32)
    plain = ppo.declare(job(files, klCoef=0.0).spec, ModelConfigs(None, lambda _: None))
    assert not plain.reference and "ref_logp" not in plain.columns


def test_critic_warmup_leaves_the_policy_unchanged(files, tmp_path):
    """Steps 1-2 train the critic only: the policy is unchanged, so step 3 (the first policy
    step, on the same rollout as steps 1-2) still sees ratio 1 on every token (approx_kl 0),
    while the value loss moved; step 4, after one policy update, is far above rounding. With
    weightDecay 0.1 a zero gradient alone would still shrink the policy's weights: the policy's
    optimizer update itself is skipped (``loop_optim.idle_between``)."""
    out = tmp_path / "warm"
    train(
        job(files, weight_decay=0.1, criticWarmupSteps=2),
        str(out),
        say=lambda _m: None,
        progress_bar=False,
    )
    s = steps_of(out)
    assert [s[k]["policy_on"] for k in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 1.0]
    # numIterations 2 x numMiniBatches 2: steps 1-4 train on rollout 0
    # (the no-grad forward that scored old_logp and the step's forward differ by rounding)
    for k in (1, 2, 3):
        assert s[k]["approx_kl"] < 1e-12 and s[k]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert s[4]["approx_kl"] > 1e-8
    assert s[1]["value_loss"] != s[3]["value_loss"]


def test_kl_loss_adaptive_controller_eos_penalty_and_whitening_run_and_resume(files, tmp_path):
    spec = dict(
        klCoef=0.05,
        targetKl=0.01,
        klHorizon=100,
        useKlLoss=True,
        klLossCoef=0.1,
        missingEosPenalty=1.0,
        whitenRewards=True,
        clipRatioC=3.0,
    )
    whole = train(job(files, **spec), str(tmp_path / "whole"), say=lambda _m: None, progress_bar=False)  # fmt: skip
    s = steps_of(tmp_path / "whole")
    assert all(np.isfinite(r["loss"]) and r["kl_loss"] >= 0 for r in s.values())
    assert {"pg_clipfrac_lower", "kl_loss", "kl_coef"} <= set(s[1])
    coefs = [s[k]["kl_coef"] for k in sorted(s)]
    assert coefs[0] == pytest.approx(0.05)
    assert coefs[-1] != coefs[0]  # the controller moved it after the first rollout
    first = train(
        job(files, **spec), str(tmp_path / "parts"), say=lambda _m: None, progress_bar=False,
        stop_after=3,
    )  # fmt: skip
    assert first.preempted
    second = train(job(files, **spec), str(tmp_path / "parts"), say=lambda _m: None, progress_bar=False)  # fmt: skip
    resumed = steps_of(tmp_path / "parts")
    assert [resumed[k]["kl_coef"] for k in sorted(resumed)] == coefs
    assert [resumed[k]["loss"] for k in sorted(resumed)] == [s[k]["loss"] for k in sorted(s)]
    assert second.final == whole.final


def test_idle_between_skips_the_policys_updates_and_keeps_its_optimizer_state():
    import jax.numpy as jnp
    import optax

    from posttrain.api.v1alpha1 import TrainingSpec
    from posttrain.trainer.loop_optim import optimizer

    t = TrainingSpec(
        steps=10, learning_rate=0.1, optimizer={"weightDecay": 0.5}, schedule={"warmupSteps": 0}
    )
    params = {"policy": {"w": jnp.ones(3)}, "heads": {"value": {"w": jnp.ones(2)}}}
    grads = jax_tree_full(params, 0.3)
    tx = optimizer(t, policy_idle=(1, 3))
    state = tx.init(params)
    seen = []
    for _ in range(4):
        updates, state = tx.update(grads, state, params)
        seen.append(updates)
        params = optax.apply_updates(params, updates)
    moved = [bool(jnp.any(u["policy"]["w"] != 0)) for u in seen]
    assert moved == [True, False, False, True]  # no weight decay either at updates 1 and 2
    assert all(bool(jnp.all(u["heads"]["value"]["w"] != 0)) for u in seen)
    # after the idle window the policy continues as if the skipped updates never happened
    plain = optimizer(t)
    p2 = {"policy": {"w": jnp.ones(3)}, "heads": {"value": {"w": jnp.ones(2)}}}
    s2 = plain.init(p2)
    u0, s2 = plain.update(grads, s2, p2)
    p2 = optax.apply_updates(p2, u0)
    u1, _ = plain.update(grads, s2, p2)
    np.testing.assert_allclose(seen[3]["policy"]["w"], u1["policy"]["w"], rtol=1e-6)


def jax_tree_full(tree, value):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: jnp.full_like(x, value), tree)
