"""Action logs -> columnar event arrays -> padded training / evaluation batches.

Everything the model learns from is an `EventLog`: one row per event (user, item, action,
surface, time), sorted by user then event time, with a CSR `offsets` array marking each
user's slice. Loaders exist for

- the event dicts / JSONL that streams/ produces (`events_from_dicts`, `load_events_jsonl`),
- one-line-per-user sequence files such as Amazon Beauty (`load_sequences`),
- MovieLens `u.data` ratings, replayed as events (`load_movielens`: rating >= threshold is a
  "save", anything else a "click").

Splits say, per user, which events may be trained on (`train_end`) and which events are
evaluation targets (`targets`): `leave_one_out` (last = test, second-to-last = validation,
the published protocol for Beauty), `tail_split` (each user's last fraction of events are
targets, each predicted from everything before it) and `time_split` (one cut-off in time for
everybody: no training event is later than an evaluated one).

Batches are built with numpy fancy indexing over the whole log (no per-event Python loop):
histories are LEFT-padded so that the newest event is always the last column, which is what
the exported user model expects.

Index conventions (shared with the model and the ONNX interface):
item index 1..N (0 = padding; item index i is item-encoder bucket i, see inference/items.py),
action index 1..A and surface index 1..S (position in the settings' lists + 1; 0 = padding).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EventLog:
    """All events of a data set, columnar, sorted by (user, ts); user u owns rows offsets[u]:offsets[u+1]."""

    user: np.ndarray  # int64 [E] user row
    item: np.ndarray  # int64 [E] item index 1..N
    action: np.ndarray  # int64 [E] 1..A
    surface: np.ndarray  # int64 [E] 1..S
    ts: np.ndarray  # float64 [E] epoch seconds
    offsets: np.ndarray  # int64 [U+1]
    user_ids: np.ndarray  # str [U]
    item_ids: np.ndarray  # str [N]; item index i is row i-1
    actions: tuple[str, ...]
    surfaces: tuple[str, ...]
    features: np.ndarray | None = None  # float32 [N, F] content features, row i-1 = item index i

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_events(self) -> int:
        return len(self.item)

    @property
    def feature_dim(self) -> int:
        return 0 if self.features is None else int(self.features.shape[1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def item_counts(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Occurrences per item index (length N+1, index 0 unused) over `rows` (default all)."""
        items = self.item if rows is None else self.item[rows]
        return np.bincount(items, minlength=self.n_items + 1).astype(np.float64)

    @staticmethod
    def from_columns(
        user_ids: Sequence[Any] | np.ndarray,
        item_ids: Sequence[Any] | np.ndarray,
        action: np.ndarray,
        surface: np.ndarray,
        ts: np.ndarray,
        actions: Sequence[str],
        surfaces: Sequence[str],
        item_features: Mapping[str, Sequence[float]] | None = None,
        feature_dim: int = 0,
    ) -> EventLog:
        """Build a log from raw per-event columns (ids of any type; they become strings)."""
        users_raw = np.asarray(user_ids).astype(str)
        items_raw = np.asarray(item_ids).astype(str)
        user_keys, user = np.unique(users_raw, return_inverse=True)
        item_keys, item0 = np.unique(items_raw, return_inverse=True)
        ts = np.asarray(ts, dtype=np.float64)
        # Stable sort by user, then time; ties keep file order (lexsort's last key is primary).
        order = np.lexsort((np.arange(len(ts)), ts, user))
        counts = np.bincount(user, minlength=len(user_keys))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        features = None
        if item_features is not None or feature_dim:
            dim = feature_dim or len(next(iter(item_features.values())))  # type: ignore[union-attr]
            features = np.zeros((len(item_keys), dim), dtype=np.float32)
            for row, key in enumerate(item_keys):
                vec = (item_features or {}).get(str(key))
                if vec is not None:
                    features[row] = np.asarray(vec, dtype=np.float32)[:dim]
        return EventLog(
            user=user[order].astype(np.int64),
            item=(item0[order] + 1).astype(np.int64),
            action=np.asarray(action, dtype=np.int64)[order],
            surface=np.asarray(surface, dtype=np.int64)[order],
            ts=ts[order],
            offsets=offsets,
            user_ids=user_keys,
            item_ids=item_keys,
            actions=tuple(actions),
            surfaces=tuple(surfaces),
            features=features,
        )

    def with_features(self, features: np.ndarray) -> EventLog:
        assert features.shape[0] == self.n_items, f"features for {features.shape[0]} items, log has {self.n_items}"
        return replace(self, features=np.asarray(features, dtype=np.float32))


