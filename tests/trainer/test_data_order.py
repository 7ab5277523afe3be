"""The run's row order (``data/order.py``): seeded per epoch, resumable, the same whether a run
reads it by position or walks it."""

from __future__ import annotations

from posttrain.trainer.data.order import EpochCursor, EpochStream, epoch_order


def test_each_epoch_is_a_seeded_permutation_and_file_order_without_shuffle():
    first, second = epoch_order(10, 7, 0, True), epoch_order(10, 7, 1, True)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert list(first) != list(second)  # a new permutation each epoch
    assert list(epoch_order(10, 7, 0, True)) == list(first)  # a function of (seed, epoch)
    assert list(epoch_order(10, 7, 3, False)) == list(range(10))


def test_the_cursor_walks_the_streams_order_and_resumes_mid_epoch():
    items = list("abcdefg")
    stream = EpochStream(items, seed=3, shuffle=True)
    cursor = EpochCursor(items, seed=3, shuffle=True)
    walked = cursor.take(5) + cursor.take(6)  # across the first epoch's end
    assert walked == [stream[k] for k in range(11)]
    saved = cursor.state()
    assert saved == {"epoch": 1, "index": 4}
    expected = cursor.take(9)
    resumed = EpochCursor(items, seed=3, shuffle=True)
    resumed.restore(saved)
    assert resumed.take(9) == expected


def test_arrange_makes_each_epochs_rows():
    pairs = EpochCursor(list(range(6)), seed=0, shuffle=False, arrange=lambda r: [r[:3], r[3:]])
    assert pairs.take(3) == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]
    assert pairs.state() == {"epoch": 1, "index": 1}
