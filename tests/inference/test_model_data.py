"""Loaders, splits and batch building: vectorised, left-padded, each target used once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.data import (
    engaged,
    eval_histories,
    events_from_dicts,
    iterate_train_batches,
    leave_one_out,
    load_movielens,
    load_sequences,
    reindex_items,
    tail_split,
    time_split,
    train_until,
)


def test_sequence_file_keeps_order_and_ids(tmp_path: Path) -> None:
    path = tmp_path / "seq.txt"
    path.write_text("1 10 11 12 13\n2 11 14 10\n")
    log = load_sequences(path)
    assert log.n_users == 2 and log.n_items == 5
    u1 = log.item_ids[log.item[log.offsets[0] : log.offsets[1]] - 1]
    assert u1.tolist() == ["10", "11", "12", "13"]
    split = leave_one_out(log)
    assert log.item_ids[log.item[split.test] - 1].tolist() == ["13", "10"]
    assert log.item_ids[log.item[split.valid] - 1].tolist() == ["12", "14"]
    assert split.train_end.tolist() == [2, 5]


def test_movielens_ratings_become_outcomes(tmp_path: Path) -> None:
    path = tmp_path / "u.data"
    path.write_text("1\t5\t5\t300\n1\t6\t2\t100\n2\t5\t4\t200\t\t\n")
    log = load_movielens(path)
    assert log.actions == ("click", "save")
    # user 1 in time order: item 6 (rating 2 -> click), item 5 (rating 5 -> save)
    assert log.item_ids[log.item[:2] - 1].tolist() == ["6", "5"]
    assert log.action[:2].tolist() == [1, 2]
    assert log.ts[:2].tolist() == [100.0, 300.0]


def test_events_are_sorted_per_user_and_validated() -> None:
    events = [
        {"user_id": 7, "item_id": "b", "action": "save", "surface": "home", "ts": 2000},
        {"user_id": 7, "item_id": "a", "action": "click", "surface": "search", "ts": 1000},
        {"user_id": "x", "item_id": "a", "action": "hide", "surface": "related", "ts": 1500},
    ]
    log = events_from_dicts(events, ["click", "save", "hide"], ["home", "search", "related"])
    assert log.user_ids.tolist() == ["7", "x"]
    assert log.item_ids[log.item - 1].tolist() == ["a", "b", "a"]
    assert log.ts.tolist() == [1.0, 2.0, 1.5]  # seconds
    assert log.surface.tolist() == [2, 1, 3]
    with pytest.raises(ValueError, match="unknown action"):
        events_from_dicts([{**events[0], "action": "buy"}], ["click"], ["home"])


def _log(n_users: int = 30, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    events = []
    for u in range(n_users):
        for t in range(int(rng.integers(3, 40))):
            events.append({"user_id": u, "item_id": int(rng.integers(50)), "action": "click", "surface": "home", "ts": 1000 * t})
    return events_from_dicts(events, ["click"], ["home"])


def test_every_trainable_event_is_a_target_exactly_once() -> None:
    log = _log()
    split = tail_split(log)
    seen: list[int] = []
    for batch in iterate_train_batches(log, split.train_end, 8, 4, 1, np.random.default_rng(0)):
        rows = batch.history.rows
        assert (batch.history.item[rows < 0] == 0).all()
        # left padding: once a row starts, it never pads again
        started = np.maximum.accumulate(rows >= 0, axis=1)
        assert ((rows >= 0) == started).all()
        tgt = batch.target_item[..., 0]
        seen += (rows[tgt > 0] + 1).tolist()
    starts = log.offsets[:-1]
    expected = [r for u in range(log.n_users) for r in range(starts[u] + 1, split.train_end[u])]
    assert sorted(seen) == sorted(expected)


def test_future_window_targets_stop_at_the_training_cut() -> None:
    log = _log(seed=1)
    split = tail_split(log, test_frac=0.2)
    for batch in iterate_train_batches(log, split.train_end, 8, 4, 3, np.random.default_rng(0)):
        rows = batch.history.rows
        for k in range(3):
            has = batch.target_item[..., k] > 0
            target_rows = rows[has] + 1 + k
            assert (target_rows < split.train_end[log.user[rows[has]]]).all()
            assert (log.item[target_rows] == batch.target_item[..., k][has]).all()


def test_eval_histories_are_the_events_before_the_target() -> None:
    log = _log(seed=2)
    split = tail_split(log)
    h = eval_histories(log, split.test, 5)
    for i, r in enumerate(split.test):
        start = log.offsets[log.user[r]]
        expect = log.item[max(start, r - 5) : r]
        assert h.item[i, 5 - len(expect) :].tolist() == expect.tolist()
        assert (h.item[i, : 5 - len(expect)] == 0).all()
    end = train_until(split, split.valid, log)
    assert (end >= split.train_end).all()


def test_reindex_drops_unknown_items() -> None:
    log = events_from_dicts(
        [{"user_id": 1, "item_id": i, "action": "click", "surface": "home", "ts": t} for t, i in enumerate("abcab")],
        ["click"],
        ["home"],
    )
    other = reindex_items(log, np.array(["b", "z", "a"]))
    assert other.item.tolist() == [3, 1, 3, 1]
    assert other.offsets.tolist() == [0, 4]


def test_a_split_asked_for_no_test_share_keeps_every_event() -> None:
    log = _log()
    split = tail_split(log, test_frac=0.0, valid_frac=0.1)
    assert len(split.test) == 0  # a model for serving holds out its validation share only
    ends = log.offsets[1:]
    assert set(ends[split.train_end < ends] - 1) <= set(split.valid.tolist())  # each user's newest is validation, not test


def test_hidden_items_are_not_evaluation_targets() -> None:
    events = [{"user_id": 1, "item_id": i, "action": a, "surface": "home", "ts": 1000 * i}
              for i, a in enumerate(["click", "save", "hide", "click"])]
    log = events_from_dicts(events, ["click", "save", "hide"], ["home"])
    assert engaged(log, np.arange(4), ["hide"]).tolist() == [0, 1, 3]
    assert engaged(log, np.arange(4), []).tolist() == [0, 1, 2, 3]


def test_time_split_has_one_cut_off_for_everybody() -> None:
    """No training event after any evaluated one (a per-user tail lets other users' later events
    train); each user's targets are a contiguous run after their training prefix."""
    from inference.data import EventLog

    rng = np.random.default_rng(0)
    n = 2_000
    users = np.sort(rng.integers(0, 50, n))
    ts = np.empty(n)
    for u in np.unique(users):  # each user active over a different stretch of time
        rows = np.flatnonzero(users == u)
        ts[rows] = np.sort(rng.uniform(u * 10, u * 10 + 500, len(rows)))
    log = EventLog.from_columns(users.tolist(), rng.integers(0, 100, n).tolist(), rng.integers(0, 2, n),
                                rng.integers(0, 2, n), ts, ["click", "save"], ["home", "search"])
    split = time_split(log, test_frac=0.1, valid_frac=0.1)
    train = np.concatenate([np.arange(a, b) for a, b in zip(log.offsets[:-1], split.train_end, strict=True)])
    assert log.ts[train].max() < log.ts[split.valid].min() <= log.ts[split.valid].max() < log.ts[split.test].min()
    firsts = set(log.offsets[:-1].tolist())
    held = set(range(n)) - set(train.tolist())
    assert set(split.valid.tolist()) | set(split.test.tolist()) == held - firsts  # a user's first event: no target
    assert abs(len(split.test) - 0.1 * n) <= 5 and abs(len(split.valid) - 0.1 * n) <= 5
    # Tied times split by count, not all on one side of the cut: a day-resolution log whose last
    # day holds 30% of the events (rows are grouped by user, so each user's times stay in order).
    two_days = (np.arange(n) >= n * 0.7) * 86400.0
    daily = EventLog.from_columns(users.tolist(), rng.integers(0, 100, n).tolist(), rng.integers(0, 2, n),
                                  rng.integers(0, 2, n), two_days, ["click", "save"], ["home", "search"])
    by_day = time_split(daily, test_frac=0.1, valid_frac=0.1)
    assert 0.1 * n - 10 <= len(by_day.valid) <= 0.1 * n and 0.1 * n - 10 <= len(by_day.test) <= 0.1 * n
    # Per user: training prefix, then validation, then test rows, in order.
    tail = tail_split(log)
    tail_train = np.concatenate([np.arange(a, b) for a, b in zip(log.offsets[:-1], tail.train_end, strict=True)])
    assert log.ts[tail_train].max() > log.ts[tail.test].min()  # what the time split avoids
    with pytest.raises(ValueError, match="below 1"):
        time_split(log, test_frac=0.5, valid_frac=0.5)
    # A sequence file carries no times (all 0): nothing to cut on.
    untimed = EventLog.from_columns(users.tolist(), rng.integers(0, 100, n).tolist(), rng.integers(0, 2, n),
                                    rng.integers(0, 2, n), np.zeros(n), ["click", "save"], ["home", "search"])
    with pytest.raises(ValueError, match="no times"):
        time_split(untimed)