# ----------------------------------------------------------------------------- loaders


def events_from_dicts(
    events: Iterable[Any],
    actions: Sequence[str],
    surfaces: Sequence[str],
    item_features: Mapping[str, Sequence[float]] | None = None,
    feature_dim: int = 0,
) -> EventLog:
    """Events as streams/ defines them ({user_id, item_id, action, surface, ts(ms)}): dicts or
    `streams.schema.ActionEvent`s."""
    users: list[Any] = []
    items: list[Any] = []
    acts: list[str] = []
    surfs: list[str] = []
    ts: list[float] = []
    for ev in events:  # parsing dicts is inherently per event; everything after is vectorised
        if hasattr(ev, "to_wire"):  # streams.schema.ActionEvent
            ev = ev.to_wire()
        users.append(ev["user_id"])
        items.append(ev["item_id"])
        acts.append(ev["action"])
        surfs.append(ev["surface"])
        ts.append(ev["ts"])
    return EventLog.from_columns(
        users,
        items,
        _index_of(acts, actions, "action"),
        _index_of(surfs, surfaces, "surface"),
        np.asarray(ts, dtype=np.float64) / 1000.0,
        actions,
        surfaces,
        item_features,
        feature_dim,
    )


def load_events_jsonl(path: str | Path, actions: Sequence[str], surfaces: Sequence[str]) -> EventLog:
    """A JSONL file of streams/ events (one JSON object per line, ts in epoch ms)."""
    with open(path, encoding="utf-8") as f:
        return events_from_dicts((json.loads(line) for line in f if line.strip()), actions, surfaces)


def load_sequences(path: str | Path, action: str = "click", surface: str = "home") -> EventLog:
    """`user item item ...` per line, items in time order (Beauty.txt). No timestamps: ts = 0."""
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            items.append(np.asarray(parts[1:]))
            users.append(np.full(len(parts) - 1, parts[0]))
    user_col = np.concatenate(users)
    item_col = np.concatenate(items)
    n = len(item_col)
    # ts = 0 everywhere; from_columns' stable sort keeps the file's order within a user.
    return EventLog.from_columns(
        user_col, item_col, np.ones(n, np.int64), np.ones(n, np.int64), np.zeros(n), [action], [surface]
    )


def load_movielens(
    path: str | Path,
    save_threshold: float = 4.0,
    actions: Sequence[str] = ("click", "save"),
    surface: str = "home",
) -> EventLog:
    """MovieLens `u.data` (user, item, rating, unix ts): rating >= threshold -> "save", else "click"."""
    raw = np.loadtxt(path, usecols=(0, 1, 2, 3), dtype=np.float64)
    act = np.where(raw[:, 2] >= save_threshold, actions.index("save") + 1, actions.index("click") + 1)
    return EventLog.from_columns(
        raw[:, 0].astype(np.int64),
        raw[:, 1].astype(np.int64),
        act,
        np.ones(len(raw), np.int64),
        raw[:, 3],
        list(actions),
        [surface],
    )


def load_movielens_genres(path: str | Path, log: EventLog) -> np.ndarray:
    """u.item genre flags as a float32 [N, 19] matrix aligned with log.item_ids."""
    genres: dict[str, np.ndarray] = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            parts = line.rstrip("\n").split("|")
            genres[parts[0]] = np.asarray(parts[-19:], dtype=np.float32)
    return np.stack([genres.get(str(i), np.zeros(19, np.float32)) for i in log.item_ids])


