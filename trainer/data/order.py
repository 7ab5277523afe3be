"""The order in which a run visits its rows, a pure function of the seed: epoch ``e`` visits them
in a permutation seeded by ``(seed, e)``, or in file order without ``shuffle``.

Two ways to walk it: ``EpochStream`` (row k of the run, k counting over epochs: the rollout
algorithms' prompts) and ``EpochCursor`` (the next rows, with a position to checkpoint: the
training sources, whose epochs may be packed into fewer rows).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The indices of ``n`` rows in epoch ``epoch``'s order."""
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


class EpochStream(Generic[T]):
    """Row k of the run (k counts over epochs); one epoch's order is kept at a time."""

    def __init__(self, rows: Sequence[T], seed: int, shuffle: bool):
        self.rows = list(rows)
        self.seed = seed
        self.shuffle = shuffle
        self._orders: dict[int, np.ndarray] = {}

    def __getitem__(self, k: int) -> T:
        epoch, i = divmod(k, len(self.rows))
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.rows), self.seed, epoch, self.shuffle)}
        return self.rows[int(self._orders[epoch][i])]


class EpochCursor(Generic[T]):
    """The next rows of a run, epoch after epoch, resumable from ``state()``. ``arrange`` turns an
    epoch's items, in order, into its rows (packing); by default each item is a row."""

    def __init__(
        self,
        items: Sequence[T],
        *,
        seed: int,
        shuffle: bool,
        arrange: Callable[[list[T]], list[T]] | None = None,
    ):
        self.items = list(items)
        self.seed = seed
        self.shuffle = shuffle
        self.arrange = arrange
        self.epoch = 0
        self.index = 0
        self._rows = self._rows_for(0)

    def _rows_for(self, epoch: int) -> list[T]:
        order = epoch_order(len(self.items), self.seed, epoch, self.shuffle)
        rows = [self.items[i] for i in order]
        return rows if self.arrange is None else self.arrange(rows)

    def take(self, n: int) -> list[T]:
        """The next ``n`` rows, crossing into the next epoch where this one ends."""
        rows = []
        for _ in range(n):
            if self.index >= len(self._rows):
                self.epoch += 1
                self.index = 0
                self._rows = self._rows_for(self.epoch)
            rows.append(self._rows[self.index])
            self.index += 1
        return rows

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._rows = self._rows_for(self.epoch)
