"""DAPO's dynamic sampling as pure functions: which sampled groups fill a step's batch.

A group (one prompt's G completions) whose rewards are all equal has advantage 0 and teaches
nothing. With ``dynamicSampling`` each step samples rounds of ``batchSize`` prompts (the sampler's
shape never changes, so it compiles once), keeps the groups whose rewards differ, and stops when
``batchSize`` of them are kept or after ``maxSamplingRounds`` rounds. Kept groups beyond the batch
are dropped, as in verl (``algorithm.filter_groups``): they were sampled by these weights and would
be stale a step later. A batch still short after the last round is filled with equal-reward groups
in sampling order; their advantage is 0, so the step trains on what there is, at the fixed batch
shape (batchSize x G rows) that the jitted step was compiled for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def round_seed(seed: int, group: int, round_: int) -> int:
    """The sampler's seed for round ``round_`` of rollout group ``group``; round 0 uses GRPO's
    ``group_seed``, so a step whose first round fills the batch samples exactly what GRPO would."""
    words = [seed, group] if round_ == 0 else [seed, group, round_]
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


def informative_groups(rewards_r: np.ndarray, group_size: int) -> np.ndarray:
    """[R / G] bool: the group's rewards are not all equal (exactly: max != min)."""
    by_group = np.asarray(rewards_r).reshape(-1, group_size)
    return by_group.max(axis=1) != by_group.min(axis=1)


def choose_groups(
    informative_by_round: Sequence[np.ndarray], batch_groups: int
) -> list[tuple[int, int]]:
    """(round, group) pairs filling a batch of ``batch_groups`` groups: informative groups in
    sampling order, then, if the rounds ran out first, equal-reward groups in sampling order."""
    kept = [(r, k) for r, mask in enumerate(informative_by_round) for k in np.flatnonzero(mask)]
    filler = [(r, k) for r, mask in enumerate(informative_by_round) for k in np.flatnonzero(~mask)]
    chosen = (kept + filler)[:batch_groups]
    if len(chosen) < batch_groups:
        raise ValueError(f"{len(chosen)} groups sampled, {batch_groups} needed")
    return [(int(r), int(k)) for r, k in chosen]


def gather_rows(
    columns_by_round: Sequence[np.ndarray], chosen: Sequence[tuple[int, int]], group_size: int
) -> np.ndarray:
    """The rows of the chosen groups (each group's G rows kept adjacent), in ``chosen``'s order."""
    G = group_size
    return np.concatenate([columns_by_round[r][k * G : (k + 1) * G] for r, k in chosen])
