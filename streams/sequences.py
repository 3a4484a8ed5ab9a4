"""Per-user sequences: the pure fold behind the Faust table `sequences`, and its wire forms.

A user's sequence is the last `streams.max_sequence_len` events in event-time order, no
older than `streams.max_age_ms` behind the newest. Events are ordered by the total key
(ts, str(item_id), action, surface), so the kept sequence is a function of the *set* of
accepted events, not of the order they arrived in. That is what makes re-delivery harmless:
after a crash, events replayed from uncommitted offsets are either still in the sequence
(exact duplicate: dropped) or have already fallen off it (stale: dropped), and the state
recovered from the changelog plus the replay equals the state of an uninterrupted run.

Only a late event that *would enter* the sequence is rejected (`TooLate`, to the DLQ): one
behind the user's newest event by more than `streams.lateness_ms`. An event that would fall
off at once (older than everything in a full sequence, or beyond the age bound) is `stale`:
counted, not stored, not dead-lettered - which is also exactly how a replayed, long-evicted
event must be treated.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import msgpack

from recsys.settings import Settings
from streams.errors import TooLate
from streams.schema import ActionEvent, Id

__all__ = [
    "Folded",
    "Outcome",
    "SeqEvent",
    "UserState",
    "decode_state",
    "encode_state",
    "fold_event",
    "order_key",
    "user_update",
]


class SeqEvent(NamedTuple):
    """What a sequence keeps of an event (the `user-updates` contract's event fields)."""

    ts: int
    item_id: Id
    action: str
    surface: str

    def to_wire(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "action": self.action, "surface": self.surface, "ts": self.ts}


def order_key(e: SeqEvent) -> tuple[int, str, str, str]:
    """Total order of sequence events; equal keys are exact duplicates (ids compare as str)."""
    return (e.ts, str(e.item_id), e.action, e.surface)


class Outcome(StrEnum):
    APPLIED = "applied"  # the sequence changed
    DUPLICATE = "duplicate"  # already in the sequence (client retry or re-delivery)
    STALE = "stale"  # would fall off at once (beyond the age or count bound)


class Folded(NamedTuple):
    seq: tuple[SeqEvent, ...]
    outcome: Outcome


def fold_event(seq: tuple[SeqEvent, ...], event: ActionEvent, settings: Settings) -> Folded:
    """Fold one valid event into a user's sequence (oldest -> newest); pure.

    Returns the new sequence (the same object when nothing changed) and what happened.
    Raises `TooLate` for an event that would enter the sequence but is behind the newest
    event by more than the lateness bound.
    """
    cfg = settings.streams
    new = SeqEvent(event.ts, event.item_id, event.action, event.surface)
    if not seq or new.ts > seq[-1].ts:
        # The common case, an event newer than all kept: it goes last, nothing can be a
        # duplicate, stale or late. Same result as the general path, without its key list.
        out = (*seq, new)
        cutoff = new.ts - cfg.max_age_ms
        start = bisect_left([e.ts for e in out], cutoff) if out[0].ts < cutoff else 0
        return Folded(out[max(start, len(out) - cfg.max_sequence_len) :], Outcome.APPLIED)
    key = order_key(new)
    keys = [order_key(e) for e in seq]  # len <= max_sequence_len: a scan is cheaper than an index
    i = bisect_left(keys, key)
    if i < len(keys) and keys[i] == key:
        return Folded(seq, Outcome.DUPLICATE)
    if seq:
        newest = seq[-1].ts
        if new.ts < newest - cfg.max_age_ms or (i == 0 and len(seq) >= cfg.max_sequence_len):
            return Folded(seq, Outcome.STALE)
        if new.ts < newest - cfg.lateness_ms:
            raise TooLate(f"ts={new.ts} is {newest - new.ts} ms behind the user's newest event (lateness_ms={cfg.lateness_ms})")
    out = seq[:i] + (new,) + seq[i:]
    # Trim: first by age against the newest event, then by count (both drop from the front).
    cutoff = out[-1].ts - cfg.max_age_ms
    start = bisect_left([e.ts for e in out], cutoff)
    out = out[max(start, len(out) - cfg.max_sequence_len) :]
    return Folded(out, Outcome.APPLIED)


@dataclass(frozen=True, slots=True)
class UserState:
    """The value of the `sequences` table for one user."""

    user_id: Id  # as the first event spelled it (the table key is str(user_id))
    version: int  # bumped at every emitted update; strictly increasing per user
    events: tuple[SeqEvent, ...]  # oldest -> newest


def encode_state(state: UserState) -> bytes:
    """msgpack value of the changelog topic: {"user_id", "version", "events": [[ts, item, action, surface]]}."""
    # msgpack writes the SeqEvent tuples as arrays: no per-event conversion.
    return msgpack.packb({"user_id": state.user_id, "version": state.version, "events": state.events}, use_bin_type=True)


def decode_state(raw: bytes) -> UserState:
    obj = msgpack.unpackb(raw, raw=False, use_list=False)
    return UserState(obj["user_id"], obj["version"], tuple(map(SeqEvent._make, obj["events"])))


def user_update(state: UserState, *, last_event_ts: int, emitted_at: int) -> dict[str, Any]:
    """The `user-updates` value (shared contract): the whole bounded sequence, oldest -> newest."""
    return {
        "user_id": state.user_id,
        "version": state.version,
        "events": [e.to_wire() for e in state.events],
        "last_event_ts": last_event_ts,
        "emitted_at": emitted_at,
    }