def test_the_synthetic_data_set_speaks_the_configured_vocabulary_and_is_remade_exactly() -> None:
    """`recsys train --dataset synthetic` (docker-compose's trainer) under configured actions and
    surfaces; `recsys evaluate` remakes the very log, times included, from the checkpoint."""
    from inference.datasets import load_dataset, synthetic_start_ms
    from recsys.settings import Settings

    settings = Settings(events={"surfaces": ["home", "shop"], "actions": ["click", "like", "hide"]})
    log = load_dataset("synthetic", None, settings, n_events=400, n_users=20, n_items=40)
    assert log.surfaces == ("home", "shop") and log.actions == ("click", "like", "hide")
    assert set(np.unique(log.surface)) == {1, 2} and set(np.unique(log.action)) == {1, 2, 3}
    again = load_dataset("synthetic", None, settings, n_events=400, n_users=20, n_items=40,
                         start_ts_ms=synthetic_start_ms(log) - 60_000)
    np.testing.assert_array_equal(again.item, log.item)
    np.testing.assert_allclose(again.ts, log.ts - 60.0)
    remade = load_dataset("synthetic", None, settings, n_events=400, n_users=20, n_items=40,
                          start_ts_ms=synthetic_start_ms(log))
    np.testing.assert_array_equal(remade.ts, log.ts)
