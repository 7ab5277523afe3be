"""Rollout correction (TIS weights, rejection masks, mismatch metrics) against numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.trainer.algorithms import rollout_correction as rc


def _case(seed=0, B=5, T=7, scale=0.5):
    rng = np.random.default_rng(seed)
    learner = -rng.random((B, T)) * 3
    sampler = learner + rng.normal(size=(B, T)) * scale
    mask = np.zeros((B, T), np.float32)
    for b, n in enumerate(rng.integers(1, T + 1, B)):
        mask[b, :n] = 1
    mask[-1] = 0  # a padding row
    return learner.astype(np.float32), sampler.astype(np.float32), mask


def test_token_is_weights_are_truncated_ratios():
    learner, sampler, mask = _case()
    learner[0, 0], sampler[0, 0] = 0.0, -30.0  # ratio e^30: clipped to e^20, truncated to C
    learner[1, 0], sampler[1, 0] = -30.0, 0.0  # ratio e^-30: clipped to e^-20
    got = np.asarray(rc.token_is_weights(jnp.asarray(learner), jnp.asarray(sampler), mask))
    x = np.clip(learner.astype(np.float64) - sampler, -20, 20)
    want = np.minimum(np.exp(x), 2.0) * mask
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    assert got[0, 0] == 2.0 and got.max() <= 2.0 and (got[mask == 0] == 0).all()
    assert rc.ROLLOUT_IS_THRESHOLD == 2.0
    # A constant of the loss: no gradient flows into the learner's log-probs through it.
    grad = jax.grad(lambda lp: rc.token_is_weights(lp, jnp.asarray(sampler), mask).sum())(
        jnp.asarray(learner)
    )
    assert not np.asarray(grad).any()


def _np_reject(learner, sampler, mask, level, upper, lower, veto):
    lower = 1 / upper if lower is None else lower
    out = np.zeros_like(mask)
    for b in range(mask.shape[0]):
        real = mask[b] > 0
        r = learner[b].astype(np.float64) - sampler[b]
        if level == "token":
            keep = (np.exp(r) >= lower) & (np.exp(r) <= upper)
        else:
            s = r[real].sum() if level == "sequence" else r[real].mean() if real.any() else 0.0
            ratio = np.exp(np.clip(s, -20, 20))  # product / geometric mean of the ratios
            keep = np.full(mask.shape[1], lower <= ratio <= upper)
        if veto is not None and (np.exp(r[real]) < veto).any():
            keep[:] = False
        out[b] = real & keep
    return out


@pytest.mark.parametrize(
    "level,upper,lower,veto",
    [
        ("token", 2.0, None, None),
        ("sequence", 2.0, None, None),
        ("sequence", 3.0, 0.1, None),
        ("geometric", 1.2, None, None),
        ("geometric", 1.5, None, 0.5),  # the veto alone rejects here
    ],
)
def test_rejection_mask_matches_numpy(level, upper, lower, veto):
    learner, sampler, mask = _case(seed=1, B=8, T=9, scale=0.6)
    got = rc.rejection_mask(
        jnp.asarray(learner), jnp.asarray(sampler), mask, level, upper, lower, veto
    )
    want = _np_reject(learner, sampler, mask, level, upper, lower, veto)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert 0 < want.sum() < mask.sum()  # the case rejects something and keeps something


def test_rejection_mask_keeps_everything_when_sampler_equals_learner():
    learner, _, mask = _case(seed=2)
    for level in ("token", "sequence", "geometric"):
        got = rc.rejection_mask(jnp.asarray(learner), jnp.asarray(learner), mask, level, 1.001)
        np.testing.assert_array_equal(np.asarray(got), mask)
    with pytest.raises(ValueError, match="lower <= upper"):
        rc.rejection_mask(jnp.asarray(learner), jnp.asarray(learner), mask, "token", 2.0, 3.0)


def test_mismatch_metrics_match_numpy():
    learner, sampler, mask = _case(seed=3)
    got = {k: float(v) for k, v in rc.mismatch_metrics(learner, sampler, mask).items()}
    real = mask > 0
    r = (learner.astype(np.float64) - sampler)[real]
    diff = np.abs(np.exp(sampler.astype(np.float64)) - np.exp(learner))[real]
    w = np.minimum(np.exp(r), 2.0)
    want = {
        "mismatch_kl": np.mean(-r),
        "mismatch_k3_kl": np.mean(np.exp(r) - r - 1),
        "rollout_probs_diff_mean": diff.mean(),
        "rollout_probs_diff_max": diff.max(),
        "rollout_probs_diff_std": diff.std(ddof=1),
        "rollout_is_mean": w.mean(),
        "rollout_is_ratio_fraction_high": np.mean(np.exp(r) > 2.0),
        "rollout_is_eff_sample_size": 1 / np.mean((w / w.mean()) ** 2),
    }
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, err_msg=k)


def test_k3_mismatch_estimates_kl_of_sampler_to_learner():
    """Tokens drawn from the sampler: mean k3 -> KL(pi_sampler || pi_learner) (Monte Carlo)."""
    rng = np.random.default_rng(4)
    q = rng.dirichlet(np.ones(6))  # sampler
    p = rng.dirichlet(np.ones(6))  # learner
    tokens = rng.choice(6, size=(200, 100), p=q)
    learner, sampler = np.log(p)[tokens], np.log(q)[tokens]
    got = rc.mismatch_metrics(learner, sampler, np.ones_like(learner))
    exact = float(np.sum(q * np.log(q / p)))
    np.testing.assert_allclose(float(got["mismatch_k3_kl"]), exact, rtol=0.05)
    np.testing.assert_allclose(float(got["mismatch_kl"]), exact, rtol=0.05)
