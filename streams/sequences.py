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

Beside the sequence, the items the user hid (`train.negative_actions`), one entry per item at
its newest hide, the newest `streams.max_hidden` kept and no age bound: a hidden item must stay
out of the user's candidates after the hide has fallen off the sequence. A function of the set
of hides (the newest K of a set), so replays leave it as they find it, and a hide is taken even
when it is stale or too late for the sequence.

Two forms of the same thing: `fold_event` on a tuple of `SeqEvent`s is the reference (pure,
simple, what the tests reason with); `PackedSeq` is what the worker folds and stores. It keeps
each event already encoded in its `user-updates` wire form, so that a window costs per user
one small msgpack decode, an append, one small encode, and an update assembled by
concatenation instead of re-encoding the whole sequence three times (the profile in
benchmarks/sections/ingest.md). Anything but an append delegates to `fold_event`, and
tests/streams/test_fold.py checks that both give the same sequences, outcomes and bytes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import msgpack

from recsys.settings import Settings
from streams.errors import TooLate
from streams.schema import ActionEvent, Id

__all__ = [
    "Folded",
    "Hidden",
    "Outcome",
    "PackedSeq",
    "SeqEvent",
    "UserState",
    "decode_state",
    "encode_state",
    "fold_event",
    "fold_hidden",
    "hidden_malformed",
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


Hidden = tuple[tuple[int, Id], ...]  # (time of the hide, item), by (ts, str(item)); one per item


def _hidden_key(entry: tuple[int, Id]) -> tuple[int, str]:
    return (entry[0], str(entry[1]))


def hidden_malformed(hidden: Hidden) -> str | None:
    """What makes stored hidden items not ones `fold_hidden` wrote, or None."""
    if not all(len(h) == 2 and type(h[0]) is int and type(h[1]) in (int, str) for h in hidden):
        return "hidden items not (time, item) pairs"
    return None


def fold_hidden(hidden: Hidden, event: ActionEvent, settings: Settings) -> Hidden:
    """The items a user hid, after one more event; pure. An item is kept once, at its newest
    hide; the newest `max_hidden` are kept (the same object when nothing changed). A hide too
    late for the sequence (`TooLate`, dead-lettered) still counts here: the result depends on
    the set of hides only, so a late one can be taken. (An id spelled 7 and "7" is one item;
    which spelling is kept at equal times depends on arrival, as in the sequence.)"""
    if event.action not in settings.train.negative_actions:
        return hidden
    limit = settings.streams.max_hidden
    if limit <= 0:
        return ()
    item = str(event.item_id)
    if not hidden or (event.ts, item) > _hidden_key(hidden[-1]):
        # The common case, a newer hide than every kept one: append, unless the item is
        # already hidden (then its entry moves to the end).
        if all(str(i) != item for _, i in hidden):
            return (*hidden, (event.ts, event.item_id))[-limit:]
    entries = {str(i): (ts, i) for ts, i in hidden}
    if item not in entries or entries[item][0] < event.ts:
        entries[item] = (event.ts, event.item_id)
    kept = tuple(sorted(entries.values(), key=_hidden_key)[-limit:])  # also after max_hidden was lowered
    return hidden if kept == hidden else kept


@dataclass(frozen=True, slots=True)
class UserState:
    """The value of the `sequences` table for one user."""

    user_id: Id  # as the first event spelled it (the table key is str(user_id))
    version: int  # at every emitted update max(version + 1, now in ms): strictly increasing per user
    events: tuple[SeqEvent, ...]  # oldest -> newest
    hidden: Hidden = ()  # `fold_hidden`'s


def encode_state(state: UserState) -> bytes:
    """The table (changelog) value of `state`: `PackedSeq`'s form."""
    return PackedSeq.of(state.user_id, state.version, state.events, state.hidden).encode()


def decode_state(raw: bytes) -> UserState:
    """A table (changelog) value as a `UserState` (either form: `PackedSeq.decode`)."""
    packed = PackedSeq.decode(raw)
    return UserState(packed.user_id, packed.version, packed.events(), tuple(packed.hidden))


def user_update(state: UserState, *, last_event_ts: int, emitted_at: int) -> dict[str, Any]:
    """The `user-updates` value (shared contract): the whole bounded sequence, oldest -> newest,
    and the items the user hid (oldest hide first), to be kept out of their candidates."""
    return {
        "user_id": state.user_id,
        "version": state.version,
        "events": [e.to_wire() for e in state.events],
        "last_event_ts": last_event_ts,
        "emitted_at": emitted_at,
        "hidden": [item for _, item in state.hidden],
    }


# One Packer for the hot path (msgpack.packb builds a new one per call: a third of its cost).
# Not thread-safe; the worker is one asyncio thread.
_pack = msgpack.Packer().pack


def _wire_event(ts: int, item_id: Id, action: str, surface: str) -> bytes:
    # Exactly SeqEvent.to_wire packed: an update assembled from these equals packb(user_update(...)).
    return _pack({"item_id": item_id, "action": action, "surface": surface, "ts": ts})


def _array_header(n: int) -> bytes:
    if n <= 0x0F:
        return bytes((0x90 | n,))
    if n <= 0xFFFF:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


_UPDATE_USER_ID = b"\x86" + msgpack.packb("user_id")  # a map of 6 entries, in user_update's order
_UPDATE_VERSION = msgpack.packb("version")
_UPDATE_EVENTS = msgpack.packb("events")
_UPDATE_LAST_EVENT_TS = msgpack.packb("last_event_ts")
_UPDATE_EMITTED_AT = msgpack.packb("emitted_at")
_UPDATE_HIDDEN = msgpack.packb("hidden")
_EMPTY_ARRAY = msgpack.packb([])


class PackedSeq:
    """One user's sequence as the worker folds and the table stores it (mutable).

    Table value: msgpack {"user_id", "version", "ts": [event time, ...], "sizes": [bytes, ...],
    "events": bin, "hidden": [[ts, item], ...]}, where "events" is the events' user-updates maps
    (`SeqEvent.to_wire`), msgpack-encoded and concatenated, oldest -> newest, and "sizes" their
    lengths, and "p" the `actions` partition the user's events come from (the changelog
    partition of the value: what forgetting the user needs, streams/forget.py). The earlier
    forms, "events": [[ts, item, action, surface], ...], no "hidden", no "p", are still read.
    """

    __slots__ = ("hidden", "partition", "sizes", "ts", "user_id", "version", "wire")

    def __init__(self, user_id: Id, version: int, ts: list[int], sizes: list[int], wire: bytes,
                 hidden: Hidden = (), partition: int = -1) -> None:
        self.user_id = user_id
        self.version = version
        self.ts = ts  # event times, oldest -> newest (what the age bound and appends look at)
        self.sizes = sizes  # byte length of each event's wire form in `wire`
        self.wire = wire  # the events' wire forms, concatenated
        self.hidden = hidden  # `fold_hidden`'s
        self.partition = partition  # -1: not known (a value written before "p")

    @classmethod
    def of(cls, user_id: Id, version: int, events: Sequence[SeqEvent], hidden: Hidden = ()) -> PackedSeq:
        wires = [_wire_event(*e) for e in events]
        return cls(user_id, version, [e.ts for e in events], [len(w) for w in wires], b"".join(wires), hidden)

    @classmethod
    def decode(cls, raw: bytes) -> PackedSeq:
        obj = msgpack.unpackb(raw, raw=False)
        events = obj["events"]
        hidden = tuple((ts, item) for ts, item in obj.get("hidden", ()))
        if isinstance(events, bytes):
            seq = cls(obj["user_id"], obj["version"], obj["ts"], obj["sizes"], events, hidden, obj.get("p", -1))
            # The shape the fold and the update rely on, checked here where a bad value can be
            # told apart (streams.app.read_state), not later mid-window; the newest entry only
            # (a whole pass cost 25% of a decode), and the sizes against the bytes: the fast
            # append path copies the bytes unread, so bytes not ours went on into every update.
            if (type(seq.version) is not int or len(seq.ts) != len(seq.sizes)
                    or (seq.ts and (type(seq.ts[-1]) is not int or type(seq.sizes[-1]) is not int))):
                raise ValueError("not a sequence value of this release (version, ts, sizes disagree)")
            if sum(seq.sizes) != len(events):
                raise ValueError("not a sequence value of this release (sizes do not add up to the events' bytes)")
            if seq.ts:
                newest = msgpack.unpackb(events[len(events) - seq.sizes[-1]:], raw=False)
                if not isinstance(newest, dict) or newest.get("ts") != seq.ts[-1]:
                    raise ValueError("not a sequence value of this release (the newest event is not its ts)")
            return seq
        # The earlier form: rare, so checked whole.
        if type(obj["version"]) is not int or not all(
                len(e) == 4 and type(e[0]) is int and type(e[1]) in (int, str) and type(e[2]) is str and type(e[3]) is str
                for e in events):
            raise ValueError("not a sequence value (version or events of the earlier form malformed)")
        return cls.of(obj["user_id"], obj["version"], [SeqEvent(*e) for e in events], hidden)

    def malformed(self) -> str | None:
        """What makes this value not one of ours, checked whole (every entry: `decode` checks
        the newest only), or None."""
        if type(self.version) is not int or len(self.ts) != len(self.sizes):
            return "version, ts and sizes disagree"
        if not all(type(t) is int for t in self.ts) or not all(type(n) is int and n > 0 for n in self.sizes):
            return "ts or sizes not all ints"
        if sum(self.sizes) != len(self.wire):
            return "sizes do not add up to the events' bytes"
        try:
            events = self.events()
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            return f"events unreadable ({type(exc).__name__})"
        if [e.ts for e in events] != self.ts:
            return "events' times are not ts"
        if not all(type(e.item_id) in (int, str) and type(e.action) is str and type(e.surface) is str for e in events):
            return "an event's item, action or surface of the wrong type"
        return hidden_malformed(self.hidden)

    def encode(self) -> bytes:
        state = {"user_id": self.user_id, "version": self.version, "ts": self.ts, "sizes": self.sizes, "events": self.wire}
        if self.hidden:  # most users hide nothing: no key, as in the earlier form
            state["hidden"] = self.hidden
        if self.partition >= 0:
            state["p"] = self.partition
        return _pack(state)

    def events(self) -> tuple[SeqEvent, ...]:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(self.wire)
        return tuple(SeqEvent(m["ts"], m["item_id"], m["action"], m["surface"]) for m in unpacker)

    def fold(self, event: ActionEvent, settings: Settings) -> Outcome:
        """`fold_hidden` and `fold_event` in place: same hidden items, same sequence, same
        outcome, same `TooLate` (raised after the hide, if it is one, has been taken)."""
        if event.action in settings.train.negative_actions:
            self.hidden = fold_hidden(self.hidden, event, settings)
        return self._fold_sequence(event, settings)

    def _fold_sequence(self, event: ActionEvent, settings: Settings) -> Outcome:
        ts = self.ts
        if ts and event.ts <= ts[-1]:
            # Not an append (out of order, duplicate, stale, too late): the reference decides.
            folded = fold_event(self.events(), event, settings)
            if folded.outcome is Outcome.APPLIED:
                other = PackedSeq.of(self.user_id, self.version, folded.seq)
                self.ts, self.sizes, self.wire = other.ts, other.sizes, other.wire
            return folded.outcome
        # The common case, an event newer than all kept: it goes last and nothing can be a
        # duplicate, stale or late; then the same trim as fold_event (age, then count).
        cfg = settings.streams
        wire = _wire_event(event.ts, event.item_id, event.action, event.surface)
        ts.append(event.ts)
        self.sizes.append(len(wire))
        self.wire += wire
        drop = len(ts) - cfg.max_sequence_len
        cutoff = event.ts - cfg.max_age_ms
        if ts[0] < cutoff:
            drop = max(drop, bisect_left(ts, cutoff))
        if drop > 0:
            self.wire = self.wire[sum(self.sizes[:drop]) :]
            del ts[:drop], self.sizes[:drop]
        return Outcome.APPLIED

    def update(self, *, last_event_ts: int, emitted_at: int) -> bytes:
        """The `user-updates` value: the bytes of packb(user_update(...)), by concatenation."""
        return b"".join((
            _UPDATE_USER_ID, _pack(self.user_id), _UPDATE_VERSION, _pack(self.version),
            _UPDATE_EVENTS, _array_header(len(self.ts)), self.wire,
            _UPDATE_LAST_EVENT_TS, _pack(last_event_ts), _UPDATE_EMITTED_AT, _pack(emitted_at),
            _UPDATE_HIDDEN, _pack([item for _, item in self.hidden]) if self.hidden else _EMPTY_ARRAY,
        ))  # fmt: skip