def _index_of(values: Sequence[str], vocab: Sequence[str], what: str) -> np.ndarray:
    lookup = {name: i + 1 for i, name in enumerate(vocab)}
    try:
        return np.fromiter((lookup[v] for v in values), dtype=np.int64, count=len(values))
    except KeyError as e:
        raise ValueError(f"unknown {what} {e.args[0]!r}; configured: {list(vocab)}") from None


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """Which events train, which are evaluation targets (absolute row numbers into the log)."""

    train_end: np.ndarray  # int64 [U]: user u trains on rows offsets[u]:train_end[u]
    valid: np.ndarray  # int64 [V] rows of validation targets
    test: np.ndarray  # int64 [T] rows of test targets
    kind: str = ""  # "loo" | "tail" | "time" (datasets.make_split), recorded in checkpoints


def leave_one_out(log: EventLog, min_len: int = 3) -> Split:
    """Last event = test, second-to-last = validation, the rest trains (users shorter than
    `min_len` only train). The test history includes the validation event."""
    ends = log.offsets[1:]
    lengths = log.lengths()
    ok = lengths >= min_len
    train_end = np.where(ok, ends - 2, ends)
    return Split(train_end=train_end.astype(np.int64), valid=(ends - 2)[ok], test=(ends - 1)[ok])


def tail_split(log: EventLog, test_frac: float = 0.1, valid_frac: float = 0.1, min_train: int = 3) -> Split:
    """Each user's last `test_frac` of events are test targets, the `valid_frac` before them
    validation targets; every target is predicted from all events before it (the stream
    replayed in time order)."""
    starts, ends = log.offsets[:-1], log.offsets[1:]
    lengths = ends - starts
    def held_out(frac: float) -> np.ndarray:
        # At least one per user when asked for a share, none when asked for none: a model
        # trained for serving (test_frac=0) gives up only its validation share.
        n = np.maximum(1, np.floor(lengths * frac)) if frac > 0 else np.zeros_like(lengths)
        return np.where(lengths >= min_train + 2, n, 0).astype(np.int64)

    n_test, n_valid = held_out(test_frac), held_out(valid_frac)
    test_start = ends - n_test
    valid_start = test_start - n_valid
    return Split(
        train_end=valid_start,
        valid=concat_ranges(valid_start, test_start),
        test=concat_ranges(test_start, ends),
    )


def time_split(log: EventLog, test_frac: float = 0.1, valid_frac: float = 0.1) -> Split:
    """One cut-off in time for everybody: the log's last `test_frac` of events in time order are
    test targets, the `valid_frac` before them validation targets, everything earlier trains.
    Unlike `tail_split` (each user's own tail), no training event is later than an evaluated one,
    so nothing of the evaluated period (a trend, a new item's popularity) leaks into training.
    Events are ordered by (time, row), so tied times split by count as asked. A target is
    predicted from all of its user's events before it; a user's very first event is no target
    (nothing to predict it from: a cold start, not what the model is measured on)."""
    if not (0 <= test_frac < 1 and 0 <= valid_frac < 1 and test_frac + valid_frac < 1):
        raise ValueError(f"test_frac {test_frac} + valid_frac {valid_frac} must be a share of the log below 1")
    n = len(log.ts)
    if n > 1 and log.ts.min() == log.ts.max():
        raise ValueError("the events carry no times to cut on (e.g. a sequence file): use the loo or tail split")
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((np.arange(n), log.ts))] = np.arange(n)
    n_test, n_valid = int(round(n * test_frac)), int(round(n * valid_frac))
    part = np.where(rank >= n - n_test, 2, np.where(rank >= n - n_test - n_valid, 1, 0))  # 0 train, 1 valid, 2 test
    # Each user's events are in time order, so their training events are a prefix.
    starts, ends = log.offsets[:-1], log.offsets[1:]
    trains = np.concatenate([[0], np.cumsum(part == 0)])
    train_end = starts + (trains[ends] - trains[starts])
    first = np.zeros(n, dtype=bool)
    first[starts[log.lengths() > 0]] = True
    valid, test = np.flatnonzero((part == 1) & ~first), np.flatnonzero((part == 2) & ~first)
    if (valid_frac > 0 and len(valid) == 0) or (test_frac > 0 and len(test) == 0) or not (part == 0).any():
        raise ValueError(f"a time split of {n} events gives {int((part == 0).sum())} to train, {len(valid)} "
                         f"validation and {len(test)} test targets: too few events for these shares")
    return Split(train_end=train_end.astype(np.int64), valid=valid.astype(np.int64), test=test.astype(np.int64))


