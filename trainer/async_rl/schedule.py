"""Which rollout batch a worker samples next and which policy version it needs (pure).

Rollout batch ``i`` is first trained on at step ``t_i = warmup + i x steps_per_rollout`` (the
batch source's own arithmetic); at that step the trainer holds version ``t_i`` (versions count
finished optimizer steps). Its policy lag is ``t_i - v`` for the version ``v`` that sampled it,
so a worker may sample it once it holds ``v >= t_i - maxPolicyLag``. Worker ``w`` of ``W`` samples
the indices ``i = w (mod W)``: a fixed share, so a restarted worker picks up exactly its own.
"""

from __future__ import annotations

from collections.abc import Collection


def first_step(index: int, warmup: int, steps_per_rollout: int) -> int:
    """The step at which rollout batch ``index`` is first trained on."""
    return warmup + index * steps_per_rollout


def min_version(index: int, warmup: int, steps_per_rollout: int, lag: int) -> int:
    """The oldest policy version that may sample rollout batch ``index``."""
    return max(0, first_step(index, warmup, steps_per_rollout) - lag)


def next_index(worker: int, workers: int, consumed: int, queued: Collection[int]) -> int:
    """Worker ``worker``'s next rollout index: the first of its share not yet trained on
    (``>= consumed``, the index the trainer takes next) and not already queued."""
    if not 0 <= worker < workers:
        raise ValueError(f"rollout worker {worker} outside 0..{workers - 1}")
    i = consumed + (worker - consumed) % workers
    while i in queued:
        i += workers
    return i


def lag_ok(index: int, version: int, warmup: int, steps_per_rollout: int, lag: int) -> bool:
    """Whether a batch sampled by ``version`` may be trained on (0 <= lag <= maxPolicyLag)."""
    return 0 <= first_step(index, warmup, steps_per_rollout) - version <= lag
