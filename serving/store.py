"""The materialised `candidates` topic: user -> the newest candidate lists, bounded in memory.

The follower (serving/follower.py) feeds it every record of the compacted topic; the gRPC
handlers read it. Three rules:

- **Newest wins, whatever the arrival order.** A record replaces the stored one only if its
  `(version, source_event_ts, generated_at)` is larger. `version` is the user-update version the
  worker copies into the record (strictly increasing per user): it orders correctly even when a
  late event, older than the user's newest, was folded in (its update's source_event_ts is
  older, yet the update is newer). Records without it (-1) fall back to the source event time.
  For the same update, the later generation (e.g. by a new model) wins. A replayed or older
  record (a worker retry, a snapshot older than the topic) never overwrites a newer one, so
  applying the whole topic again is harmless.
- **Bounded memory.** At most `max_users` users, least recently used (read or written) evicted
  first; an evicted user is served the popularity fallback until their next update. Item ids
  are interned and scores kept as float32 arrays: ~4.8 KiB per user at 3 surfaces x 100 items,
  plus ~2.0 KiB per surface once it has been served (its memoised protobuf encoding), and a
  filtered copy of a list that holds an item withdrawn since (serving/eligibility.py); measured
  by `python -m benchmarks.serving_memory`.
- **Optional snapshot.** `save()` / `load()` write the records in the topic's own wire format
  (msgpack) after a header (`SnapshotInfo`): the topic's offsets the records were read up to,
  from which a restarted server's follower goes on (a warm start: it catches up on what came
  since, not on the whole topic), and when the server was last reading the topic, which bounds
  the deletions it could have missed.

Wire format of a record (the `candidates` contract in the team brief):
    {"user_id", "model_version": str, "source_event_ts": ms, "generated_at": ms,
     "surfaces": {surface: {"items": [ids], "scores": [floats]}}}
"""

from __future__ import annotations

import logging
import math
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from recsys.files import atomic_write

log = logging.getLogger(__name__)

_MAP_STARTS = {bytes([b]) for b in (*range(0x80, 0x90), 0xDE, 0xDF)}  # a msgpack map's first byte: a header

__all__ = ["CandidateStore", "MalformedCandidates", "SnapshotInfo", "SurfaceList", "UserCandidates", "parse_candidates"]

SNAPSHOT_FORMAT = 2  # 1: the records' array alone (no header), read as before