def engaged(log: EventLog, rows: np.ndarray, negative_actions: Sequence[str]) -> np.ndarray:
    """`rows` less those whose action is a negative one ("hide"). Such events are never targets
    in training, so scoring them as validation or test hits would reward retrieving what users
    hid (and select checkpoints for it)."""
    negative = [log.actions.index(a) + 1 for a in negative_actions if a in log.actions]
    return rows[~np.isin(log.action[rows], negative)]


def train_until(split: Split, rows: np.ndarray, log: EventLog) -> np.ndarray:
    """train_end moved up to include `rows` (e.g. validation targets, to refit before testing)."""
    end = split.train_end.copy()
    np.maximum.at(end, log.user[rows], rows + 1)
    return end


def concat_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for each pair, vectorised."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    rep = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return (np.arange(total) + rep).astype(np.int64)


# ----------------------------------------------------------------------------- batches


@dataclass
class HistoryBatch:
    """LEFT-padded histories (the newest event is column T-1); index 0 = padding."""

    item: np.ndarray  # int64 [B, T]
    action: np.ndarray  # int64 [B, T]
    surface: np.ndarray  # int64 [B, T]
    ts: np.ndarray  # float64 [B, T]
    rows: np.ndarray  # int64 [B, T] log row of each cell (-1 = padding)


def gather_history(log: EventLog, starts: np.ndarray, ends: np.ndarray, length: int) -> HistoryBatch:
    """Rows [max(start, end-length), end) of each example, left-padded to `length`."""
    cols = np.arange(length) - length  # -T .. -1
    rows = ends[:, None] + cols[None, :]  # [B, T]
    valid = rows >= starts[:, None]
    safe = np.where(valid, rows, 0)
    return HistoryBatch(
        item=np.where(valid, log.item[safe], 0),
        action=np.where(valid, log.action[safe], 0),
        surface=np.where(valid, log.surface[safe], 0),
        ts=np.where(valid, log.ts[safe], 0.0),
        rows=np.where(valid, rows, -1),
    )


@dataclass
class TrainBatch:
    """A window of history plus, for every position t, the next `window` events as targets."""

    history: HistoryBatch
    target_item: np.ndarray  # int64 [B, T, W] (0 = none)
    target_action: np.ndarray  # int64 [B, T, W]
    target_surface: np.ndarray  # int64 [B, T, W]


