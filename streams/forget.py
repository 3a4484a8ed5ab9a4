"""Forgetting idle users: what bounds the `sequences` table, beside each sequence's own bounds.

`streams.max_sequence_len` and `streams.max_age_ms` bound what one user's value holds, but a
user seen once stays in the table (in memory with `memory://`) and in its changelog for good.
A user whose last fold is older than `streams.forget_idle_ms` is forgotten: the value is
deleted from the store and a tombstone goes to its changelog partition, so a restart does not
bring it back. Idle is measured by the value's `version`, the hybrid clock of its last fold
(processing time, not event time: a replay of old events is not idle). A user who comes back
starts afresh, above every version served before; with `forget_idle_ms` = `max_age_ms` their
old events would have fallen off behind the new one anyway. What is lost with them: their
hides (no age bound of their own).

The sweep runs inside the flush window, before its events are folded (`IdleSweep.due`): the
value is read, judged and deleted without an await in between, so no fold of the same user
interleaves, and the tombstone is produced through the window's own outbox ahead of the
window's changelog records. A round reads the table's keys once, then examines
`streams.sweep_batch` of them per window; rounds start at most every `streams.sweep_every_s`.
Only values that name their partition ("p", written since it exists) of a partition this
worker owns are forgotten; a `memory://` store drops the values of partitions it lost once
the rebalance's recovery completes (`streams.app.put_value` tells it their partitions).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, MutableMapping

import msgpack

from recsys.settings import StreamsSettings

__all__ = ["IdleSweep"]

# Versions below this are the per-user counters of earlier releases, not times: such a value's
# idleness is unknown until its next fold writes a clock version.
CLOCK_VERSIONS_FROM = 10**12  # ms, September 2001


class IdleSweep:
    """Which users to forget, a slice of the table per flush window."""

    def __init__(self, cfg: StreamsSettings) -> None:
        self.idle_ms = cfg.forget_idle_ms
        self.every_s = cfg.sweep_every_s
        self.batch = cfg.sweep_batch
        self._keys: list[bytes] = []  # the round's keys
        self._at = 0  # the next of them to examine
        self._next_round = 0.0  # monotonic

    def due(self, data: MutableMapping[bytes, bytes], owned: Callable[[], Container[int]],
            now_ms: int) -> list[tuple[bytes, int]]:
        """Delete the idle users among the next slice of keys from ``data`` (the table's store)
        and return (key, changelog partition) of each, for their tombstones. ``owned`` gives the
        partitions this worker owns; asked only when a slice is examined, not every window."""
        if self.idle_ms <= 0:
            return []
        if self._at >= len(self._keys):
            if time.monotonic() < self._next_round:
                return []
            self._keys, self._at = list(data.keys()), 0
            self._next_round = time.monotonic() + self.every_s
        batch = self._keys[self._at : self._at + self.batch]
        self._at += len(batch)
        owned_now = owned()
        # Faust's memory store also maps each key it recovered to its partition: forgotten too.
        recovered = getattr(data, "_key_partition", {})
        forgotten: list[tuple[bytes, int]] = []
        for key in batch:
            raw = data.get(key)
            if raw is None:
                continue
            try:
                value = msgpack.unpackb(raw, raw=False)
                version, partition = value.get("version", 0), value.get("p", -1)
            except (ValueError, TypeError, AttributeError, msgpack.UnpackException):
                version = partition = None
            if type(version) is not int or type(partition) is not int:
                continue  # not a value of ours: left to the user's next fold (which reports it), not a window's failure
            if partition in owned_now and CLOCK_VERSIONS_FROM <= version < now_ms - self.idle_ms:
                del data[key]
                recovered.pop(key, None)
                forgotten.append((key, partition))
        return forgotten
