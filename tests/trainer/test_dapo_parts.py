"""DAPO / Dr. GRPO pieces against numpy references and constructed batches: the soft overlong
penalty (DAPO section 3.4), truncation, dynamic sampling's group choice, the constant normaliser."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.trainer.algorithms import dynamic_sampling as ds
from posttrain.trainer.algorithms import grpo, overlong, rollout
from posttrain.trainer.algorithms import grpo_loss as gl


def np_soft_overlong(length, l_max, l_cache, factor):
    """DAPO section 3.4 (R_length) as written, one completion at a time."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return factor * ((l_max - l_cache) - length) / l_cache
    return -factor


def test_soft_overlong_penalty_matches_the_paper():
    lengths = np.arange(0, 25)  # past L_max too, though the sampler never gets there
    got = overlong.soft_overlong_penalty(lengths, max_new_tokens=20, buffer=8, factor=0.5)
    want = [np_soft_overlong(n, 20, 8, 0.5) for n in lengths]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[12] == 0.0 and got[16] == pytest.approx(-0.25) and got[20] == pytest.approx(-0.5)


def test_truncated_means_no_eos_among_the_tokens():
    eos = 2
    ids = np.array([[5, 5, 2, 0], [5, 5, 5, 5], [2, 0, 0, 0], [5, 5, 5, 2]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(overlong.truncated(ids, mask, eos), [False, True, False, False])
    # A masked-out EOS does not count: the sampler stopped before it.
    np.testing.assert_array_equal(
        overlong.truncated(ids[:1], np.array([[1, 1, 0, 0]]), eos), [True]
    )


def test_informative_groups_are_those_whose_rewards_differ():
    rewards = np.array([0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.3, 0.3 + 1e-7], np.float32)
    np.testing.assert_array_equal(ds.informative_groups(rewards, 2), [False, True, True, True])
    np.testing.assert_array_equal(ds.informative_groups(rewards, 4), [True, True])


def test_choose_groups_fills_with_informative_groups_first_then_equal_ones():
    rounds = [np.array([True, False, False]), np.array([False, True, True])]
    # Enough informative groups: the first three in sampling order (the surplus is dropped).
    assert ds.choose_groups(rounds, 3) == [(0, 0), (1, 1), (1, 2)]
    assert ds.choose_groups(rounds, 2) == [(0, 0), (1, 1)]
    # Rounds ran out: equal-reward groups fill the rest, in sampling order.
    short = [np.array([False, True, False]), np.array([False, False, False])]
    assert ds.choose_groups(short, 3) == [(0, 1), (0, 0), (0, 2)]
    with pytest.raises(ValueError, match="3 groups sampled, 4 needed"):
        ds.choose_groups(short[:1], 4)


def test_gather_rows_keeps_each_group_adjacent():
    G = 2
    by_round = [np.arange(6) + 100 * r for r in range(2)]  # 3 groups of 2 rows per round
    rows = ds.gather_rows(by_round, [(1, 2), (0, 0)], G)
    np.testing.assert_array_equal(rows, [104, 105, 0, 1])
    two_d = [np.arange(12).reshape(6, 2)]
    np.testing.assert_array_equal(ds.gather_rows(two_d, [(0, 1)], G), [[4, 5], [6, 7]])


def test_round_zero_samples_what_grpo_would():
    assert ds.round_seed(3, 7, 0) == rollout.group_seed(3, 7)
    seeds = {ds.round_seed(3, g, r) for g in range(20) for r in range(5)}
    assert len(seeds) == 100


def np_dr_grpo(logp, old, adv, mask, eps, eps_high, max_new_tokens):
    """Dr. GRPO's objective (Liu et al. 2025): 1/G sum_i sum_t min(...) / MAX_TOKENS,
    i.e. no 1/|o_i|; here averaged over every completion of the batch."""
    B, T = logp.shape
    total = 0.0
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                r = np.exp(logp[i, t] - old[i, t])
                total += -min(r * adv[i], np.clip(r, 1 - eps, 1 + eps_high) * adv[i])
    return total / (B * max_new_tokens)


def test_constant_normalizer_matches_dr_grpo_and_accumulates_exactly():
    rng = np.random.default_rng(0)
    B, T, N = 8, 12, 10
    logp = rng.normal(-2, 0.5, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)  # off-policy: some clipping
    lengths = rng.integers(1, N + 1, B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    rewards = rng.integers(0, 2, B).astype(np.float32)
    adv = np.asarray(gl.group_advantages(jnp.asarray(rewards), 4, "group-mean"))

    def loss(rows):
        mode, denominator = grpo.aggregation_args(
            "constant-normalizer", len(rows), jnp.zeros(len(rows)), N
        )
        value, _ = gl.grpo_loss(
            jnp.asarray(logp[rows]), jnp.asarray(old[rows]), None, jnp.asarray(adv[rows]),
            jnp.asarray(mask[rows]), eps=0.2, eps_high=0.28, beta=0.0, aggregation=mode,
            num_tokens=denominator,
        )  # fmt: skip
        return float(value)

    want = np_dr_grpo(logp, old, adv, mask, 0.2, 0.28, N)
    assert loss(np.arange(B)) == pytest.approx(want, rel=1e-5)
    # Two micro-batches, averaged by the loop, equal the one big batch.
    halves = (loss(np.arange(4)) + loss(np.arange(4, 8))) / 2
    assert halves == pytest.approx(want, rel=1e-5)