@dataclass
class SnapshotInfo:
    """The header of a snapshot: where its records were read from, and how fresh they are."""

    topic: str | None = None  # the `candidates` topic the records were read from
    positions: dict[int, int] = field(default_factory=dict)  # partition -> next offset: read up to here
    # The last time the server was reading the topic (wall clock, ms): deletions since may be
    # missing, and compaction drops their tombstones after `kafka.tombstone_retention_ms`.
    # None: never read from a topic (only loaded from an earlier snapshot, or a topic that did
    # not exist): its age is unknown.
    fresh_at_ms: int | None = None
    # The store's bound, and whether it had evicted users (the records lack them, though the
    # positions are past them): a larger store reads the topic whole.
    max_users: int = 0
    evicted: bool = False
    # partition -> the newest record timestamp read below its position: a topic whose records
    # below the position include a newer one is not the topic read (one recreated since).
    stamps: dict[int, int] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"format": SNAPSHOT_FORMAT, "topic": self.topic, "positions": self.positions, "fresh_at_ms": self.fresh_at_ms,
                "max_users": self.max_users, "evicted": self.evicted, "stamps": self.stamps}

    @classmethod
    def from_wire(cls, value: Any) -> SnapshotInfo:
        try:
            if value["format"] != SNAPSHOT_FORMAT:
                raise MalformedCandidates(f"snapshot format {value['format']!r}, not {SNAPSHOT_FORMAT}")
            positions = {int(p): int(o) for p, o in value["positions"].items()}
            fresh = value["fresh_at_ms"]
            topic = value["topic"]
            max_users, evicted = int(value.get("max_users", 0)), bool(value.get("evicted", False))
            stamps = {int(p): int(t) for p, t in value.get("stamps", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedCandidates(f"snapshot header malformed ({exc!r})") from None
        return cls(topic if isinstance(topic, str) else None, positions, fresh if type(fresh) is int else None,
                   max_users, evicted, stamps)


class MalformedCandidates(ValueError):
    """A `candidates` record that does not follow the wire contract (skipped and counted)."""


@dataclass(frozen=True, slots=True)
class SurfaceList:
    """One surface's candidates, best first; items and scores have the same length."""

    items: tuple[str, ...]  # interned: the catalogue's ids are shared by every user's lists
    scores: array[float]  # float32, as served; a tenth of the memory of a tuple of floats
    # Forms derived from this list on first use and kept with it (the server keeps the list's
    # protobuf encoding here), so they live and die with the record, LRU eviction included.
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class UserCandidates:
    """The newest candidates of one user, as the inference worker wrote them."""

    user_id: str
    model_version: str
    source_event_ts: int  # ms, event time of the newest action folded in
    generated_at: int  # ms, when the worker produced the lists
    surfaces: Mapping[str, SurfaceList]
    version: int = -1  # the user-update version the lists were built from; -1 = not given

    @property
    def order_key(self) -> tuple[int, int, int]:
        """Larger is newer: the update version, then the source event, then the generation."""
        return (self.version, self.source_event_ts, self.generated_at)

    def to_wire(self) -> dict[str, Any]:
        """Back to the topic's msgpack map (used by snapshots and tests)."""
        return {
            "user_id": self.user_id,
            "model_version": self.model_version,
            "source_event_ts": self.source_event_ts,
            "generated_at": self.generated_at,
            "surfaces": {s: {"items": list(v.items), "scores": list(v.scores)} for s, v in self.surfaces.items()},
            **({"version": self.version} if self.version >= 0 else {}),
        }


def _int(value: Any, name: str) -> int:
    # bool is an int subclass; a True timestamp is a bug upstream, not 1 ms.
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedCandidates(f"{name} must be an int (ms), got {type(value).__name__}")
    return value


def parse_candidates(value: Any, *, max_items: int | None = None) -> UserCandidates:
    """Validate one decoded `candidates` value and turn it into a UserCandidates.

    Raises MalformedCandidates with a reason. Ids may be int or str on the wire; they are
    served as str. `max_items` truncates each surface's list (the server never serves more).
    """
    if not isinstance(value, Mapping):
        raise MalformedCandidates(f"value must be a map, got {type(value).__name__}")
    try:
        user_id, surfaces_raw = value["user_id"], value["surfaces"]
        model_version = value.get("model_version", "")
        source_event_ts = _int(value["source_event_ts"], "source_event_ts")
        generated_at = _int(value["generated_at"], "generated_at")
        version = _int(value.get("version", -1), "version")
    except KeyError as missing:
        raise MalformedCandidates(f"missing field {missing}") from None
    if isinstance(user_id, bool) or not isinstance(user_id, (str, int)) or user_id == "":
        raise MalformedCandidates("user_id must be a non-empty str or an int")
    if not isinstance(model_version, str):
        raise MalformedCandidates("model_version must be a str")
    if not isinstance(surfaces_raw, Mapping):
        raise MalformedCandidates("surfaces must be a map")
    surfaces: dict[str, SurfaceList] = {}
    for surface, lists in surfaces_raw.items():
        if not isinstance(surface, str) or not isinstance(lists, Mapping):
            raise MalformedCandidates("surfaces must map a surface name to {items, scores}")
        items, scores = lists.get("items"), lists.get("scores")
        if not isinstance(items, (list, tuple)) or not isinstance(scores, (list, tuple)):
            raise MalformedCandidates(f"surface {surface!r}: items and scores must be lists")
        if len(items) != len(scores):
            raise MalformedCandidates(f"surface {surface!r}: {len(items)} items but {len(scores)} scores")
        if max_items is not None:
            items, scores = items[:max_items], scores[:max_items]
        # The fast path (str ids, float scores: what the worker writes) is checked by type sets,
        # ~5x cheaper than per-element isinstance calls; anything else gets the slow check.
        if not {type(i) for i in items} <= {str}:
            if any(isinstance(i, bool) or not isinstance(i, (str, int)) for i in items):
                raise MalformedCandidates(f"surface {surface!r}: item ids must be str or int")
            items = [str(i) for i in items]
        if not {type(s) for s in scores} <= {float, int}:  # bool is its own type here
            raise MalformedCandidates(f"surface {surface!r}: scores must be numbers")
        try:
            packed = array("f", scores)
        except OverflowError:  # an int beyond any float
            raise MalformedCandidates(f"surface {surface!r}: a score is out of range") from None
        surfaces[surface] = SurfaceList(tuple(map(sys.intern, items)), packed)
    return UserCandidates(str(user_id), model_version, source_event_ts, generated_at, surfaces, version)


class CandidateStore:
    """user_id -> UserCandidates, LRU-bounded, newest-wins. Single-threaded (one event loop)."""

    def __init__(self, max_users: int, *, max_items: int | None = None) -> None:
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users}")
        self.max_users = max_users
        self.max_items = max_items  # per surface; longer lists are cut at ingest
        self._users: OrderedDict[str, UserCandidates] = OrderedDict()
        self.applied = 0  # records that replaced or added a user
        self.stale = 0  # records older than what was stored (ignored)
        self.malformed = 0  # records that broke the contract (ignored)
        self.evicted = 0  # users dropped by the LRU bound

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def __iter__(self) -> Iterator[UserCandidates]:
        return iter(list(self._users.values()))

    def get(self, user_id: str) -> UserCandidates | None:
        """The user's candidates, or None when unknown (or evicted). Marks the user as used."""
        record = self._users.get(user_id)
        if record is not None:
            self._users.move_to_end(user_id)
        return record

    def upsert(self, record: UserCandidates) -> bool:
        """Store record unless an equally new or newer one is there; True if stored."""
        current = self._users.get(record.user_id)
        if current is not None and current.order_key >= record.order_key:
            self.stale += 1
            return False
        self._users[record.user_id] = record
        self._users.move_to_end(record.user_id)
        self.applied += 1
        while len(self._users) > self.max_users:
            self._users.popitem(last=False)
            self.evicted += 1
        return True

    def apply(self, value: Any) -> bool:
        """Parse one decoded topic value and upsert it; malformed values are counted, not raised."""
        try:
            record = parse_candidates(value, max_items=self.max_items)
        except MalformedCandidates:
            self.malformed += 1
            return False
        return self.upsert(record)

    def delete(self, user_id: str) -> None:
        """A tombstone (null value) on the compacted topic: forget the user."""
        self._users.pop(user_id, None)

    def clear(self) -> None:
        """Forget every user (a snapshot that turned out not to belong to the topic)."""
        self._users.clear()

    def save(self, path: Path, info: SnapshotInfo | None = None) -> int:
        """Write ``info`` and every record (oldest use first) to path atomically; returns how
        many. The records are one msgpack array, packed record by record: building the whole
        list first took ~28 KB of Python objects per user (gigabytes at max_users) on the way
        out of a SIGTERM."""
        packer = msgpack.Packer(use_bin_type=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:  # a crash mid-write leaves the previous snapshot whole
            f.write(packer.pack((info or SnapshotInfo()).to_wire()))
            f.write(packer.pack_array_header(len(self._users)))
            for record in self._users.values():
                f.write(packer.pack(record.to_wire()))
        return len(self._users)

    def load(self, path: Path, max_age_ms: int | None = None) -> tuple[int, SnapshotInfo | None]:
        """Apply a snapshot written by save() (newest-wins, like topic records), record by
        record as it is read; returns (records applied, its header; None when not loaded). A
        snapshot whose records are older than ``max_age_ms`` (the topic's tombstone retention)
        is not loaded: the tombstones of users deleted since may be compacted away, and its
        records would bring those users back for good. A file that cannot be read whole raises
        MalformedCandidates, the records read before left applied (the caller decides)."""
        if not path.exists():
            return 0, None
        with path.open("rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
            try:
                if f.read(1)[:1] in _MAP_STARTS:
                    f.seek(0)
                    info = SnapshotInfo.from_wire(unpacker.unpack())
                    fresh_ms = info.fresh_at_ms
                else:  # format 1, the records alone: as fresh as the file's time
                    f.seek(0)
                    info, fresh_ms = SnapshotInfo(), int(path.stat().st_mtime * 1000)
                age_ms = math.inf if fresh_ms is None else time.time() * 1000 - fresh_ms
                if max_age_ms is not None and age_ms > max_age_ms:
                    log.warning("snapshot %s was last fresh %.1f h ago, longer than the topic keeps deletions (%.1f h): "
                                "not loaded, the topic is read whole", path, age_ms / 3.6e6, max_age_ms / 3.6e6)
                    return 0, None
                n = unpacker.read_array_header()
                return sum(self.apply(unpacker.unpack()) for _ in range(n)), info
            except (ValueError, msgpack.UnpackException) as exc:  # OutOfData, ExtraData, FormatError are ValueErrors
                raise MalformedCandidates(f"snapshot {path} cannot be read ({type(exc).__name__}: {exc})") from exc