def training_windows(log: EventLog, train_end: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of every training window: each user's trainable events cut from the newest
    backwards into windows of `max_len` inputs, so long histories are fully used and each event
    is a target exactly once."""
    starts = log.offsets[:-1]
    # Inputs are rows start .. train_end-2 (the last trainable event is only a target).
    n_inputs = np.maximum(train_end - starts - 1, 0)
    n_windows = -(-n_inputs // max_len)  # ceil
    user = np.repeat(np.arange(log.n_users), n_windows)
    k = concat_ranges(np.zeros_like(n_windows), n_windows)  # window number from the newest, 0..
    end = train_end[user] - 1 - k * max_len  # exclusive end of this window's inputs
    start = np.maximum(starts[user], end - max_len)
    return start.astype(np.int64), end.astype(np.int64)


def gather_train_batch(
    log: EventLog,
    starts: np.ndarray,
    ends: np.ndarray,
    limit: np.ndarray,
    window: int,
) -> TrainBatch:
    """Windows [start, end) padded to their longest; targets of input row r are rows
    r+1 .. r+window that are < limit (the user's train_end)."""
    length = int((ends - starts).max())
    hist = gather_history(log, starts, ends, length)
    offsets = np.arange(1, window + 1)
    tgt_rows = hist.rows[:, :, None] + offsets[None, None, :]  # [B, T, W]
    valid = (hist.rows[:, :, None] >= 0) & (tgt_rows < limit[:, None, None])
    safe = np.where(valid, tgt_rows, 0)
    return TrainBatch(
        history=hist,
        target_item=np.where(valid, log.item[safe], 0),
        target_action=np.where(valid, log.action[safe], 0),
        target_surface=np.where(valid, log.surface[safe], 0),
    )


def iterate_train_batches(
    log: EventLog,
    train_end: np.ndarray,
    max_len: int,
    batch_size: int,
    window: int,
    rng: np.random.Generator,
) -> Iterator[TrainBatch]:
    """One epoch of shuffled batches. Windows of similar length are batched together (sorted
    within chunks of 50 batches) so little compute goes into padding."""
    starts, ends = training_windows(log, train_end, max_len)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    limit = train_end[log.user[np.maximum(ends - 1, 0)]]
    perm = rng.permutation(len(starts))
    chunk = batch_size * 50
    batches: list[np.ndarray] = []
    for c in range(0, len(perm), chunk):
        part = perm[c : c + chunk]
        part = part[np.argsort(ends[part] - starts[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    for b in rng.permutation(len(batches)):
        idx = batches[b]
        yield gather_train_batch(log, starts[idx], ends[idx], limit[idx], window)


def n_train_batches(log: EventLog, train_end: np.ndarray, max_len: int, batch_size: int) -> int:
    starts, ends = training_windows(log, train_end, max_len)
    n = int((ends > starts).sum())
    chunk = batch_size * 50
    full, rest = divmod(n, chunk)
    return full * 50 + -(-rest // batch_size)


def eval_histories(log: EventLog, targets: np.ndarray, max_len: int) -> HistoryBatch:
    """The `max_len` events before each target row (same user), left-padded."""
    starts = log.offsets[log.user[targets]]
    return gather_history(log, starts, targets, max_len)


def user_histories(log: EventLog, rows: np.ndarray) -> list[np.ndarray]:
    """Item indices the user of each target row interacted with before it (for exclusion)."""
    starts = log.offsets[log.user[rows]]
    return [log.item[s:r] for s, r in zip(starts, rows, strict=True)]


def reindex_items(log: EventLog, item_ids: np.ndarray, features: np.ndarray | None = None) -> EventLog:
    """The log expressed in another item vocabulary (e.g. a checkpoint's): item index i becomes
    the position of its id in `item_ids` + 1; events on items outside it are dropped."""
    item_ids = np.asarray(item_ids).astype(str)
    if len(item_ids) == log.n_items and np.array_equal(item_ids, log.item_ids):
        return log if features is None else log.with_features(features)
    order = np.argsort(item_ids)
    pos = np.searchsorted(item_ids[order], log.item_ids)
    pos = np.minimum(pos, len(item_ids) - 1)
    found = item_ids[order][pos] == log.item_ids
    new_index = np.where(found, order[pos] + 1, 0)  # per old item row
    item = new_index[log.item - 1]
    keep = item > 0
    counts = np.bincount(log.user[keep], minlength=log.n_users)
    return EventLog(
        user=log.user[keep],
        item=item[keep],
        action=log.action[keep],
        surface=log.surface[keep],
        ts=log.ts[keep],
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        user_ids=log.user_ids,
        item_ids=item_ids,
        actions=log.actions,
        surfaces=log.surfaces,
        features=features,
    )
